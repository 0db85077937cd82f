"""Worker memory under a limit: peak RSS above the post-import baseline, in blocks, and
restarts counted.

A worker's baseline is its RSS once the libraries training loads are imported; its peak is the
kernel's high-water mark (VmHWM), reset to the baseline just before the run (Linux
``/proc/self/clear_refs``). Restarts are counted from the scheduler's own record: every worker
that joins during the run (a nanny restarting a worker that crossed its memory limit, or a
worker that died and came back) logs an ``add-worker`` event.
"""

from __future__ import annotations

import dataclasses
import os
import time


def reset_peak() -> int:
    """On a worker: warm up what training uses (:func:`rpicluster.train.tasks.warm_up`), reset
    the peak-RSS counter; the RSS now."""
    from rpicluster.train.tasks import warm_up

    warm_up()
    with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return _status("VmRSS")


def peak_rss() -> int:
    """On a worker: the peak RSS since the last :func:`reset_peak` (bytes)."""
    return _status("VmHWM")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def by_name(client, func) -> dict:
    """``client.run(func)`` keyed by worker name."""
    names = {a: str(w.get("name", a))
             for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
    return {names.get(a, a): v for a, v in client.run(func).items()}


def worker_joins(client, since: float) -> int:
    """Workers that joined the scheduler after ``since`` (``time.time()``): restarts."""
    return sum(1 for t, msg in client.get_events("all")
               if t >= since and isinstance(msg, dict) and msg.get("action") == "add-worker")


def post_import_baseline() -> int:
    """RSS (bytes) of a fresh one-thread nanny worker after the training imports."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        return int(next(iter(client.run(reset_peak).values())))


@dataclasses.dataclass
class MemoryRun:
    """One training run under a memory limit."""

    seconds: float
    limit: int                  # bytes per worker
    block_bytes: int
    baseline: dict              # worker -> RSS after imports (bytes)
    peak: dict                  # worker -> peak RSS during the run (bytes)
    restarts: int
    window: int
    model: object

    def above_baseline_blocks(self) -> dict:
        """Worker -> (peak - baseline) / block."""
        return {w: (self.peak[w] - self.baseline.get(w, self.peak[w])) / self.block_bytes
                for w in self.peak}


def train_under_limit(dataset, params: dict, *, n_workers: int, limit: int) -> MemoryRun:
    """Train ``dataset`` on ``n_workers`` one-thread nanny workers limited to ``limit`` bytes."""
    from distributed import Client, LocalCluster

    from rpicluster.models.incremental import IncrementalKSGDClassifier
    from rpicluster.train.job import train

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      memory_limit=limit, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        baseline = by_name(client, reset_peak)
        since = time.time()
        result = train(IncrementalKSGDClassifier(**params), dataset, client)
        peak = by_name(client, peak_rss)
        restarts = worker_joins(client, since)
    return MemoryRun(seconds=result.seconds, limit=limit,
                     block_bytes=dataset.block_rows * dataset.n_features * 4,
                     baseline=baseline, peak=peak, restarts=restarts, window=result.window,
                     model=result.model)
