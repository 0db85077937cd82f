"""The Inc-kSGD training job on a Dask cluster, and distributed scoring and prediction.

The client submits, per block, a partition task and one fit task per cluster (see
:mod:`rpicluster.train.tasks`); every block's clusters are interleaved so all workers stay busy,
and Dask weighs data locality against idle cores when it places a fit. At most
``max_blocks_in_flight`` blocks are submitted at once (default: one more than there are workers),
which bounds each worker's memory to about two or three blocks whatever the dataset size. As
each block's fits return, the block model is assembled and committed to the run directory; a
resumed run skips the committed blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

from rpicluster import events as ev
from rpicluster.errors import RPiClusterError, TrainingError
from rpicluster.progress import Progress
from rpicluster.train import tasks
from rpicluster.train.rundir import RunDir


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
        Partition and fit tasks, rows processed and task seconds, by worker name.
    """

    model: object
    seconds: float
    trained_blocks: list
    resumed_blocks: list
    tasks_per_worker: Counter
    rows_per_worker: Counter
    busy_seconds_per_worker: Counter
    run_dir: Path | None = None

    def rows_per_second(self) -> dict:
        """Per-worker throughput over the time each worker spent in tasks."""
        return {w: self.rows_per_worker[w] / s for w, s in self.busy_seconds_per_worker.items()
                if s > 0}


class _Block:
    """Futures and results of one block in flight."""

    def __init__(self, index: int):
        self.index = index
        self.futures: list = []
        self.meta: dict | None = None
        self.models: dict[int, object] = {}
        self.n_clusters = 0

    def complete(self) -> bool:
        return self.meta is not None and len(self.models) == self.n_clusters


VALIDATE = "validate"  # marks a validation-scoring future in the driver's bookkeeping


def _log(client, kind: str, **fields) -> None:
    client.log_event(ev.TOPIC, ev.make_event(kind, **fields))


