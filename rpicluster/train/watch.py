"""No silent waiting: what a run waits on, said while it waits, and a bounded wait for workers.

:class:`ClusterWatch` is called from a job's run loop. While the loop waits for results it reads
the scheduler's view of the workers (``client.scheduler_info``: status and heartbeats; nothing
runs on the scheduler) about once a second, and

* puts on the progress line, and publishes as a ``stalled`` event for the ``/rpicluster`` page,
  the workers paused for memory (Dask's ``paused`` status: above the pause fraction of their
  limit they take no new task) and the workers whose heartbeats stopped for
  ``config.SILENT_WORKER_TIMEOUT`` seconds (a stopped or frozen process);
* stops the run with one line after ``config.NO_WORKER_TIMEOUT`` seconds without any worker it
  may use, and after ``config.PAUSED_TIMEOUT`` seconds with every one of them paused for memory
  (Dask itself waits for a paused worker forever).

:func:`check_memory` refuses, before anything is submitted, a worker whose memory limit cannot
hold its post-import floor and one block below Dask's pause threshold: such a worker would pause
and never resume.
"""

from __future__ import annotations

import math
import time

from rpicluster import config
from rpicluster import events as ev
from rpicluster.errors import ConfigError, TrainingError
from rpicluster.progress import Progress

# RSS of a worker once training's libraries are imported and their buffers allocated (measured
# ~210 MiB on x86-64; a worker that has not run a task yet reports less).
WORKER_BASELINE = 256 * 2**20
#: Headroom above a measured floor in the memory limit :func:`check_memory` advises.
FLOOR_MARGIN = 1.25


def worker_floor(w: dict) -> int:
    """Bytes a worker uses before it holds a block: its ``floor`` where measured
    (:func:`measure_floors`), else its reported process memory and at least
    :data:`WORKER_BASELINE` (a fresh worker has not imported the training libraries yet)."""
    if w.get("floor"):
        return int(w["floor"])
    return max(int((w.get("metrics") or {}).get("memory") or 0), WORKER_BASELINE)


#: Floors measured in this process, by worker (its address and its own scratch directory,
#: which Dask names at random for each worker process: an address alone is reused by a later
#: worker on the same port, which may run other code). A worker's floor is its RSS right after
#: warming up, so it is measured once per worker, not before every run (a round trip to every
#: worker, about 0.1 s of a 2 s run); a restarted worker is measured again.
_FLOORS: dict[tuple[str, str], int] = {}


def measure_floors(client, info: dict, *, key: str, timeout: float) -> dict:
    """``info`` with a measured ``floor`` for each worker that has a memory limit: its RSS
    after :func:`rpicluster.train.tasks.warm_up` (a small task on that worker; once per
    worker, see :data:`_FLOORS`). A worker that does not answer within ``timeout`` seconds
    (stopped, paused, or lost after finishing the task) keeps its reported memory."""
    from distributed import wait

    from rpicluster.train import tasks

    limited = [a for a, w in info.items() if w.get("memory_limit")]
    ids = {a: (a, info[a]["local_directory"]) if info[a].get("local_directory") else None
           for a in limited}
    futures = {a: client.submit(tasks.warm_up, key=f"{key}-{i}", workers=[a],
                                allow_other_workers=False, pure=False)
               for i, a in enumerate(limited) if ids[a] not in _FLOORS}
    deadline = time.monotonic() + timeout
    try:
        wait(list(futures.values()), timeout=timeout)
    except TimeoutError:
        pass
    floors = {a: _FLOORS[ids[a]] for a in limited if ids[a] in _FLOORS}
    for a, f in futures.items():
        if f.status != "finished":
            continue
        try:
            # Bounded too: a worker that finished the task and then stopped or died cannot
            # send its result, and the task, pinned to it, is not run elsewhere.
            floors[a] = int(f.result(timeout=max(0.1, deadline - time.monotonic())))
        except Exception:  # noqa: BLE001 - any failure: the worker keeps its reported memory
            continue
        if ids[a]:
            _FLOORS[ids[a]] = floors[a]
    client.cancel(list(futures.values()))
    return {a: {**w, "floor": floors[a]} if a in floors else w for a, w in info.items()}


def pause_fraction() -> float:
    """The fraction of its memory limit at which a Dask worker pauses (``distributed.worker.
    memory.pause``; the terminate fraction, or 1, when pausing is off)."""
    import dask

    for key in ("pause", "terminate"):
        value = dask.config.get(f"distributed.worker.memory.{key}", False)
        if value:
            return float(value)
    return 1.0


