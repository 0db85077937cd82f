"""The ``rpicluster`` command: a thin click layer.

Each command parses its options, calls one library function, and prints the result. No SSH, Dask or
Zarr logic lives here. Library errors (:class:`~rpicluster.errors.RPiClusterError`) are printed as
one clear line and exit with status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import shlex
import sys

import click

from rpicluster import __version__, config
from rpicluster.errors import RPiClusterError


class _Group(click.Group):
    """A click group that turns rpicluster errors, warnings and Ctrl-C into one-line messages."""

    def invoke(self, ctx):
        import warnings

        from rpicluster.errors import RPiClusterWarning

        def show(message, category, *args, **kwargs):
            if issubclass(category, RPiClusterWarning):
                click.echo(f"warning: {message}", err=True)
            else:
                default(message, category, *args, **kwargs)

        with warnings.catch_warnings():
            default = warnings.showwarning
            warnings.showwarning = show
            try:
                return super().invoke(ctx)
            except RPiClusterError as exc:
                click.echo(f"error: {exc}", err=True)
                sys.exit(1)
            except KeyboardInterrupt:
                click.echo("interrupted (Ctrl-C); nothing half-written was left under a final "
                           "name", err=True)
                sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rpicluster")
def main() -> None:
    """Train Inc-kSGD classifiers on a Dask cluster of Raspberry Pis and spare x86 boxes."""


@main.group(cls=_Group)
def bench() -> None:
    """Benchmarks: algorithm comparison and cluster scaling."""


@bench.command("algorithms")
@click.option("--sizes", default=",".join(("200k", "100k")), show_default=True,
              help="Comma-separated presets: quick, 200k (200k x 512, 200 classes), "
                   "100k (100k x 2048, 1000 classes), 1m (1M x 2048, 1000 classes).")
@click.option("--quick", is_flag=True, help="Smoke run: the tiny 'quick' preset only.")
@click.option("--data", metavar="NAME,...",
              help="Real data sets instead of --sizes: digits, fashion-mnist "
                   "(apt-get install dataset-fashion-mnist).")
@click.option("--algorithms", "algos", metavar="A,B,...",
              help="Subset of rows: inc-ksgd, inc-ksgd-sklearn, ksgd, ksgd-sklearn, "
                   "minibatch-sgd, sgd, liblinear, logreg, dask-ml (default: all).")
@click.option("--time-cap", type=click.FloatRange(min=0, min_open=True),
              default=config.BENCH_TIME_CAP_S, show_default=True,
              help="Seconds after which a row is stopped and reported as not finished.")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True,
              help="SGD epochs for every row.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data and models.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False),
              default=str(config.BENCH_OUT / "algorithms"), show_default=True,
              help="Folder for algorithms.md and algorithms.json.")
def bench_algorithms(sizes, quick, data, algos, time_cap, epochs, seed, out_dir) -> None:
    """Inc-kSGD against SGDClassifier, LIBLINEAR, LogisticRegression and dask-ml (Table 1)."""
    from rpicluster.bench.algorithms import ALGORITHMS, REAL_DATA, run_algorithms, to_markdown
    from rpicluster.errors import ConfigError
    from rpicluster.progress import Progress

    names = ["quick"] if quick else [s.strip() for s in sizes.split(",") if s.strip()]
    if data:
        names = [d.strip() for d in data.split(",") if d.strip()]
        bad = [d for d in names if d not in REAL_DATA]
        if bad:
            raise ConfigError(f"unknown data set {bad[0]!r} for --data (known: "
                              f"{', '.join(REAL_DATA)})")
    chosen = [a.strip() for a in algos.split(",")] if algos else list(ALGORITHMS)
    with Progress("bench algorithms", total=len(names) * len(chosen), unit="rows",
                  interval=0) as progress:
        doc = run_algorithms(names, algorithms=chosen, out_dir=out_dir, time_cap=time_cap,
                             epochs=epochs, seed=seed, progress=progress)
    click.echo(to_markdown(doc))
    click.echo(f"wrote {out_dir}/algorithms.md and algorithms.json")


def echo_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    """Print a table: rich on a terminal, plain aligned lines otherwise; never truncated.

    Host names and key fingerprints are compared by eye, so a narrow terminal folds a long cell
    onto more lines rather than cutting it, and piped output has no width limit at all.
    """
    cells = [["" if v is None else str(v) for v in r] for r in rows]
    if not sys.stdout.isatty():
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        click.echo(title)
        for r in [columns, *cells]:
            click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in cells:
        table.add_row(*r)
    Console().print(table)




class _LocalWorkers(click.ParamType):
    """``--local [N]``: the embedded local cluster, with N workers when N is given."""

    name = "N"

    def convert(self, value, param, ctx):
        if value is True:  # the bare flag
            return True
        try:
            n = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of workers", param, ctx)
        if n < 1:
            self.fail(f"needs at least 1 worker, got {n}", param, ctx)
        return n


def _local_option(help_text: str):
    # flag_value=True: a bare --local means "the local cluster, whatever its size".
    return click.option("--local", "local", type=_LocalWorkers(), is_flag=False,
                        flag_value=True, default=None, metavar="[N]", help=help_text)


_LOCAL_HELP = ("The embedded local cluster (with N workers: a running one of another size is "
               "refused; started for this command if none runs).")
_inventory_option = click.option("-c", "--inventory", type=click.Path(dir_okay=False),
                                 metavar="TOML", help="The SSH cluster `up` started from this "
                                 "inventory (rpicluster init writes one).")


def cluster_options(f):
    """--scheduler / -c / --local: which cluster a command runs on (rpicluster.deploy.resolve)."""
    f = _local_option(_LOCAL_HELP)(f)
    f = _inventory_option(f)
    f = click.option("--scheduler", metavar="ADDR",
                     help="Scheduler address, e.g. tls://192.168.1.10:8786.")(f)
    return f


def _announce(ref) -> None:
    """Say which cluster a command acts on (stderr, beside the progress lines)."""
    click.echo(f"cluster: {ref.describe()}", err=True)


def _cluster(scheduler, inventory, local):
    from rpicluster.train.api import ClusterChoice

    return ClusterChoice(scheduler=scheduler, inventory=inventory, local=local,
                         announce=_announce)


@main.command()
@click.option("--scheduler", metavar="ADDR",
              help="Scheduler address (tcp://host:8786); default: the cluster `up` recorded.")
@_inventory_option
@_local_option("The embedded local cluster (`up --local`).")
def dashboard(scheduler, inventory, local) -> None:
    """Print the URLs of the Dask dashboard and its rpicluster training page."""
    from rpicluster.dashboard.links import dashboard_links

    for line in dashboard_links(scheduler, inventory=inventory, local=local,
                                announce=_announce).lines():
        click.echo(line)


@main.command("train")
@click.argument("data")
@click.option("-o", "--output", "model_path", required=True, type=click.Path(dir_okay=False),
              help="Model file to write (skops format).")
@click.option("--clusters", "n_clusters", type=click.IntRange(min=1), help="k-means clusters per block (k).")
@click.option("--epochs", "max_iter", type=click.IntRange(min=1), help="SGD epochs per local model.")
@click.option("--eta", "eta0", type=click.FloatRange(min=0, min_open=True), help="Initial learning rate.")
@click.option("--alpha", type=click.FloatRange(min=0), help="L2 regularisation strength.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Minibatch rows (our kernel).")
@click.option("--solver", type=click.Choice(["minibatch", "sklearn"]),
              help="minibatch: our vectorised kernel; sklearn: one SGDClassifier per cluster.")
@click.option("--seed", "random_state", type=int, help="Random seed (same seed, same model).")
@click.option("--vote", type=click.Choice(["majority", "soft"]),
              help="How block models combine: majority vote (default; ties broken by summed "
                   "decision scores) or soft (mean decision scores).")
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="Where block models are committed (default MODEL.run).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True),
              help="Continue a killed run from its run directory.")
@click.option("--test", metavar="DATA", help="A store to report accuracy on after training.")
@click.option("--allow-skewed", is_flag=True,
              help="Train on a --no-shuffle store whose blocks hold few classes (refused "
                   "otherwise: its block models would vote on classes they never saw).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing model file (and start its run directory afresh).")
@click.option("--model", "kind", type=click.Choice(["inc-ksgd", "mlp", "sgd"]),
              default="inc-ksgd", show_default=True,
              help="inc-ksgd: block ensembles; mlp (MLPClassifier) / sgd (SGDClassifier): one "
                   "model trained by averaging the workers' partial_fit runs every round.")
@click.option("--hidden", metavar="N,N,...", help="mlp: hidden layer sizes (default 100).")
@click.option("--rounds", type=click.IntRange(min=1), default=10, show_default=True,
              help="mlp/sgd: averaging rounds.")
@click.option("--local-epochs", type=click.IntRange(min=1), default=1, show_default=True,
              help="mlp/sgd: passes over its blocks each worker makes per round.")
@click.option("--sync", type=click.Choice(["round", "epoch", "batch"]), default="round",
              show_default=True, help="mlp/sgd: average once per round, after every local "
              "epoch, or after every minibatch (parameter-server pattern).")
@cluster_options
def train_cmd(data, model_path, run_dir, resume_dir, test, overwrite, allow_skewed, scheduler,
              inventory, local, kind, hidden, rounds, local_epochs, sync, **params):
    """Train a model on a Zarr store DATA (made by `rpicluster ingest`)."""
    import warnings

    from rpicluster.errors import RPiClusterWarning, TrainingStopped
    from rpicluster.train.api import train_model

    params = {k: v for k, v in params.items() if v is not None}
    if resume_dir and run_dir and resume_dir != run_dir:
        raise click.UsageError("give --resume RUN_DIR or --run-dir, not both")
    if kind != "inc-ksgd":
        _quiet_dask_logs()
        try:
            return _train_averaged(data, model_path, resume_dir or run_dir,
                                   resume_dir is not None, overwrite, test,
                                   _cluster(scheduler, inventory, local), kind, hidden, rounds,
                                   local_epochs, sync, params)
        except TrainingStopped as exc:
            _exit_stopped(exc, ["train", data, "-o", model_path],
                          (("--model", kind), ("--rounds", rounds),
                           ("--local-epochs", local_epochs), ("--sync", sync),
                           ("--scheduler", scheduler), ("-c", inventory), ("--local", local),
                           ("--test", test), ("--overwrite", overwrite)))
    if hidden is not None:
        raise click.UsageError("--hidden is for --model mlp")
    _quiet_dask_logs()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            try:
                summary = train_model(data, model_path, params,
                                      cluster=_cluster(scheduler, inventory, local),
                                      run_dir=resume_dir or run_dir,
                                      resume=resume_dir is not None, overwrite=overwrite,
                                      test=test, allow_skewed=allow_skewed)
            finally:
                for w in caught:
                    if issubclass(w.category, RPiClusterWarning):
                        click.echo(f"warning: {w.message}", err=True)
    except TrainingStopped as exc:
        _exit_stopped(exc, ["train", data, "-o", model_path],
                      (("--scheduler", scheduler), ("-c", inventory), ("--local", local),
                       ("--test", test), ("--overwrite", overwrite)))
    r = summary.result
    click.echo(f"trained {len(r.trained_blocks)} blocks"
               + (f" (+{len(r.resumed_blocks)} resumed)" if r.resumed_blocks else "")
               + f" on {summary.n_workers} workers in {r.seconds:.1f} s")
    rates = r.rows_per_second()
    echo_table("tasks per worker", ["worker", "tasks", "rows", "busy s", "rows/s"],
               [[w, n, r.rows_per_worker[w], f"{r.busy_seconds_per_worker[w]:.1f}",
                 f"{rates.get(w, 0):,.0f}"] for w, n in sorted(r.tasks_per_worker.items())])
    if summary.test_accuracy is not None:
        click.echo(f"test accuracy: {summary.test_accuracy:.4f}")
    click.echo(f"model: {summary.model_path} (sha256 {summary.sha256[:16]}...)")


def _exit_stopped(exc, command: list[str], options) -> None:
    """Print a stopped run's one line with the exact command that resumes it, and exit.

    ``command`` is the command's name and arguments; ``options`` the ``(flag, value)`` pairs
    to repeat (a True value is a bare flag; None and False are left out).
    """
    again = _command_line([*command, "--resume", exc.run_dir], options)
    click.echo(f"error: {exc}; continue with: {again}", err=True)
    sys.exit(130 if exc.interrupted else 1)


def _command_line(command: list, options) -> str:
    """``rpicluster COMMAND...`` with the ``(flag, value)`` options that are set, quoted for a
    shell (a True value is a bare flag; None and False are left out)."""
    words = ["rpicluster", *map(str, command)]
    for flag, value in options:
        if value is True:
            words.append(flag)
        elif value is not None and value is not False:
            words += [flag, str(value)]
    return shlex.join(words)


def _exit_interrupted(command: list[str], options, stores: list[str]) -> None:
    """Ctrl-C during a store writer (ingest, features): one line saying what each store holds
    (an incomplete one is refused by readers) and the exact command that resumes, then exit."""
    from rpicluster.data.store import written_blocks

    said, resumable = [], False
    for url in stores:
        state = written_blocks(url)
        if state is None:
            continue
        done, total, complete = state
        if complete:
            said.append(f"{url} is complete")
        else:
            said.append(f"{url} holds {done} of {total} blocks and is marked incomplete")
            resumable = True
    if not resumable:
        click.echo("interrupted (Ctrl-C) before any store was started; nothing was written",
                   err=True)
        sys.exit(130)
    click.echo(f"interrupted (Ctrl-C): {'; '.join(said)}; continue with: "
               f"{_command_line(command, [*options, ('--resume', True)])}", err=True)
    sys.exit(130)


def _quiet_dask_logs() -> None:
    """A run that stops (Ctrl-C, lost scheduler) makes Dask's client log its own reconnect
    attempts and callback tracebacks while it cleans up; the one line of
    :func:`_exit_stopped` says it all."""
    import logging

    import distributed  # noqa: F401 - configures its loggers on import; ours must come after

    for name in ("distributed.client", "distributed.batched", "tornado.application", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def averaged_params(kind: str, hidden: str | None, params: dict) -> dict:
    """Map the shared train flags onto MLPClassifier / SGDClassifier parameters."""
    from rpicluster.train.averaging import parse_hidden

    for flag, key in (("--clusters", "n_clusters"), ("--epochs", "max_iter"),
                      ("--solver", "solver")):
        if key in params:
            raise click.UsageError(f"{flag} is for --model inc-ksgd (with {kind}: "
                                   "--rounds and --local-epochs)")
    if hidden is not None and kind != "mlp":
        raise click.UsageError("--hidden is for --model mlp")
    out = {"random_state": params.get("random_state"), "alpha": params.get("alpha")}
    if kind == "mlp":
        out["learning_rate_init"] = params.get("eta0")
        out["batch_size"] = params.get("batch_size")
        out["hidden_layer_sizes"] = parse_hidden(hidden) if hidden is not None else None
    else:
        if "batch_size" in params:
            raise click.UsageError("--batch-size is for --model inc-ksgd or mlp")
        if "eta0" in params:
            out.update(eta0=params["eta0"], learning_rate="constant")
    return {k: v for k, v in out.items() if v is not None}


def _train_averaged(data, model_path, run_dir, resume, overwrite, test, cluster, kind, hidden,
                    rounds, local_epochs, sync, params) -> None:
    from rpicluster.train.averaging import train_averaged_model

    summary = train_averaged_model(data, model_path, model=kind,
                                   params=averaged_params(kind, hidden, params), rounds=rounds,
                                   local_epochs=local_epochs, sync=sync, cluster=cluster,
                                   run_dir=run_dir, resume=resume, overwrite=overwrite,
                                   test=test)
    r = summary.result
    click.echo(f"trained {len(r.rounds) - r.resumed_rounds} rounds"
               + (f" (+{r.resumed_rounds} resumed)" if r.resumed_rounds else "")
               + f" of {kind} (sync {sync}) on {summary.n_workers} workers in {r.seconds:.1f} s")
    echo_table("rounds", ["round", "seconds", "syncs", "MB moved", "loss", "accuracy"],
               [[x["round"], f"{x['seconds']:.1f}", x["steps"],
                 f"{(x['bytes_down'] + x['bytes_up']) / 1e6:.1f}",
                 "" if x["loss"] is None else f"{x['loss']:.4f}",
                 "" if x["accuracy"] is None else f"{x['accuracy']:.4f}"]
                for x in r.rounds[r.resumed_rounds:]])
    if summary.test_accuracy is not None:
        click.echo(f"test accuracy: {summary.test_accuracy:.4f}")
    click.echo(f"model: {summary.model_path} (sha256 {summary.sha256[:16]}...)")


@main.command("federate")
@click.option("-c", "--inventory", required=True, type=click.Path(dir_okay=False, exists=True),
              metavar="TOML", help="The cluster inventory (workers may give their own data).")
@click.option("-o", "--output", "model_path", required=True, type=click.Path(dir_okay=False),
              help="Model file to write (skops format).")
@click.option("--model", "kind", type=click.Choice(["mlp", "sgd"]), default="mlp",
              show_default=True)
@click.option("--data", metavar="PATH", help="The store's path on every host (default: each "
              "worker's data = ... in the inventory).")
@click.option("--hidden", metavar="N,N,...", help="mlp: hidden layer sizes (default 100).")
@click.option("--rounds", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--local-epochs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Passes over its store each host makes per round.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=1.0,
              show_default=True, help="Fraction of the connected hosts sampled each round.")
@click.option("--min-clients", type=click.IntRange(min=1), default=1, show_default=True,
              help="Hosts a round needs; it waits --round-timeout (or a minute) for them.")
@click.option("--round-timeout", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="Seconds a host has to return its update (late hosts sit the round out).")
@click.option("--validation", metavar="DATA", help="A store on this machine scored every round.")
@click.option("--eta", "eta0", type=click.FloatRange(min=0, min_open=True),
              help="Learning rate.")
@click.option("--alpha", type=click.FloatRange(min=0), help="L2 regularisation strength.")
@click.option("--batch-size", type=click.IntRange(min=1), help="mlp: minibatch rows.")
@click.option("--seed", "random_state", type=int, help="Random seed (same seed, same model).")
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="Where rounds are checkpointed (default MODEL.run).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True),
              help="Continue a killed run from its run directory.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing model file (and start its run directory afresh).")
def federate_cmd(inventory, model_path, kind, data, hidden, rounds, local_epochs, fraction,
                 min_clients, round_timeout, validation, run_dir, resume_dir, overwrite,
                 **params):
    """Federated averaging: each host trains on its own store, only weights travel."""
    from rpicluster.errors import TrainingStopped
    from rpicluster.train.federated import federate

    params = {k: v for k, v in params.items() if v is not None}
    if resume_dir and run_dir and resume_dir != run_dir:
        raise click.UsageError("give --resume RUN_DIR or --run-dir, not both")

    def show(report):
        left = "; ".join(f"{h}: {why}" for h, why in report["left_out"].items())
        acc = "" if report["accuracy"] is None else f" accuracy {report['accuracy']:.4f}"
        click.echo(f"round {report['round']}: {len(report['participants'])} hosts, "
                   f"{report['rows']} rows, {(report['bytes_down'] + report['bytes_up']) / 1e6:.2f}"
                   f" MB moved, {report['seconds']:.1f} s{acc}" + (f" (left out: {left})"
                                                                  if left else ""))

    _quiet_dask_logs()
    try:
        result, digest = federate(inventory, model_path, model=kind,
                                  params=averaged_params(kind, hidden, params), data=data,
                                  rounds=rounds, local_epochs=local_epochs, fraction=fraction,
                                  min_clients=min_clients, round_timeout=round_timeout,
                                  validation=validation, run_dir=resume_dir or run_dir,
                                  resume=resume_dir is not None, overwrite=overwrite,
                                  show_progress=False, on_round=show)
    except TrainingStopped as exc:
        _exit_stopped(exc, ["federate", "-c", inventory, "-o", model_path],
                      (("--model", kind), ("--data", data), ("--rounds", rounds),
                       ("--local-epochs", local_epochs), ("--fraction", fraction),
                       ("--min-clients", min_clients), ("--round-timeout", round_timeout),
                       ("--validation", validation), ("--overwrite", overwrite)))
    click.echo(f"federated {len(result.rounds) - result.resumed_rounds} rounds"
               + (f" (+{result.resumed_rounds} resumed)" if result.resumed_rounds else "")
               + f" in {result.seconds:.1f} s")
    click.echo(f"model: {model_path} (sha256 {digest[:16]}...)")


@main.command("score")
@click.argument("model_path", type=click.Path(dir_okay=False, exists=True))
@click.argument("data")
@cluster_options
def score_cmd(model_path, data, scheduler, inventory, local):
    """Print the accuracy of MODEL on the labelled store DATA."""
    from rpicluster.train.api import score_model

    from rpicluster import open_dataset

    acc = score_model(model_path, data, cluster=_cluster(scheduler, inventory, local))
    ds = open_dataset(data)
    split = ds.attrs.get("split") or {}
    what = {"test": "held-out rows", "train": "TRAINING rows (not a held-out estimate)"}.get(
        split.get("part"), "rows")
    click.echo(f"accuracy: {acc:.4f} on {ds.url} ({ds.n_rows} {what})")


@main.command("predict")
@click.argument("model_path", type=click.Path(dir_okay=False, exists=True))
@click.argument("data")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the labels (.npy, .csv or .txt).")
@cluster_options
def predict_cmd(model_path, data, out, scheduler, inventory, local):
    """Predict a label for every row of the store DATA with MODEL."""
    from rpicluster.train.api import predict_to_file

    n = predict_to_file(model_path, data, out, cluster=_cluster(scheduler, inventory, local))
    click.echo(f"wrote {n} labels to {out}")


@main.command("features")
@click.argument("images", metavar="IMAGES.zarr")
@click.option("-o", "--output", "out", required=True, metavar="FEATURES.zarr",
              help="Feature store to write (a path or URL every worker can write).")
@click.option("--model", default="efficientnet-lite0", show_default=True,
              metavar="efficientnet-lite0|FILE.onnx", help="Frozen network to run.")
@click.option("--input-size", type=click.IntRange(min=8), metavar="N",
              help="Network input side in pixels (default 224, or the model's fixed size).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per ONNX Runtime call on a worker (bounds its memory).")
@click.option("--threads", type=click.IntRange(min=1), metavar="T",
              help="ONNX Runtime threads per worker (default: the worker's threads).")
@click.option("--block-rows", type=click.IntRange(min=1), metavar="N",
              help="Rows per feature block: a multiple of the image store's (its own by default).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run into FEATURES.zarr.")
@click.option("--overwrite", is_flag=True, help="Replace an existing FEATURES.zarr.")
@cluster_options
def features_cmd(images, out, model, input_size, batch_size, threads, block_rows, resume,
                 overwrite, scheduler, inventory, local):
    """Extract frozen-network features of the image store IMAGES.zarr on the cluster."""
    from rpicluster.features.job import extract_features
    from rpicluster.progress import Progress

    _quiet_dask_logs()
    try:
        with Progress("features", unit="blocks") as progress:
            r = extract_features(images, out, model=model, input_size=input_size,
                                 batch_size=batch_size, threads=threads, block_rows=block_rows,
                                 resume=resume, overwrite=overwrite,
                                 cluster=_cluster(scheduler, inventory, local),
                                 progress=progress)
    except KeyboardInterrupt:
        _exit_interrupted(["features", images, "-o", out],
                          (("--model", model), ("--input-size", input_size),
                           ("--batch-size", batch_size), ("--threads", threads),
                           ("--block-rows", block_rows), ("--scheduler", scheduler),
                           ("-c", inventory), ("--local", local)), [out])
    ds = r.store
    click.echo(f"extracted {len(r.extracted_blocks)} blocks"
               + (f" (+{len(r.resumed_blocks)} resumed)" if r.resumed_blocks else "")
               + f" in {r.seconds:.1f} s: {ds.n_rows} images -> {ds.n_features} features "
               f"({r.model} at {r.input_size} px, sha256 {r.sha256[:12]})")
    rates = r.images_per_second()
    echo_table("images per worker", ["worker", "images", "busy s", "images/s"],
               [[w, n, f"{r.busy_seconds_per_worker[w]:.1f}", f"{rates.get(w, 0):,.1f}"]
                for w, n in sorted(r.images_per_worker.items())])
    click.echo(f"features: {ds.url}")


@main.command()
@click.argument("source")
@click.argument("out", metavar="OUT.zarr", type=click.Path())
@click.option("--block-rows", type=click.IntRange(min=1), default=config.BLOCK_ROWS,
              show_default=True, metavar="N", help="Rows per training block (one Zarr chunk row).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False),
              help="Labels .npy for a .npy features file.")
@click.option("--label-column", metavar="NAME",
              help="CSV label column (default: label, y or target, else the last column).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the row shuffle and of the test split.")
@click.option("--no-shuffle", is_flag=True,
              help="Keep the source's row order (blocks of sorted data hold few classes).")
@click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              metavar="F", help="Hold out this fraction of each class (stratified) ...")
@click.option("--test-out", metavar="TEST.zarr", type=click.Path(),
              help="... into this store (same classes list as OUT.zarr).")
@click.option("--image-size", type=click.IntRange(min=1), metavar="PX",
              help="images:DIR: side of the square uint8 images stored (default 64).")
@click.option("--image-mode", type=click.Choice(["RGB", "L"]),
              help="images:DIR: colour (RGB, default) or grayscale (L).")
@click.option("--bad-images", type=click.Choice(["skip", "error"]),
              help="images:DIR: skip unreadable files with a warning (default) or refuse.")
@click.option("--resume", is_flag=True, help="Continue an interrupted ingest of the same source.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at OUT.zarr.")
def ingest(source, out, block_rows, labels, label_column, seed, no_shuffle, test_fraction,
           test_out, image_size, image_mode, bad_images, resume, overwrite) -> None:
    """Write SOURCE into the Zarr store OUT.zarr, block by block, rows shuffled.

    SOURCE is a file (data.npz with X and y; features.npy with --labels; data.csv; svmlight
    .svm/.svmlight/.libsvm), sklearn:digits (iris, wine, breast_cancer), idx:IMAGES,LABELS
    (MNIST-format files), fashion-mnist[:train|:test] (apt-get install dataset-fashion-mnist),
    images:DIR (one subfolder per class; stored as uint8), or
    synthetic:rows=..,features=..,classes=..,seed=..
    """
    import time
    import warnings

    from rpicluster.data.store import class_spread_text, ingest as ingest_store, open_dataset
    from rpicluster.progress import Progress

    if (test_fraction is None) != (test_out is None):
        raise click.UsageError("--test-fraction and --test-out go together")
    options = {k: v for k, v in (("image_size", image_size), ("image_mode", image_mode),
                                 ("bad_images", bad_images)) if v is not None}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            ds = ingest_store(source, out, block_rows=block_rows, labels=labels,
                              label_column=label_column, shuffle=not no_shuffle, seed=seed,
                              test_fraction=test_fraction, test_out=test_out,
                              source_options=options, resume=resume, overwrite=overwrite,
                              progress=Progress("ingest", unit="blocks"))
        except KeyboardInterrupt:
            _exit_interrupted(["ingest", source, out],
                              (("--block-rows", block_rows), ("--labels", labels),
                               ("--label-column", label_column), ("--seed", seed),
                               ("--no-shuffle", no_shuffle), ("--test-fraction", test_fraction),
                               ("--test-out", test_out), ("--image-size", image_size),
                               ("--image-mode", image_mode), ("--bad-images", bad_images)),
                              [out] + ([test_out] if test_out else []))
        finally:
            for w in caught:
                click.echo(f"warning: {w.message}", err=True)
    seconds = f", {time.perf_counter() - t0:.1f} s"
    for what, store in [("ingested", ds)] + ([("held out", open_dataset(test_out))]
                                             if test_out else []):
        click.echo(f"{what} {store.url}: {store.n_rows} rows, {store.n_features} features, "
                   f"{len(store.classes)} classes, {store.n_blocks} blocks, {store.nbytes} bytes"
                   f"{seconds}")
        seconds = ""
        spread = class_spread_text(store)
        if spread:
            click.echo(f"  {spread}")


@main.command()
@click.argument("store", metavar="DATA.zarr", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default=config.SERVE_HOST, show_default=True,
              help="Address to bind (default: this machine only; 0.0.0.0: every interface, "
                   "so the Pis can read).")
@click.option("--port", type=click.IntRange(0, 65535), default=config.SERVE_PORT,
              show_default=True, help="Port (0 picks a free one).")
def serve(store, host, port) -> None:
    """Serve DATA.zarr read-only over HTTP; workers open http://THIS-HOST:PORT."""
    from rpicluster.data.serve import serve as serve_store

    local = host in ("127.0.0.1", "localhost", "::1")
    serve_store(store, host, port, on_ready=lambda url: click.echo(
        f"serving {store} read-only at {url} (Ctrl-C stops)"
        + ("; only this machine can read it: --host 0.0.0.0 serves the LAN" if local else "")))


