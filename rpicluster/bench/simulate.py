"""Predict a job's wall time on a cluster from measured task costs: list scheduling.

A job is a list of :class:`SimTask` (work in *reference units*, dependencies, a group). A
cluster is a list of slots (one per worker thread), each with a rate in reference units per
second, from the calibration task every worker ran. :func:`list_schedule` plays the job the way
Dask runs it: whenever a slot is free it takes the ready task of highest priority (earliest
group, then submission order), the fastest free slot first, and every task costs
``work / rate + overhead`` on the slot that runs it. ``window`` bounds the groups in flight, as
the training job bounds blocks in flight (a group opens when an earlier one completes).

Work is measured, not modelled: a task that took ``s`` seconds on a worker whose threads each do
``r`` units per second did ``s * r`` units. The only fitted constant is ``overhead`` (scheduler
round trip, data movement, client bookkeeping per task): :func:`fit_overhead` picks it so the
reference run is reproduced, and every other prediction is then out of sample.

Hypothetical clusters are written like ``"32x pi4, 2x desktop"``: each name is a calibrated
worker (its name or address) or a tag (Dask resource) shared by calibrated workers, whose mean
rate and threads the hypothetical workers get (:func:`parse_cluster`).
"""

from __future__ import annotations

import dataclasses
import heapq
import re
from collections.abc import Mapping, Sequence

from rpicluster.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SimTask:
    """One task of a job graph.

    Attributes
    ----------
    key : str
    work : float
        Reference units (seconds on a slot of rate 1).
    group : int
        Priority group (a training block); lower runs first, and ``window`` counts groups.
    deps : tuple of str
        Keys of tasks that must finish first (within the same or earlier groups).
    """

    key: str
    work: float
    group: int = 0
    deps: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Slot:
    """One worker thread: ``worker`` name and ``rate`` in reference units per second."""

    worker: str
    rate: float


@dataclasses.dataclass
class Schedule:
    """Result of :func:`list_schedule`: makespan and, per task key, (slot index, start, end)."""

    makespan: float
    placed: dict[str, tuple[int, float, float]]


def list_schedule(tasks: Sequence[SimTask], slots: Sequence[Slot], *, window: int | None = None,
                  overhead: float = 0.0) -> Schedule:
    """Simulate greedy list scheduling of ``tasks`` on ``slots``.

    Parameters
    ----------
    tasks : sequence of SimTask
        In submission order (ties within a group run in this order).
    slots : sequence of Slot
    window : int, optional
        At most this many groups started and not finished; default unbounded.
    overhead : float
        Seconds added to every task.

    Returns
    -------
    Schedule

    Raises
    ------
    ConfigError
        No slots, a slot with a non-positive rate, an unknown dependency or a cycle.
    """
    if not slots:
        raise ConfigError("cannot simulate on an empty cluster (no worker threads)")
    for s in slots:
        if not s.rate > 0:
            raise ConfigError(f"worker {s.worker!r} has rate {s.rate!r}; expected > 0 units/s")
    keys = {t.key: i for i, t in enumerate(tasks)}
    waiting = [0] * len(tasks)
    children: list[list[int]] = [[] for _ in tasks]
    for i, t in enumerate(tasks):
        for d in t.deps:
            if d not in keys:
                raise ConfigError(f"task {t.key!r} depends on unknown task {d!r}")
            children[keys[d]].append(i)
            waiting[i] += 1
    groups = sorted({t.group for t in tasks})
    left_in_group = {g: 0 for g in groups}
    for t in tasks:
        left_in_group[t.group] += 1
    limit = len(groups) if window is None else max(1, window)
    open_groups = set(groups[:limit])
    next_group = limit
    # Ready = dependencies done; runnable = ready and in an open group.
    ready_closed: dict[int, list[int]] = {}
    runnable: list[tuple[int, int]] = []

    def make_ready(i: int) -> None:
        g = tasks[i].group
        if g in open_groups:
            heapq.heappush(runnable, (g, i))
        else:
            ready_closed.setdefault(g, []).append(i)

    for i in range(len(tasks)):
        if waiting[i] == 0:
            make_ready(i)
    # Fastest slot first; equal rates by index.
    free = [(-s.rate, j) for j, s in enumerate(slots)]
    heapq.heapify(free)
    running: list[tuple[float, int, int]] = []  # (end, slot, task)
    placed: dict[str, tuple[int, float, float]] = {}
    now = 0.0
    while len(placed) < len(tasks) or running:
        while runnable and free:
            _, i = heapq.heappop(runnable)
            _, j = heapq.heappop(free)
            end = now + tasks[i].work / slots[j].rate + overhead
            placed[tasks[i].key] = (j, now, end)
            heapq.heappush(running, (end, j, i))
        if not running:
            if len(placed) < len(tasks):
                stuck = [t.key for t in tasks if t.key not in placed]
                raise ConfigError(f"task graph has a cycle; never runnable: {stuck[:5]}")
            break
        now, j, i = heapq.heappop(running)
        heapq.heappush(free, (-slots[j].rate, j))
        for c in children[i]:
            waiting[c] -= 1
            if waiting[c] == 0:
                make_ready(c)
        g = tasks[i].group
        left_in_group[g] -= 1
        if left_in_group[g] == 0:
            open_groups.discard(g)
            if next_group < len(groups):
                opened = groups[next_group]
                next_group += 1
                open_groups.add(opened)
                for c in ready_closed.pop(opened, []):
                    heapq.heappush(runnable, (opened, c))
    return Schedule(makespan=max((p[2] for p in placed.values()), default=0.0), placed=placed)


