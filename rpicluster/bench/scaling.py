"""Scaling benchmark: the same job on growing worker sets, ideal against measured time.

One running cluster serves every step: a step restricts the job to its workers (the training
job's ``workers=``; for the random forest, joblib's dask backend passes ``workers=`` and
``allow_other_workers=False`` to every ``client.submit``), so no cluster restarts between steps.

Two ideals per step N, both anchored at the first step's measured median T1:

* core ideal (the cluster paper's): ``T1 * cores_1 / cores_N``. It assumes every core is
  equal, so a fast desktop joining a slow Pi reads as "138 % scalability".
* capacity ideal: ``T1 * capacity_1 / capacity_N``, where a step's capacity is the throughput
  (rows/s) its workers reach together on calibration tasks of the same job, every thread of
  every one of them busy at once (:func:`step_capacity`). On separate machines that is the sum
  of each worker's own rate; workers that share a machine (a desktop running several, or the
  namespace test hosts) share its cores, and adding their rates measured one at a time would
  promise more than the machine has (3 hosts capped at 1 + 1 + 0.25 cores on a 2-core machine:
  2.25 cores that are not there, an ideal no schedule can reach).

A rate is sustained throughput, never a typical task's speed (:func:`sustained_rate`): the rows
of back-to-back tasks over the wall time from the first one's start to the last one's end, on
the worker's own clock, across a window of :data:`CALIBRATION_WINDOW_S` (many CPU-quota
periods). A CPU quota (a cgroup's CFS bandwidth) hands out CPU in periods of 100 ms, and
unused quota is not carried over: a task that starts on a fresh period's quota after its
worker paused (for its next task, for its event loop) runs faster than the quota sustains, and
the median of such tasks' rates can read several times the sustained rate
(``tests/test_bench_scaling.py`` replays the kernel's rule). On the 8-host shelf the median
rule rated a 15 % host at 4,600-6,100 rows/s, which sustained 3,534 in the run, and an 80 %
host at 40,000, about a whole core's rate: the step joining the fast hosts then read 1.13 of
its ideal. Over a window of tens of periods a burst adds at most one period's quota, and the
wall between tasks charges the worker's own background work (its event loop, heartbeats, the
nanny's monitor, all under the same quota) to its rate, as a run does. The report puts each
step's measured rows/s beside its capacity (``run_over_capacity``): a fair ideal has about the
same ratio at every step.

Capacities and runs of the same minutes: the same work's CPU cost drifts from minute to minute
(by up to 25 % on the shelf's VM), and with every capacity measured once, before the steps,
step 8's capacity came from one minute and its runs from 25 minutes later. So the
timed runs go in rounds (round r: run r of step 1, of step 2, ... of step N), as
``benchmarks/train_profile.py`` alternates its runs, and a step's capacity is measured with
:func:`step_capacity` right before and right after each of its timed runs: a slow stretch of
the machine hits every step alike, and a step's capacity (the median of its runs' capacities,
each the mean of the two that bracket it, all kept in the JSON) comes from the minutes of its
own runs. One measurement before each run was not enough on the shelf's VM: its runs' rows/s
over it spread 0.78-1.30, as the machine sped up or slowed down during a 3-minute run.

Method, as hyperfine's ``--warmup`` and pytest-benchmark's warm-up rounds: every step has an
untimed warm-up run on the step's own workers (all of them before the first round), then
``repeats`` timed runs; a step's time is their median (min and max are reported beside it).
The workers are not restarted between steps, so what a worker does only once (imports, its
first read of the store, joblib's per-worker client to the scheduler, its first TLS connections
to the scheduler and to the other workers) would otherwise land in the first timed run of the
first step that uses it. The default
warm-up is a reduced run through the same code path (:attr:`IncKSGDJob.reduced` and
:attr:`RandomForestJob.reduced` say what is reduced); ``warmup="full"`` repeats the timed run
itself, ``"none"`` measures cold workers. The calibration before the steps is no substitute: its
tasks import the job's libraries on every worker but do not go through the job's scheduling path
(the forest's first run on a worker still opens joblib's worker client, for instance).

Scalability is ideal / measured for both. The simulator (:mod:`rpicluster.bench.simulate`)
replays the first step's task costs on each step's workers and predicts its time (one fitted
constant, the per-task overhead, from the first step): the prediction error column validates it,
and ``simulate=`` applies it to a hypothetical cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from rpicluster import config, history
from rpicluster.bench import simulate as sim
from rpicluster.bench.method import check_method, in_rounds, method
from rpicluster.bench.steps import natural, parse_steps, worker_order, worker_table
from rpicluster.errors import ConfigError, TrainingError, make_dirs
from rpicluster.progress import Progress
from rpicluster.train.checks import fingerprint

JOBS = ("inc-ksgd", "random-forest")
#: Jobs measured by rpicluster.bench.averaging (model averaging, not block tasks).
AVERAGING_JOBS = ("mlp", "sgd")


# --- jobs ---

def _calibrate_ksgd(dataset, params: dict, rows: int) -> tuple[int, float, float]:
    """On a worker: block 0 through the job's own whole-block task (read, k-means and sort,
    then every cluster's fit; :func:`rpicluster.train.tasks.block_task`); (rows, start, end)
    on the worker's clock.
    Always a whole block, whatever ``rows``: a part of one costs more per row (k-means and each
    cluster's fit have a fixed cost), and more so on a CPU-capped host (a 2,000-row part of a
    4,000-row block rated the 25 % host 2.5x and the free hosts 1.9x below their rate on whole
    blocks)."""
    from rpicluster.train.tasks import block_task

    t0 = time.perf_counter()
    rows = block_task(dataset, 0, params, 0).meta.rows
    return rows, t0, time.perf_counter()


def _calibrate_forest(dataset, params: dict, rows: int) -> tuple[int, float, float]:
    """On a worker: one tree of the forest on ``rows`` rows of block 0; (rows, start, end) on
    the worker's clock."""
    from sklearn.ensemble import RandomForestClassifier

    X, y = dataset.block(0)
    X, y = X[:rows], y[:rows]
    t0 = time.perf_counter()
    RandomForestClassifier(**{**params, "n_estimators": 1, "n_jobs": 1}).fit(X, y)
    return int(X.shape[0]), t0, time.perf_counter()