# --- cluster bring-up: init / doctor / up / status / logs / down (rpicluster.deploy) ---

_accept_option = click.option("--accept-new-hosts", is_flag=True,
                              help="Trust and record unknown host keys (changed keys are refused).")


@main.command()
@click.argument("path", default="cluster.toml", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path, force) -> None:
    """Write a commented example inventory to PATH (default cluster.toml)."""
    from rpicluster.inventory import write_example

    click.echo(f"wrote {write_example(path, overwrite=force)}: edit hosts, user and key, "
               "then run rpicluster doctor -c " + path)


@main.command()
@click.option("-c", "--inventory", required=True, type=click.Path(dir_okay=False),
              metavar="TOML", help="The cluster inventory (rpicluster init).")
@_accept_option
def doctor(inventory, accept_new_hosts) -> None:
    """Check every host: SSH, platform, versions against this machine, memory, disk, health."""
    from rpicluster.deploy.doctor import doctor as run_doctor, table_rows

    checks = run_doctor(inventory, accept_new_hosts=accept_new_hosts)
    echo_table("rpicluster doctor", *table_rows(checks))
    if not all(c.ok for c in checks):
        sys.exit(1)


def _echo_report(title, report) -> None:
    echo_table(title, ["host", "role", "state", "pid", "detail"],
               [[r.host, r.role, r.state, r.pid, r.detail] for r in report.rows])


