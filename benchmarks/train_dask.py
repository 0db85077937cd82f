"""Training on Dask vs in-process, 1 vs N workers, and worker memory on a dataset larger than a
worker's memory limit.

    python benchmarks/train_dask.py [--rows 98304 --features 512 --classes 100 --block-rows 12288]
                                    [--workers 2] [--memory-gb 1.0] [--out DIR]

Prints three tables from one run (same store, same parameters and seed):
1. in-process ``IncrementalKSGDClassifier.fit(dataset)`` vs the Dask job on 1 and on N local
   workers (1 thread each): wall seconds, speed-up over 1 worker, overhead ratio over in-process;
2. memory: a store of ``--memory-gb`` GB trained by N workers whose memory limit is a quarter of
   the store; each worker's peak RSS above its idle RSS, in blocks;
and writes them as Markdown to ``--out``/train_dask.md (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_rss() -> int:
    """This process's peak RSS (VmHWM: per address space, so not inherited across exec as
    ``ru_maxrss`` is on Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _store(root: Path, name: str, rows: int, features: int, classes: int, block_rows: int):
    from rpicluster import ingest

    path = root / f"{name}.zarr"
    ingest(f"synthetic:rows={rows},features={features},classes={classes},seed=0", path,
           block_rows=block_rows)
    return path


def _fit_dask(store, params, n_workers, memory_limit="auto"):
    from distributed import Client, LocalCluster

    from rpicluster import IncrementalKSGDClassifier, open_dataset
    from rpicluster.train.job import train

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      memory_limit=memory_limit, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        idle = _by_name(client, _peak_rss)
        pids = _by_name(client, os.getpid)
        ds = open_dataset(store)
        t0 = time.perf_counter()
        result = train(IncrementalKSGDClassifier(**params), ds, client)
        seconds = time.perf_counter() - t0
        peak = _by_name(client, _peak_rss)
        restarted = sorted(w for w, pid in _by_name(client, os.getpid).items()
                           if pids.get(w) != pid)
    return seconds, result, idle, peak, restarted


def _by_name(client, func) -> dict:
    """``client.run(func)`` keyed by worker name (a restarted worker keeps its name)."""
    names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
    return {names.get(a, a): v for a, v in client.run(func).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=98_304)
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--block-rows", type=int, default=12_288)
    ap.add_argument("--clusters", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-gb", type=float, default=2.0)
    ap.add_argument("--memory-features", type=int, default=1024)
    ap.add_argument("--memory-block-rows", type=int, default=16_384)
    ap.add_argument("--memory-limit-fraction", type=float, default=0.25,
                    help="worker memory limit as a fraction of the store (0: no limit)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args()

    from rpicluster import IncrementalKSGDClassifier, open_dataset

    params = dict(n_clusters=a.clusters, max_iter=a.epochs, random_state=0,
                  block_rows=a.block_rows)
    lines = ["# Training on Dask (benchmarks/train_dask.py)\n",
             f"load average at start: {os.getloadavg()[0]:.2f}; cores: {os.cpu_count()}\n"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = _store(root, "speed", a.rows, a.features, a.classes, a.block_rows)
        ds = open_dataset(store)
        t0 = time.perf_counter()
        ref = IncrementalKSGDClassifier(**params, n_jobs=a.workers).fit(ds)
        t_in = time.perf_counter() - t0
        X, y = ds.block(0)
        rows = [("in-process (n_jobs=%d threads)" % a.workers, t_in, None, 1.0)]
        t1, r1, *_ = _fit_dask(store, params, 1)
        rows.append(("Dask, 1 worker x 1 thread", t1, 1.0, t1 / t_in))
        tn, rn, *_ = _fit_dask(store, params, a.workers)
        rows.append((f"Dask, {a.workers} workers x 1 thread", tn, t1 / tn, tn / t_in))
        same = np.array_equal(rn.model.predict(X), ref.predict(X))
        lines += [f"\n## Speed: {a.rows:,} x {a.features} x {a.classes} classes, "
                  f"{ds.n_blocks} blocks, k={a.clusters}, {a.epochs} epochs\n",
                  "| run | seconds | speed-up vs 1 worker | ratio to in-process |",
                  "|---|---|---|---|"]
        lines += [f"| {n} | {s:.1f} | {'' if sp is None else f'{sp:.2f}x'} | {r:.2f} |"
                  for n, s, sp, r in rows]
        lines.append(f"\nDask model predicts the same labels as the in-process fit on block 0: "
                     f"{same}. Tasks per worker ({a.workers} workers): "
                     f"{dict(rn.tasks_per_worker)}\n")
        print("\n".join(lines), flush=True)

        mb = a.memory_block_rows
        block_bytes = mb * a.memory_features * 4
        mem_rows = int(a.memory_gb * 2**30 / (a.memory_features * 4)) // mb * mb
        big = _store(root, "memory", mem_rows, a.memory_features, a.classes, mb)
        limit = int(a.memory_gb * 2**30 * a.memory_limit_fraction)
        t, rm, idle, peak, restarted = _fit_dask(
            big, {**params, "max_iter": 2, "block_rows": mb}, a.workers, memory_limit=limit)
        where = (f"worker memory limit {limit / 2**20:.0f} MiB "
                 f"({a.memory_limit_fraction:g} of the store)" if limit else "no memory limit")
        lines += [f"\n## Memory: {mem_rows:,} x {a.memory_features} rows = "
                  f"{a.memory_gb:.2f} GiB store, {mem_rows // mb} blocks of "
                  f"{block_bytes / 2**20:.0f} MiB; {where}; {t:.1f} s\n",
                  "| worker | idle RSS MiB | peak RSS MiB | peak - idle, in blocks |",
                  "|---|---|---|---|"]
        for w in sorted(peak, key=str):
            extra = (peak[w] - idle[w]) / block_bytes
            lines.append(f"| {w} | {idle[w] / 2**20:.0f} | {peak[w] / 2**20:.0f} | "
                         f"{extra:.2f} |")
        lines.append(f"\nWorkers restarted by their nanny for exceeding the memory limit: "
                     f"{restarted or 'none'} (a restarted worker's peak is since its restart). "
                     f"The run completed with {len(rm.model.estimators_)} block models.")
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "train_dask.md").write_text(text)


if __name__ == "__main__":
    main()