def usable_memory(w: dict) -> int:
    """Bytes of a worker's memory limit below its pause threshold (0: no limit)."""
    return int(int(w.get("memory_limit") or 0) * pause_fraction())


def worker_label(address: str, w: dict) -> str:
    """A worker as the user knows it: ``name (address)``, or the address alone."""
    name = w.get("name")
    return f"{name} ({address})" if name is not None and str(name) != address else address


def _mib(n: float) -> str:
    from dask.utils import format_bytes

    return format_bytes(int(n))


def check_memory(info: dict, block_bytes: int, slots: dict[str, int]) -> None:
    """Refuse workers whose memory limit cannot hold what the run will put on them.

    A worker holding ``n`` blocks needs its floor (:func:`worker_floor`) plus ``1.5 n + 0.5``
    blocks (see :func:`rpicluster.train.placement.worker_slots`) below its pause threshold; it holds
    at least one block whatever its limit, so a limit below ``floor + 2 blocks`` pauses the
    worker for good.

    Parameters
    ----------
    info : dict
        ``scheduler_info()["workers"]`` of the workers the run may use.
    block_bytes : int
        Bytes of one block.
    slots : dict
        Worker address -> blocks it will hold.

    Raises
    ------
    ConfigError
        Naming each worker that cannot, with its floor, the block size, the blocks, its limit,
        and a ``--memory-limit`` that would work.
    """
    frac, bad = pause_fraction(), []
    for addr, w in info.items():
        limit = int(w.get("memory_limit") or 0)
        floor, blocks = worker_floor(w), max(1, slots.get(addr, 1))
        need = floor + (1.5 * blocks + 0.5) * block_bytes
        if limit and need > usable_memory(w):
            bad.append(f"worker {worker_label(addr, w)} has a memory limit of {_mib(limit)} and "
                       f"pauses at {frac:.0%} ({_mib(usable_memory(w))}), but needs {_mib(need)}: "
                       f"{_mib(floor)} after imports + {1.5 * blocks + 0.5:g} x "
                       f"{_mib(block_bytes)} for {blocks} block(s) of {_mib(block_bytes)}")
    if not bad:
        return
    # One block per worker is the least a run needs. A worker's floor creeps up as it works
    # (allocator arenas, Dask's own buffers: 243 -> 252 MiB in seconds on x86-64), so the
    # limit advised leaves it a quarter more, rounded up to 16 MiB.
    floor = max(worker_floor(w) for w in info.values() if w.get("memory_limit"))
    fix = 16 * math.ceil((FLOOR_MARGIN * floor + 2 * block_bytes) / frac / 2**24)
    smaller = (", or ingest with fewer --block-rows" if floor < min(
        usable_memory(w) for w in info.values() if w.get("memory_limit")) else "")
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise ConfigError(
        f"{bad[0]}{more}: it would wait forever; restart the workers with --memory-limit "
        f"{fix}MiB or more (rpicluster up --local N --memory-limit {fix}MiB, or memory = "
        f"\"{fix}MiB\" in the inventory){smaller}")


