"""``rpicluster bench paper``: the paper's ImageNet shape, trained on the embedded cluster.

Ingests 1,009,124 x 2048 synthetic ImageNet-like rows of 1,000 classes (the paper's shape) in 8
blocks, plus a held-out stream (the same generator continued past the training rows), starts
the embedded local cluster (or uses the one ``up --local`` left running), trains Inc-kSGD on it
with the workers reading their blocks from the store, and scores the model on the held-out
rows. ``--paper-config`` trains with the paper's own settings (:data:`PAPER_CONFIG`). In the
same run scikit-learn's ``SGDClassifier`` (hinge, the paper's "full SGD") is fitted in full, to
its own stopping rule, on the first ``sgd_rows`` rows of block 0 and on a quarter of them (how
its held-out accuracy grows with rows), and its time is extrapolated linearly to every training
row: an extrapolation, labelled as such, since the full fit would take hours here.

Per-worker peak RSS is measured above each worker's post-import baseline (the peak counter,
VmHWM, is reset once the libraries are loaded) and expressed in blocks.

Every size is a flag (``--rows`` and friends) so that a test runs the whole path small.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from rpicluster.errors import ConfigError, make_dirs
from rpicluster.progress import Progress

#: The paper's data set: ImageNet deep features.
PAPER_ROWS = 1_009_124
PAPER_FEATURES = 2048
PAPER_CLASSES = 1000
PAPER_BLOCKS = 8
#: The paper's own Inc-kSGD settings (``bench paper --paper-config``): k=300 clusters per block,
#: 50 epochs, learning rate 0.001 (a constant rate: scikit-learn's ``'optimal'`` schedule, our
#: default, ignores ``eta0``).
PAPER_CONFIG = {"n_clusters": 300, "max_iter": 50, "learning_rate": "constant", "eta0": 0.001}


def paper_params(*, n_clusters=None, max_iter=None, eta0=None, paper_config=False) -> dict:
    """Inc-kSGD settings of a ``bench paper`` run: the defaults (k=20, 5 epochs, the 'optimal'
    schedule), or :data:`PAPER_CONFIG` with ``paper_config``; a value given wins, and a given
    ``eta0`` is a constant learning rate."""
    given = {k: v for k, v in (("n_clusters", n_clusters), ("max_iter", max_iter),
                               ("eta0", eta0)) if v is not None}
    params = {"n_clusters": 20, "max_iter": 5, **(PAPER_CONFIG if paper_config else {}),
              **given}
    if eta0 is not None:
        params["learning_rate"] = "constant"
    return params


def _sgd_fit(X, y, X_test, y_test, seed: int) -> dict:
    """A full ``SGDClassifier`` fit (hinge, L2, scikit-learn's defaults: up to 1,000 epochs,
    stopping when the training loss stops improving by ``tol``) on (X, y): its seconds,
    epochs, seconds per epoch and held-out accuracy."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import SGDClassifier

    clf = SGDClassifier(loss="hinge", penalty="l2", random_state=seed, n_jobs=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        clf.fit(X, y)
        seconds = time.perf_counter() - t0
    epochs = int(clf.n_iter_)
    return {"rows": int(X.shape[0]), "seconds": seconds, "epochs": epochs,
            "epoch_seconds": seconds / max(epochs, 1),
            "accuracy": float(clf.score(X_test, y_test))}


def run_paper(out_dir, *, rows: int = PAPER_ROWS, features: int = PAPER_FEATURES,
              classes: int = PAPER_CLASSES, blocks: int = PAPER_BLOCKS, test_rows: int = 20_000,
              n_clusters: int = 20, max_iter: int = 5, learning_rate: str = "optimal",
              eta0: float = 0.01, sgd_rows: int = 20_000, workers: int | None = None,
              scheduler: str | None = None, seed: int = 0, keep_data: bool = False,
              show_progress: bool = True) -> dict:
    """Run the paper-scale benchmark; write ``paper.json`` and ``paper.md`` to ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Receives the stores (deleted at the end unless ``keep_data``), the run directory and
        the reports.
    rows, features, classes, blocks : int
        Training data shape (default: the paper's 1,009,124 x 2048, 1,000 classes, 8 blocks).
    test_rows : int
        Held-out rows (the generator continued past the training rows).
    n_clusters, max_iter : int
        Inc-kSGD's k-means clusters per block and SGD epochs.
    learning_rate, eta0
        Inc-kSGD's learning-rate schedule (:data:`PAPER_CONFIG` has the paper's).
    sgd_rows : int
        Rows of block 0 that a full ``SGDClassifier`` fit runs on (and a quarter of them, to
        show how its accuracy grows with rows); its time is extrapolated to every row.
    workers : int, optional
        Workers of the embedded cluster (default one per core).
    scheduler : str, optional
        Use this running cluster instead of the embedded one.
    seed : int
    keep_data : bool
        Keep the stores (the next run with the same shape reuses them).

    Returns
    -------
    dict
        The report (as written to paper.json).

    Raises
    ------
    ConfigError
        A size that does not fit (rows per block below the clusters, too little disk space).
    """
    from rpicluster import history
    from rpicluster.bench.memory import by_name, peak_rss, reset_peak
    from rpicluster.data.sources import ArraySource
    from rpicluster.data.reader import open_dataset
    from rpicluster.data.writer import ingest
    from rpicluster.data.synthetic import SyntheticSpec, _generate
    from rpicluster.deploy.local import start_local, stop_local
    from rpicluster.deploy.resolve import find_cluster
    from rpicluster.models.incremental import IncrementalKSGDClassifier
    from rpicluster.train.checks import fingerprint
    from rpicluster.train.job import train
    from rpicluster.train.mapping import score_dataset

    block_rows = math.ceil(rows / blocks)
    if block_rows < n_clusters or sgd_rows < 1 or test_rows < 1:
        raise ConfigError(f"bench paper: {rows} rows in {blocks} blocks gives {block_rows} rows "
                          f"per block, fewer than --clusters {n_clusters}; use fewer blocks or "
                          "more rows" if block_rows < n_clusters else
                          "bench paper: --sgd-rows and --test-rows must be >= 1")
    out = Path(out_dir)
    make_dirs(out)
    need = (rows + test_rows) * (features * 4 + 4)
    train_path, test_path = out / "train.zarr", out / "test.zarr"
    knobs = f"features={features},classes={classes},seed={seed}"
    existing = _matching_store(train_path, rows, features, classes, block_rows)
    free = shutil.disk_usage(out).free
    if existing is None and free < need * 1.05:
        raise ConfigError(f"bench paper: the stores need {need / 2**30:.1f} GiB and {out} has "
                          f"{free / 2**30:.1f} GiB free; free some space or pass -o elsewhere "
                          "(or smaller --rows)")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    if existing is None:
        with Progress("ingest train", unit="blocks", enabled=show_progress) as progress:
            ingest(f"synthetic:rows={rows},{knobs}", train_path, block_rows=block_rows,
                   overwrite=True, progress=progress)
    spec = SyntheticSpec.from_string(f"rows={rows + test_rows},{knobs}")
    X_test, y_test = _generate(spec, rows, rows + test_rows)
    ingest(ArraySource(f"synthetic held-out rows {rows}..{rows + test_rows}", X_test, y_test),
           test_path, block_rows=min(test_rows, block_rows), overwrite=True)
    ingest_seconds = time.perf_counter() - t0
    dataset, test = open_dataset(train_path), open_dataset(test_path)

    info = None
    if scheduler is None:
        info = start_local(workers)
        scheduler = info["scheduler_address"]
    try:
        # The resolver adds the recorded certificate (the local cluster is TLS-only).
        with find_cluster(scheduler).client(timeout="30s") as client, history.recording(
                "bench", params={"bench": "paper", "n_clusters": n_clusters,
                                 "max_iter": max_iter, "learning_rate": learning_rate,
                                 "eta0": eta0, "seed": seed}, data=str(dataset.url),
                fingerprint=fingerprint(dataset), cluster=client.scheduler.address) as record:
            baseline = by_name(client, reset_peak)
            est = IncrementalKSGDClassifier(n_clusters=n_clusters, max_iter=max_iter,
                                            learning_rate=learning_rate, eta0=eta0,
                                            random_state=seed)
            shutil.rmtree(out / "model.run", ignore_errors=True)  # a fresh run every time
            with Progress("train", total=dataset.n_blocks, unit="blocks",
                          enabled=show_progress) as progress:
                result = train(est, dataset, client, run_dir=out / "model.run",
                               progress=progress)
            peak = by_name(client, peak_rss)
            accuracy = score_dataset(est, test, client)
            record.update(workers=sorted(peak))
            record.result(phases={"train": result.seconds}, accuracy=accuracy)
            threads = sum(w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"]
                          .values())
    finally:
        if info is not None and not info["already_running"]:
            stop_local()

    X0, y0 = dataset.block(0)
    n_sgd = min(sgd_rows, X0.shape[0])
    labels = np.asarray(dataset.classes)
    # y_test holds the generator's labels; the store's y holds codes into its classes
    sgd = [_sgd_fit(X0[:n], labels[y0[:n]], X_test, y_test, seed)
           for n in sorted({max(1, n_sgd // 4), n_sgd})]
    del X0, y0
    block_bytes = block_rows * features * 4
    doc = {
        "shape": {"rows": rows, "features": features, "classes": classes, "blocks": blocks,
                  "block_rows": block_rows, "test_rows": test_rows,
                  "store_gib": need / 2**30},
        "params": {"n_clusters": n_clusters, "max_iter": max_iter,
                   "learning_rate": learning_rate, "eta0": eta0, "seed": seed},
        "ingest_seconds": ingest_seconds, "ingest_reused": existing is not None,
        "train_seconds": result.seconds, "test_accuracy": accuracy,
        "workers": len(peak), "threads": threads,
        "peak_rss": {w: {"baseline_mib": baseline.get(w, 0) / 2**20,
                         "peak_mib": peak[w] / 2**20,
                         "above_baseline_blocks": (peak[w] - baseline.get(w, 0)) / block_bytes}
                     for w in sorted(peak)},
        "sgd": {"fits": sgd, "extrapolated_seconds": sgd[-1]["seconds"] * rows / n_sgd,
                "note": "SGDClassifier(hinge, L2, n_jobs=-1, scikit-learn's stopping rule) "
                        "fitted in full on the first rows of block 0; the all-rows time is that "
                        "fit's time scaled linearly by rows (the same epochs), not run"},
        "load": {"before": list(load_before), "after": list(os.getloadavg()),
                 "cpus": os.cpu_count()},
    }
    (out / "paper.json").write_text(json.dumps(doc, indent=2))
    (out / "paper.md").write_text(to_markdown(doc))
    if not keep_data:
        shutil.rmtree(train_path, ignore_errors=True)
        shutil.rmtree(test_path, ignore_errors=True)
    return doc


def _matching_store(path: Path, rows: int, features: int, classes: int, block_rows: int):
    from rpicluster.data.reader import open_dataset

    try:
        ds = open_dataset(path)
    except Exception:  # noqa: BLE001 - absent, incomplete or foreign: ingest afresh
        return None
    same = (ds.n_rows, ds.n_features, len(ds.classes), ds.block_rows) == (
        rows, features, classes, block_rows)
    return ds if same else None


def _rate(params: dict) -> str:
    """The learning-rate schedule in words (reports older than the flag were 'optimal')."""
    schedule = params.get("learning_rate", "optimal")
    return "'optimal'" if schedule == "optimal" else f"{schedule} {params.get('eta0')}"


def to_markdown(doc: dict) -> str:
    """The report as a Markdown table (README's Performance section quotes it)."""
    s, p, sgd = doc["shape"], doc["params"], doc["sgd"]
    rss = doc["peak_rss"]
    worst = max((r["above_baseline_blocks"] for r in rss.values()), default=float("nan"))
    lines = [
        f"## Paper scale: {s['rows']:,} x {s['features']:,}, {s['classes']:,} classes, "
        f"{s['blocks']} blocks of {s['block_rows']:,} rows ({s['store_gib']:.1f} GiB)\n",
        f"Inc-kSGD k={p['n_clusters']}, {p['max_iter']} epochs, learning rate "
        f"{_rate(p)}, on {doc['workers']} local "
        f"workers ({doc['threads']} threads); {os.cpu_count()} cores; load average "
        f"{doc['load']['before'][0]:.2f} before, {doc['load']['after'][0]:.2f} after.\n",
        "| step | result |", "|---|---|",
        f"| ingest (train + {s['test_rows']:,} held-out rows) | {doc['ingest_seconds']:.0f} s"
        f"{' (train store reused)' if doc['ingest_reused'] else ''} |",
        f"| train (Inc-kSGD, Dask) | **{doc['train_seconds']:.0f} s** |",
        f"| held-out accuracy | **{doc['test_accuracy']:.4f}** |",
        "| peak RSS per worker above its post-import baseline | "
        + ", ".join(f"{w}: {r['above_baseline_blocks']:.2f} blocks ({r['peak_mib']:.0f} MiB)"
                    for w, r in rss.items()) + f" (worst {worst:.2f}) |",
        *(f"| SGDClassifier (hinge, full fit to its stopping rule) on {f['rows']:,} rows: "
          f"held-out accuracy, time | {f['accuracy']:.4f}, {f['seconds']:.0f} s "
          f"({f['epochs']} epochs) |" for f in sgd["fits"]),
        f"| SGDClassifier on all {s['rows']:,} rows (**extrapolated**: the "
        f"{sgd['fits'][-1]['rows']:,}-row fit's time x rows, same epochs; not run) | "
        f"{sgd['extrapolated_seconds']:.0f} s |",
    ]
    return "\n".join(lines) + "\n"