def fit_overhead(tasks: Sequence[SimTask], slots: Sequence[Slot], measured: float, *,
                 window: int | None = None) -> float:
    """Per-task overhead (s, >= 0) with which the simulated makespan equals ``measured``.

    The makespan grows monotonically with the overhead, so bisection finds it; 0 when the
    simulation without overhead is already as slow as the measurement.
    """
    if list_schedule(tasks, slots, window=window).makespan >= measured or not tasks:
        return 0.0
    lo, hi = 0.0, measured
    for _ in range(50):
        mid = (lo + hi) / 2
        if list_schedule(tasks, slots, window=window, overhead=mid).makespan < measured:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


_TERM = re.compile(r"^\s*(?:(\d+)\s*[x*]\s*)?(\S+)\s*$")


def parse_cluster(text: str, workers: Mapping[str, Mapping]) -> list[tuple[int, str]]:
    """Parse ``"32x pi4, 2x desktop"`` into ``[(32, "pi4"), (2, "desktop")]``.

    Parameters
    ----------
    text : str
        Comma-separated ``[N x] NAME`` terms.
    workers : mapping
        Calibrated workers by name: ``{"threads": int, "rate": float, "tags": [...]}``;
        each NAME must be one of them or one of their tags.

    Raises
    ------
    ConfigError
        Empty text, a malformed term, a zero count or an unknown name (the message lists the
        worker names and tags that can be used).
    """
    terms = [t for t in text.split(",") if t.strip()]
    if not terms:
        raise ConfigError(f"--simulate {text!r}: expected terms like '32x pi4, 2x desktop'")
    known = sorted(workers) + sorted({tag for w in workers.values() for tag in w.get("tags", ())}
                                     - set(workers))
    out = []
    for term in terms:
        m = _TERM.match(term)
        if not m:
            raise ConfigError(f"--simulate: cannot read {term.strip()!r}; expected 'N x NAME', "
                              f"e.g. '4x pi4'")
        count = int(m.group(1) or 1)
        if count < 1:
            raise ConfigError(f"--simulate: {term.strip()!r} asks for {count} workers")
        if m.group(2) not in known:
            raise ConfigError(f"--simulate: unknown worker or tag {m.group(2)!r} "
                              f"(calibrated workers and tags: {', '.join(known)})")
        out.append((count, m.group(2)))
    return out


def class_profile(name: str, workers: Mapping[str, Mapping]) -> tuple[int, float]:
    """(threads, rate per thread) of worker ``name``, or the mean over workers tagged ``name``."""
    if name in workers:
        members = [workers[name]]
    else:
        members = [w for w in workers.values() if name in w.get("tags", ())]
    threads = round(sum(w["threads"] for w in members) / len(members))
    rate = sum(w["rate"] / w["threads"] for w in members) / len(members)
    return max(1, threads), rate


def slots_for(terms: Sequence[tuple[int, str]], workers: Mapping[str, Mapping]) -> list[Slot]:
    """The slots of a hypothetical cluster (:func:`parse_cluster` terms)."""
    slots = []
    for count, name in terms:
        threads, rate = class_profile(name, workers)
        for k in range(count):
            slots += [Slot(f"{name}#{k}", rate)] * threads
    return slots


def measured_slots(names: Sequence[str], workers: Mapping[str, Mapping]) -> list[Slot]:
    """The slots of real workers ``names``: each thread at its worker's calibrated rate."""
    return [Slot(n, workers[n]["rate"] / workers[n]["threads"])
            for n in names for _ in range(workers[n]["threads"])]