@main.command()
@_inventory_option
@_local_option("Start the embedded local cluster (N workers; default one per core) instead; "
               "a running one of another size is refused.")
@click.option("--threads-per-worker", type=click.IntRange(min=1), help="With --local.")
@click.option("--memory-limit", help="With --local: per-worker limit, e.g. 4GiB (default auto).")
@click.option("--dashboard-address", metavar="HOST:PORT",
              help="With --local: where the dashboard listens (default 127.0.0.1:8787, this "
                   "machine only; :8787 opens it to the network).")
@_accept_option
@click.option("--insecure", is_flag=True, help="Plain TCP instead of TLS (not recommended).")
@click.option("--provision", is_flag=True,
              help="First install this machine's exact packages on every host (no internet needed).")
def up(inventory, local, threads_per_worker, memory_limit, dashboard_address, accept_new_hosts,
       insecure, provision) -> None:
    """Start the cluster of an inventory (only what is missing), or the embedded local one."""
    if inventory is not None and local is not None:
        raise click.UsageError("give -c/--inventory or --local, not both")
    if inventory is not None and dashboard_address is not None:
        raise click.UsageError("--dashboard-address is for --local; an inventory's dashboard "
                               "listens on its scheduler host, at dashboard_port")
    if inventory is None:
        from rpicluster.deploy.local import start_local

        info = start_local(None if local is True else local,
                           threads_per_worker=threads_per_worker, memory_limit=memory_limit,
                           dashboard_address=dashboard_address)
        click.echo(f"local cluster{' already running' if info['already_running'] else ''}: "
                   f"{info['scheduler_address']} ({info.get('n_workers', '?')} workers) "
                   f"dashboard {info['dashboard_link']}")
        return
    import warnings

    from rpicluster.deploy.cluster import up as cluster_up
    from rpicluster.errors import HostsFailedError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            report = cluster_up(inventory, accept_new_hosts=accept_new_hosts, insecure=insecure,
                                provision=provision)
        except HostsFailedError as exc:
            _echo_report("rpicluster up", exc.report)
            raise
        finally:
            for w in caught:
                click.echo(f"warning: {w.message}", err=True)
    _echo_report("rpicluster up", report)
    click.echo(f"scheduler {report.address}, dashboard {report.dashboard}")


