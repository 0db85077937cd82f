"""What an Inc-kSGD training run did (:class:`TrainResult`)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path


@dataclasses.dataclass
class TrainResult:
    """What a training run did.

    Attributes
    ----------
    model : IncrementalKSGDClassifier
        The ensemble of every block model.
    seconds : float
        Wall time of this call.
    trained_blocks, resumed_blocks : list of int
        Blocks fitted by this call, and blocks taken from the run directory.
    tasks_per_worker, rows_per_worker, busy_seconds_per_worker : Counter
        Partition and fit tasks whose results were taken, the rows their fits trained on (each
        row once, summing to the rows trained) and their task seconds, by worker name (a
        whole-block task counts as the partition and the fit it ran; a speculative copy's loser
        is not counted).
    run_dir : Path or None
    phases : dict
        Seconds by phase: on the workers ``read``, ``kmeans``, ``sort``, ``fit`` (task time,
        summed over workers) and ``partition-cpu``, ``fit-cpu`` (their CPU time), on the
        driver ``driver-assemble``, ``driver-validation`` and ``driver-commit`` (waiting for
        the background writer at the end).
    window : int
        Blocks that were in flight at once.
    speculation : Counter
        ``copies`` (tasks run again on an idle worker because they ran late elsewhere) and
        ``won`` (copies whose result was the one taken).
    """

    model: object
    seconds: float
    trained_blocks: list
    resumed_blocks: list
    tasks_per_worker: Counter
    rows_per_worker: Counter
    busy_seconds_per_worker: Counter
    run_dir: Path | None = None
    phases: dict = dataclasses.field(default_factory=dict)
    window: int = 0
    speculation: Counter = dataclasses.field(default_factory=Counter)

    def rows_per_second(self) -> dict:
        """Per-worker throughput over the time each worker spent in tasks."""
        return {w: self.rows_per_worker[w] / s for w, s in self.busy_seconds_per_worker.items()
                if s > 0}
