"""Training commands: ``train``, ``federate``, ``score``, ``predict`` and the ``demo``."""

from __future__ import annotations

import click

from rpicluster.cli._common import (announce, cluster_choice, cluster_options, echo_table,
                                    exit_stopped, quiet_dask_logs, usage_errors)
from rpicluster.cli._mlflow import mlflow_option

#: The defaults ``train --help`` shows: IncrementalKSGDClassifier's own (an unset flag leaves the
#: estimator's default, or a resumed run's value), written out so that ``--help`` does not import
#: scikit-learn; tests/test_friction_cli.py checks them against the estimator.
INC_KSGD_DEFAULTS = {"n_clusters": 10, "max_iter": 5, "eta0": 0.01, "alpha": 0.0001,
                     "batch_size": 256, "solver": "minibatch", "vote": "majority"}


def _with_default(text: str, key: str) -> str:
    return f"{text}  [default: {INC_KSGD_DEFAULTS[key]}]"


class _Tol(click.ParamType):
    """``--tol``: a number >= 0, or ``none`` (no convergence: every round runs)."""

    name = "TOL|none"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float) or value == "default":
            return value
        if str(value).lower() == "none":
            return None
        try:
            tol = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'none'", param, ctx)
        if not tol >= 0:
            self.fail(f"must be >= 0, got {value}", param, ctx)
        return tol


def stopping_options(f):
    """--tol / --n-iter-no-change / --validation-fraction: scikit-learn's stopping rule for
    round-based training."""
    f = click.option("--validation-fraction", type=click.FloatRange(0, 1, min_open=True,
                                                                     max_open=True),
                     metavar="F", help="mlp/sgd: hold out a seeded fraction F of the blocks "
                     "(of every host's store, for federate): never trained on, scored every "
                     "round for --tol (scikit-learn's early_stopping; default: off).")(f)
    f = click.option("--n-iter-no-change", type=click.IntRange(min=1),
                     help="mlp/sgd: rounds without an improvement of --tol before the run "
                     "stops (default: scikit-learn's, 10 for mlp, 5 for sgd).")(f)
    f = click.option("--tol", type=_Tol(), default="default",
                     help="mlp/sgd: the improvement of the held-out accuracy (--test/"
                     "--validation; else the training loss) that counts; 'none' runs every "
                     "round (default: scikit-learn's, 1e-4 for mlp, 1e-3 for sgd).")(f)
    return f


@click.command("train")
@mlflow_option
@click.argument("data")
@click.option("-o", "--output", "model_path", required=True, type=click.Path(dir_okay=False),
              help="Model file to write (skops format).")
@click.option("--clusters", "n_clusters", type=click.IntRange(min=1),
              help=_with_default("k-means clusters per block (k).", "n_clusters"))
@click.option("--epochs", "max_iter", type=click.IntRange(min=1),
              help=_with_default("SGD epochs per local model.", "max_iter"))
@click.option("--eta", "eta0", type=click.FloatRange(min=0, min_open=True),
              help=_with_default("Initial learning rate.", "eta0"))
@click.option("--alpha", type=click.FloatRange(min=0),
              help=_with_default("L2 regularisation strength.", "alpha"))
@click.option("--batch-size", type=click.IntRange(min=1),
              help=_with_default("Minibatch rows (our kernel).", "batch_size"))
@click.option("--solver", type=click.Choice(["minibatch", "sklearn"]),
              help=_with_default("minibatch: our vectorised kernel; sklearn: one SGDClassifier per "
                            "cluster.", "solver"))
@click.option("--seed", "random_state", type=int,
              help="Random seed (same seed, same model).  [default: none, a new model each "
                   "run]")
@click.option("--vote", type=click.Choice(["majority", "soft"]),
              help=_with_default("How block models combine: majority vote (ties broken by summed "
                            "decision scores) or soft (mean decision scores).", "vote"))
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="Where block models are committed (default MODEL.run).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True),
              help="Continue a killed run from its run directory.")
@click.option("--test", metavar="DATA", help="A store to report accuracy on after training.")
@click.option("--allow-skewed", is_flag=True,
              help="Train on a --no-shuffle store whose blocks hold few classes (refused "
                   "otherwise: its block models would vote on classes they never saw).")
@click.option("--allow-pixels", is_flag=True,
              help="Train on an image store's raw pixels (refused otherwise: run `rpicluster "
                   "features` first and train on its feature store).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing model file (and start its run directory afresh).")
@click.option("--model", "kind", type=click.Choice(["inc-ksgd", "mlp", "sgd"]),
              default="inc-ksgd", show_default=True,
              help="inc-ksgd: block ensembles; mlp (MLPClassifier) / sgd (SGDClassifier): one "
                   "model trained by averaging the workers' partial_fit runs every round.")