_ACT_LOCAL = "The embedded local cluster (`up --local`)."


def _target(inventory, local):
    """The recorded cluster ``status``/``down``/``logs`` act on, announced on stderr."""
    from rpicluster.deploy.resolve import find_cluster

    ref = find_cluster(inventory=inventory, local=local)
    _announce(ref)
    return ref


@main.command()
@_inventory_option
@_local_option(_ACT_LOCAL)
def status(inventory, local) -> None:
    """Show scheduler and every inventory worker: state, threads, memory, tasks, temperature.

    A worker that is not running says why: never connected, up failed (the reason), rejoining
    (restarting by itself after its scheduler went away) or lost (run `rpicluster up`).

    Without -c or --local: the SSH cluster `up` last recorded, else the local cluster.
    """
    ref = _target(inventory, local)
    if ref.kind == "local":
        from rpicluster.deploy.state import local_record

        info = local_record() or {}
        click.echo(f"local cluster: {ref.address}, {info.get('n_workers', '?')} workers, "
                   f"dashboard {info.get('dashboard_link')}")
        return
    from rpicluster.deploy.cluster import status as cluster_status

    rows = cluster_status(ref.inventory)
    echo_table("rpicluster status", ["host", "role", "state", "pid", "threads", "memory", "tasks",
                                     "temp", "detail"],
               [[r.host, r.role, r.state, r.pid, r.threads, r.memory, r.tasks,
                 "n/a" if r.temperature is None else f"{r.temperature:.1f} C", r.detail]
                for r in rows])


