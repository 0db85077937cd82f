"""Where a training run's time goes: a per-phase table, 1 vs N workers, Dask vs in-process.

    python benchmarks/train_profile.py [--rows 192000 --features 512 --classes 200 --blocks 8]
        [--clusters 16 --epochs 10] [--workers 2] [--repeats 3] [--out DIR] [--store PATH]

The same store, parameters and seed for: the in-process fit with ``n_jobs=N`` threads, then the
Dask job on 1 worker x 1 thread and on N workers x 1 thread (a fresh nanny LocalCluster each,
both started before the first timed run, libraries imported on every worker before the clock
starts). Each of the three gets an untimed warm-up fit (one SGD epoch: every block and task; on
a fresh cluster the first run also pays its workers' first reads and allocations), then
``--repeats`` timed fits, the Dask ones alternating between the two clusters so that a machine
whose speed drifts during the benchmark weighs on both alike; the median is reported, with
every run's time. For the Dask runs the table splits
the wall time x workers into:

* worker phases, from the tasks' own timers: ``read`` (chunk into its array), ``k-means``,
  ``sort`` (rows grouped by cluster in place), ``fit`` (SGD of every cluster), whether in a
  whole-block task (``block-``: all but the last blocks, one per thread) or in the partition
  and fit tasks of the shared last blocks;
* other task time from Dask's task stream (``meta``, ``piece`` tasks, deserialisation) and
  ``transfers`` (pieces moving to the worker that fits them);
* the driver's own time: ``assemble`` (block model from its parts), ``validation`` (submitting
  the scoring), ``commit`` (waiting at the end for the background run-directory writer),
  and the driver process's CPU seconds;
* ``idle``: worker-seconds in which a worker ran nothing (wall x workers - task time).

It also prints, per timed run, the workers' CPU seconds (user and system), minor page faults,
and their task threads' CPU, context switches and migrations between cores (Linux ``/proc``),
with a probe of the machine's speed (one fixed fit in the driver) just before the run: on a
loaded machine the ratio of CPU to wall time shows how much of a core the run really got, and
a fit that costs more CPU in one configuration shows whether it was the machine (the probe) or
the worker (faults, switches, migrations).
Writes Markdown to ``--out``/train_profile.md (default benchmarks/results). Works on older
checkouts too (phases it cannot see there stay empty), so a before/after pair is
``PYTHONPATH=<old checkout> python benchmarks/train_profile.py --out before/``.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

PHASE_RE = re.compile(r"(?:^|-)(block|partition|meta|piece|fit|validate|score)(?:-|$)")


def _phase(key) -> str:
    m = PHASE_RE.search(str(key))
    return m.group(1) if m else "other"


def _warm():
    """Import what the tasks import, so the first block does not pay for it."""
    import sklearn.cluster  # noqa: F401

    import rpicluster.models.ksgd  # noqa: F401
    import rpicluster.train.tasks  # noqa: F401
    return os.getpid()


def _counters() -> dict:
    """This worker process's counters: CPU seconds (user, system), minor page faults, and for
    its task threads (``Dask-Default-Threads``) and the rest: CPU seconds, voluntary and
    involuntary context switches and migrations between cores (Linux ``/proc``; zero elsewhere)."""
    import resource
    import threading

    ru = resource.getrusage(resource.RUSAGE_SELF)
    out = Counter(user=ru.ru_utime, sys=ru.ru_stime, minflt=ru.ru_minflt)
    tasks = {t.native_id for t in threading.enumerate()
             if "Dask-Default-Threads" in t.name}
    for task_dir in Path("/proc/self/task").glob("*"):
        who = "task" if int(task_dir.name) in tasks else "other"
        try:
            status = dict(line.split(":", 1) for line in (task_dir / "status").read_text()
                          .splitlines() if ":" in line)
            sched = dict(line.split(":", 1) for line in (task_dir / "sched").read_text()
                         .splitlines() if ":" in line)
            stat = (task_dir / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a thread that ended, or no /proc
            continue
        out[f"{who}-cpu"] += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
        out[f"{who}-vcsw"] += int(status["voluntary_ctxt_switches"])
        out[f"{who}-ivcsw"] += int(status["nonvoluntary_ctxt_switches"])
        out[f"{who}-migrations"] += int(float(sched.get("se.nr_migrations", "0")))
    return dict(out)


def _probe() -> float:
    """CPU seconds of one fixed cluster fit (1,500 x 512 rows, 200 classes, one BLAS thread) in
    the driver, idle workers: the machine's speed at that moment, to tell drift from a cause."""
    from rpicluster.models.ksgd import fit_cluster
    from rpicluster.train.tasks import one_blas_thread

    rng = np.random.default_rng(0)
    X = rng.standard_normal((1500, 512)).astype(np.float32)
    y = rng.integers(0, 200, 1500)
    c0 = time.thread_time()
    with one_blas_thread():
        fit_cluster(X, y, seed=0, params={"max_iter": 10, "alpha": 1e-4, "learning_rate":
                                          "optimal", "eta0": 0.01, "power_t": 0.5,
                                          "batch_size": 256, "average": True,
                                          "solver": "minibatch"})
    return time.thread_time() - c0


