"""The Inc-kSGD training job on a Dask cluster, and distributed scoring and prediction.

The client submits each block as one ``block-`` task (read, k-means and the fits of all its
clusters, on one worker) while there are more blocks left than threads to train them; the last
blocks, one per thread, as a graph that the workers share: a partition task and one fit task per
group of clusters (see :mod:`rpicluster.train.tasks`; keys start with their phase:
``partition-``, ``fit-``, ``score-``...), where Dask weighs data locality against idle cores
when it places a fit, so no worker idles at the end while another fits a whole block. At most a
window of blocks is in flight (default: one more than there are workers, fewer where the
workers' memory limits say so), which bounds each worker's memory to about two blocks whatever
the dataset size. As each block's results return, the block model is assembled, the next block
is submitted, and the model is committed to the run directory by a background thread; a resumed
run skips the committed blocks.
:class:`TrainingRun` is the run loop.

Uneven workers (a Pi next to a desktop) must not hold the tail of a run. A worker measured much
slower than the others gets no new block near the end when the faster ones would finish it
sooner (:func:`worth_a_block`), and once every block is submitted, a task running late on one
worker while another worker is idle is run again there under its own key (``…-copy``): a
whole block or a partition with its block graph, a fit with the same piece. Every task is a pure
function of its seeded inputs, so both copies compute the same result; the first to finish is
taken and the other cancelled (:meth:`TrainingRun.speculate`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from rpicluster import events as ev
from rpicluster.errors import RPiClusterError, TrainingError
from rpicluster.progress import Progress
from rpicluster.train import tasks
from rpicluster.train.rundir import RunDir
from rpicluster.train.watch import (ClusterWatch, check_memory, measure_floors, usable_memory,
                                    worker_floor)


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
        Partition and fit tasks whose results were taken, their rows and task seconds, by
        worker name (a whole-block task counts as the partition and the fit it ran; a
        speculative copy's loser is not counted).
    run_dir : Path or None
    phases : dict
        Seconds by phase: on the workers ``read``, ``kmeans``, ``sort``, ``fit`` (task time,
        summed over workers) and ``partition-cpu``, ``fit-cpu`` (their CPU time), on the driver ``driver-assemble``, ``driver-validation`` and
        ``driver-commit`` (waiting for the background writer at the end).
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


class _Block:
    """Futures and results of one block in flight."""

    def __init__(self, index: int, planned: str | None):
        self.index = index
        self.planned = planned  # the worker chosen to partition it (None: Dask chooses)
        self.pinned = False  # its partition may run on the planned worker only
        self.whole = False  # one block task (partition and fits) instead of the graph
        self.n_groups = 1  # its fit groups (a piece and a fit task each, in the graph)
        self.fit_pinned: set[str] = set()  # the only workers its fits may run on (if any)
        self.address: str | None = None  # the worker that did, and holds its rows
        self.futures: list = []  # the client's references: meta and the fits (and copies)
        self.pieces: dict = {}  # fit group -> piece future, until the group is fitted
        self.meta: dict | None = None
        self.models: dict[int, object] = {}  # cluster -> LocalModel
        self.fitted: set[int] = set()  # fit groups whose result was taken
        self.fits_left = 0
        self.n_clusters = 0

    def complete(self) -> bool:
        return self.meta is not None and self.fits_left == 0

    def group_rows(self, group: int) -> int:
        """Rows of fit group ``group`` (0 for a group the block does not have)."""
        groups = self.meta["groups"]
        if group >= len(groups):
            return 0
        first, stop = groups[group]
        return int(sum(self.meta["sizes"][first:stop]))


VALIDATE = "validate"  # marks a validation-scoring future in the driver's bookkeeping
BLOCK = "block"  # marks a whole-block task's future (tasks.block_task)


# A task runs late when it has taken this many times the seconds its rows should take (at the
# median seconds per row of its phase so far), plus a margin for scheduling noise.
LATE_FACTOR = 2.0
LATE_MARGIN_S = 0.5
# How often the run loop looks for late tasks while no result arrives.
TICK_S = 0.25
# A worker this many times slower than usual counts as slow: no block near the end of a run
# (worth_a_block), no block queued ahead.
SLOW = 1.5
# Blocks a worker may hold beyond one per thread, memory allowing: the next block waits on the
# worker behind the current one's fits, so the worker does not idle between blocks while the
# last fit's result goes to the client and the next block's tasks come back (tens of ms) ...
AHEAD = 1
# ... while a block takes under this many seconds (partition and fits) at the run's median
# speed: beyond it that wait is a few percent, not worth a block of memory (paper-scale 1 GB
# blocks of ~20 s trained no faster with one queued ahead, and peaked at 3.0 blocks per worker
# instead of 2.0).
AHEAD_BELOW_S = 2.0


def worth_a_block(slowness: float | None, remaining: int, faster: int) -> bool:
    """Whether a worker ``slowness`` times slower than usual should take one of the
    ``remaining`` unstarted blocks, when ``faster`` faster workers could take it instead.

    The block would end ``slowness`` block-times from now on this worker; the faster workers
    finish the other ``remaining - 1`` in about ``(remaining - 1) / faster`` block-times after
    the one they hold. Near the end of a run that is sooner, and the slow worker would hold the
    tail: it gets the block only while ``remaining > faster * (slowness - 1)``.
    """
    if slowness is None or slowness <= SLOW or faster == 0:
        return True
    return remaining > faster * (slowness - 1)


def behind(slowness: float | None, faster: float, expected: float, elapsed: float) -> bool:
    """Whether a task on a worker ``slowness`` times slower than usual, running for ``elapsed``
    seconds, is worth a copy on an idle worker ``faster`` times slower than usual (1: usual),
    for a task of ``expected`` seconds at the usual speed: when the copy would end first (the
    "longest approximate time to end" of Zaharia et al.'s LATE scheduler; the idle worker has
    nothing else to do). Never on a worker of usual speed: there a copy only helps once the
    task runs late (:data:`LATE_FACTOR`), and would otherwise double the work of a homogeneous
    cluster's tail."""
    if slowness is None or slowness <= SLOW:
        return False
    return slowness * expected - elapsed > faster * expected