@click.option("--hidden", metavar="N,N,...", help="mlp: hidden layer sizes (default 100).")
@click.option("--rounds", type=click.IntRange(min=1), default=200, show_default=True,
              help="mlp/sgd: most averaging rounds (the run stops earlier once converged: "
              "--tol, --n-iter-no-change).")
@click.option("--local-epochs", type=click.IntRange(min=1), default=1, show_default=True,
              help="mlp/sgd: passes over its blocks each worker makes per round.")
@click.option("--sync", type=click.Choice(["round", "epoch", "batch"]), default="round",
              show_default=True, help="mlp/sgd: average once per round, after every local "
              "epoch, or after every minibatch (parameter-server pattern).")
@stopping_options
@cluster_options
def train_cmd(data, model_path, run_dir, resume_dir, test, overwrite, allow_skewed, allow_pixels,
              scheduler, inventory, local, kind, hidden, rounds, local_epochs, sync, tol,
              n_iter_no_change, validation_fraction, **params):
    """Train a model on a Zarr store DATA (made by `rpicluster ingest`)."""
    import warnings

    from rpicluster.errors import RPiClusterWarning, TrainingStopped
    from rpicluster.train.api import train_model

    params = {k: v for k, v in params.items() if v is not None}
    if resume_dir and run_dir and resume_dir != run_dir:
        raise click.UsageError("give --resume RUN_DIR or --run-dir, not both")
    if kind != "inc-ksgd":
        quiet_dask_logs()
        try:
            return _train_averaged(data, model_path, resume_dir or run_dir,
                                   resume_dir is not None, overwrite, test,
                                   cluster_choice(scheduler, inventory, local), kind, hidden,
                                   rounds, local_epochs, sync, params,
                                   {"tol": tol, "n_iter_no_change": n_iter_no_change,
                                    "validation_fraction": validation_fraction})
        except TrainingStopped as exc:
            exit_stopped(exc, ["train", data, "-o", model_path],
                         (("--model", kind), ("--rounds", rounds),
                          ("--local-epochs", local_epochs), ("--sync", sync),
                          ("--tol", "none" if tol is None else
                           (None if tol == "default" else tol)),
                          ("--n-iter-no-change", n_iter_no_change),
                          ("--validation-fraction", validation_fraction),
                          ("--scheduler", scheduler), ("-c", inventory), ("--local", local),
                          ("--test", test), ("--overwrite", overwrite)))
    if hidden is not None:
        raise click.UsageError("--hidden is for --model mlp")
    if tol != "default" or n_iter_no_change is not None or validation_fraction is not None:
        raise click.UsageError("--tol, --n-iter-no-change and --validation-fraction are for "
                               "--model mlp or sgd (Inc-kSGD trains each block for --epochs)")
    quiet_dask_logs()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            try:
                summary = train_model(data, model_path, params,
                                      cluster=cluster_choice(scheduler, inventory, local),
                                      run_dir=resume_dir or run_dir,
                                      resume=resume_dir is not None, overwrite=overwrite,
                                      test=test, allow_skewed=allow_skewed,
                                      allow_pixels=allow_pixels)
            finally:
                for w in caught:
                    if issubclass(w.category, RPiClusterWarning):
                        click.echo(f"warning: {w.message}", err=True)
    except TrainingStopped as exc:
        exit_stopped(exc, ["train", data, "-o", model_path],
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


def _train_averaged(data, model_path, run_dir, resume, overwrite, test, cluster, kind, hidden,
                    rounds, local_epochs, sync, params, stopping) -> None:
    from rpicluster.train.averaging import averaged_params, train_averaged_model

    with usage_errors():
        params = averaged_params(kind, hidden, params)
    summary = train_averaged_model(data, model_path, model=kind, params=params, rounds=rounds,
                                   local_epochs=local_epochs, sync=sync, cluster=cluster,
                                   run_dir=run_dir, resume=resume, overwrite=overwrite,
                                   test=test, **stopping)
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
    if r.held_out:
        click.echo(f"held out for the stopping rule (accuracy column): blocks "
                   f"{', '.join(map(str, r.held_out))} of {data} ({r.held_out_rows} of "
                   f"{r.held_out_rows + r.rounds[0]['rows'] // local_epochs} rows)")
    click.echo(f"stopped: {summary.stopped}")
    if summary.test_accuracy is not None:
        click.echo(f"test accuracy: {summary.test_accuracy:.4f}")
    click.echo(f"model: {summary.model_path} (sha256 {summary.sha256[:16]}...)")


@click.command("federate")
@mlflow_option
@click.option("-c", "--inventory", required=True, type=click.Path(dir_okay=False, exists=True),
              metavar="TOML", help="The cluster inventory (workers may give their own data).")
@click.option("-o", "--output", "model_path", required=True, type=click.Path(dir_okay=False),
              help="Model file to write (skops format).")
@click.option("--model", "kind", type=click.Choice(["mlp", "sgd"]), default="mlp",
              show_default=True)
@click.option("--data", metavar="PATH", help="The store's path on every host (default: each "
              "worker's data = ... in the inventory).")
@click.option("--hidden", metavar="N,N,...", help="mlp: hidden layer sizes (default 100).")
@click.option("--rounds", type=click.IntRange(min=1), default=200, show_default=True,
              help="Most rounds (the run stops earlier once converged: --tol, "
              "--n-iter-no-change).")
@click.option("--local-epochs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Passes over its store each host makes per round.")
@stopping_options
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
                 min_clients, round_timeout, validation, run_dir, resume_dir, overwrite, tol,
                 n_iter_no_change, validation_fraction, **params):
    """Federated averaging: each host trains on its own store, only weights travel."""
    from rpicluster.errors import TrainingStopped
    from rpicluster.train.averaging import averaged_params
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

    quiet_dask_logs()
    try:
        with usage_errors():
            params = averaged_params(kind, hidden, params)
        result, digest = federate(inventory, model_path, model=kind, params=params, data=data,
                                  rounds=rounds, local_epochs=local_epochs, fraction=fraction,
                                  min_clients=min_clients, round_timeout=round_timeout,
                                  validation=validation, run_dir=resume_dir or run_dir,
                                  resume=resume_dir is not None, overwrite=overwrite,
                                  show_progress=False, on_round=show, tol=tol,
                                  n_iter_no_change=n_iter_no_change,
                                  validation_fraction=validation_fraction)
    except TrainingStopped as exc:
        exit_stopped(exc, ["federate", "-c", inventory, "-o", model_path],
                     (("--model", kind), ("--data", data), ("--rounds", rounds),
                      ("--local-epochs", local_epochs), ("--fraction", fraction),
                      ("--tol", "none" if tol is None else (None if tol == "default" else tol)),
                      ("--n-iter-no-change", n_iter_no_change),
                      ("--validation-fraction", validation_fraction),
                      ("--min-clients", min_clients), ("--round-timeout", round_timeout),
                      ("--validation", validation), ("--overwrite", overwrite)))
    click.echo(f"federated {len(result.rounds) - result.resumed_rounds} rounds"
               + (f" (+{result.resumed_rounds} resumed)" if result.resumed_rounds else "")
               + f" in {result.seconds:.1f} s")
    click.echo(f"stopped: {result.stopped}")
    click.echo(f"model: {model_path} (sha256 {digest[:16]}...)")


