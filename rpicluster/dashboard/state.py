"""Training progress folded from the event stream: pure Python, no bokeh, no Dask.

:class:`TrainingState` consumes the events of :mod:`rpicluster.events` one at a time and
answers what the page shows: how many blocks are partitioned, clusters fitted and blocks committed,
the ETA, each worker's throughput, and each block's validation accuracy. Tasks may run twice (a
worker died), so progress counts distinct blocks and (block, cluster) pairs, never events. A
resumed run trains only the blocks its run directory lacks: the ``resumed`` count of its
``run-start`` event counts as done in every stage, and the ETA is measured on this run's work only.

The ETA counts what the terminal's counts (:class:`rpicluster.progress.Progress` in ``train``):
blocks committed, from the same ``committed`` events, at the rate of
:func:`rpicluster.progress.recent_eta`, so the page and the terminal tell the same time. Blocks
are the unit because every block is the same work (its rows), where a partition task costs many
times a small cluster's fit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from rpicluster import events as ev
from rpicluster.progress import recent_eta


def ended(event: dict, complete: bool) -> tuple[str, str | None]:
    """(outcome, reason) of a run from its ``run-end`` event: the history's words (``done``,
    ``stopped``, ``failed``). An event without an outcome (an older client) says ``done`` when
    the run did all its work (``complete``), else ``stopped``."""
    outcome = event.get(ev.OUTCOME)
    if outcome not in ev.OUTCOMES:
        outcome = "done" if complete else "stopped"
    return outcome, event.get(ev.REASON)


@dataclass
class WorkerStats:
    """Rows a worker processed and the seconds its tasks took, per task kind."""

    partition_rows: int = 0
    partition_seconds: float = 0.0
    fit_rows: int = 0
    fit_seconds: float = 0.0
    tasks: int = 0

    @staticmethod
    def _rate(rows: int, seconds: float) -> float:
        return rows / seconds if seconds > 0 else 0.0

    @property
    def partition_rate(self) -> float:
        """Rows per second of busy time in partition tasks."""
        return self._rate(self.partition_rows, self.partition_seconds)

    @property
    def fit_rate(self) -> float:
        """Rows per second of busy time in fit tasks."""
        return self._rate(self.fit_rows, self.fit_seconds)


@dataclass
class TrainingState:
    """Progress of the latest training run, updated event by event.

    A ``run-start`` event starts afresh; events of another ``run_id`` than the current run's are
    ignored, and so are events of unknown kind (a newer trainer must not break an older page).
    """

    run_id: str | None = None
    n_blocks: int | None = None
    n_clusters: int | None = None
    resumed: int = 0
    started: float | None = None
    finished: float | None = None
    last_t: float | None = None
    partitioned: set = field(default_factory=set)
    fitted: set = field(default_factory=set)
    committed: set = field(default_factory=set)
    accuracy: dict = field(default_factory=dict)
    block_rows: dict = field(default_factory=dict)
    workers: dict = field(default_factory=dict)
    marks: list = field(default_factory=list)
    n_events: int = 0
    alert: str | None = None  # what the run waits on (a paused or silent worker), if anything
    #: The terminal's count as its ``progress`` events told it: (started, base), then
    #: (time, done) at each advance; None until the first such event.
    terminal: list | None = None
    terminal_total: int | None = None
    outcome: str | None = None  # how the run ended (run-end), None while it runs
    reason: str | None = None

    def update(self, events: Iterable[dict]) -> None:
        """Fold several events, oldest first (see :meth:`feed`)."""
        for e in events:
            self.feed(e)

    def feed(self, event: dict) -> None:
        """Fold one event into the state.

        Parameters
        ----------
        event : dict
            A training event (see :mod:`rpicluster.events`); non-dicts are ignored.
        """
        if not isinstance(event, dict):
            return
        kind = event.get(ev.KIND)
        if kind not in ev.KINDS:
            return
        run_id = event.get(ev.RUN_ID)
        if kind == ev.RUN_START:
            self._start(event)
        elif self.run_id is not None and run_id is not None and run_id != self.run_id:
            return
        elif self.run_id is None and run_id is not None:
            # Joined mid-run (the page came up after run-start): adopt the run.
            self.run_id = run_id
        self.n_events += 1
        t = event.get(ev.T)
        if t is not None:
            self.last_t = t if self.last_t is None else max(self.last_t, t)
            if self.started is None:
                self.started = t
        for name, attr in ((ev.N_BLOCKS, "n_blocks"), (ev.N_CLUSTERS, "n_clusters"),
                           (ev.RESUMED, "resumed")):
            if event.get(name) is not None:
                setattr(self, attr, int(event[name]))
        block = event.get(ev.BLOCK)
        if kind == ev.PARTITIONED:
            self.partitioned.add(block)
            if event.get(ev.ROWS) is not None:
                self.block_rows[block] = int(event[ev.ROWS])
            self._work(event, "partition")
        elif kind == ev.FITTED:
            first = event.get(ev.CLUSTER)
            if first is None:
                self.fitted.add((block, None))
            else:
                self.fitted.update((block, first + i)
                                   for i in range(int(event.get(ev.CLUSTERS) or 1)))
            self._work(event, "fit")
        elif kind == ev.COMMITTED:
            self.committed.add(block)
        elif kind == ev.VALIDATION and event.get(ev.ACCURACY) is not None:
            self.accuracy[block] = float(event[ev.ACCURACY])
        elif kind == ev.RUN_END:
            self.finished = t if t is not None else self.last_t
            self.alert = None
            self.outcome, self.reason = ended(
                event, self.n_blocks is not None and self.blocks_done() >= self.n_blocks)
        elif kind == ev.STALLED:
            self.alert = event.get(ev.NOTE)
        elif kind == ev.PROGRESS:
            self._terminal(event)
        self._mark(t)

    def _terminal(self, event: dict) -> None:
        start = (event.get(ev.STARTED), int(event.get(ev.BASE) or 0))
        if self.terminal is None or self.terminal[0] != start:
            self.terminal = [start]
        if event.get(ev.TOTAL) is not None:
            self.terminal_total = int(event[ev.TOTAL])
        t, done = event.get(ev.T), event.get(ev.DONE)
        if t is not None and done is not None and t != start[0] and \
                int(done) > self.terminal[-1][1]:
            self.terminal.append((t, int(done)))

    def blocks_done(self) -> int:
        """Blocks done, resumed ones included: the terminal's count when it published one
        (``progress`` events), else the blocks committed."""
        if self.terminal is not None:
            return self.terminal[-1][1]
        return self.resumed + len(self.committed)

    def _mark(self, t: float | None) -> None:
        # (time, blocks done) from the first event on and whenever a block is committed: the
        # ETA's rate comes from these, as the terminal's comes from its commits.
        done = self.resumed + len(self.committed)
        if t is not None and (not self.marks or done > self.marks[-1][1]):
            self.marks.append((t, done))

    def _start(self, event: dict) -> None:
        fresh = TrainingState()
        vars(self).update(vars(fresh))
        self.run_id = event.get(ev.RUN_ID)
        self.started = event.get(ev.T)

    def _work(self, event: dict, what: str) -> None:
        worker = event.get(ev.WORKER)
        rows, seconds = event.get(ev.ROWS), event.get(ev.SECONDS)
        if worker is None or rows is None or seconds is None:
            return
        stats = self.workers.setdefault(worker, WorkerStats())
        stats.tasks += 1
        setattr(stats, f"{what}_rows", getattr(stats, f"{what}_rows") + int(rows))
        setattr(stats, f"{what}_seconds", getattr(stats, f"{what}_seconds") + float(seconds))

    @property
    def total_fits(self) -> int | None:
        """Local models the run fits in all (blocks x clusters), when both are known."""
        if self.n_blocks is None or self.n_clusters is None:
            return None
        return self.n_blocks * self.n_clusters

    def stages(self) -> list[tuple[int, int | None]]:
        """(done, total) of blocks partitioned, clusters fitted and blocks committed.

        Resumed blocks count as done in each; a total is None while unknown.
        """
        k = self.n_clusters or 0
        return [(self.resumed + len(self.partitioned), self.n_blocks),
                (self.resumed * k + len(self.fitted), self.total_fits),
                (self.blocks_done(), self.n_blocks)]

    def fraction(self) -> float | None:
        """Share of the run done, 0..1, or None before the run's size is known.

        Each block is one partition task and ``n_clusters`` fit tasks; committed blocks count in
        full, so a run whose tasks finished before the page came up still shows them. A run that
        ended early (it failed) stays below 1.
        """
        if not self.n_blocks:
            return None
        (parts, _), (fits, _), (committed, _) = self.stages()
        frac = committed / self.n_blocks
        if self.n_clusters:
            frac = max(frac, (parts + fits) / (self.n_blocks * (1 + self.n_clusters)))
        return min(1.0, frac)

    def eta(self, now: float) -> float | None:
        """Seconds left at the recent rate of blocks committed
        (:func:`rpicluster.progress.recent_eta`, as the terminal's), or None when unknown (or
        the run ended early).

        Parameters
        ----------
        now : float
            The current ``time.time()``.
        """
        if not self.n_blocks:
            return None
        done = self.blocks_done()
        if done >= self.n_blocks:
            return 0.0
        if self.finished is not None:
            return None
        if self.terminal is not None:
            # The terminal's own marks: its ETA to the digit (Progress.eta).
            if len(self.terminal) < 2:
                return None
            return recent_eta(self.terminal, now, done, self.terminal_total or self.n_blocks)
        return recent_eta(self.marks, now, done, self.n_blocks)

    def rows_per_second(self, now: float) -> float | None:
        """Training rows committed by this run per second of its wall time, or None when unknown.

        Parameters
        ----------
        now : float
            The current ``time.time()`` (the run's end is used once it finished).
        """
        if self.started is None:
            return None
        elapsed = (self.finished if self.finished is not None else now) - self.started
        rows = sum(self.block_rows.get(b, 0) for b in self.committed)
        return rows / elapsed if elapsed > 0 and rows else None

    def status(self) -> str:
        """One word for the run: ``"waiting"``, ``"running"``, or how it ended (``"done"``,
        ``"stopped"``, ``"failed"``: the run history's words)."""
        if self.run_id is None and self.n_events == 0:
            return "waiting"
        return self.outcome if self.finished is not None else "running"


@dataclass
class FeaturesState:
    """Progress of the latest feature-extraction run (``rpicluster.features`` events).

    Blocks are counted once however often their task ran; images/s per worker is over the time
    its tasks took.
    """

    run_id: str | None = None
    n_blocks: int | None = None
    resumed: int = 0
    finished: bool = False
    outcome: str | None = None
    reason: str | None = None
    done: set = field(default_factory=set)
    images: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def feed(self, event: dict) -> None:
        """Fold one ``rpicluster.features`` event (others, and other runs', are ignored)."""
        if not isinstance(event, dict):
            return
        kind, run_id = event.get(ev.KIND), event.get(ev.RUN_ID)
        if kind == ev.RUN_START:
            vars(self).update(vars(FeaturesState()))
            self.run_id = run_id
            self.n_blocks, self.resumed = event.get(ev.N_BLOCKS), int(event.get(ev.RESUMED) or 0)
            return
        if run_id != self.run_id:
            return
        if kind == ev.EXTRACTED:
            self.done.add(event.get(ev.BLOCK))
            worker = str(event.get(ev.WORKER))
            self.images[worker] = self.images.get(worker, 0) + int(event.get(ev.ROWS) or 0)
            self.seconds[worker] = self.seconds.get(worker, 0.0) + float(
                event.get(ev.SECONDS) or 0.0)
        elif kind == ev.RUN_END:
            self.finished = True
            self.outcome, self.reason = ended(event, self.n_blocks is not None and
                                              self.resumed + len(self.done) >= self.n_blocks)

    def status(self) -> str:
        """``"waiting"`` (no run yet), ``"running"``, or how the run ended (``"done"``,
        ``"stopped"``, ``"failed"``)."""
        if self.run_id is None:
            return "waiting"
        return self.outcome if self.finished else "running"

    def images_per_second(self) -> dict:
        """Images per second of task time, by worker."""
        return {w: self.images[w] / s for w, s in sorted(self.seconds.items()) if s > 0}


@dataclass
class RoundsState:
    """The latest round-based run (``rpicluster.rounds`` events: ``train --model mlp|sgd`` or
    ``federate``): one report per finished round, by round number (a round published twice,
    e.g. a resumed one, counts once)."""

    run_id: str | None = None
    mode: str | None = None
    model: str | None = None
    n_rounds: int | None = None
    resumed: int = 0
    finished: bool = False
    outcome: str | None = None
    reason: str | None = None
    rounds: dict = field(default_factory=dict)

    def feed(self, event: dict) -> None:
        """Fold one ``rpicluster.rounds`` event (others, and other runs', are ignored)."""
        if not isinstance(event, dict):
            return
        kind, run_id = event.get(ev.KIND), event.get(ev.RUN_ID)
        if kind == ev.RUN_START:
            vars(self).update(vars(RoundsState()))
            self.run_id, self.mode, self.model = run_id, event.get(ev.MODE), event.get(ev.MODEL)
            self.n_rounds = event.get(ev.N_ROUNDS)
            self.resumed = int(event.get(ev.RESUMED) or 0)
            return
        if run_id != self.run_id or run_id is None:
            return
        if kind == ev.ROUND and event.get(ev.ROUND_NO) is not None:
            self.rounds[int(event[ev.ROUND_NO])] = {k: v for k, v in event.items()
                                                     if k not in (ev.KIND, ev.RUN_ID)}
        elif kind == ev.RUN_END:
            self.finished = True
            # A stopping rule may end a run before n_rounds: without an outcome, done.
            self.outcome, self.reason = ended(event, True)

    def status(self) -> str:
        """``"waiting"`` (no run yet), ``"running"``, or how the run ended (``"done"``,
        ``"stopped"``, ``"failed"``)."""
        if self.run_id is None:
            return "waiting"
        return self.outcome if self.finished else "running"

    def table(self) -> dict:
        """Columns of the rounds table, oldest round first: round, participants, left out (each
        host with its reason), rows, bytes moved, seconds, accuracy (NaN when not scored)."""
        cols = {"round": [], "participants": [], "left_out": [], "rows": [], "moved": [],
                "seconds": [], "accuracy": []}
        for n in sorted(self.rounds):
            r = self.rounds[n]
            cols["round"].append(n)
            cols["participants"].append(", ".join(r.get(ev.PARTICIPANTS) or []) or "none")
            cols["left_out"].append("; ".join(f"{h}: {why}" for h, why in
                                              (r.get(ev.LEFT_OUT) or {}).items()))
            cols["rows"].append(int(r.get(ev.ROWS) or 0))
            cols["moved"].append(int(r.get(ev.BYTES_DOWN) or 0) + int(r.get(ev.BYTES_UP) or 0))
            cols["seconds"].append(float(r.get(ev.SECONDS) or 0.0))
            acc = r.get(ev.ACCURACY)
            cols["accuracy"].append(float("nan") if acc is None else float(acc))
        return cols


@dataclass
class RunLog:
    """Every run the scheduler has seen in its events (training, rounds, feature extraction),
    by run id: what the page's run list shows, newest first."""

    runs: dict = field(default_factory=dict)

    def note(self, topic: str, state, event: dict) -> None:
        """Refresh the entry of ``state``'s run after ``event`` (of ``topic``) was folded in."""
        run_id = state.run_id
        if run_id is None:
            return
        t = event.get(ev.T)
        entry = self.runs.setdefault(run_id, {"run": str(run_id), "started": t, "ended": None})
        if entry["started"] is None:
            entry["started"] = t
        if isinstance(state, TrainingState):
            done, total = state.stages()[2]
            acc = state.accuracy
            entry.update(kind="train", what="Inc-kSGD", status=state.status(), done=done,
                         total=total, unit="blocks",
                         accuracy=sum(acc.values()) / len(acc) if acc else None,
                         ended=state.finished)
        elif isinstance(state, RoundsState):
            last = state.rounds[max(state.rounds)] if state.rounds else {}
            entry.update(kind="federate" if state.mode == "federated" else "train",
                         what=f"{state.model} rounds", status=state.status(),
                         done=len(state.rounds), total=state.n_rounds, unit="rounds",
                         accuracy=last.get(ev.ACCURACY))
        else:
            entry.update(kind="features", what="feature extraction", status=state.status(),
                         done=state.resumed + len(state.done), total=state.n_blocks,
                         unit="blocks", accuracy=None)
        entry["reason"] = state.reason
        if state.finished and entry["ended"] is None:
            entry["ended"] = t

    def newest_first(self) -> list[dict]:
        """The entries, the latest started first."""
        return sorted(self.runs.values(), key=lambda e: -(e["started"] or 0.0))


@dataclass
class Timeline:
    """The cluster over time: rows done by all workers' tasks so far, and each worker's
    temperature, memory and memory limit, one sample every few seconds (the last hour at most).
    """

    samples: deque = field(default_factory=lambda: deque(maxlen=1800))

    def sample(self, t: float, rows_total: int, workers: dict) -> None:
        """Add one sample: ``workers`` maps a worker's name to ``temperature`` (or None),
        ``memory`` and ``limit`` (bytes)."""
        self.samples.append((t, rows_total, workers))

    def rows_per_second(self, window: float = 10.0) -> tuple[list, list]:
        """(times, cluster rows/s), each over the samples of the last ``window`` seconds: task
        results arrive in bursts, so an instant rate would jump between 0 and peaks."""
        ts, rates = [], []
        start = 0
        samples = list(self.samples)
        for i, (t, rows, _) in enumerate(samples):
            while samples[start][0] < t - window:
                start += 1
            t0, rows0, _ = samples[start]
            if t > t0:
                ts.append(t)
                rates.append((rows - rows0) / (t - t0))
        return ts, rates

    def per_worker(self, key: str) -> dict[str, tuple[list, list]]:
        """{worker: (times, values)} of one reading (``temperature``, ``memory``, ``limit``),
        leaving out the samples where a worker could not tell it."""
        out: dict[str, tuple[list, list]] = {}
        for t, _, workers in self.samples:
            for name, reading in workers.items():
                if reading.get(key) is not None:
                    times, values = out.setdefault(name, ([], []))
                    times.append(t)
                    values.append(reading[key])
        return out
