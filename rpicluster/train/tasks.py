"""Task functions that run on the workers. Each is a pure function of its inputs.

A training block b becomes this small graph (keys carry the run id, block and cluster)::

    partition-b  : read X[b], y[b] from the Zarr store (on the worker), k-means -> k row groups
      ├─ meta-b        : centroids and group sizes (small; gathered by the client)
      └─ piece-b-j     : rows of cluster j (stays on a worker; Dask moves it if an idle worker
           └─ fit-b-j    takes the fit) -> one local linear model (gathered by the client)

Only centroids and fitted local models reach the client; training rows never do. Every random
choice derives from (random_state, block, cluster), so a task that runs twice (its worker died)
gives the same result, and the distributed model equals the in-process one.
"""

from __future__ import annotations

import time

import numpy as np


def worker_name() -> str:
    """The Dask worker running the current task, or "local" outside a worker."""
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except ValueError:
        return "local"


def partition_task(dataset, block: int, params: dict, random_state: int) -> dict:
    """Read block ``block`` of ``dataset`` and split its rows by nearest k-means centroid."""
    from rpicluster.models.ksgd import partition_block, task_seed

    t0 = time.perf_counter()
    X, y = dataset.block(block)
    centers, labels = partition_block(X, params["n_clusters"], seed=task_seed(random_state, block))
    # Rows of each cluster in their original order, as the in-process fit takes them.
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(centers.shape[0] + 1))
    pieces = [(X[order[a:z]], y[order[a:z]]) for a, z in zip(bounds[:-1], bounds[1:])]
    return {"centers": centers, "pieces": pieces, "rows": int(X.shape[0]),
            "worker": worker_name(), "seconds": time.perf_counter() - t0}


def block_meta(part: dict) -> dict:
    """The small part of a partition result: centroids, group sizes, who ran it and how long."""
    return {"centers": part["centers"], "sizes": [int(p[1].shape[0]) for p in part["pieces"]],
            "rows": part["rows"], "worker": part["worker"], "seconds": part["seconds"]}


def cluster_piece(part: dict, cluster: int):
    """Rows ``(X_j, y_j)`` of cluster ``cluster``."""
    return part["pieces"][cluster]


def fit_task(piece, block: int, cluster: int, params: dict, random_state: int) -> dict:
    """Fit cluster ``cluster``'s local model of block ``block`` on its rows."""
    from rpicluster.models.ksgd import fit_cluster, task_seed

    t0 = time.perf_counter()
    X, y = piece
    model = fit_cluster(X, y, params=params, seed=task_seed(random_state, block, cluster))
    return {"model": model, "rows": int(X.shape[0]), "worker": worker_name(),
            "seconds": time.perf_counter() - t0}


def predict_task(model, dataset, block: int) -> np.ndarray:
    """Labels predicted by ``model`` for the rows of block ``block``."""
    X, _ = dataset.block(block)
    return model.predict(X)


def score_task(model, dataset, block: int) -> tuple[int, int]:
    """(correct, rows) of ``model`` on block ``block``."""
    X, y = dataset.block(block)
    truth = np.asarray(dataset.classes)[y]
    return int(np.count_nonzero(model.predict(X) == truth)), int(y.shape[0])