def train(estimator, dataset, client, *, run_dir=None, resume: bool = False,
          validation=None, workers: list[str] | None = None,
          max_blocks_in_flight: int | None = None, progress: Progress | None = None
          ) -> TrainResult:
    """Fit ``estimator`` (an IncrementalKSGDClassifier) on a Zarr ``dataset`` through ``client``.

    Parameters
    ----------
    estimator : IncrementalKSGDClassifier
        Supplies the parameters; it is fitted in place and returned as ``result.model``.
    dataset : rpicluster.data.store.Dataset
        Opened with :func:`rpicluster.open_dataset`; workers read its blocks themselves, so its
        URL must be readable from every worker (a shared path, ``http://`` or ``s3://``).
    client : distributed.Client
    run_dir : path, optional
        Where block models are committed as they finish. Without one nothing is written.
    resume : bool
        Continue the run in ``run_dir``: committed blocks are loaded, not recomputed.
    validation : Dataset, optional
        A labelled store each block model is scored on as it is committed (``validation``
        events, shown on the dashboard page).
    workers : list of str, optional
        Run every task on these workers only (addresses or names), e.g. one step of a scaling
        benchmark; default: any worker.
    max_blocks_in_flight : int, optional
        Blocks submitted at once; default one more than the number of workers.
    progress : Progress, optional
        Where to report blocks committed (with partition/fit counts and ETA).

    Raises
    ------
    TrainingError
        A task failed or kept killing its worker; the message names the block (and cluster).
    """
    from distributed import as_completed

    from rpicluster.models.ksgd import KSGDClassifier, resolve_random_state

    t0 = time.perf_counter()
    # A store's blocks are its chunks: block_rows is the store's, whatever the estimator says.
    params = {**estimator._check_params(), "block_rows": int(dataset.block_rows)}
    random_state = resolve_random_state(estimator.random_state)
    classes = np.asarray(dataset.classes)
    n_blocks = dataset.n_blocks
    rundir = RunDir(run_dir) if run_dir is not None else None
    done = rundir.begin(params, dataset, resume=resume) if rundir is not None else {}
    resumed = sorted(done)
    todo = [b for b in range(n_blocks) if b not in done]
    n_workers = len(workers) if workers else max(1, len(client.scheduler_info()["workers"]))
    where = {"workers": workers, "allow_other_workers": False} if workers else {}
    window = max_blocks_in_flight or n_workers + 1
    run_id = uuid.uuid4().hex[:8]
    progress = progress or Progress.null()
    counts, rows, busy = Counter(), Counter(), Counter()
    _log(client, ev.RUN_START, run_id=run_id, n_blocks=n_blocks, resumed=len(resumed),
         n_clusters=int(params["n_clusters"]), rows=int(dataset.n_rows))

    in_flight: dict[int, _Block] = {}
    pending = iter(todo)
    queue = as_completed([], with_results=True, raise_errors=False)
    owner: dict[str, tuple[int, int | None]] = {}
    prefix = f"rpicluster-{run_id}"

    def submit_partition() -> None:
        b = next(pending, None)
        if b is None:
            return
        blk = in_flight[b] = _Block(b)
        # Earlier blocks first, so they finish and free their workers' memory in order.
        part = client.submit(tasks.partition_task, dataset, b, params, random_state,
                             key=f"{prefix}-partition-{b}", priority=-b, **where)
        meta = client.submit(tasks.block_meta, part, key=f"{prefix}-meta-{b}", priority=-b,
                             **where)
        owner[meta.key] = (b, None)
        queue.add(meta)
        blk.futures = [part, meta]

    def submit_fits(blk: _Block) -> None:
        b, part = blk.index, blk.futures[0]
        for j in range(blk.n_clusters):
            piece = client.submit(tasks.cluster_piece, part, j, key=f"{prefix}-piece-{b}-{j}",
                                  priority=-b, **where)
            fit = client.submit(tasks.fit_task, piece, b, j, params, random_state,
                                key=f"{prefix}-fit-{b}-{j}", priority=-b, **where)
            owner[fit.key] = (b, j)
            queue.add(fit)
            blk.futures += [piece, fit]

    n_partitioned = n_fitted = 0
    scores: dict[int, list[int]] = {}  # block -> [validation blocks left, correct, rows]

    def submit_validation(b: int, model) -> None:
        [remote] = client.scatter([model], hash=False, **({"workers": workers} if workers else {}))
        scores[b] = [validation.n_blocks, 0, 0]
        for vb in range(validation.n_blocks):
            f = client.submit(tasks.score_task, remote, validation, vb, pure=False,
                              key=f"{prefix}-validate-{b}-{vb}", priority=-b, **where)
            owner[f.key] = (b, VALIDATE)
            queue.add(f)

    with progress, rundir or contextlib.nullcontext():  # owns the run directory until done
        if resumed:
            progress.skip(len(resumed), note=f"{len(resumed)} resumed")
        for _ in range(window):
            submit_partition()
        try:
            for future, result in queue:
                b, j = owner.pop(future.key)
                if future.status == "error":
                    _raise_task_error(future, b, None if j == VALIDATE else j)
                if j == VALIDATE:
                    left, correct, total = scores[b]
                    scores[b] = [left - 1, correct + result[0], total + result[1]]
                    if left == 1:
                        _log(client, ev.VALIDATION, run_id=run_id, block=b,
                             accuracy=scores[b][1] / max(scores[b][2], 1))
                    continue
                blk = in_flight[b]
                counts[result["worker"]] += 1
                rows[result["worker"]] += result["rows"]
                busy[result["worker"]] += result["seconds"]
                if j is None:
                    blk.meta = result
                    blk.n_clusters = len(result["sizes"])
                    submit_fits(blk)
                    n_partitioned += 1
                    _log(client, ev.PARTITIONED, run_id=run_id, block=b, rows=result["rows"],
                         worker=result["worker"], seconds=result["seconds"])
                else:
                    blk.models[j] = result["model"]
                    n_fitted += 1
                    _log(client, ev.FITTED, run_id=run_id, block=b, cluster=j,
                         rows=result["rows"], worker=result["worker"],
                         seconds=result["seconds"])
                progress.advance(0, note=f"{n_partitioned}/{len(todo)} partitioned, "
                                         f"{n_fitted} clusters fitted")
                if blk.complete():
                    model = KSGDClassifier.from_parts(
                        classes, blk.meta["centers"],
                        [blk.models[c] for c in range(blk.n_clusters)], params)
                    if rundir is not None:
                        rundir.commit_block(b, model, {"rows": blk.meta["rows"]})
                    done[b] = model
                    del in_flight[b]  # drops the futures: the block's data leaves the workers
                    _log(client, ev.COMMITTED, run_id=run_id, block=b)
                    progress.advance(note=f"block {b} committed, {n_fitted} clusters fitted")
                    if validation is not None:
                        submit_validation(b, model)
                    submit_partition()
        except BaseException:
            for blk in in_flight.values():
                client.cancel(blk.futures)
            _log(client, ev.RUN_END, run_id=run_id)
            raise
    estimator.estimators_ = [done[b] for b in range(n_blocks)]
    estimator.classes_ = classes
    estimator.n_features_in_ = int(dataset.n_features)
    _log(client, ev.RUN_END, run_id=run_id)
    return TrainResult(model=estimator, seconds=time.perf_counter() - t0,
                       trained_blocks=todo, resumed_blocks=resumed, tasks_per_worker=counts,
                       rows_per_worker=rows, busy_seconds_per_worker=busy,
                       run_dir=rundir.path if rundir else None)