@dataclasses.dataclass
class RunRecord:
    """One repeat of a step: wall seconds, the task trace, tasks run outside the step."""

    seconds: float
    trace: list[dict]     # {"key", "group", "deps", "worker", "seconds", "end"}
    outside: int          # tasks that ran on a worker not in the step (must be 0)


class IncKSGDJob:
    """The Inc-kSGD training job (:func:`rpicluster.train.job.train`) on a step's workers."""

    name = "inc-ksgd"
    calibrate = staticmethod(_calibrate_ksgd)
    #: The warm-up run: the same graph (every block, partition and fits, the same window) on
    #: the step's workers, so every worker reads, partitions, fits and exchanges pieces; only
    #: the SGD epochs inside each fit task are cut to one.
    reduced = "the same training job with max_iter=1 (every block and task, one SGD epoch)"

    def __init__(self, params: dict | None = None):
        from rpicluster.models.incremental import (IncrementalKSGDClassifier,
                                                   check_incremental_params)

        est = IncrementalKSGDClassifier(**{"random_state": 0, **(params or {})})
        self.params = check_incremental_params(est.get_params())

    def window(self, n_workers: int) -> int:
        """Blocks in flight, as the training job sets them without memory limits: one per
        worker thread (:func:`rpicluster.train.placement.worker_slots`; one thread per worker
        here)."""
        return n_workers

    def check(self, workers: dict[str, dict]) -> None:
        """Any cluster with a worker runs the training job."""

    def sim_tasks(self, trace: list[dict], cal: dict[str, dict]) -> list[sim.SimTask]:
        """Partition and fit tasks of every block, work = seconds x the worker's thread rate."""
        return [sim.SimTask(t["key"], t["seconds"] * _thread_rate(cal, t["worker"]), t["group"],
                            tuple(t["deps"])) for t in trace]

    def run(self, client, dataset, workers: dict[str, dict], step: list[str], *,
            reduced: bool = False) -> RunRecord:
        """Train on the step's workers (``reduced``: the warm-up run, :attr:`reduced`)."""
        from rpicluster import events as ev
        from rpicluster.models.incremental import IncrementalKSGDClassifier
        from rpicluster.train.job import train

        got: list[dict] = []
        ended = threading.Event()

        def on_event(event) -> None:
            msg = event[1]
            if isinstance(msg, dict):
                got.append({**msg, "_end": event[0]})  # when the scheduler got the result
                if msg.get(ev.KIND) == ev.RUN_END:
                    ended.set()

        params = {k: v for k, v in self.params.items() if k != "block_rows"}
        if reduced:
            params["max_iter"] = 1
        est = IncrementalKSGDClassifier(**params)
        client.subscribe_topic(ev.TOPIC, on_event)
        try:
            result = train(est, dataset, client, workers=[workers[n]["address"] for n in step])
            # Events reach this client after train() returns; run-end is the last one.
            ended.wait(10)
        finally:
            client.unsubscribe_topic(ev.TOPIC)
        trace = []
        for e in got:
            if e.get(ev.KIND) == ev.PARTITIONED:
                trace.append({"key": f"p{e['block']}", "group": e["block"], "deps": [],
                              "worker": str(e["worker"]), "seconds": e["seconds"],
                              "end": e["_end"]})
            elif e.get(ev.KIND) == ev.FITTED:
                trace.append({"key": f"f{e['block']}-{e['cluster']}", "group": e["block"],
                              "deps": [f"p{e['block']}"], "worker": str(e["worker"]),
                              "seconds": e["seconds"], "end": e["_end"]})
        outside = sum(n for w, n in result.tasks_per_worker.items() if w not in step)
        return RunRecord(result.seconds, trace, outside)


