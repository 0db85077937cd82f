"""The Inc-kSGD training job on a Dask cluster: :class:`TrainingRun`, the run loop.

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
run skips the committed blocks. Where blocks go: :mod:`rpicluster.train.placement`; the tail
of a run on uneven workers (a Pi next to a desktop) and the copies of late tasks:
:mod:`rpicluster.train.speculate`; predict and score over a store: :mod:`rpicluster.train.mapping`.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rpicluster import events as ev
from rpicluster.errors import TrainingError
from rpicluster.models.remote import hold
from rpicluster.progress import Progress
from rpicluster.train import tasks
from rpicluster.train.failures import killed_blocks, raise_task_error, task_failure
from rpicluster.train.mapping import predict_dataset, score_dataset
from rpicluster.train.params import RunParams
from rpicluster.train.placement import fit_groups_per_block, free_worker, worker_slots
from rpicluster.train.result import TrainResult
from rpicluster.train.rundir import RunDir
from rpicluster.train.speculate import BLOCK, SLOW, Pace, Speculation
from rpicluster.train.watch import ClusterWatch, check_memory, measure_floors


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
        self.meta: tasks.BlockMeta | None = None
        self.models: dict[int, object] = {}  # cluster -> LocalModel
        self.fitted: set[int] = set()  # fit groups whose result was taken
        self.fits_left = 0
        self.n_clusters = 0

    def complete(self) -> bool:
        return self.meta is not None and self.fits_left == 0

    def group_rows(self, group: int) -> int:
        """Rows of fit group ``group`` (0 for a group the block does not have)."""
        groups = self.meta.groups
        if group >= len(groups):
            return 0
        first, stop = groups[group]
        return int(sum(self.meta.sizes[first:stop]))


VALIDATE = "validate"  # marks a validation-scoring future (a whole block's: BLOCK)
# How often the run loop looks for late tasks while no result arrives.
TICK_S = 0.25


def _log(client, kind: str, **fields) -> None:
    ev.publish(client, ev.TOPIC, ev.make_event(kind, **fields))


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

        self.estimator, self.dataset, self.client = estimator, dataset, client
        self.validation = validation
        self.params = RunParams.of(estimator, dataset)
        # what the tasks take: the validated parameters and the resolved seed
        self.values, self.random_state = self.params.values, self.params.random_state
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
        self.pace = Pace()  # the speeds measured so far
        self.spec = Speculation(self.pace, enabled=speculate)  # late tasks and their copies
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
            self.done = self.rundir.begin(self.values, self.dataset, resume=self.resume)
        self.resumed = sorted(self.done)
        self.todo = [b for b in range(self.dataset.n_blocks) if b not in self.done]
        self._pending = iter(self.todo)
        self._refresh_slots()
        self.window = self.max_blocks_in_flight or max(1, sum(self.slots.values()))
        self.n_groups = fit_groups_per_block(self.params.n_clusters, info)
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
        """The worker the next block goes to (:func:`~rpicluster.train.placement.free_worker`)."""
        return free_worker(self.slots, self.threads, self.holding, self.pace,
                           len(self.todo) - self.n_submitted, self.dataset.block_rows)

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
        """Where a shared block's fits may run: not on a worker measured slow
        (:data:`~rpicluster.train.speculate.SLOW`), when there are others. The slow worker is
        not given the last blocks (:func:`~rpicluster.train.speculate.worth_a_block`) and idles,
        and Dask may then hand it a fit the run would wait for. A preference, as for a
        partition, unless the run is restricted to some workers (then a pin:
        :meth:`_check_planned` stops the run if they all leave)."""
        fast = [a for a in self.slots if (self.pace.slowness(a) or 1.0) <= SLOW]
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
            whole = self.client.submit(tasks.block_task, self.dataset, b, self.values,
                                       self.random_state, key=self._key("block", b, *suffix),
                                       priority=-b, **where)
            self.owner[whole.key] = (b, BLOCK)
            self.queue.add(whole)
            blk.futures.append(whole)
            if suffix:
                self.spec.copies.add(whole.key)
                return
            self.spec.watch(whole.key, b, BLOCK, None, ready=True)
            blk.fits_left = 1
            return
        part = self._key("partition", b, *suffix)
        meta = self._key("meta", b, *suffix)
        cut = [self._key("piece", b, g, *suffix) for g in range(blk.n_groups)]
        graph = {part: (tasks.partition_task, self.dataset, b, self.values, self.random_state,
                        blk.n_groups),
                 meta: (tasks.block_meta, part),
                 **{key: (tasks.cluster_piece, part, g) for g, key in enumerate(cut)}}
        meta_f, *pieces = self.client.get(graph, [meta, *cut], sync=False, priority=-b, **where)
        graph = {self._key("fit", b, g, *suffix): (tasks.fit_task, piece, b, g, self.values,
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
            self.spec.copies.update(f.key for f in (meta_f, *fits))
            return
        self.spec.watch(part, b, "partition", None, ready=True)
        blk.fits_left = blk.n_groups
        for g, (piece, fit) in enumerate(zip(pieces, fits)):
            blk.pieces[g] = piece  # kept for a copy of its fit (speculate)
            self.spec.watch(fit.key, b, "fit", g, ready=False)

    def submit_validation(self, b: int, model) -> None:
        """Score block model ``b`` on every validation block (``score-…`` tasks)."""
        t0 = time.perf_counter()
        client, workers = self.client, self.workers
        # Held, not scattered: scattered data dies with its worker (a host cut mid-run), and
        # the score tasks then fail; a held model is recomputed on another worker.
        remote = hold(client, model, workers=workers)
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
        copy = self.spec.taken(future.key)
        blk = self.in_flight.get(b) if j != VALIDATE else None
        needed = blk is not None and (blk.meta is None if j in (None, BLOCK) else
                                      j not in blk.fitted)
        failure = task_failure(result)
        if failure is not None:
            if copy or (j != VALIDATE and not needed):
                return  # a cancelled or failed copy, or a loser: the other one counts
            raise_task_error(failure, b, j if isinstance(j, int) else None,
                             killed_with=killed_blocks(self.in_flight))
        if j == VALIDATE:
            left, correct, total = self.scores[b]
            self.scores[b] = [left - 1, correct + result[0], total + result[1]]
            if left == 1:
                _log(self.client, ev.VALIDATION, run_id=self.run_id, block=b,
                     accuracy=self.scores[b][1] / max(self.scores[b][2], 1))
            return
        # A whole block's result is its partition's and its one fit's.
        parts = [(None, result.meta), (0, result.fit)] if j == BLOCK else [(j, result)]
        for g, part in parts:
            self.pace.observe(part.address, "fit" if g is not None else "partition",
                              part.rows, part.seconds)
        if not needed:
            return  # the other copy's result was taken first
        if copy:
            self.spec.counts["won"] += 1
        for g, part in parts:
            if g is None:
                self._take_partition(blk, part)
            else:
                self._take_fit(blk, g, part)
        self.progress.advance(0, note=f"{self.n_partitioned}/{len(self.todo)} partitioned, "
                                      f"{self.n_fitted} clusters fitted")
        if blk.complete():
            self.commit(blk)

    def _count(self, result: tasks.TaskReport, *, trained: bool = True) -> None:
        """Count a taken task for its worker; its rows only where it ``trained`` on them (a
        block's rows are read by its partition and again by its fits: counted once)."""
        w = result.worker
        if result.rows:
            self.counts[w] += 1
            self.rows[w] += result.rows if trained else 0
            self.busy[w] += result.seconds

    def _take_partition(self, blk: _Block, result: tasks.BlockMeta) -> None:
        """A block's partition result (its meta): where its rows are held, its clusters."""
        b = blk.index
        self._count(result, trained=False)
        blk.meta = result
        for g in range(blk.n_groups):  # the fits can run from now
            self.spec.ready(self._key("fit", b, g))
        blk.n_clusters = len(result.sizes)
        blk.address = result.address
        if blk.planned != blk.address:  # Dask chose, or the planned worker left
            if blk.planned is not None:
                self.holding[blk.planned] -= 1
            self.holding[blk.address] += 1
        self.worker_phases.update(result.phases)
        self.n_partitioned += 1
        _log(self.client, ev.PARTITIONED, run_id=self.run_id, block=b, rows=result.rows,
             worker=result.worker, seconds=result.seconds)

    def _take_fit(self, blk: _Block, group: int, result: tasks.FitResult) -> None:
        """A fit task's result: the local models of its group's clusters."""
        self._count(result)
        blk.fitted.add(group)
        blk.pieces.pop(group, None)
        blk.fits_left -= 1
        self.worker_phases["fit"] += result.seconds
        self.worker_phases["fit-cpu"] += result.cpu
        first, sizes = result.first, result.sizes
        for i, model in enumerate(result.models):
            blk.models[first + i] = model
        self.n_fitted += len(sizes)
        if sizes:  # one event per fit task: its clusters are first .. first + clusters - 1
            _log(self.client, ev.FITTED, run_id=self.run_id, block=blk.index, cluster=first,
                 clusters=len(sizes), rows=result.rows, worker=result.worker,
                 seconds=result.seconds)

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
        model = KSGDClassifier.from_parts(self.classes, blk.meta.centers,
                                          [blk.models[c] for c in range(blk.n_clusters)],
                                          self.values)
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
            (b, self._writer.submit(self.rundir.commit_block, b, model, {"rows": blk.meta.rows})))
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
        """Once every block is submitted, run late tasks again on idle workers
        (:meth:`~rpicluster.train.speculate.Speculation.late_tasks`); the copies submitted. A
        late partition is copied with its whole block graph (meta and pieces on the idle worker,
        fits on any worker but the late one's), a late whole block as one task on the idle
        worker, a late fit with the same piece. Nothing, in a run started with
        ``speculate=False``.
        """
        if not self.spec.enabled or self.n_submitted < len(self.todo) or not self.in_flight \
                or len(self.slots) < 2:
            return 0
        # All workers' tasks, then this run's: asking for a worker the scheduler has just
        # removed (a host lost mid-run) raises KeyError on the scheduler.
        processing = {a: keys for a, keys in self.client.processing().items() if a in self.slots}
        idle = [a for a in self.slots if a in processing and not processing[a]]
        if not idle:
            return 0
        copies = self.spec.late_tasks(processing, idle, self.in_flight, self.dataset.block_rows)
        for b, group, target, late in copies:
            self._copy(self.in_flight[b], group, target, late)
        return len(copies)

    def _copy(self, blk: _Block, group: int | None, target: str, late: str) -> None:
        """Run a late partition (``group`` None) or fit again on ``target``."""
        b, pin = blk.index, {"workers": [target], "allow_other_workers": False}
        if group is not None:
            fit = self.client.submit(tasks.fit_task, blk.pieces[group], b, group, self.values,
                                     self.random_state, key=self._key("fit", b, group, "copy"),
                                     priority=-b, **pin)
            self.owner[fit.key] = (b, group)
            self.spec.copies.add(fit.key)
            self.queue.add(fit)
            blk.futures.append(fit)
            return
        # The copy brings a fit of every group, under the keys a copy of a single fit would
        # take: the original fits are not copied again.
        for g in range(blk.n_groups):
            self.spec.speculable.pop(self._key("fit", b, g), None)
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
        self.pace.start()
        ds = self.dataset
        _log(self.client, ev.RUN_START, run_id=self.run_id, n_blocks=ds.n_blocks,
             resumed=len(self.resumed), n_clusters=self.params.n_clusters,
             rows=int(ds.n_rows))
        # The page shows the terminal's own count and ETA (one progress truth).
        unpublish = ev.publish_progress(self.client, self.progress, self.run_id)
        # The run directory is owned (locked) until the last block is committed.
        with self.progress, self.rundir or contextlib.nullcontext():
            if self.resumed:
                self.progress.skip(len(self.resumed), note=f"{len(self.resumed)} resumed")
            try:
                self._loop()
                self._drain_writes(wait=True)
            except BaseException as exc:
                for blk in self.in_flight.values():
                    self.client.cancel(blk.futures)
                _log(self.client, ev.RUN_END, run_id=self.run_id, **ev.ending(exc))
                raise
            finally:
                unpublish()
                if self._writer is not None:
                    self._writer.shutdown(wait=True)
        est = self.estimator
        est.estimators_ = [self.done[b] for b in range(ds.n_blocks)]
        est.classes_ = self.classes
        est.n_features_in_ = int(ds.n_features)
        _log(self.client, ev.RUN_END, run_id=self.run_id, **ev.ending(None))
        return TrainResult(model=est, seconds=time.perf_counter() - t0,
                           trained_blocks=self.todo, resumed_blocks=self.resumed,
                           tasks_per_worker=self.counts, rows_per_worker=self.rows,
                           busy_seconds_per_worker=self.busy,
                           run_dir=self.rundir.path if self.rundir else None,
                           phases={**self.worker_phases, **{f"driver-{k}": v for k, v in
                                                            self.driver_seconds.items()}},
                           window=self.window, speculation=self.spec.counts)


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
        workers' memory limits allow fewer (:func:`~rpicluster.train.placement.worker_slots`).
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


def _register() -> None:
    # The estimator fits a blocked dataset on the current client through this job, without
    # importing it (models sit below train).
    from rpicluster.models.incremental import (register_distributed_fit,
                                               register_distributed_predict)

    register_distributed_fit(train)
    register_distributed_predict(predict_dataset, score_dataset)


_register()
