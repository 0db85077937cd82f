"""``rpicluster bench``: algorithm comparison, cluster scaling, the paper's shape."""

from __future__ import annotations

import click

from rpicluster import config
from rpicluster.cli._common import Group, announce, cluster_options, usage_errors


@click.group(cls=Group)
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
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed runs per step (every job); the report gives their median, min, max.")
@click.option("--warmup", type=click.Choice(["reduced", "full", "none"]), default="reduced",
              show_default=True,
              help="Untimed run on each step's workers before its timed runs: a reduced run of "
                   "the job (inc-ksgd: one SGD epoch; random-forest: 2 trees per thread; "
                   "mlp/sgd: one round), the full run, or none (cold workers).")
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
              help="Folder for scaling.{csv,json,md,png} and timed-runs.html.")
def bench_scaling(scheduler, inventory, local, job, syncs, local_epochs, hidden, test, data,
                  rows, features, classes, block_rows, steps, repeats, warmup, simulate,
                  n_clusters, max_iter, n_estimators, out_dir) -> None:
    """The same job on growing worker sets: ideal (cores, capacity) against measured time."""
    from rpicluster.bench.report import to_markdown
    from rpicluster.bench.scaling import scaling_bench
    from rpicluster.progress import Progress

    if job in ("mlp", "sgd"):
        from rpicluster.bench.averaging import to_markdown as averaging_markdown
        from rpicluster.train.averaging import averaged_params

        with usage_errors():
            params = averaged_params(job, hidden, {})
        doc = scaling_bench(
            out_dir, scheduler=scheduler, inventory=inventory, local=local, job=job, data=data,
            rows=rows, features=features, classes=classes, block_rows=block_rows, steps=steps,
            repeats=repeats, warmup=warmup, params=params,
            averaging={"syncs": [x.strip() for x in syncs.split(",")], "test": test,
                       "epochs": max_iter or 4, "local_epochs": local_epochs},
            progress=Progress("bench scaling", unit="runs", interval=0), announce=announce)
        click.echo(averaging_markdown(doc))
        click.echo(f"wrote {out_dir}/averaging.{{csv,json,md}}")
        return
    params = {"n_clusters": n_clusters, "max_iter": max_iter} if job == "inc-ksgd" else \
        {"n_estimators": n_estimators}
    doc = scaling_bench(out_dir, scheduler=scheduler, inventory=inventory, local=local, job=job,
                        data=data, rows=rows, features=features, classes=classes,
                        block_rows=block_rows, steps=steps, repeats=repeats, warmup=warmup,
                        simulate=simulate,
                        params={k: v for k, v in params.items() if v is not None},
                        progress=Progress("bench scaling", unit="runs", interval=0),
                        announce=announce)
    click.echo(to_markdown(doc))
    click.echo(f"wrote {out_dir}/scaling.{{csv,json,md,png}} and {doc['report_html']}")


@bench.command("paper")
@click.option("--rows", type=click.IntRange(min=1), default=1_009_124, show_default=True,
              help="Training rows (the paper's ImageNet: 1,009,124).")
@click.option("--features", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("--classes", type=click.IntRange(min=2), default=1000, show_default=True)
@click.option("--blocks", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--test-rows", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="Held-out rows (the generator continued past the training rows).")
@click.option("--clusters", "n_clusters", type=click.IntRange(min=1),
              help="k-means clusters per block [default: 20].")
@click.option("--epochs", "max_iter", type=click.IntRange(min=1), help="[default: 5]")
@click.option("--eta", "eta0", type=click.FloatRange(min=0, min_open=True),
              help="A constant learning rate (default: scikit-learn's 'optimal' schedule).")
@click.option("--paper-config", is_flag=True,
              help="The paper's own settings: --clusters 300 --epochs 50 --eta 0.001.")
@click.option("--sgd-rows", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="Rows a full SGDClassifier fit runs on (its time then extrapolated).")
@click.option("--local", "workers", type=click.IntRange(min=1),
              help="Workers of the embedded cluster (default: one per core).")
@click.option("--keep-data", is_flag=True, help="Keep the stores (a rerun reuses them).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False),
              default=str(config.BENCH_OUT / "paper"), show_default=True,
              help="Folder for the stores, paper.json and paper.md.")
def bench_paper(rows, features, classes, blocks, test_rows, n_clusters, max_iter, eta0,
                paper_config, sgd_rows, workers, keep_data, out_dir) -> None:
    """The paper's ImageNet shape on this machine: ingest, train, accuracy, memory, vs SGD."""
    from rpicluster.bench.paper import paper_params, run_paper, to_markdown

    doc = run_paper(out_dir, rows=rows, features=features, classes=classes, blocks=blocks,
                    test_rows=test_rows, sgd_rows=sgd_rows, workers=workers,
                    keep_data=keep_data, **paper_params(n_clusters=n_clusters,
                                                        max_iter=max_iter, eta0=eta0,
                                                        paper_config=paper_config))
    click.echo(to_markdown(doc))
    click.echo(f"wrote {out_dir}/paper.json and paper.md")