def ahead_pays(per_row: dict[str, list[float]], block_rows: int) -> bool:
    """Whether a block is short enough for one queued ahead to pay for its memory
    (:data:`AHEAD_BELOW_S`), from the seconds per row measured so far by phase (``partition``,
    ``fit``); not before both have been measured."""
    if not per_row.get("partition") or not per_row.get("fit"):
        return False
    seconds = (float(np.median(per_row["partition"])) + float(np.median(per_row["fit"]))) \
        * block_rows
    return seconds < AHEAD_BELOW_S


def _log(client, kind: str, **fields) -> None:
    client.log_event(ev.TOPIC, ev.make_event(kind, **fields))


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


class TrainingRun:
    """The run loop of one training job: submit, on_result, commit.

    :func:`train` builds one and calls :meth:`run`; the phases are methods so that each can be
    read and tested alone.

    * :meth:`submit_partition` sends the next block's whole graph at once (partition, meta, and
      a piece and a fit task per possible fit group, so no worker waits for the driver between
      a partition and its fits) to a worker with a free slot (:func:`worker_slots`: a worker
      holds at most as many blocks as its memory allows), while fewer than ``window`` blocks
      are in flight;
    * :meth:`on_result` takes one finished task: a meta result records where the block's rows
      are held, a fit result is stored, a validation result is counted;
    * :meth:`commit` assembles a complete block model, submits the next partition first (so the
      workers never wait on the driver), then hands the run-directory write to a background
      thread (a skops dump and two fsyncs are the driver's slowest step);
    * :meth:`speculate`, once every block is submitted, runs a late task again on an idle
      worker (the first copy to finish is taken, the other cancelled).

    ``driver_seconds`` records where the driver's own time goes (``assemble``, ``commit``
    [waiting for the writer thread at the end], ``validation``), for the per-phase table of
    ``benchmarks/train_profile.py``.
    """

    def __init__(self, estimator, dataset, client, *, run_dir=None, resume: bool = False,
                 validation=None, workers: list[str] | None = None,
                 max_blocks_in_flight: int | None = None, progress: Progress | None = None,
                 speculate: bool = True):
        from distributed import as_completed

        from rpicluster.models.ksgd import resolve_random_state

        self.estimator, self.dataset, self.client = estimator, dataset, client
        self.validation = validation
        # A store's blocks are its chunks: block_rows is the store's, whatever the estimator says.
        self.params = {**estimator._check_params(), "block_rows": int(dataset.block_rows)}
        self.random_state = resolve_random_state(estimator.random_state)
        self.classes = np.asarray(dataset.classes)
        self.rundir = RunDir(run_dir) if run_dir is not None else None
        self.resume = resume
        self.done: dict[int, object] = {}
        self.workers = workers
        self.where = {"workers": workers, "allow_other_workers": False} if workers else {}
        self.max_blocks_in_flight = max_blocks_in_flight
        self.progress = progress or Progress.null()
        self.run_id = uuid.uuid4().hex[:8]
        self.watch = ClusterWatch(client, self.progress, workers=workers, run_id=self.run_id)
        self.counts, self.rows, self.busy = Counter(), Counter(), Counter()
        self.worker_phases: Counter = Counter()  # task seconds by phase (read, kmeans, ...)
        self.driver_seconds: Counter = Counter()
        self.in_flight: dict[int, _Block] = {}
        self.owner: dict[str, tuple[int, int | str | None]] = {}
        self.queue = as_completed([], with_results=True, raise_errors=False)
        self.scores: dict[int, list[int]] = {}  # block -> [validation blocks left, correct, rows]
        self.n_partitioned = self.n_fitted = 0
        self.n_groups = 1  # fit tasks of a block shared between workers (fit_groups_per_block)
        self.tail = 1  # the last blocks of a run are shared: one per thread of its workers
        self.window = 1
        self.slots: dict[str, int] = {}  # worker address -> blocks it may hold
        self.threads: dict[str, int] = {}  # worker address -> its threads
        self.holding: Counter = Counter()  # worker address -> blocks held or planned there
        self.todo: list[int] = []
        self.resumed: list[int] = []
        self.n_submitted = 0
        self._pending = iter(())
        # Speculation: original partition/fit keys that may be copied -> (block, phase, group),
        # when each became runnable, when each worker last returned a result, seconds per row
        # by phase (all workers) and each worker's seconds per row over its phase's median.
        self.speculable: dict[str, tuple[int, str, int | None]] = {}
        self.ready_at: dict[str, float] = {}
        self.last_seen: dict[str, float] = {}
        self.per_row: dict[str, list[float]] = {"partition": [], "fit": []}
        self.slowness_obs: dict[str, list[float]] = {}
        self.copies: set[str] = set()
        self.speculation: Counter = Counter()
        self.speculative = speculate
        self.first_result: float | None = None  # workers import their libraries before it
        self.started = self.warm_up = 0.0
        self._writer = None
        self._writes: list = []  # (block, concurrent future) of run-directory commits

    # --- set-up ---

    def prepare(self) -> None:
        """Wait (bounded) for a worker, refuse workers whose memory cannot hold a block, create
        or resume the run directory, pick the blocks to train and the window."""
        info = self.watch.wait_for_workers(f"{self.dataset.n_blocks} blocks to train")
        info = measure_floors(self.client, info, key=self._key("warm-up"),
                              timeout=self.watch.silent_after)
        check_memory(info, self._block_bytes(), worker_slots(info, self._block_bytes()))
        if self.rundir is not None:
            self.done = self.rundir.begin(self.params, self.dataset, resume=self.resume)
        self.resumed = sorted(self.done)
        self.todo = [b for b in range(self.dataset.n_blocks) if b not in self.done]
        self._pending = iter(self.todo)
        self._refresh_slots()
        self.window = self.max_blocks_in_flight or max(1, sum(self.slots.values()))
        self.n_groups = fit_groups_per_block(self.params["n_clusters"], info)
        self.tail = sum(self.threads.values())

    def _refresh_slots(self) -> None:
        """Follow the workers connected now: a worker that left loses its slots, and one that
        joined (or came back under a new address after a restart) gets its own. The slots of a
        worker already known are kept: its memory now counts the blocks it holds."""
        info = self.watch.workers()
        self.threads = {a: max(1, int(w.get("nthreads", 1))) for a, w in info.items()}
        self.slots = {a: n for a, n in self.slots.items() if a in info}
        new = {a: w for a, w in info.items() if a not in self.slots}
        self.slots.update(worker_slots(new, self._block_bytes()))

    def _block_bytes(self) -> int:
        return self.dataset.block_rows * (self.dataset.n_features * 4 + 4)

    def _free_worker(self) -> str | None:
        """The worker with the most free slots that is worth the next block
        (:func:`worth_a_block`); None when there is none. A block is queued ahead of a
        worker's threads (:data:`AHEAD`) only while blocks are short (:func:`ahead_pays`), and
        never on a slow worker: it would hold it long after the others could have trained it."""
        free = {}
        ahead = ahead_pays(self.per_row, self.dataset.block_rows)
        for a, n in self.slots.items():
            slow = self._slowness(a)
            if not ahead or (slow is not None and slow > SLOW):
                n = min(n, self.threads.get(a, 1))
            if n > self.holding[a]:
                free[a] = n - self.holding[a]
        remaining = len(self.todo) - self.n_submitted
        for a in sorted(free, key=free.get, reverse=True):
            slow = self._slowness(a)
            faster = sum(1 for o in self.slots if o != a and (self._slowness(o) or 1.0) < slow) \
                if slow is not None else 0
            if worth_a_block(slow, remaining, faster):
                return a
        return None

    def _slowness(self, address: str) -> float | None:
        """A worker's seconds per row over its phase's median (1: usual), None before it has
        returned anything."""
        obs = self.slowness_obs.get(address)
        return float(np.median(obs)) if obs else None

    def _observe(self, address: str | None, phase: str, rows: int, seconds: float) -> None:
        """Record a result's speed, for late-task detection and block planning."""
        now = time.perf_counter()
        if self.first_result is None:
            self.first_result, self.warm_up = now, now - self.started
        if address is not None:
            self.last_seen[address] = now
        if rows <= 0 or address is None:
            return
        per_row = seconds / rows
        self.per_row[phase].append(per_row)
        median = float(np.median(self.per_row[phase]))
        if median > 0:
            self.slowness_obs.setdefault(address, []).append(per_row / median)

    def _key(self, phase: str, *parts) -> str:
        return "-".join([phase, self.run_id, *(str(p) for p in parts)])

    # --- submit ---

    def submit_partition(self) -> bool:
        """Submit the next block's tasks if the window and a worker's memory allow; False
        when nothing was submitted.

        Partition, meta, and one piece and one fit task for each of the ``n_groups`` fit
        groups a block can have (a group that turns out not to exist is an empty piece and a
        fit that returns nothing). The client keeps only meta and the fits: a piece is released
        once its fit has run, the partition result once every piece is cut from it.
        """
        if len(self.in_flight) >= self.window:
            return False
        # A window the caller fixed is taken as is, and Dask places the blocks.
        planned = self._free_worker() if self.max_blocks_in_flight is None else None
        if self.max_blocks_in_flight is None and planned is None:
            return False  # every worker holds all the blocks its memory allows
        b = next(self._pending, None)
        if b is None:
            return False
        blk = self.in_flight[b] = _Block(b, planned)
        # Only the last blocks are shared between workers: before them, every thread has a
        # block of its own to train.
        left = len(self.todo) - self.n_submitted
        blk.whole = self.n_groups == 1 or left > self.tail
        blk.n_groups = 1 if blk.whole else self.n_groups
        self.n_submitted += 1
        where = self.where
        if planned is not None:
            self.holding[planned] += 1
        if planned is not None and len(self.slots) > 1:
            # The partition and its pieces on the planned worker: Dask would otherwise cut a
            # piece on an idle worker and move the whole block there first. A preference, not
            # a pin: if that worker dies, Dask runs them elsewhere. Not for a lone worker: if
            # it dies, nothing else is running, the tasks wait as no-worker, and Dask does not
            # hand them to the worker the nanny restarts (a new address) despite
            # allow_other_workers: the run would wait forever.
            # In a run restricted to some workers the pin is strict: a loose one lets Dask's
            # work stealing hand the partition to any idle worker of the cluster, outside the
            # run's workers (and a block whose worker leaves first stops the run:
            # _check_planned).
            where = {"workers": [planned], "allow_other_workers": not self.workers}
            blk.pinned = bool(self.workers)
        self._submit_graph(blk, where, self._fit_where(blk))
        return True

    def _fit_where(self, blk: _Block) -> dict:
        """Where a shared block's fits may run: not on a worker measured slow (:data:`SLOW`),
        when there are others. The slow worker is not given the last blocks
        (:func:`worth_a_block`) and idles, and Dask may then hand it a fit the run would wait
        for. A preference, as for a partition, unless the run is restricted to some workers
        (then a pin: :meth:`_check_planned` stops the run if they all leave)."""
        fast = [a for a in self.slots if (self._slowness(a) or 1.0) <= SLOW]
        if blk.whole or not fast or len(fast) == len(self.slots):
            return self.where
        if self.workers:
            blk.fit_pinned = set(fast)
        return {"workers": fast, "allow_other_workers": not self.workers}

    def _submit_graph(self, blk: _Block, where: dict, fit_where: dict,
                      suffix: tuple = ()) -> None:
        """A block's graph in two messages to the scheduler (each ``client.submit`` is one, and
        the scheduler's cost is mostly per message): its partition, meta and pieces
        (``where``), then its fits (``fit_where``); or, for a whole block, its one task
        (``where``). Earlier blocks first (``priority``), so they finish and free their
        workers' memory in order."""
        b = blk.index
        if blk.whole:
            whole = self.client.submit(tasks.block_task, self.dataset, b, self.params,
                                       self.random_state, key=self._key("block", b, *suffix),
                                       priority=-b, **where)
            self.owner[whole.key] = (b, BLOCK)
            self.queue.add(whole)
            blk.futures.append(whole)
            if suffix:
                self.copies.add(whole.key)
                return
            self.speculable[whole.key] = (b, BLOCK, None)
            self.ready_at[whole.key] = time.perf_counter()
            blk.fits_left = 1
            return
        part = self._key("partition", b, *suffix)
        meta = self._key("meta", b, *suffix)
        cut = [self._key("piece", b, g, *suffix) for g in range(blk.n_groups)]
        graph = {part: (tasks.partition_task, self.dataset, b, self.params, self.random_state,
                        blk.n_groups),
                 meta: (tasks.block_meta, part),
                 **{key: (tasks.cluster_piece, part, g) for g, key in enumerate(cut)}}
        meta_f, *pieces = self.client.get(graph, [meta, *cut], sync=False, priority=-b, **where)
        graph = {self._key("fit", b, g, *suffix): (tasks.fit_task, piece, b, g, self.params,
                                                   self.random_state)
                 for g, piece in enumerate(pieces)}
        fits = self.client.get(graph, list(graph), sync=False, priority=-b, **fit_where)
        self.owner[meta_f.key] = (b, None)
        self.queue.add(meta_f)
        blk.futures.append(meta_f)
        for g, fit in enumerate(fits):
            self.owner[fit.key] = (b, g)
            self.queue.add(fit)
            blk.futures.append(fit)
        if suffix:
            self.copies.update(f.key for f in (meta_f, *fits))
            return
        self.speculable[part] = (b, "partition", None)
        self.ready_at[part] = time.perf_counter()
        blk.fits_left = blk.n_groups
        for g, (piece, fit) in enumerate(zip(pieces, fits)):
            blk.pieces[g] = piece  # kept for a copy of its fit (speculate)
            self.speculable[fit.key] = (b, "fit", g)

    def submit_validation(self, b: int, model) -> None:
        """Score block model ``b`` on every validation block (``score-…`` tasks)."""
        t0 = time.perf_counter()
        client, workers = self.client, self.workers
        [remote] = client.scatter([model], hash=False, **({"workers": workers} if workers else {}))
        self.scores[b] = [self.validation.n_blocks, 0, 0]
        for vb in range(self.validation.n_blocks):
            f = client.submit(tasks.score_task, remote, self.validation, vb, pure=False,
                              key=self._key("score", b, vb), priority=-b, **self.where)
            self.owner[f.key] = (b, VALIDATE)
            self.queue.add(f)
        self.driver_seconds["validation"] += time.perf_counter() - t0

    # --- results ---

    def on_result(self, future, result) -> None:
        """Take one finished task's result (raises TrainingError for a failed task).

        Of a task and its speculative copy the first result is taken; the other's result,
        failure or cancellation is dropped (a result still tells how fast its worker was)."""
        b, j = self.owner.pop(future.key)
        copy = future.key in self.copies
        self.copies.discard(future.key)
        self.speculable.pop(future.key, None)
        blk = self.in_flight.get(b) if j != VALIDATE else None
        needed = blk is not None and (blk.meta is None if j in (None, BLOCK) else
                                      j not in blk.fitted)
        failure = task_failure(result)
        if failure is not None:
            if copy or (j != VALIDATE and not needed):
                return  # a cancelled or failed copy, or a loser: the other one counts
            _raise_task_error(failure, b, j if isinstance(j, int) else None,
                              killed_with=self._killed_blocks())
        if j == VALIDATE:
            left, correct, total = self.scores[b]
            self.scores[b] = [left - 1, correct + result[0], total + result[1]]
            if left == 1:
                _log(self.client, ev.VALIDATION, run_id=self.run_id, block=b,
                     accuracy=self.scores[b][1] / max(self.scores[b][2], 1))
            return
        # A whole block's result is its partition's and its one fit's.
        parts = [(None, result["meta"]), (0, result["fit"])] if j == BLOCK else [(j, result)]
        for g, part in parts:
            self._observe(part.get("address"), "fit" if g is not None else "partition",
                          part["rows"], part["seconds"])
        if not needed:
            return  # the other copy's result was taken first
        if copy:
            self.speculation["won"] += 1
        for g, part in parts:
            if g is None:
                self._take_partition(blk, part)
            else:
                self._take_fit(blk, g, part)
        self.progress.advance(0, note=f"{self.n_partitioned}/{len(self.todo)} partitioned, "
                                      f"{self.n_fitted} clusters fitted")
        if blk.complete():
            self.commit(blk)

    def _killed_blocks(self) -> list[int]:
        """Blocks in flight with a task Dask gave up on because its worker kept dying
        (KilledWorker)."""
        from distributed import KilledWorker

        return sorted(b for b, blk in self.in_flight.items()
                      if any(f.status == "error" and isinstance(f.exception(), KilledWorker)
                             for f in blk.futures))

    def _count(self, result: dict) -> None:
        w = result["worker"]
        if result["rows"]:
            self.counts[w] += 1
            self.rows[w] += result["rows"]
            self.busy[w] += result["seconds"]

    def _take_partition(self, blk: _Block, result: dict) -> None:
        """A block's partition result (its meta): where its rows are held, its clusters."""
        b = blk.index
        self._count(result)
        blk.meta = result
        now = time.perf_counter()
        for g in range(blk.n_groups):  # the fits can run from now
            self.ready_at[self._key("fit", b, g)] = now
        blk.n_clusters = len(result["sizes"])
        blk.address = result["address"]
        if blk.planned != blk.address:  # Dask chose, or the planned worker left
            if blk.planned is not None:
                self.holding[blk.planned] -= 1
            self.holding[blk.address] += 1
        self.worker_phases.update(result["phases"])
        self.n_partitioned += 1
        _log(self.client, ev.PARTITIONED, run_id=self.run_id, block=b, rows=result["rows"],
             worker=result["worker"], seconds=result["seconds"])

    def _take_fit(self, blk: _Block, group: int, result: dict) -> None:
        """A fit task's result: the local models of its group's clusters."""
        self._count(result)
        blk.fitted.add(group)
        blk.pieces.pop(group, None)
        blk.fits_left -= 1
        self.worker_phases["fit"] += result["seconds"]
        self.worker_phases["fit-cpu"] += result.get("cpu", 0.0)
        first, sizes = result["first"], result["sizes"]
        for i, model in enumerate(result["models"]):
            blk.models[first + i] = model
        self.n_fitted += len(sizes)
        if sizes:  # one event per fit task: its clusters are first .. first + clusters - 1
            _log(self.client, ev.FITTED, run_id=self.run_id, block=blk.index, cluster=first,
                 clusters=len(sizes), rows=result["rows"], worker=result["worker"],
                 seconds=result["seconds"])

    def commit(self, blk: _Block) -> None:
        """Assemble a complete block's model, keep the window full, write it in the background."""
        from rpicluster.models.ksgd import KSGDClassifier

        b = blk.index
        del self.in_flight[b]  # drops the futures: the block's data leaves the workers
        losers = [f for f in blk.futures if not f.done()]  # a task's slower copy
        if losers:
            self.client.cancel(losers)
        if blk.address is not None and self.holding[blk.address] > 0:
            self.holding[blk.address] -= 1
        if self.max_blocks_in_flight is None:
            self._refresh_slots()
        while self.submit_partition():  # before anything slow: a worker may be waiting
            pass
        t0 = time.perf_counter()
        model = KSGDClassifier.from_parts(self.classes, blk.meta["centers"],
                                          [blk.models[c] for c in range(blk.n_clusters)],
                                          self.params)
        self.done[b] = model
        self.driver_seconds["assemble"] += time.perf_counter() - t0
        if self.validation is not None:
            self.submit_validation(b, model)
        if self.rundir is None:
            self._committed(b)
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="rpicluster-commit")
        self._writes.append(
            (b, self._writer.submit(self.rundir.commit_block, b, model, {"rows": blk.meta["rows"]})))
        self._drain_writes(wait=False)

    def _committed(self, b: int) -> None:
        _log(self.client, ev.COMMITTED, run_id=self.run_id, block=b)
        self.progress.advance(note=f"block {b} committed, {self.n_fitted} clusters fitted")

    def _drain_writes(self, wait: bool) -> None:
        """Report the run-directory writes that finished (all of them with ``wait``); a failed
        write raises here, in the driver."""
        t0 = time.perf_counter()
        still = []
        for b, w in self._writes:
            if wait or w.done():
                w.result()
                self._committed(b)
            else:
                still.append((b, w))
        self._writes = still
        if wait:
            self.driver_seconds["commit"] += time.perf_counter() - t0

    # --- the tail ---

    def speculate(self) -> int:
        """Once every block is submitted, run late tasks again on idle workers; the copies
        submitted.

        A partition, fit or whole-block task is late when it has run ``LATE_FACTOR`` times
        the seconds its rows take at its phase's median seconds per row (plus
        ``LATE_MARGIN_S``), or when its worker is measured slow and a copy on an idle one would
        end first (:func:`behind`: so a slow worker's last task does not end the run); its
        start is taken as the latest of when it could run, when its worker last returned a
        result and the run's first result (before it, every worker imports its libraries; a
        worker yet to return anything is allowed that warm-up again). The oldest block's late
        task goes to an idle worker first; a worker measured slower than the late task's own
        is not given it. A late partition is copied with its whole block graph (meta and
        pieces on the idle worker, fits on any worker but the late one's), a late whole block
        as one task on the idle worker, a late fit with the same piece. Each task is copied
        once. Nothing, in a run started
        with ``speculate=False``.
        """
        if not self.speculative or self.n_submitted < len(self.todo) or not self.in_flight \
                or len(self.slots) < 2:
            return 0
        # All workers' tasks, then this run's: asking for a worker the scheduler has just
        # removed (a host lost mid-run) raises KeyError on the scheduler.
        processing = {a: keys for a, keys in self.client.processing().items() if a in self.slots}
        idle = [a for a in self.slots if a in processing and not processing[a]]
        if not idle:
            return 0
        now = time.perf_counter()
        late = []
        for addr, keys in processing.items():
            others = [a for a in idle if a != addr]
            if not others:
                continue  # no idle worker could take a copy
            fastest = min(self._slowness(a) or 1.0 for a in others)
            mine = self._slowness(addr)
            # A worker yet to return anything may still be importing: it gets the time the
            # first result took.
            cold = 0.0 if addr in self.last_seen else self.warm_up
            for key in keys:
                spec = self.speculable.get(str(key))
                if spec is None:
                    continue
                b, phase, g = spec
                blk = self.in_flight.get(b)
                if blk is None or (blk.meta is not None if g is None else
                                   blk.meta is None or g in blk.fitted):
                    continue
                rows = blk.group_rows(g) if g is not None else self.dataset.block_rows
                expected = self._expected(phase, rows)
                if expected is None:
                    continue
                started = max(self.ready_at.get(str(key), now), self.last_seen.get(addr, 0.0),
                              self.first_result or now)
                if rows and (now - started > LATE_FACTOR * expected + LATE_MARGIN_S + cold
                             or behind(mine, fastest, expected, now - started)):
                    late.append((b, -1 if g is None else g, str(key), addr))
        n = 0
        for b, g, key, addr in sorted(late):
            mine = self._slowness(addr)
            target = next((a for a in idle if a != addr and (
                mine is None or (self._slowness(a) or 1.0) < mine)), None)
            if target is None:
                continue
            idle.remove(target)
            del self.speculable[key]
            self._copy(self.in_flight[b], None if g < 0 else g, target, addr)
            n += 1
        self.speculation["copies"] += n
        return n

    def _expected(self, phase: str, rows: int) -> float | None:
        """Seconds a task of ``phase`` (``partition``, ``fit``, or a whole block: both) on
        ``rows`` rows takes at the run's median speed; None until that is measured."""
        phases = ("partition", "fit") if phase == BLOCK else (phase,)
        if not all(self.per_row[p] for p in phases):
            return None
        return sum(float(np.median(self.per_row[p])) for p in phases) * rows

    def _copy(self, blk: _Block, group: int | None, target: str, late: str) -> None:
        """Run a late partition (``group`` None) or fit again on ``target``."""
        b, pin = blk.index, {"workers": [target], "allow_other_workers": False}
        if group is not None:
            fit = self.client.submit(tasks.fit_task, blk.pieces[group], b, group, self.params,
                                     self.random_state, key=self._key("fit", b, group, "copy"),
                                     priority=-b, **pin)
            self.owner[fit.key] = (b, group)
            self.copies.add(fit.key)
            self.queue.add(fit)
            blk.futures.append(fit)
            return
        # The copy brings a fit of every group, under the keys a copy of a single fit would
        # take: the original fits are not copied again.
        for g in range(blk.n_groups):
            self.speculable.pop(self._key("fit", b, g), None)
        others = [a for a in self.slots if a != late]
        self._submit_graph(blk, pin, {"workers": others, "allow_other_workers": False},
                           suffix=("copy",))

    # --- the loop ---

    def _results(self):
        """The queue's (future, result) pairs as they finish, and None every ``TICK_S`` while
        none does (so the loop can look at the tail); ends when the queue is empty."""
        queue = self.queue
        while True:
            deadline = time.monotonic() + TICK_S
            while not queue.has_ready():
                if queue.is_empty():
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with queue.thread_condition:
                    queue.thread_condition.wait(timeout=min(left, 0.1))
            yield next(queue) if queue.has_ready() else None

    def _check_planned(self) -> None:
        """In a run restricted to some workers, stop when a block's worker left before
        partitioning it, or every worker its fits are pinned to left before fitting it: its
        tasks are pinned there (:meth:`submit_partition`, :meth:`_fit_where`) and would wait
        for them forever."""
        live = self.watch.live
        if not self.workers or live is None:
            return
        for b, blk in self.in_flight.items():
            if blk.pinned and blk.meta is None and blk.planned not in live:
                left = f"worker {blk.planned} left before partitioning block {b}"
            elif blk.fit_pinned and blk.fits_left and not blk.fit_pinned & live:
                left = f"workers {', '.join(sorted(blk.fit_pinned))} left before fitting block {b}"
            else:
                continue
            raise TrainingError(
                f"{left}, and this run is restricted to workers {sorted(self.workers)}: train "
                f"again on the workers still connected (with a run directory, --resume keeps "
                f"the {len(self.done)} blocks committed)")

    def _loop(self) -> None:
        """Submit and take results until every block is committed; the watch says what the
        run waits on, and stops it after too long without a worker."""
        n = self.dataset.n_blocks
        while True:
            while self.submit_partition():
                pass
            for item in self._results():
                if item is not None:
                    self.on_result(*item)
                self._drain_writes(wait=False)
                self.speculate()
                self.watch.tick(f"{n - len(self.done)} of {n} blocks left to train")
                self._check_planned()
            left = n - len(self.done) - len(self.in_flight)
            if not left:
                return
            # Nothing in flight and blocks left: every worker left. Wait (bounded) for one.
            self.watch.wait_for_workers(f"{left} of {n} blocks left to train")
            self.holding.clear()
            self._refresh_slots()

    def run(self) -> TrainResult:
        """Prepare, then submit and take results until every block is committed."""
        t0 = time.perf_counter()
        self.prepare()
        self.started = time.perf_counter()
        ds = self.dataset
        _log(self.client, ev.RUN_START, run_id=self.run_id, n_blocks=ds.n_blocks,
             resumed=len(self.resumed), n_clusters=int(self.params["n_clusters"]),
             rows=int(ds.n_rows))
        # The run directory is owned (locked) until the last block is committed.
        with self.progress, self.rundir or contextlib.nullcontext():
            if self.resumed:
                self.progress.skip(len(self.resumed), note=f"{len(self.resumed)} resumed")
            try:
                self._loop()
                self._drain_writes(wait=True)
            except BaseException:
                for blk in self.in_flight.values():
                    self.client.cancel(blk.futures)
                _log(self.client, ev.RUN_END, run_id=self.run_id)
                raise
            finally:
                if self._writer is not None:
                    self._writer.shutdown(wait=True)
        est = self.estimator
        est.estimators_ = [self.done[b] for b in range(ds.n_blocks)]
        est.classes_ = self.classes
        est.n_features_in_ = int(ds.n_features)
        _log(self.client, ev.RUN_END, run_id=self.run_id)
        return TrainResult(model=est, seconds=time.perf_counter() - t0,
                           trained_blocks=self.todo, resumed_blocks=self.resumed,
                           tasks_per_worker=self.counts, rows_per_worker=self.rows,
                           busy_seconds_per_worker=self.busy,
                           run_dir=self.rundir.path if self.rundir else None,
                           phases={**self.worker_phases, **{f"driver-{k}": v for k, v in
                                                            self.driver_seconds.items()}},
                           window=self.window, speculation=self.speculation)


