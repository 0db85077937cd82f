"""Task functions that run on the workers. Each is a pure function of its inputs.

A training block b becomes this small graph (each key starts with its phase, so Dask's own
dashboard tells the phases apart; then the run id, block and group)::

    partition-<run>-b : read X[b], y[b] from the Zarr store (on the worker), k-means, then sort
      │                 the block's rows by cluster in place (clusters are contiguous slices)
      ├─ meta-<run>-b        : centroids, cluster sizes, fit groups (small; to the client)
      └─ piece-<run>-b-g     : group g's rows, a view into the sorted block (stays on a worker;
           └─ fit-<run>-b-g    Dask moves it if an idle worker takes the fit) -> one local
                               linear model per cluster of the group (to the client)

The client submits all of it at once, with one piece/fit pair per fit group the block may have
(a group the block turns out not to have is empty), so no worker waits for the client between
a partition and its fits. A block that need not be shared between workers (every block but the
last few of a run) is one task instead, ``block-<run>-b`` (:func:`block_task`: the partition
and one fit of all its clusters, on the same worker), since every task costs the scheduler, the
worker and the client the same whatever its size.

A fit group is a run of consecutive clusters holding about an equal share of the block's rows
(:func:`fit_groups`). The client asks for as many groups as the run's workers have threads
(at most ``n_clusters``): enough for every worker to take a share of the last block, and few
tasks, since each costs the scheduler, the worker and the client about a millisecond whatever
its size. Each cluster is still fitted alone, with its own seed, so grouping never changes the
model. Only centroids and fitted local models reach the client; training rows never do. Every
random choice derives from (random_state, block, cluster), so a task that runs twice (its
worker died, or a straggler's task was re-run elsewhere) gives the same result, and the
distributed model equals the in-process one.

Memory on the worker that partitions a block: the block is read straight into its array
(:meth:`rpicluster.data.reader.Dataset.block`), sorted in place
(:func:`~rpicluster.models.ksgd.permute_rows`), and the pieces are views of it, so the block
costs one block of memory until its last piece is released.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np


@dataclasses.dataclass
class TaskReport:
    """Who ran a task and how long: ``rows`` trained on, the worker's ``worker`` name and
    ``address`` (None outside a worker), wall ``seconds``."""

    rows: int
    worker: str
    address: str | None
    seconds: float


@dataclasses.dataclass
class Partition(TaskReport):
    """A partitioned block, held on its worker: ``X``, ``y`` (rows sorted by cluster),
    ``centers``, ``bounds`` (cluster ``j`` is rows ``bounds[j]:bounds[j + 1]``), ``groups``
    (:func:`fit_groups`), ``phases`` (seconds of read, k-means and sort, and the task's CPU
    seconds: on a loaded machine wall time also counts waiting for a core)."""

    X: np.ndarray
    y: np.ndarray
    centers: np.ndarray
    bounds: np.ndarray
    groups: list
    phases: dict


@dataclasses.dataclass
class BlockMeta(TaskReport):
    """The small part of a :class:`Partition` that goes to the client: ``centers``, ``sizes``
    (rows per cluster), ``groups``, ``phases``."""

    centers: np.ndarray
    sizes: list
    groups: list
    phases: dict


@dataclasses.dataclass
class FitResult(TaskReport):
    """A fit group's local models: ``models`` (one LocalModel per cluster, from cluster
    ``first`` on), ``sizes`` (rows per cluster), ``cpu`` (the task's CPU seconds)."""

    models: list
    first: int
    sizes: list
    cpu: float


@dataclasses.dataclass
class BlockResult:
    """A whole block's task: its partition's ``meta`` and its one ``fit``."""

    meta: BlockMeta
    fit: FitResult


def worker_name() -> str:
    """The Dask worker running the current task, or "local" outside a worker."""
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except ValueError:
        return "local"


def task_cancelled() -> bool:
    """Whether the client cancelled the task running in this thread (released its future).

    Dask cannot interrupt a running task: a cancelled one keeps its worker's thread until it
    returns. A long task that asks between its steps can return early and free the thread for
    the work that replaced it. False outside a worker (and where the worker's state cannot be
    read, so that a task never stops for a reason it cannot see).
    """
    try:
        from distributed import get_worker

        worker = get_worker()
        task = worker.state.tasks.get(worker.get_current_task())
    except (ValueError, AttributeError):
        return False
    return task is None or task.state in ("cancelled", "released", "forgotten")


class TaskCancelled(Exception):
    """A long task stopped early because :func:`task_cancelled` said its future was released
    while it ran (a speculative copy that lost): nobody waits for its result, and the worker
    drops this error with the task."""


_CONTROLLER = None


def one_blas_thread():
    """BLAS limited to one thread, as in the in-process fit: a worker's threads are its
    parallelism, and oversubscribed BLAS was measured a hundred times slower. The library scan
    is done once per process (``threadpool_limits`` rescans on every call: ~20 ms a task)."""
    global _CONTROLLER
    from threadpoolctl import ThreadpoolController

    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


def warm_up() -> int:
    """Load what training uses and run a tiny k-means and SGD fit, so the one-time buffers of
    BLAS and OpenMP (tens of MiB, whatever the data size) are allocated; the process's RSS
    now (bytes): a worker's memory floor before it holds any block."""
    import psutil

    from rpicluster.models.ksgd import fit_cluster, partition_block

    rng = np.random.default_rng(0)
    X = rng.standard_normal((2000, 16)).astype(np.float32)
    y = rng.integers(0, 3, 2000)
    with one_blas_thread():
        partition_block(X, 4, seed=0)
        fit_cluster(X, y, seed=0, params={"max_iter": 1, "alpha": 1e-4, "learning_rate":
                                          "optimal", "eta0": 0.01, "power_t": 0.5,
                                          "batch_size": 256, "average": True,
                                          "solver": "minibatch"})
    return int(psutil.Process().memory_info().rss)


def worker_address() -> str | None:
    """Address of the Dask worker running the current task, or None outside a worker."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except ValueError:
        return None


def fit_groups(sizes, n_groups: int) -> list[tuple[int, int]]:
    """Consecutive clusters batched into at most ``n_groups`` fit tasks: ``[(first, stop), ...]``.

    Group ``i`` ends at the cluster boundary nearest to ``i / n_groups`` of the block's rows, so
    the groups hold about equal rows (a cluster larger than a share makes its group larger, and
    there may then be fewer groups). The groups cover every cluster once, none is empty.

    Parameters
    ----------
    sizes : sequence of int
        Rows per cluster.
    n_groups : int
        Groups wanted (at least 1; at most one per cluster).
    """
    k = len(sizes)
    if k == 0:
        return []
    cum = np.cumsum(np.asarray(sizes, dtype=np.int64))
    n = min(max(1, int(n_groups)), k)
    # cum[j] is the rows of clusters 0..j: cutting there starts a group at cluster j + 1.
    cuts = sorted({int(np.argmin(np.abs(cum[:-1] - cum[-1] * i / n))) + 1 for i in range(1, n)})
    bounds = [0, *cuts, k]
    return list(zip(bounds[:-1], bounds[1:]))


def partition_task(dataset, block: int, params: dict, random_state: int,
                   n_groups: int | None = None) -> Partition:
    """Read block ``block`` of ``dataset``, cluster its rows and sort them by cluster in place,
    and split the clusters into ``n_groups`` fit groups (default: one per cluster)."""
    from rpicluster.models.ksgd import group_rows, partition_block, permute_rows, task_seed

    t0, c0 = time.perf_counter(), time.thread_time()
    X, y = dataset.block(block)
    if not X.flags.writeable:
        X = X.copy()
    t1 = time.perf_counter()
    with one_blas_thread():
        centers, labels = partition_block(X, params["n_clusters"],
                                          seed=task_seed(random_state, block))
    t2 = time.perf_counter()
    order, bounds = group_rows(labels, centers.shape[0])
    del labels
    permute_rows(X, order)
    y = y[order]
    del order
    sizes = np.diff(bounds)
    t3 = time.perf_counter()
    return Partition(X=X, y=y, centers=centers, bounds=bounds,
                     groups=fit_groups(sizes, n_groups or params["n_clusters"]),
                     rows=int(X.shape[0]), worker=worker_name(), address=worker_address(),
                     seconds=t3 - t0,
                     phases={"read": t1 - t0, "kmeans": t2 - t1, "sort": t3 - t2,
                             "partition-cpu": time.thread_time() - c0})


def block_meta(part: Partition) -> BlockMeta:
    """The small part of a partition: centroids, sizes, groups, who ran it, how long."""
    return BlockMeta(centers=part.centers, sizes=np.diff(part.bounds).tolist(),
                     groups=part.groups, rows=part.rows, worker=part.worker,
                     address=part.address, seconds=part.seconds, phases=part.phases)


def cluster_piece(part: Partition, group: int):
    """Rows of fit group ``group``: ``(X_g, y_g, bounds_g, first)``, views into the sorted block.

    ``bounds_g`` are the group's cluster bounds relative to its first row and ``first`` its
    first cluster. A group the block does not have (the client submits its fits before it knows
    how many groups there are) is empty.
    """
    bounds = part.bounds
    if group >= len(part.groups):
        k = len(bounds) - 1
        return part.X[:0], part.y[:0], bounds[k:] - bounds[k], k
    first, stop = part.groups[group]
    lo, hi = int(bounds[first]), int(bounds[stop])
    return part.X[lo:hi], part.y[lo:hi], bounds[first:stop + 1] - lo, first


def fit_task(piece, block: int, group: int, params: dict, random_state: int) -> FitResult:
    """Fit the local model of every cluster of fit group ``group`` of block ``block``."""
    from rpicluster.models.ksgd import fit_cluster, task_seed

    t0, c0 = time.perf_counter(), time.thread_time()
    X, y, bounds, first_cluster = piece
    models = []
    with one_blas_thread():
        for i, (a, z) in enumerate(zip(bounds[:-1], bounds[1:])):
            # A copy of this task won (the driver cancelled this one): free the thread now
            # rather than after the rest of the group's clusters.
            if i and task_cancelled():
                raise TaskCancelled(f"block {block}, fit group {group}: cancelled after {i} "
                                    f"of {len(bounds) - 1} clusters")
            models.append(fit_cluster(X[a:z], y[a:z], params=params,
                                      seed=task_seed(random_state, block, first_cluster + i)))
    return FitResult(models=models, first=int(first_cluster), sizes=np.diff(bounds).tolist(),
                     rows=int(X.shape[0]), worker=worker_name(), address=worker_address(),
                     seconds=time.perf_counter() - t0, cpu=time.thread_time() - c0)


def block_task(dataset, block: int, params: dict, random_state: int) -> BlockResult:
    """A whole block in one task: :func:`partition_task`, then :func:`fit_task` of all its
    clusters on the same rows (one fit group), for a block the client does not need to share
    between workers. The block costs one block of memory, as in the graph."""
    part = partition_task(dataset, block, params, random_state, n_groups=1)
    meta = block_meta(part)
    piece = cluster_piece(part, 0)
    del part
    return BlockResult(meta=meta, fit=fit_task(piece, block, 0, params, random_state))


def predict_task(model, dataset, block: int) -> np.ndarray:
    """Labels predicted by ``model`` for the rows of block ``block``."""
    X, _ = dataset.block(block)
    return model.predict(X)


def score_task(model, dataset, block: int) -> tuple[int, int]:
    """(correct, rows) of ``model`` on block ``block``."""
    X, y = dataset.block(block)
    truth = np.asarray(dataset.classes)[y]
    return int(np.count_nonzero(model.predict(X) == truth)), int(y.shape[0])
