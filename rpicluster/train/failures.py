"""Reading a failed task: what :class:`distributed.as_completed` hands back instead of a result,
and the one-line error that names the block (and cluster) it belonged to."""

from __future__ import annotations

from rpicluster.errors import RPiClusterError, TrainingError


def task_failure(result) -> BaseException | None:
    """What a failed task's entry in ``as_completed(..., with_results=True,
    raise_errors=False)`` carries instead of a result (its exception, or the CancelledError of a
    cancelled task); None for a result.

    Read from the entry, not from ``future.status`` when the entry is taken: a result gathered
    is in hand even if its worker dies a moment later, and the future then reads ``lost`` while
    Dask recomputes it (a worker killed mid-run made a finished block look failed)."""
    from distributed import CancelledError

    if isinstance(result, CancelledError):
        return result
    if isinstance(result, tuple) and len(result) == 3 and isinstance(result[1], BaseException):
        return result[1]  # distributed's clean_exception: (type, exception, traceback)
    return None


def killed_blocks(in_flight: dict) -> list[int]:
    """Blocks (of ``in_flight``: block -> its ``futures``) with a task Dask gave up on because
    its worker kept dying (KilledWorker)."""
    from distributed import KilledWorker

    return sorted(b for b, blk in in_flight.items()
                  if any(f.status == "error" and isinstance(f.exception(), KilledWorker)
                         for f in blk.futures))


def raise_task_error(exc: BaseException, block: int, cluster: int | None, killed_with=()):
    """Raise the TrainingError (or the task's own RPiClusterError) for a task of ``block`` that
    failed with ``exc``.

    ``killed_with``: the blocks whose tasks Dask gave up on with this one because their worker
    kept dying. Every task waiting on a worker is blamed for its death, so any of them may be
    the cause; the worker runs the earliest block first, which is named (the others too)."""
    from distributed import CancelledError, KilledWorker

    if isinstance(exc, KilledWorker):
        blocks = sorted({block, *killed_with})
        where = f"block {blocks[0]}" if len(blocks) > 1 else \
            f"block {block}" + (f", cluster {cluster}" if cluster is not None else "")
        also = (f" (so did the tasks of block(s) {', '.join(map(str, blocks[1:]))}, waiting on "
                f"the same worker: one of these blocks is the cause, most likely the first)"
                if len(blocks) > 1 else "")
        raise TrainingError(
            f"{where} failed: the task killed its worker each time it ran "
            f"(distributed.scheduler.allowed-failures reached){also}; the block may be too "
            f"large for the workers' memory or its data crashes the worker ({exc})") from exc
    where = f"block {block}" + (f", cluster {cluster}" if cluster is not None else "")
    if isinstance(exc, CancelledError):  # not by this run: by the scheduler, or another client
        raise TrainingError(
            f"{where}: its task was cancelled on the scheduler while the run still needed it "
            f"({exc}); train again (with a run directory, --resume keeps the blocks "
            f"committed)") from exc
    if isinstance(exc, RPiClusterError):
        raise type(exc)(f"{where}: {exc}") from exc
    raise TrainingError(f"{where} failed on a worker: {type(exc).__name__}: {exc}") from exc