class ClusterWatch:
    """Watch the workers a run may use while its loop waits (see the module docstring).

    Parameters
    ----------
    client : distributed.Client
    progress : Progress, optional
        Where the alert is shown.
    workers : list of str, optional
        The run's workers (addresses or names); default any.
    run_id : str, optional
        Set on the ``stalled`` events (none are published without it).
    interval : float
        Seconds between looks at the scheduler.
    """

    def __init__(self, client, progress: Progress | None = None, *,
                 workers: list[str] | None = None, run_id: str | None = None,
                 interval: float = 1.0):
        self.client = client
        self.progress = progress or Progress.null()
        self.wanted = set(workers) if workers else None
        self.run_id = run_id
        self.interval = interval
        self.no_worker_timeout = config.NO_WORKER_TIMEOUT
        self.silent_after = config.SILENT_WORKER_TIMEOUT
        self.paused_timeout = config.PAUSED_TIMEOUT
        self._all_paused_since: float | None = None
        self._next = 0.0
        self._none_since: float | None = None
        self._seen: dict[str, tuple[float, float]] = {}  # address -> (last_seen, when it moved)
        self.live: set[str] | None = None  # the run's workers at the last look (None: no look)
        self._state: tuple = ((), ())  # (paused, silent) labels last published
        self.alert: str | None = None

    def workers(self) -> dict:
        """``scheduler_info()["workers"]`` of the workers the run may use."""
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        if self.wanted is None:
            return info
        return {a: w for a, w in info.items() if a in self.wanted or w.get("name") in self.wanted}

    def wait_for_workers(self, what: str) -> dict:
        """The run's workers, once at least one is connected.

        Raises
        ------
        TrainingError
            None connected within ``config.NO_WORKER_TIMEOUT`` seconds.
        """
        while True:
            info = self.workers()
            if info:
                if self._none_since is not None:
                    self._none_since = None
                    self._show(None, now=False)
                return info
            self._no_worker(time.monotonic(), what)
            time.sleep(min(0.5, self.interval))

    def _no_worker(self, now: float, what: str) -> None:
        if self._none_since is None:
            self._none_since = now
            self._show(f"waiting for a worker to connect to {self.client.scheduler.address}",
                       now=True)
        waited = now - self._none_since
        if waited < self.no_worker_timeout:
            return
        whose = (f"none of this run's workers ({', '.join(sorted(self.wanted))}) is"
                 if self.wanted else "no worker is")
        raise TrainingError(
            f"{whose} connected to the scheduler {self.client.scheduler.address} ({what}); "
            f"waited {waited:.0f} s (RPICLUSTER_NO_WORKER_TIMEOUT); see which are missing with "
            f"rpicluster status, start them with rpicluster up")

    def wait(self, futures: list, what: str) -> None:
        """``distributed.wait(futures)``, looking at the workers every ``interval`` meanwhile."""
        from distributed import wait

        while True:
            try:
                wait(futures, timeout=self.interval)
                return
            except TimeoutError:
                self.tick(what)

    def tick(self, what: str) -> None:
        """Look at the workers if ``interval`` has passed: update the alert, publish a change,
        raise after too long without any worker."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        info = self.workers()
        self.live = set(info)
        if not info:
            self._no_worker(now, what)
            return
        if self._none_since is not None:
            self._none_since = None
            self._show(None, now=True)
        paused = sorted(worker_label(a, w) for a, w in info.items() if w.get("status") == "paused")
        silent = []
        for a, w in info.items():
            seen = w.get("last_seen")
            if a not in self._seen or self._seen[a][0] != seen:
                self._seen[a] = (seen, now)
            quiet = now - self._seen[a][1]
            if quiet >= self.silent_after:
                silent.append((worker_label(a, w), quiet))
        self._seen = {a: s for a, s in self._seen.items() if a in info}
        parts = []
        if paused:
            parts.append(f"{len(paused)} worker(s) paused for memory (above "
                         f"{pause_fraction():.0%} of their limit): {', '.join(paused)}")
        parts += [f"worker {label} has not reported for {quiet:.0f} s" for label, quiet in silent]
        state = (tuple(paused), tuple(label for label, _ in silent))
        changed = state != self._state
        self._state = state
        self._show("; ".join(parts) or None, now=changed)
        if changed and self.run_id is not None:
            self.client.log_event(ev.TOPIC, ev.make_event(
                ev.STALLED, run_id=self.run_id, worker=", ".join(state[0] + state[1]) or None,
                note=self.alert))
        self._check_paused(now, paused, len(info), what)

    def _check_paused(self, now: float, paused: list[str], n_workers: int, what: str) -> None:
        """Stop the run once every worker it may use has been paused for memory for
        ``paused_timeout`` seconds: none starts a task, so none frees a block, and the run
        would wait as long as Dask does (forever). The run keeps no more blocks on a worker
        than its limit allows (:func:`check_memory`), so what holds the memory is not the
        run's plan: another client's data, or memory the worker process did not give back."""
        if len(paused) < n_workers:
            self._all_paused_since = None
            return
        if self._all_paused_since is None:
            self._all_paused_since = now
        waited = now - self._all_paused_since
        if waited < self.paused_timeout:
            return
        raise TrainingError(
            f"every worker of this run has been paused for memory for {waited:.0f} s (above "
            f"{pause_fraction():.0%} of its limit; RPICLUSTER_PAUSED_TIMEOUT): "
            f"{', '.join(paused)} ({what}); restart the workers (rpicluster down, then up), "
            f"with a larger memory limit if it recurs (rpicluster up --local N --memory-limit, "
            f"or memory = in the inventory)")

    def _show(self, alert: str | None, *, now: bool) -> None:
        self.alert = alert
        self.progress.alert(alert, show=now)