@main.command()
@click.argument("host", required=False)
@_inventory_option
@_local_option(_ACT_LOCAL)
@click.option("-n", "--lines", type=click.IntRange(min=1), default=100, show_default=True)
def logs(host, inventory, local, lines) -> None:
    """Print the end of the log of the worker on HOST (or of the scheduler: HOST = scheduler).

    The local cluster keeps one log for its scheduler and workers: HOST is not needed there.
    """
    ref = _target(inventory, local)
    if ref.kind == "local":
        from rpicluster.deploy.local import log_tail

        click.echo(log_tail(lines), nl=False)
        return
    if host is None:
        raise click.UsageError(f"name the HOST whose log to show ({ref.describe()} has several)")
    from rpicluster.deploy.cluster import logs as cluster_logs

    click.echo(cluster_logs(host, ref.inventory, lines=lines), nl=False)


@main.command()
@_inventory_option
@_local_option(_ACT_LOCAL)
def down(inventory, local) -> None:
    """Stop exactly what up started (workers, then scheduler), verified by pid.

    Without -c or --local: the SSH cluster `up` last recorded, else the local cluster.
    """
    from rpicluster.deploy.state import local_record

    if local is not None and local_record() is None:
        click.echo("no local cluster running")
        return
    ref = _target(inventory, local)
    if ref.kind == "local":
        from rpicluster.deploy.local import stop_local

        info = stop_local()
        click.echo("no local cluster running" if info is None else
                   f"stopped the local cluster (pid {info['pid']})")
        return
    from rpicluster.deploy.cluster import down as cluster_down
    from rpicluster.errors import HostsFailedError

    try:
        report = cluster_down(ref.inventory)
    except HostsFailedError as exc:
        _echo_report("rpicluster down", exc.report)
        raise
    _echo_report("rpicluster down", report)


