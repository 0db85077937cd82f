"""``rpicluster demo``: the main job on the embedded default, start to finish.

Ingests seeded ImageNet-like features into a train and a test Zarr store, brings up the embedded
local cluster (or uses the one ``up --local`` left running), trains Inc-kSGD on it with the
workers reading their blocks from the store, scores the model on the held-out store, and writes
the model file. Every step is the same library call the individual commands make.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rpicluster.errors import ConfigError, make_dirs
from rpicluster.progress import Progress


@dataclasses.dataclass
class DemoResult:
    workdir: Path
    rows: int
    features: int
    classes: int
    ingest_seconds: float
    summary: object  # rpicluster.train.api.TrainSummary
    dashboard_link: str | None


def run_demo(workdir: str | Path = "rpicluster-demo", *, rows: int = 60_000, features: int = 256,
             classes: int = 100, block_rows: int = 12_000, local: int | None = None,
             n_clusters: int = 16, max_iter: int = 10, seed: int = 0, on_cluster=None,
             show_progress: bool = True) -> DemoResult:
    """Run the demo; ``workdir`` receives the stores, the run directory and the model.

    The demo owns ``workdir``: running it again replaces what the last run left there.

    ``local`` is the number of workers of the embedded cluster (default: the running one, else
    one per core; a running one of another size is refused). ``on_cluster(ref)`` is called with
    the :class:`~rpicluster.deploy.resolve.ClusterRef` once the cluster is up (the CLI prints
    the dashboard URL).
    """
    from rpicluster.data.writer import ingest
    from rpicluster.deploy.resolve import use_cluster
    from rpicluster.train.api import ClusterChoice, train_model

    if rows < block_rows or rows % block_rows:
        raise ConfigError(f"demo rows ({rows}) must be a positive multiple of block rows "
                          f"({block_rows})")
    workdir = Path(workdir)
    make_dirs(workdir)
    test_rows = block_rows
    t0 = time.perf_counter()
    # One ingest writes both stores: rows shuffled, one block's worth held out (stratified), and
    # the same classes list in both.
    with Progress("ingest", unit="blocks", enabled=show_progress) as progress:
        ingest(f"synthetic:rows={rows + test_rows},features={features},classes={classes},"
               f"seed={seed}", workdir / "train.zarr", block_rows=block_rows, seed=seed,
               test_fraction=test_rows / (rows + test_rows), test_out=workdir / "test.zarr",
               overwrite=True, progress=progress)
    ingest_seconds = time.perf_counter() - t0

    # The embedded cluster, started for the demo unless `up --local` left one running.
    with use_cluster(local=local or True, announce=on_cluster) as ref:
        params = {"n_clusters": n_clusters, "max_iter": max_iter, "random_state": seed}
        summary = train_model(str(workdir / "train.zarr"), workdir / "model.skops", params,
                              cluster=ClusterChoice(scheduler=ref.address),
                              run_dir=workdir / "model.run", test=str(workdir / "test.zarr"),
                              overwrite=True, show_progress=show_progress)
    return DemoResult(workdir=workdir, rows=rows, features=features, classes=classes,
                      ingest_seconds=ingest_seconds, summary=summary,
                      dashboard_link=ref.dashboard)