@click.command("score")
@click.argument("model_path", type=click.Path(dir_okay=False, exists=True))
@click.argument("data")
@cluster_options
def score_cmd(model_path, data, scheduler, inventory, local):
    """Print the accuracy of MODEL on the labelled store DATA."""
    from rpicluster.train.api import score_summary

    s = score_summary(model_path, data, cluster=cluster_choice(scheduler, inventory, local))
    click.echo(f"accuracy: {s.accuracy:.4f} on {s.url} ({s.n_rows} {s.rows})")


@click.command("predict")
@click.argument("model_path", type=click.Path(dir_okay=False, exists=True))
@click.argument("data")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the labels (.npy, .csv or .txt).")
@cluster_options
def predict_cmd(model_path, data, out, scheduler, inventory, local):
    """Predict a label for every row of the store DATA with MODEL."""
    from rpicluster.train.api import predict_to_file

    n = predict_to_file(model_path, data, out,
                        cluster=cluster_choice(scheduler, inventory, local))
    click.echo(f"wrote {n} labels to {out}")


def _default(func, name: str):
    """The default of ``func``'s parameter ``name``: the library's, shown by --help, not repeated."""
    import inspect

    return inspect.signature(func).parameters[name].default


def _demo_default(name: str):
    from rpicluster.train.demo import run_demo  # light: the heavy imports are inside it

    return _default(run_demo, name)


@click.command("demo")
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

    def on_cluster(ref):
        announce(ref)
        if ref.dashboard:
            click.echo(f"watch the run at {ref.dashboard.rsplit('/', 1)[0]}/rpicluster")

    res = run_demo(workdir, rows=rows, features=features, classes=classes,
                   block_rows=block_rows, local=local, on_cluster=on_cluster)
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