def fit_dask(store, params: dict, counts, *, run_dir: Path, repeats: int) -> dict:
    """Training runs on one fresh LocalCluster per worker count in ``counts``, all started
    together: each gets an untimed warm-up (one SGD epoch, every block and task), then the
    timed runs alternate between the clusters (1, N, 1, N, ...), so a machine that speeds up or
    slows down during the benchmark weighs on every count alike. Per count: the phase
    accounting of the median run, every timed run's wall seconds (``walls``) and each run's
    worker counters (``counters``, see :func:`_counters`) and driver probe (``probes``)."""
    from contextlib import ExitStack

    from distributed import Client, LocalCluster, get_task_stream

    from rpicluster import IncrementalKSGDClassifier, open_dataset
    from rpicluster import config as rpicluster_config
    from rpicluster.train.job import train

    # Dask's clocks as on every cluster rpicluster starts (config.DASK_DEFAULTS).
    rpicluster_config.apply_dask_defaults()

    runs = {n: [] for n in counts}
    with ExitStack() as stack:
        clients = {}
        for n in counts:
            cluster = stack.enter_context(LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0"))
            client = clients[n] = stack.enter_context(Client(cluster, set_as_default=False))
            client.run(_warm)
            with client.as_current():  # train's as_completed finds the current client
                train(IncrementalKSGDClassifier(**{**params, "max_iter": 1}),
                      open_dataset(store), client, run_dir=run_dir / f"warm-up-{n}")
        for i in range(repeats):
            for n, client in clients.items():
                probe = _probe()
                before = client.run(_counters)
                d0 = time.process_time()
                with client.as_current(), get_task_stream(client) as ts:
                    t0 = time.perf_counter()
                    result = train(IncrementalKSGDClassifier(**params), open_dataset(store),
                                   client, run_dir=run_dir / f"run-{n}-{i}")
                    wall = time.perf_counter() - t0
                driver_cpu = time.process_time() - d0
                after = client.run(_counters)
                counters = sum((Counter({k: v - before.get(w, {}).get(k, 0)
                                         for k, v in after[w].items()}) for w in after),
                               Counter())
                runs[n].append({**_account(ts.data, wall, result, n, driver_cpu,
                                           counters["user"] + counters["sys"]),
                                "counters": counters, "probe": probe})
    out = {}
    for n, rs in runs.items():
        median = sorted(rs, key=lambda r: r["wall"])[len(rs) // 2]
        out[n] = {**median, "walls": [r["wall"] for r in rs], "all": rs}
    return out


def run_rows(runs: dict) -> list[str]:
    """One Markdown row per timed run, in the order run: wall, the fits' CPU, the workers'
    counters (see :func:`_counters`) and the driver's probe."""
    order = sorted(((i, n, r) for n, rs in runs.items() for i, r in enumerate(rs["all"])),
                   key=lambda t: (t[0], t[1]))
    rows = ["| run | workers | wall | fits' CPU | workers' user / sys CPU | task threads' CPU | "
            "minor faults | task threads' switches vol. / invol. | task threads' migrations | "
            "other threads' CPU, switches vol. | probe CPU |", "|" + "---|" * 11]
    for i, n, r in order:
        c = r["counters"]
        rows.append(f"| {i + 1} | {n} | {r['wall']:.2f} | {r['phases'].get('fit-cpu', 0):.2f} | "
                    f"{c['user']:.2f} / {c['sys']:.2f} | {c['task-cpu']:.2f} | "
                    f"{c['minflt']:,} | {c['task-vcsw']:,} / {c['task-ivcsw']:,} | "
                    f"{c['task-migrations']:,} | {c['other-cpu']:.2f}, {c['other-vcsw']:,} | "
                    f"{r['probe']:.3f} |")
    return rows


def _account(records, wall, result, n_workers, driver_cpu, worker_cpu) -> dict:
    compute, transfer = Counter(), 0.0
    for r in records:
        for s in r.get("startstops", ()):
            if s["action"] == "compute":
                compute[_phase(r["key"])] += s["stop"] - s["start"]
            elif s["action"] == "transfer":
                transfer += s["stop"] - s["start"]
    return {"wall": wall, "result": result, "compute": compute, "transfer": transfer,
            "workers": n_workers, "driver_cpu": driver_cpu, "worker_cpu": worker_cpu,
            "phases": dict(getattr(result, "phases", {}) or {})}


def phase_rows(run: dict) -> list[tuple[str, float]]:
    """(phase, seconds) rows of one Dask run; worker-seconds add up to wall x workers."""
    ph, comp = run["phases"], run["compute"]
    # A whole-block task (block-...) is a partition then a fit: its fit part is the fits'
    # seconds measured in the tasks beyond the fit tasks' own.
    fit_in_blocks = max(0.0, ph.get("fit", 0.0) - comp["fit"]) if comp["block"] else 0.0
    partition = comp["partition"] + comp["block"] - fit_in_blocks
    rows = [("whole-block tasks (partition + fit)", comp["block"])]
    if "read" in ph:
        rows += [("read (worker)", ph.get("read", 0.0)), ("k-means (worker)", ph.get("kmeans", 0)),
                 ("sort by cluster (worker)", ph.get("sort", 0.0))]
        rest = partition - ph.get("read", 0) - ph.get("kmeans", 0) - ph.get("sort", 0)
        rows.append(("partition, other", max(0.0, rest)))
    else:
        rows.append(("partition task (read + k-means + pieces)", comp["partition"]))
    if "fit-cpu" in ph:
        rows += [("  partition tasks' CPU", ph.get("partition-cpu", 0.0)),
                 ("  fit tasks' CPU", ph["fit-cpu"])]
    rows += [("fits (in fit and whole-block tasks)", comp["fit"] + fit_in_blocks),
             ("meta + piece tasks", comp["meta"] + comp["piece"]),
             ("validation tasks", comp["validate"] + comp["score"]),
             ("other tasks", comp["other"]),
             ("transfers", run["transfer"])]
    busy = sum(comp.values()) + run["transfer"]
    rows.append(("idle (worker-seconds)", max(0.0, run["wall"] * run["workers"] - busy)))
    rows += [(f"driver: {k.removeprefix('driver-')}", v) for k, v in sorted(ph.items())
             if k.startswith("driver-")]
    rows += [("driver CPU", run["driver_cpu"]), ("workers' CPU", run["worker_cpu"]),
             ("wall", run["wall"])]
    return rows


def _runs(run: dict) -> str:
    return ", ".join(f"{w:.1f}" for w in run["walls"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=192_000)
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--clusters", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--store", type=Path, help="reuse (or create) the store here")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of each fit after an untimed warm-up (median reported)")
    ap.add_argument("--skip-in-process", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args()

    from rpicluster import IncrementalKSGDClassifier, ingest, open_dataset

    block_rows = -(-a.rows // a.blocks)
    params = dict(n_clusters=a.clusters, max_iter=a.epochs, random_state=0,
                  block_rows=block_rows)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        store = a.store or Path(tmp) / "profile.zarr"
        try:
            ds = open_dataset(store)
            assert (ds.n_rows, ds.n_features, len(ds.classes), ds.block_rows) == (
                a.rows, a.features, a.classes, block_rows)
        except Exception:  # noqa: BLE001 - absent or different: build it
            ds = ingest(f"synthetic:rows={a.rows},features={a.features},classes={a.classes},"
                        f"seed=0", store, block_rows=block_rows, overwrite=True)
        t_in = cpu_in = None
        if not a.skip_in_process:
            IncrementalKSGDClassifier(**{**params, "max_iter": 1}, n_jobs=a.workers).fit(ds)
            timed = []
            for _ in range(a.repeats):
                c0, t0 = time.process_time(), time.perf_counter()
                ref = IncrementalKSGDClassifier(**params, n_jobs=a.workers).fit(ds)
                timed.append((time.perf_counter() - t0, time.process_time() - c0))
            t_in, cpu_in = sorted(timed)[len(timed) // 2]
            print(f"in-process n_jobs={a.workers}: {t_in:.1f} s (CPU {cpu_in:.1f} s), runs "
                  + ", ".join(f"{t:.1f}" for t, _ in timed), flush=True)
        runs = fit_dask(store, params, (1, a.workers), run_dir=Path(tmp),
                        repeats=a.repeats)
        for n, run in runs.items():
            print(f"Dask {n} worker(s): {run['wall']:.1f} s, runs {_runs(run)}", flush=True)
        X, _ = ds.block(0)
        same = (None if a.skip_in_process else
                bool(np.array_equal(runs[a.workers]["result"].model.predict(X), ref.predict(X))))
    load1 = os.getloadavg()
    t1, tn = runs[1]["wall"], runs[a.workers]["wall"]
    lines = ["# Training profile (benchmarks/train_profile.py)\n",
             f"{a.rows:,} x {a.features} x {a.classes} classes, {ds.n_blocks} blocks of "
             f"{block_rows:,}, k={a.clusters}, {a.epochs} epochs; cores: {os.cpu_count()}; "
             f"load average before {load0[0]:.2f}, after {load1[0]:.2f}\n",
             f"Every fit: an untimed warm-up (one SGD epoch; the Dask ones on their fresh "
             f"clusters, both started first), then {a.repeats} timed runs, the Dask ones "
             f"alternating 1, {a.workers}, 1, {a.workers}, ...; the median run is shown. Timed "
             f"runs (s): 1 worker {_runs(runs[1])}; {a.workers} workers "
             f"{_runs(runs[a.workers])}.\n",
             f"| phase (seconds) | Dask 1 worker | Dask {a.workers} workers |", "|---|---|---|"]
    r1, rn = phase_rows(runs[1]), dict(phase_rows(runs[a.workers]))
    lines += [f"| {name} | {v:.1f} | {rn.get(name, float('nan')):.1f} |" for name, v in r1]
    lines += ["", "Every timed run in order: the workers' counters summed over workers (Linux "
              "/proc; task threads: the workers' Dask-Default-Threads), and the driver's "
              "probe, the CPU seconds of one fixed 1,500-row fit just before the run:\n",
              *run_rows(runs)]
    lines += ["", f"- speed-up, {a.workers} workers over 1: **{t1 / tn:.2f}x**"]
    if t_in:
        lines += [f"- in-process n_jobs={a.workers}: {t_in:.1f} s (CPU {cpu_in:.1f} s); "
                  f"Dask {a.workers} workers / in-process: **{tn / t_in:.2f}**",
                  f"- Dask model predicts the same labels as the in-process fit on block 0: "
                  f"{same}"]
    lines += [f"- blocks in flight: {getattr(runs[a.workers]['result'], 'window', '?')}; "
              f"tasks per worker: {dict(runs[a.workers]['result'].tasks_per_worker)}"]
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "train_profile.md").write_text(text)


if __name__ == "__main__":
    main()