def _raise_task_error(future, block: int, cluster: int | None):
    from distributed import KilledWorker

    exc = future.exception()
    where = f"block {block}" + (f", cluster {cluster}" if cluster is not None else "")
    if isinstance(exc, KilledWorker):
        raise TrainingError(
            f"{where} failed: the task killed its worker each time it ran "
            f"(distributed.scheduler.allowed-failures reached); the block may be too large for "
            f"the workers' memory or its data crashes the worker ({exc})") from exc
    if isinstance(exc, RPiClusterError):
        raise type(exc)(f"{where}: {exc}") from exc
    raise TrainingError(f"{where} failed on a worker: {type(exc).__name__}: {exc}") from exc


def _map_blocks(client, func, model, dataset, progress: Progress | None, what: str) -> list:
    """Run ``func(model, dataset, b)`` for every block on the cluster; results in block order."""
    from distributed import as_completed

    [remote_model] = client.scatter([model], broadcast=True, hash=False)
    futures = [client.submit(func, remote_model, dataset, b, pure=False, priority=-b)
               for b in range(dataset.n_blocks)]
    index = {f.key: b for b, f in enumerate(futures)}
    out: list = [None] * len(futures)
    with progress or Progress.null() as p:
        for future in as_completed(futures):
            b = index[future.key]
            if future.status == "error":
                _raise_task_error(future, b, None)
            out[b] = future.result()
            p.advance(note=f"{what} block {b}")
    return out


def predict_dataset(model, dataset, client, *, progress: Progress | None = None) -> np.ndarray:
    """Labels predicted for every row of ``dataset``, computed block by block on the workers."""
    parts = _map_blocks(client, tasks.predict_task, model, dataset, progress, "predicted")
    return np.concatenate(parts) if parts else np.empty(0)


def score_dataset(model, dataset, client, *, progress: Progress | None = None) -> float:
    """Accuracy of ``model`` on ``dataset``, computed block by block on the workers."""
    parts = _map_blocks(client, tasks.score_task, model, dataset, progress, "scored")
    correct = sum(c for c, _ in parts)
    total = sum(n for _, n in parts)
    return correct / total if total else float("nan")


def _register() -> None:
    # The estimator fits a blocked dataset on the current client through this job, without
    # importing it (models sit below train).
    from rpicluster.models.incremental import register_distributed_fit

    register_distributed_fit(train)


_register()