class RandomForestJob:
    """scikit-learn's RandomForestClassifier through joblib's dask backend, as the paper ran.

    The client loads the dataset (the forest needs it in memory); joblib scatters it to the
    workers once and submits batches of trees restricted to the step's workers.
    """

    name = "random-forest"
    calibrate = staticmethod(_calibrate_forest)
    #: The warm-up run: the same fit through joblib's dask backend on the step's workers with
    #: two trees per thread. joblib dispatches up to twice n_jobs one-tree batches at once, so
    #: every thread gets a batch: each worker receives X, builds a tree and opens the client
    #: joblib's batches make on a worker (``get_client``) to the scheduler.
    reduced = "the same forest fit with 2 trees per thread of the step"

    def __init__(self, params: dict | None = None):
        self.params = {"n_estimators": 32, "max_depth": 12, "random_state": 0, **(params or {})}
        self._data = None

    def window(self, n_workers: int) -> None:
        return None

    def check(self, workers: dict[str, dict]) -> None:
        """Refuse a cluster of one thread in all (ConfigError): joblib sizes its dask backend
        by the whole cluster's threads and runs a backend of one sequentially, on this machine."""
        if sum(w["threads"] for w in workers.values()) < 2:
            raise ConfigError(
                "--job random-forest needs at least 2 worker threads in the cluster: with one, "
                "joblib fits the forest on this machine instead of the cluster; start 2 workers "
                "(--local 2) or give a worker 2 threads")

    def run(self, client, dataset, workers: dict[str, dict], step: list[str], *,
            reduced: bool = False) -> RunRecord:
        """Fit the forest on the step's workers (``reduced``: the warm-up run, :attr:`reduced`)."""
        import joblib
        from distributed import get_task_stream
        from sklearn.ensemble import RandomForestClassifier

        if self._data is None:
            parts = [dataset.block(b) for b in range(dataset.n_blocks)]
            self._data = (np.concatenate([p[0] for p in parts]),
                          np.concatenate([p[1] for p in parts]))
        X, y = self._data
        addresses = [workers[n]["address"] for n in step]
        cores = sum(workers[n]["threads"] for n in step)
        n = self.params["n_estimators"]
        trees = min(n, 2 * cores) if reduced else n
        forest = RandomForestClassifier(**{**self.params, "n_estimators": trees,
                                           "n_jobs": cores})
        with get_task_stream(client) as ts:
            t0 = time.perf_counter()
            with joblib.parallel_config(backend="dask", client=client, workers=addresses,
                                        allow_other_workers=False):
                forest.fit(X, y)
            seconds = time.perf_counter() - t0
        names = {w["address"]: n for n, w in workers.items()}
        trace, outside = [], 0
        for i, rec in enumerate(r for r in ts.data if "_parallel_build_trees" in str(r["key"])):
            busy = sum(s["stop"] - s["start"] for s in rec["startstops"]
                       if s["action"] == "compute")
            worker = names.get(rec["worker"], rec["worker"])
            outside += worker not in step
            trace.append({"key": f"b{i}", "group": 0, "deps": [], "worker": worker,
                          "seconds": busy, "end": max(s["stop"] for s in rec["startstops"])})
        if not trace:
            raise TrainingError("random-forest: no tree was built on the cluster (joblib fitted "
                                "the forest on this machine); nothing to measure")
        return RunRecord(seconds, trace, outside)

    def sim_tasks(self, trace: list[dict], cal: dict[str, dict]) -> list[sim.SimTask]:
        """One task per tree, each an equal share of the batches' work: joblib sizes its
        batches itself, so the graph is the trees, not the batches of one run."""
        total = sum(t["seconds"] * _thread_rate(cal, t["worker"]) for t in trace)
        n = self.params["n_estimators"]
        return [sim.SimTask(f"t{i}", total / n) for i in range(n)]


