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
             classes: int = 100, block_rows: int = 12_000, workers: int | None = None,
             n_clusters: int = 16, max_iter: int = 10, seed: int = 0,
             show_progress: bool = True) -> DemoResult:
    """Run the demo; ``workdir`` receives the stores, the run directory and the model."""
    from rpicluster.data.store import ingest
    from rpicluster.deploy.local import start_local, stop_local
    from rpicluster.train.api import ClusterChoice, train_model

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    test_rows = max(rows // 5, 1)
    t0 = time.perf_counter()
    spec = f"rows={rows + test_rows},features={features},classes={classes},seed={seed}"
    # One generated table split into train and test rows, so both share one class geometry.
    for name, part in (("train", f"{spec},start=0,stop={rows}"),
                       ("test", f"{spec},start={rows},stop={rows + test_rows}")):
        store = workdir / f"{name}.zarr"
        progress = Progress(f"ingest {name}", unit="blocks", enabled=show_progress)
        ingest(f"synthetic:{part}", store, block_rows=block_rows, overwrite=True,
               progress=progress)
    ingest_seconds = time.perf_counter() - t0

    info = start_local(workers)
    try:
        params = {"n_clusters": n_clusters, "max_iter": max_iter, "random_state": seed}
        summary = train_model(str(workdir / "train.zarr"), workdir / "model.skops", params,
                              cluster=ClusterChoice(scheduler=info["scheduler_address"]),
                              run_dir=workdir / "model.run", test=str(workdir / "test.zarr"),
                              show_progress=show_progress)
    finally:
        if not info["already_running"]:
            stop_local()
    return DemoResult(workdir=workdir, rows=rows, features=features, classes=classes,
                      ingest_seconds=ingest_seconds, summary=summary,
                      dashboard_link=info.get("dashboard_link"))
