"""The tail of a run on uneven workers: the speeds measured so far (:class:`Pace`), which worker
still gets a block near the end (:func:`worth_a_block`), and which late task is run again on an
idle worker (:class:`Speculation`).

A worker measured much slower than the others gets no new block near the end when the faster
ones would finish it sooner, and once every block is submitted, a task running late on one
worker while another worker is idle is run again there under its own key (``…-copy``): a whole
block or a partition with its block graph, a fit with the same piece. Every task is a pure
function of its seeded inputs, so both copies compute the same result; the first to finish is
taken and the other cancelled.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np

# A task runs late when it has taken this many times the seconds its rows should take (at the
# median seconds per row of its phase so far), plus a margin for scheduling noise.
LATE_FACTOR = 2.0
LATE_MARGIN_S = 0.5
# A worker this many times slower than usual counts as slow: no block near the end of a run
# (worth_a_block), no block queued ahead.
SLOW = 1.5
BLOCK = "block"  # the phase of a whole-block task (tasks.block_task): a partition and a fit


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


class Pace:
    """The speeds a run has measured: seconds per row by phase (all workers), each worker's
    seconds per row over its phase's median, when each worker last returned a result, and the
    warm-up (the run's first result: before it, every worker imports its libraries)."""

    def __init__(self) -> None:
        self.per_row: dict[str, list[float]] = {"partition": [], "fit": []}
        self.slowness_obs: dict[str, list[float]] = {}
        self.last_seen: dict[str, float] = {}
        self.first_result: float | None = None
        self.started = self.warm_up = 0.0

    def start(self) -> None:
        """The run starts submitting now."""
        self.started = time.perf_counter()

    def observe(self, address: str | None, phase: str, rows: int, seconds: float) -> None:
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

    def slowness(self, address: str) -> float | None:
        """A worker's seconds per row over its phase's median (1: usual), None before it has
        returned anything."""
        obs = self.slowness_obs.get(address)
        return float(np.median(obs)) if obs else None

    def expected(self, phase: str, rows: int) -> float | None:
        """Seconds a task of ``phase`` (``partition``, ``fit``, or a whole block: both) on
        ``rows`` rows takes at the run's median speed; None until that is measured."""
        phases = ("partition", "fit") if phase == BLOCK else (phase,)
        if not all(self.per_row[p] for p in phases):
            return None
        return sum(float(np.median(self.per_row[p])) for p in phases) * rows


class Speculation:
    """Which tasks of a run may be copied, when each could start, which keys are copies, and
    the counts ``copies`` (tasks run again) and ``won`` (copies whose result was taken)."""

    def __init__(self, pace: Pace, enabled: bool = True) -> None:
        self.pace, self.enabled = pace, enabled
        # original partition/fit/block keys that may be copied -> (block, phase, group)
        self.speculable: dict[str, tuple[int, str, int | None]] = {}
        self.ready_at: dict[str, float] = {}
        self.copies: set[str] = set()
        self.counts: Counter = Counter()

    def watch(self, key: str, block: int, phase: str, group: int | None, ready: bool) -> None:
        """Task ``key`` may be copied (``ready``: it can run from now)."""
        self.speculable[key] = (block, phase, group)
        if ready:
            self.ready(key)

    def ready(self, key: str) -> None:
        """Task ``key`` can run from now (its inputs are computed)."""
        self.ready_at[key] = time.perf_counter()

    def taken(self, key: str) -> bool:
        """Task ``key`` returned; whether it was a copy."""
        copy = key in self.copies
        self.copies.discard(key)
        self.speculable.pop(key, None)
        return copy

    def late_tasks(self, processing: dict, idle: list[str], in_flight: dict,
                   block_rows: int) -> list[tuple[int, int | None, str, str]]:
        """The copies to run now: ``(block, group or None, idle worker, late task's worker)``.

        A partition, fit or whole-block task is late when it has run :data:`LATE_FACTOR` times
        the seconds its rows take at its phase's median seconds per row (plus
        :data:`LATE_MARGIN_S`), or when its worker is measured slow and a copy on an idle one
        would end first (:func:`behind`: so a slow worker's last task does not end the run); its
        start is taken as the latest of when it could run, when its worker last returned a
        result and the run's first result (before it, every worker imports its libraries; a
        worker yet to return anything is allowed that warm-up again). The oldest block's late
        task goes to an idle worker first; a worker measured slower than the late task's own
        is not given it. Each task is copied once.

        Parameters
        ----------
        processing : dict
            Worker address -> keys it is processing (the run's workers only).
        idle : list of str
            The run's workers processing nothing; those given a copy are removed from it.
        in_flight : dict
            Block -> its bookkeeping (``meta``, ``fitted``, ``group_rows``).
        block_rows : int
        """
        pace, now = self.pace, time.perf_counter()
        late = []
        for addr, keys in processing.items():
            others = [a for a in idle if a != addr]
            if not others:
                continue  # no idle worker could take a copy
            fastest = min(pace.slowness(a) or 1.0 for a in others)
            mine = pace.slowness(addr)
            # A worker yet to return anything may still be importing: it gets the time the
            # first result took.
            cold = 0.0 if addr in pace.last_seen else pace.warm_up
            for key in keys:
                spec = self.speculable.get(str(key))
                if spec is None:
                    continue
                b, phase, g = spec
                blk = in_flight.get(b)
                if blk is None or (blk.meta is not None if g is None else
                                   blk.meta is None or g in blk.fitted):
                    continue
                rows = blk.group_rows(g) if g is not None else block_rows
                expected = pace.expected(phase, rows)
                if expected is None:
                    continue
                started = max(self.ready_at.get(str(key), now), pace.last_seen.get(addr, 0.0),
                              pace.first_result or now)
                if rows and (now - started > LATE_FACTOR * expected + LATE_MARGIN_S + cold
                             or behind(mine, fastest, expected, now - started)):
                    late.append((b, -1 if g is None else g, str(key), addr))
        out = []
        for b, g, key, addr in sorted(late):
            mine = pace.slowness(addr)
            target = next((a for a in idle if a != addr and (
                mine is None or (pace.slowness(a) or 1.0) < mine)), None)
            if target is None:
                continue
            idle.remove(target)
            del self.speculable[key]
            out.append((b, None if g < 0 else g, target, addr))
        self.counts["copies"] += len(out)
        return out