def make_job(name: str, params: dict | None = None):
    """The job called ``name`` (one of :data:`JOBS`)."""
    if name == "inc-ksgd":
        return IncKSGDJob(params)
    if name == "random-forest":
        return RandomForestJob(params)
    raise ConfigError(f"unknown job {name!r} (jobs: {', '.join(JOBS)})")


# --- calibration ---

#: Seconds of back-to-back calibration tasks a worker runs, at least, in :func:`calibrate`
#: (alone) and in :func:`step_capacity` (with the step's other workers): 60 periods of a
#: cgroup CPU quota, so that what a quota lets a task burst past its share (at most a period's
#: worth, once) moves a rate by under 2 %. A CPU-capped host's single tasks vary by +-15 %, and
#: its rate anchors every capacity ideal: the median of two warm tasks moved the 3-host
#: scalability between 0.59 and 0.96 over runs whose 3-host times agreed within 3 %.
CALIBRATION_WINDOW_S = 6.0
CAPACITY_WINDOW_S = 6.0


def sustained_rate(stamps: list[tuple[int, float, float]]) -> tuple[float, float]:
    """Rows/s of back-to-back tasks and the wall they span: ``(rate, span)``.

    ``stamps`` are one worker's tasks as ``(rows, start, end)`` on its own clock, run back to
    back on all its threads: the rate is their rows over the wall from the first start to the
    last end. The wall between tasks counts, and a task that ran faster than its worker's CPU
    quota sustains (it began on a fresh quota period) cannot lift the rate beyond the rows it
    really did in that time: unlike the median task's rate, which a run of burst tasks sets.
    """
    if not stamps:
        raise ValueError("no calibration tasks")
    span = max(e for _, _, e in stamps) - min(s for _, s, _ in stamps)
    rows = sum(r for r, _, _ in stamps)
    return (rows / span if span > 0 else math.inf), span


def _submit_calibration(client, job, dataset, w: dict, rows: int, n: int) -> list:
    return [client.submit(job.calibrate, dataset, job.params, rows, pure=False,
                          workers=[w["address"]], allow_other_workers=False)
            for _ in range(n)]


def _gather_calibration(client, name: str, futures: list) -> list[tuple[int, float, float]]:
    try:
        return client.gather(futures)
    except Exception as exc:
        raise TrainingError(f"calibration task failed on worker {name!r}: "
                            f"{type(exc).__name__}: {exc}") from exc


def calibrate(client, job, dataset, workers: dict[str, dict], *, rows: int | None = None,
              rounds: int = 3) -> dict[str, dict]:
    """Measure every worker's sustained throughput on the job's calibration task, one worker
    at a time.

    A worker first runs ``rounds`` tasks per thread, pinned to it (the first round warms it
    up: imports, first reads), then batches of back-to-back tasks on every thread until its
    batches span :data:`CALIBRATION_WINDOW_S` of wall; its rate is their rows over their wall
    (:func:`sustained_rate`, summed over batches: the wait between two batches is the client's,
    not the worker's). Workers take turns so that workers sharing a machine (a test bed, or a
    desktop running several) are each measured at what they can do, not at their share of a
    contended machine.

    Returns
    -------
    dict
        By worker name: ``{"rate": rows/s, "span": seconds measured, "threads", "tags",
        "samples": [rows/s per task]}`` (the first round first).

    Raises
    ------
    TrainingError
        The calibration task failed on a worker (named).
    """
    rows = _calibration_size(dataset, rows)
    out = {}
    for name, w in workers.items():
        first = _gather_calibration(client, name, _submit_calibration(
            client, job, dataset, w, rows, w["threads"] * rounds))
        batches = [first[w["threads"]:] or first]  # the first round is cold
        done = first
        while True:
            span = sum(sustained_rate(b)[1] for b in batches)
            if span >= CALIBRATION_WINDOW_S:
                break
            per_task = max(span / sum(map(len, batches)) * w["threads"], 1e-3)
            n = w["threads"] * math.ceil((CALIBRATION_WINDOW_S - span) / per_task)
            batches.append(_gather_calibration(client, name, _submit_calibration(
                client, job, dataset, w, rows, n)))
            done = done + batches[-1]
        out[name] = {"rate": sum(r for b in batches for r, _, _ in b) / span, "span": span,
                     "threads": w["threads"], "tags": w["tags"],
                     "samples": [r / (e - s) for r, s, e in done]}
    return out