def train(estimator, dataset, client, *, run_dir=None, resume: bool = False,
          validation=None, workers: list[str] | None = None,
          max_blocks_in_flight: int | None = None, progress: Progress | None = None,
          speculate: bool = True) -> TrainResult:
    """Fit ``estimator`` (an IncrementalKSGDClassifier) on a Zarr ``dataset`` through ``client``.

    Parameters
    ----------
    estimator : IncrementalKSGDClassifier
        Supplies the parameters; it is fitted in place and returned as ``result.model``.
    dataset : rpicluster.data.reader.Dataset
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
        Blocks submitted at once; default one more than the number of workers, fewer where the
        workers' memory limits allow fewer (:func:`worker_slots`).
    progress : Progress, optional
        Where to report blocks committed (with partition/fit counts and ETA).
    speculate : bool
        Run a task that runs late while a worker idles again on that worker, and take the first
        result (:meth:`TrainingRun.speculate`; default). False: every task runs once, where
        Dask placed it, so ``tasks_per_worker`` shows the placement alone (a test of placement,
        or a cluster whose workers are known to be even). The model is the same either way.

    Raises
    ------
    TrainingError
        A task failed or kept killing its worker; the message names the block (and cluster).
    """
    return TrainingRun(estimator, dataset, client, run_dir=run_dir, resume=resume,
                       validation=validation, workers=workers,
                       max_blocks_in_flight=max_blocks_in_flight, progress=progress,
                       speculate=speculate).run()


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


def _raise_task_error(exc: BaseException, block: int, cluster: int | None, killed_with=()):
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


def _map_blocks(client, func, model, dataset, progress: Progress | None, what: str) -> list:
    """Run ``func(model, dataset, b)`` for every block on the cluster; results in block order."""
    from distributed import as_completed

    [remote_model] = client.scatter([model], broadcast=True, hash=False)
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
                _raise_task_error(future.exception(), b, None)
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
    from rpicluster.models.incremental import (register_distributed_fit,
                                               register_distributed_predict)

    register_distributed_fit(train)
    register_distributed_predict(predict_dataset, score_dataset)


_register()