def _default(func, name: str):
    """The default of ``func``'s parameter ``name``: the library's, shown by --help, not repeated."""
    import inspect

    return inspect.signature(func).parameters[name].default


def _demo_default(name: str):
    from rpicluster.train.demo import run_demo  # light: the heavy imports are inside it

    return _default(run_demo, name)


@main.command("demo")
@click.option("--workdir", default=str(_demo_default("workdir")), show_default=True,
              type=click.Path(file_okay=False), help="Where the stores and the model go.")
@click.option("--rows", default=_demo_default("rows"), show_default=True,
              type=click.IntRange(min=1), help="Training rows (a multiple of --block-rows).")
@click.option("--features", default=_demo_default("features"), show_default=True,
              type=click.IntRange(min=1))
@click.option("--classes", default=_demo_default("classes"), show_default=True,
              type=click.IntRange(min=2))
@click.option("--block-rows", default=_demo_default("block_rows"), show_default=True,
              type=click.IntRange(min=1))
@click.option("--local", type=click.IntRange(min=1), metavar="N",
              help="Workers of the embedded local cluster (default: the running one, else one "
                   "per core).")
def demo_cmd(workdir, rows, features, classes, block_rows, local):
    """The main job on the embedded default: ingest, a local cluster, train, score."""
    from rpicluster.train.demo import run_demo

    def announce(ref):
        _announce(ref)
        if ref.dashboard:
            click.echo(f"watch the run at {ref.dashboard.rsplit('/', 1)[0]}/rpicluster")

    res = run_demo(workdir, rows=rows, features=features, classes=classes,
                   block_rows=block_rows, local=local, on_cluster=announce)
    s, r = res.summary, res.summary.result
    echo_table(f"Inc-kSGD on {res.rows:,} x {res.features} synthetic ImageNet-like rows, "
               f"{res.classes} classes", ["step", "result"],
               [["ingest (train + test)", f"{res.ingest_seconds:.1f} s"],
                ["train", f"{r.seconds:.1f} s on {s.n_workers} workers"],
                ["test accuracy", f"{s.test_accuracy:.4f}"],
                ["tasks per worker", ", ".join(f"{w}: {n}" for w, n in
                                               sorted(r.tasks_per_worker.items()))],
                ["model", f"{s.model_path} (sha256 {s.sha256[:12]}...)"]])
    click.echo(f"next: rpicluster score {s.model_path} {res.workdir / 'test.zarr'}")