def step_capacity(client, job, dataset, workers: dict[str, dict], step: list[str],
                  cal: dict[str, dict], *, rows: int | None = None, rounds: int = 3) -> float:
    """Rows/s of the step's workers together, now: each runs calibration tasks back to back on
    every thread, all of them at once, and contributes its sustained rate
    (:func:`sustained_rate`). ``cal`` (:func:`calibrate`) sizes each worker's share of tasks;
    a one-worker step is measured too, not read from ``cal``: the same work's CPU cost drifts,
    and a capacity is compared with runs of the same minutes.

    Each worker runs at least ``rounds`` tasks per thread, and as many as fill
    :data:`CAPACITY_WINDOW_S` at its own rate: with a fixed count, a fast worker's short tasks
    ended before a slow one's first did, so they barely overlapped, and 3 hosts sharing 2 cores
    read as 82,500 rows/s, their one-at-a-time sum (80,600).

    Raises
    ------
    TrainingError
        The calibration task failed on a worker (named).
    """
    rows = _calibration_size(dataset, rows)

    def count(n: str) -> int:
        per_task = rows / _thread_rate(cal, n)
        return workers[n]["threads"] * max(rounds, math.ceil(CAPACITY_WINDOW_S / per_task))

    futures = {n: _submit_calibration(client, job, dataset, workers[n], rows, count(n))
               for n in step}
    return sum(sustained_rate(_gather_calibration(client, n, fs))[0]
               for n, fs in futures.items())


def _calibration_size(dataset, rows: int | None = None) -> int:
    """Rows of the calibration task: ``rows`` or the configured default (None: one block), at
    most one block."""
    return int(min(rows or config.BENCH_CALIBRATION_ROWS or dataset.block_rows,
                   dataset.block_rows))


# --- the benchmark ---

#: Dask's performance report of the timed rounds (every step's timed runs and the capacity
#: measurements before them), in the output folder.
TIMED_REPORT = "timed-runs.html"


def _thread_rate(cal: dict[str, dict], worker: str) -> float:
    """Calibrated rows/s of one thread of ``worker``: a task of s seconds there did s x this."""
    return cal[worker]["rate"] / cal[worker]["threads"]


def _busy(trace: list[dict]) -> dict[str, float]:
    """Task seconds per worker in one run (how evenly the step's workers were used)."""
    out: dict[str, float] = {}
    for t in trace:
        out[t["worker"]] = out.get(t["worker"], 0.0) + t["seconds"]
    return out


def _tail(trace: list[dict]) -> dict[str, float]:
    """Seconds each worker had finished its last task before the run's last task ended (0 for
    the worker holding the tail): a slow worker must not be the one everybody waits for."""
    ends: dict[str, float] = {}
    for t in trace:
        if t.get("end") is not None:
            ends[t["worker"]] = max(ends.get(t["worker"], t["end"]), t["end"])
    last = max(ends.values(), default=0.0)
    return {w: last - e for w, e in ends.items()}


def _waited(tail: dict[str, float]) -> float:
    """How long the other workers waited for the one that ended a run: seconds between the
    next-to-last worker's last task and the run's (0 with one worker)."""
    ends = sorted(tail.values())
    return ends[1] if len(ends) > 1 else 0.0


def _method(warmup: str, repeats: int, reduced: str) -> dict:
    """:func:`rpicluster.bench.method.method`, plus the order of the timed runs."""
    out = in_rounds(method(warmup, repeats, reduced))
    out["text"] += (" Each timed run sits between two measurements of its step's capacity; a "
                    "run's capacity is the mean of its two, a step's the median of its runs'.")
    return out


def _median_run(runs: list[RunRecord]) -> RunRecord:
    med = statistics.median(r.seconds for r in runs)
    return min(runs, key=lambda r: abs(r.seconds - med))


def _versions() -> dict:
    from rpicluster.deploy.health import versions

    return {"python": platform.python_version(), "platform": platform.platform(),
            **versions(("rpicluster", "dask", "distributed", "numpy", "scikit-learn", "joblib",
                        "zarr"))}


