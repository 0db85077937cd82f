"""Where a run's blocks go: the blocks each worker may hold (:func:`worker_slots`), the fit
tasks a shared block is split into (:func:`fit_groups_per_block`), whether a block is queued
ahead of a worker's threads (:func:`ahead_pays`), and the worker the next block goes to
(:func:`free_worker`)."""

from __future__ import annotations

import numpy as np

from rpicluster.train.speculate import SLOW, Pace, worth_a_block
from rpicluster.train.watch import usable_memory, worker_floor

# Blocks a worker may hold beyond one per thread, memory allowing: the next block waits on the
# worker behind the current one's fits, so the worker does not idle between blocks while the
# last fit's result goes to the client and the next block's tasks come back (tens of ms) ...
AHEAD = 1
# ... while a block takes under this many seconds (partition and fits) at the run's median
# speed: beyond it that wait is a few percent, not worth a block of memory (paper-scale 1 GB
# blocks of ~20 s trained no faster with one queued ahead, and peaked at 3.0 blocks per worker
# instead of 2.0). Not 2 s: on a CPU-capped host the wait is longer (its own event loop waits
# for its quota too), and the shelf's 15 % "Pis", whose 8 MB blocks take ~2.2 s, got none
# queued: 4 of them were busy 0.91 of a quiet step's wall, and, loaded, 0.73 with none queued
# against 0.91 with one (benchmarks/shelf.py, 19 blocks: 14.3 s against 10.6 s).
AHEAD_BELOW_S = 5.0


def ahead_pays(per_row: dict[str, list[float]], block_rows: int) -> bool:
    """Whether a block is short enough for one queued ahead to pay for its memory
    (:data:`AHEAD_BELOW_S`), from the seconds per row measured so far by phase (``partition``,
    ``fit``); not before both have been measured."""
    if not per_row.get("partition") or not per_row.get("fit"):
        return False
    seconds = (float(np.median(per_row["partition"])) + float(np.median(per_row["fit"]))) \
        * block_rows
    return seconds < AHEAD_BELOW_S


def worker_slots(worker_info: dict, block_bytes: int) -> dict[str, int]:
    """Blocks each worker may hold at once, from its memory limit and threads.

    A block held costs one block (its rows, sorted in place; the fits' pieces are views), and
    partitioning one costs about a third of a block more for a moment (k-means' sample), plus
    pieces of other blocks a worker fits: so a worker gets ``(room - block / 2) // (1.5 block)``
    slots, at least one and at most its threads plus :data:`AHEAD`, where room is what its
    limit allows below Dask's pause threshold above its post-import floor
    (:func:`~rpicluster.train.watch.worker_floor`). A worker without a limit gets its threads
    plus :data:`AHEAD`.

    Parameters
    ----------
    worker_info : dict
        ``client.scheduler_info()["workers"]`` (or the subset the run may use).
    block_bytes : int
        Bytes of one block (rows x features x 4 + labels).

    Returns
    -------
    dict
        Worker address -> slots.
    """
    out = {}
    for addr, w in worker_info.items():
        most = max(1, int(w.get("nthreads", 1))) + AHEAD
        if not w.get("memory_limit"):
            out[addr] = most
            continue
        room = usable_memory(w) - worker_floor(w)
        out[addr] = max(1, min(most, int((room - block_bytes / 2) // (1.5 * block_bytes))))
    return out


def fit_groups_per_block(n_clusters: int, worker_info: dict) -> int:
    """Fit tasks per block: one per thread of the run's workers, at most one per cluster.

    Enough for every thread to take a share of the last block's fits; more would only add
    tasks, each costing the scheduler, its worker and the client about a millisecond
    (:func:`rpicluster.train.tasks.fit_groups` splits a block's clusters into this many runs of
    about equal rows)."""
    threads = sum(max(1, int(w.get("nthreads", 1))) for w in worker_info.values())
    return max(1, min(int(n_clusters), threads))


def free_worker(slots: dict[str, int], threads: dict[str, int], holding, pace: Pace,
                remaining: int, block_rows: int) -> str | None:
    """The worker with the most free slots that is worth the next block (:func:`worth_a_block`,
    with ``remaining`` blocks not yet submitted); None when there is none. A block is queued
    ahead of a worker's threads (:data:`AHEAD`) only while blocks are short
    (:func:`ahead_pays`), and never on a slow worker: it would hold it long after the others
    could have trained it. Nor on a worker yet to return anything once others have (blocks are
    measured short only then): it is slower than they are, by how much is unknown (an emulated
    Cortex-A72 beside x86 held a second block for the whole run, then both were run again).

    Parameters
    ----------
    slots, threads : dict
        Worker address -> blocks it may hold (:func:`worker_slots`), its threads.
    holding : Counter
        Worker address -> blocks it holds or is planned to.
    pace : Pace
        The speeds measured so far.
    """
    free = {}
    ahead = ahead_pays(pace.per_row, block_rows)
    for a, n in slots.items():
        slow = pace.slowness(a)
        if not ahead or slow is None or slow > SLOW:
            n = min(n, threads.get(a, 1))
        if n > holding[a]:
            free[a] = n - holding[a]
    for a in sorted(free, key=free.get, reverse=True):
        slow = pace.slowness(a)
        faster = sum(1 for o in slots if o != a and (pace.slowness(o) or 1.0) < slow) \
            if slow is not None else 0
        if worth_a_block(slow, remaining, faster):
            return a
    return None