@bench.command("scaling")
@cluster_options
@click.option("--job", type=click.Choice(["inc-ksgd", "random-forest", "mlp", "sgd"]),
              default="inc-ksgd", show_default=True,
              help="inc-ksgd: the training job; random-forest: scikit-learn "
              "RandomForestClassifier through joblib's dask backend; mlp / sgd: model "
              "averaging, --sync batch (parameter server) against --sync round (local SGD).")
@click.option("--sync", "syncs", default="batch,round", show_default=True, metavar="S,S",
              help="mlp/sgd: synchronisation modes to compare (round, epoch, batch).")
@click.option("--local-epochs", type=click.IntRange(min=1), default=2, show_default=True,
              help="mlp/sgd: local epochs per round of --sync round.")
@click.option("--hidden", metavar="N,N,...", help="mlp: hidden layer sizes (default 100).")
@click.option("--test", metavar="DATA", help="mlp/sgd: held-out store for the accuracy column.")
@click.option("--data", metavar="DATA.zarr", help="Store (path or URL every worker can read).")
@click.option("--rows", type=click.IntRange(min=1), metavar="R",
              help=f"Without --data: synthetic rows (default {config.BENCH_SCALING_ROWS:,}), "
                   "ingested into OUT/data.zarr.")
@click.option("--features", type=click.IntRange(min=1), default=256, show_default=True,
              help="With --rows.")
@click.option("--classes", type=click.IntRange(min=2), default=100, show_default=True,
              help="With --rows.")