@contextlib.contextmanager
def performance_report(client, path: Path):
    """``distributed.performance_report`` for the block, written to ``path``.

    Distributed's own asks the system monitor's count with ``run_on_scheduler``, which the
    schedulers rpicluster starts refuse; this asks the page's preload instead (a scheduler
    without it: the report's system plots start at the monitor's oldest sample).
    """
    from rpicluster import events as ev

    start = time.time()
    facts = client.sync(getattr(client.scheduler, ev.FACTS_OP)) or {}  # None: not preloaded
    client.get_task_stream(start=0, stop=0)  # the scheduler starts recording the task stream
    yield
    html = client.sync(client.scheduler.performance_report, start=start,
                       last_count=facts.get("monitor_count", 0), code="", mode=None)
    Path(path).write_text(html)


def run_scaling(client, dataset, out_dir, *, job: str = "inc-ksgd", params: dict | None = None,
                steps: str | None = None, repeats: int = 3, warmup: str = "reduced",
                inventory=None, simulate: str | None = None,
                calibration_rows: int | None = None, progress: Progress | None = None) -> dict:
    """Run the scaling benchmark on ``client``'s cluster and write the reports to ``out_dir``.

    Parameters
    ----------
    client : distributed.Client
    dataset : rpicluster.data.reader.Dataset
        Readable by every worker.
    out_dir : path
        Receives scaling.csv, scaling.json, scaling.md, scaling.png and timed-runs.html
        (:data:`TIMED_REPORT`).
    job : {"inc-ksgd", "random-forest"}
    params : dict, optional
        Estimator parameters of the job.
    steps : str, optional
        ``"pi01; pi01,desktop"``; default one more worker per step in ``worker_order``.
    repeats : int
        Timed runs per step (median, min and max are reported), in rounds across the steps,
        each after a measurement of its step's capacity.
    warmup : {"reduced", "full", "none"}
        The untimed run on a step's workers before its timed runs: the job's reduced run
        (the job's ``reduced`` says what it is), the timed run itself, or none.
    inventory : path, optional
        Orders the default steps as the inventory lists its workers.
    simulate : str, optional
        A hypothetical cluster (``"32x pi4, 2x desktop"``) to predict the job's time on.
    calibration_rows : int, optional
        Rows of the random forest's calibration tree (default ``config.BENCH_CALIBRATION_ROWS``:
        one block). Inc-kSGD's calibration task is always one whole block.

    Returns
    -------
    dict
        The report document (as written to scaling.json).
    """
    from rpicluster.bench import report

    check_method(repeats, warmup)
    jobber = make_job(job, params)
    workers = worker_table(client)
    if not workers:
        raise ConfigError("the cluster has no workers")
    jobber.check(workers)
    order = worker_order(workers, inventory)
    step_sets = parse_steps(steps, workers, order)
    terms = sim.parse_cluster(simulate, {n: {"tags": w["tags"]} for n, w in workers.items()}) \
        if simulate else None
    out = Path(out_dir)
    make_dirs(out)
    progress = progress or Progress.null()
    load_before = os.getloadavg()
    with progress:
        cal = calibrate(client, jobber, dataset, workers, rows=calibration_rows)
        progress.advance(note="calibrated " + ", ".join(
            f"{n}: {c['rate']:,.0f} rows/s" for n, c in cal.items()))
        warm: list[RunRecord | None] = []
        for i, step in enumerate(step_sets, start=1):
            warm.append(None if warmup == "none" else
                        jobber.run(client, dataset, workers, step, reduced=warmup == "reduced"))
            if warm[-1] is not None:
                progress.advance(note=f"step {i} ({len(step)} workers) warm-up, untimed: "
                                      f"{warm[-1].seconds:.1f} s")
        runs: list[list[RunRecord]] = [[] for _ in step_sets]
        caps: list[list[float]] = [[] for _ in step_sets]
        order: list[dict] = []

        def capacity(step: list[str]) -> float:
            return step_capacity(client, jobber, dataset, workers, step, cal,
                                 rows=calibration_rows)

        # After the warm-ups: one report for the timed rounds (a step's runs are spread over
        # them, and the scheduler's report spans one stretch of time).
        with performance_report(client, out / TIMED_REPORT):
            for r in range(repeats):
                for i, step in enumerate(step_sets):
                    measured = time.time()
                    before = capacity(step)
                    started = time.time()
                    runs[i].append(jobber.run(client, dataset, workers, step))
                    ended = time.time()
                    after = capacity(step)
                    # The run's capacity: the mean of the two that bracket it (a machine
                    # speeding up or slowing down during the run weighs on both).
                    caps[i].append((before + after) / 2)
                    order.append({"step": i + 1, "repeat": r + 1, "capacity_at": measured,
                                  "started": started, "ended": ended,
                                  "seconds": runs[i][-1].seconds, "capacity_before": before,
                                  "capacity_after": after, "capacity": caps[i][-1]})
                    progress.advance(note=f"round {r + 1}: step {i + 1} ({len(step)} workers) "
                                          f"{runs[i][-1].seconds:.1f} s, capacity "
                                          f"{before:,.0f} before, {after:,.0f} rows/s after")
    capacity = [statistics.median(c) for c in caps]
    rows_out = []
    ref = _median_run(runs[0])
    ref_tasks = jobber.sim_tasks(ref.trace, cal)
    t1 = statistics.median(r.seconds for r in runs[0])
    overhead = sim.fit_overhead(ref_tasks, sim.measured_slots(step_sets[0], cal), t1,
                                window=jobber.window(len(step_sets[0])))
    cores1 = sum(workers[n]["threads"] for n in step_sets[0])
    cap1 = capacity[0]
    for i, (step, step_runs, cap, w, run_caps) in enumerate(
            zip(step_sets, runs, capacity, warm, caps), start=1):
        secs = [r.seconds for r in step_runs]
        med = statistics.median(secs)
        cores = sum(workers[n]["threads"] for n in step)
        ideal_c, ideal_k = t1 * cores1 / cores, t1 * cap1 / cap
        pred = sim.list_schedule(ref_tasks, sim.measured_slots(step, cal),
                                 window=jobber.window(len(step)), overhead=overhead).makespan
        rows_out.append({
            "step": i, "workers": step, "cores": cores,
            "memory": sum(workers[n]["memory"] for n in step),
            "seconds": secs, "median": med, "min": min(secs), "max": max(secs),
            "ideal_cores": ideal_c, "scalability_cores": ideal_c / med,
            # the median of its timed runs' capacities (each the mean of the two measured
            # right before and right after the run)
            "capacity": cap, "capacities": run_caps,
            "capacity_one_at_a_time": sum(cal[n]["rate"] for n in step),
            "ideal_capacity": ideal_k, "scalability_capacity": ideal_k / med,
            # the step's measured rows/s over its capacity: a fair capacity ideal needs the
            # same ratio at every step (step 1's sets it)
            "run_over_capacity": dataset.n_rows / med / cap,
            "runs_over_capacity": [dataset.n_rows / t / c for t, c in zip(secs, run_caps)],
            "speedup": t1 / med, "rows_per_s_per_core": dataset.n_rows / med / cores,
            "predicted": pred, "prediction_error": (pred - med) / med,
            "tasks_outside_step": sum(r.outside for r in step_runs),
            "busy_seconds": _busy(_median_run(step_runs).trace),
            # per timed run, the worker whose task ended last (the run's tail) and how long
            # the others waited for it, and in the median run how long before the end each
            # worker had finished
            "last_worker": [min(t, key=t.get) if t else None
                            for t in (_tail(r.trace) for r in step_runs)],
            "tail_waited": [_waited(_tail(r.trace)) for r in step_runs],
            "finished_before_end": _tail(_median_run(step_runs).trace),
            "warmup_seconds": None if w is None else w.seconds,
            "warmup_workers": None if w is None else sorted(_busy(w.trace), key=natural)})
    doc = {
        "job": jobber.name, "params": jobber.params, "repeats": repeats,
        "method": _method(warmup, repeats, jobber.reduced),
        "runs": order, "report_html": TIMED_REPORT,
        "dataset": {"url": str(dataset.url), "rows": int(dataset.n_rows),
                    "features": int(dataset.n_features), "classes": len(dataset.classes),
                    "blocks": int(dataset.n_blocks), "block_rows": int(dataset.block_rows)},
        "versions": _versions(), "scheduler": client.scheduler.address,
        "workers": {n: {**w, "calibration": cal[n]} for n, w in workers.items()},
        "calibration": {"rows": _calibration_size(dataset, calibration_rows), "rounds": 3,
                        "window_s": CALIBRATION_WINDOW_S,
                        "mode": "sustained rows/s of back-to-back tasks over at least "
                                "window_s of wall; workers: one at a time, all its threads "
                                "busy; step capacity: the step's workers together, every "
                                "thread busy, measured right before and right after each "
                                "timed run of the step; a run's capacity is the mean of its "
                                "two, a step's the median of its runs'"},
        "steps": rows_out,
        "simulation": {"reference_step": 1, "overhead_s": overhead,
                       "window": "blocks in flight = worker threads" if job == "inc-ksgd"
                       else "none"},
        "load": {"before": list(load_before), "after": list(os.getloadavg()),
                 "cpus": os.cpu_count()},
    }
    if terms is not None:
        slots = sim.slots_for(terms, cal)
        n_hyp = sum(c for c, _ in terms)
        doc["simulation"]["hypothetical"] = {
            "spec": simulate, "workers": n_hyp, "threads": len(slots),
            "predicted": sim.list_schedule(ref_tasks, slots, window=jobber.window(n_hyp),
                                           overhead=overhead).makespan}
    report.write_all(doc, out)
    return doc


