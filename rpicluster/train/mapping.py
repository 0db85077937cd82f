"""Block mapping: a fitted model run over every block of a store on the workers (predict,
score), results in block order."""

from __future__ import annotations

import uuid

import numpy as np

from rpicluster.models.remote import hold
from rpicluster.progress import Progress
from rpicluster.train import tasks
from rpicluster.train.failures import raise_task_error


def map_blocks(client, func, model, dataset, progress: Progress | None, what: str) -> list:
    """Run ``func(model, dataset, b)`` for every block on the cluster; results in block order."""
    from distributed import as_completed

    remote_model = hold(client, model)
    run = uuid.uuid4().hex[:8]
    futures = [client.submit(func, remote_model, dataset, b, pure=False, priority=-b,
                             key=f"{func.__name__.removesuffix('_task')}-{run}-{b}")
               for b in range(dataset.n_blocks)]
    index = {f.key: b for b, f in enumerate(futures)}
    out: list = [None] * len(futures)
    with progress or Progress.null() as p:
        for future in as_completed(futures):
            b = index[future.key]
            if future.status == "error":
                raise_task_error(future.exception(), b, None)
            out[b] = future.result()
            p.advance(note=f"{what} block {b}")
    return out


def predict_dataset(model, dataset, client, *, progress: Progress | None = None) -> np.ndarray:
    """Labels predicted for every row of ``dataset``, computed block by block on the workers."""
    parts = map_blocks(client, tasks.predict_task, model, dataset, progress, "predicted")
    return np.concatenate(parts) if parts else np.empty(0)


def score_dataset(model, dataset, client, *, progress: Progress | None = None) -> float:
    """Accuracy of ``model`` on ``dataset``, computed block by block on the workers."""
    parts = map_blocks(client, tasks.score_task, model, dataset, progress, "scored")
    correct = sum(c for c, _ in parts)
    total = sum(n for _, n in parts)
    return correct / total if total else float("nan")