@click.option("--block-rows", type=click.IntRange(min=1), help="With --rows (default rows/12).")
@click.option("--steps", metavar="'A; A,B; ...'",
              help="Worker sets, ';' between steps (default: one more worker per step, in "
                   "inventory order).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--simulate", metavar="WORKERS",
              help="Also predict a hypothetical cluster, e.g. '32x pi4, 2x desktop' (names are "
                   "calibrated workers or their tags).")
@click.option("--clusters", "n_clusters", type=click.IntRange(min=1),
              help="inc-ksgd: k-means clusters per block.")
@click.option("--epochs", "max_iter", type=click.IntRange(min=1),
              help="inc-ksgd: SGD epochs; mlp/sgd: the epoch budget of every run (default 4).")
@click.option("--trees", "n_estimators", type=click.IntRange(min=1),
              help="random-forest: trees (default 32).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False),
              default=str(config.BENCH_OUT / "scaling"), show_default=True,
              help="Folder for scaling.{csv,json,md,png} and step-N.html.")
def bench_scaling(scheduler, inventory, local, job, syncs, local_epochs, hidden, test, data,
                  rows, features, classes, block_rows, steps, repeats, simulate, n_clusters,
                  max_iter, n_estimators, out_dir) -> None:
    """The same job on growing worker sets: ideal (cores, capacity) against measured time."""
    from rpicluster.bench.report import to_markdown
    from rpicluster.bench.scaling import scaling_bench
    from rpicluster.progress import Progress

    if job in ("mlp", "sgd"):
        from rpicluster.bench.averaging import to_markdown as averaging_markdown

        doc = scaling_bench(
            out_dir, scheduler=scheduler, inventory=inventory, local=local, job=job, data=data,
            rows=rows, features=features, classes=classes, block_rows=block_rows, steps=steps,
            params=averaged_params(job, hidden, {}),
            averaging={"syncs": [x.strip() for x in syncs.split(",")], "test": test,
                       "epochs": max_iter or 4, "local_epochs": local_epochs},
            progress=Progress("bench scaling", unit="runs", interval=0), announce=_announce)
        click.echo(averaging_markdown(doc))
        click.echo(f"wrote {out_dir}/averaging.{{csv,json,md}}")
        return
    params = {"n_clusters": n_clusters, "max_iter": max_iter} if job == "inc-ksgd" else \
        {"n_estimators": n_estimators}
    doc = scaling_bench(out_dir, scheduler=scheduler, inventory=inventory, local=local, job=job,
                        data=data, rows=rows, features=features, classes=classes,
                        block_rows=block_rows, steps=steps, repeats=repeats, simulate=simulate,
                        params={k: v for k, v in params.items() if v is not None},
                        progress=Progress("bench scaling", unit="runs", interval=0),
                        announce=_announce)
    click.echo(to_markdown(doc))
    click.echo(f"wrote {out_dir}/scaling.{{csv,json,md,png}} and step-1..{len(doc['steps'])}.html")


@bench.command("paper")
@click.option("--rows", type=click.IntRange(min=1), default=1_009_124, show_default=True,
              help="Training rows (the paper's ImageNet: 1,009,124).")
@click.option("--features", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("--classes", type=click.IntRange(min=2), default=1000, show_default=True)
@click.option("--blocks", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--test-rows", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="Held-out rows (the generator continued past the training rows).")
@click.option("--clusters", "n_clusters", type=click.IntRange(min=1), default=20,
              show_default=True, help="k-means clusters per block.")
@click.option("--epochs", "max_iter", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--sgd-rows", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Rows SGDClassifier's one epoch is timed on (then extrapolated).")
@click.option("--local", "workers", type=click.IntRange(min=1),
              help="Workers of the embedded cluster (default: one per core).")
@click.option("--keep-data", is_flag=True, help="Keep the stores (a rerun reuses them).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False),
              default=str(config.BENCH_OUT / "paper"), show_default=True,
              help="Folder for the stores, paper.json and paper.md.")
def bench_paper(rows, features, classes, blocks, test_rows, n_clusters, max_iter, sgd_rows,
                workers, keep_data, out_dir) -> None:
    """The paper's ImageNet shape on this machine: ingest, train, accuracy, memory, vs SGD."""
    from rpicluster.bench.paper import run_paper, to_markdown

    doc = run_paper(out_dir, rows=rows, features=features, classes=classes, blocks=blocks,
                    test_rows=test_rows, n_clusters=n_clusters, max_iter=max_iter,
                    sgd_rows=sgd_rows, workers=workers, keep_data=keep_data)
    click.echo(to_markdown(doc))
    click.echo(f"wrote {out_dir}/paper.json and paper.md")


@main.group(cls=_Group)
def deploy() -> None:
    """Run the cluster under each host's service manager instead of `up`."""


@deploy.command("systemd")
@click.option("-c", "--inventory", required=True, type=click.Path(dir_okay=False),
              metavar="TOML", help="The cluster inventory (rpicluster init).")
@click.option("-o", "--out", "out_dir", default="rpicluster-units", show_default=True,
              type=click.Path(file_okay=False), help="Folder for the units, certificates and "
              "install.sh.")
@click.option("--insecure", is_flag=True, help="Plain TCP units, no certificates (as up --insecure).")
def deploy_systemd(inventory, out_dir, insecure) -> None:
    """Render a systemd unit per host (scheduler, workers) and an install script."""
    from rpicluster.deploy.systemd import write_units

    kit = write_units(inventory, out_dir, insecure=insecure)
    for unit in kit.units:
        click.echo(f"{unit.host}: {kit.out_dir / unit.host / unit.filename} ({unit.role}, "
                   f"User={unit.node.user})")
    click.echo(f"install: review {kit.install_script}, then run: sh {kit.install_script}")
    if kit.client_env is not None:
        click.echo(f"then, before rpicluster train ... --scheduler ADDR: . {kit.client_env}")


if __name__ == "__main__":  # pragma: no cover
    main()