def scaling_bench(out_dir, *, scheduler: str | None = None, inventory=None,
                  local: int | bool | None = None, job: str = "inc-ksgd",
                  data: str | None = None,
                  rows: int | None = None, features: int = 256, classes: int = 100,
                  block_rows: int | None = None, steps: str | None = None, repeats: int = 3,
                  warmup: str = "reduced", simulate: str | None = None,
                  params: dict | None = None,
                  progress: Progress | None = None, announce=None,
                  averaging: dict | None = None) -> dict:
    """``rpicluster bench scaling``: pick the dataset and the cluster, then :func:`run_scaling`.

    Without ``data``, a synthetic store of ``rows`` x ``features`` (``classes`` classes, blocks
    of ``block_rows``) is ingested into ``out_dir/data.zarr`` (reused when it already matches);
    on an SSH cluster the workers must be able to read it (a shared path), else pass ``data``
    as an ``http://`` or ``s3://`` URL. The cluster is chosen by
    :func:`rpicluster.deploy.resolve.client` (``announce(ref)`` hears which one).

    ``job="mlp"`` (or ``"sgd"``) measures model averaging instead
    (:func:`rpicluster.bench.averaging.run_averaging_scaling`; ``averaging`` holds its
    ``syncs``, ``epochs``, ``local_epochs`` and ``test`` store) with the same ``repeats`` and
    ``warmup``.
    """
    from rpicluster.data.reader import open_dataset
    from rpicluster.data.writer import ingest
    from rpicluster.deploy.resolve import client as cluster_client

    if job not in JOBS + AVERAGING_JOBS:
        raise ConfigError(f"unknown job {job!r} (jobs: {', '.join(JOBS + AVERAGING_JOBS)})")
    if data is not None and rows is not None:
        raise ConfigError("give --data or --rows, not both")
    check_method(repeats, warmup)
    out = Path(out_dir)
    if data is None:
        rows = rows or config.BENCH_SCALING_ROWS
        block_rows = block_rows or max(1, math.ceil(rows / 12))
        spec = f"synthetic:rows={rows},features={features},classes={classes},seed=0"
        target = out / "data.zarr"
        dataset = None
        with contextlib.suppress(Exception):
            ds = open_dataset(target)
            if (ds.n_rows, ds.n_features, len(ds.classes), ds.block_rows) == (
                    rows, features, classes, block_rows):
                dataset = ds
        if dataset is None:
            make_dirs(out)
            dataset = ingest(spec, target, block_rows=block_rows, overwrite=True)
    else:
        dataset = open_dataset(data)
    # A running local cluster of another size than ``local`` is refused by the resolver.
    with cluster_client(scheduler, inventory=inventory, local=local, announce=announce) as client, \
            history.recording("bench", params={"bench": "scaling", "job": job, "steps": steps,
                                               "repeats": repeats, "warmup": warmup,
                                               **(params or {})},
                              data=str(dataset.url), fingerprint=fingerprint(dataset),
                              cluster=client.scheduler.address) as record:
        record.update(workers=list(worker_table(client)))
        if job in AVERAGING_JOBS:
            from rpicluster.bench.averaging import run_averaging_scaling

            workers = worker_table(client)
            opts = dict(averaging or {})
            test = opts.pop("test", None)
            return run_averaging_scaling(
                client, dataset, out, model=job, params=params,
                steps=parse_steps(steps, workers, worker_order(workers, inventory)),
                addresses={n: w["address"] for n, w in workers.items()},
                test=open_dataset(test) if test else None, repeats=repeats, warmup=warmup,
                progress=progress, **opts)
        doc = run_scaling(client, dataset, out, job=job, params=params, steps=steps,
                          repeats=repeats, warmup=warmup, inventory=inventory,
                          simulate=simulate, progress=progress)
        record.result(phases={f"step {s['step']} ({len(s['workers'])} workers)": s["median"]
                              for s in doc["steps"]},
                      scalability_capacity=[s["scalability_capacity"] for s in doc["steps"]])
        return doc
