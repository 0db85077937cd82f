"""Where the wall time of ``rpicluster tune`` goes: one search, timed task by task.

    python benchmarks/tune_profile.py [--rows 12000] [--block-rows 1500] [--epochs 5]
        [--candidates 27] [--runs 2] [--json OUT]

The search of ``benchmarks/tune_peers.py`` (Fashion-MNIST, model sgd, the default space) on a
fresh 2-worker local Dask cluster (one thread each), ``--runs`` times in a row: the first run
finds the workers cold (nothing imported), later ones warm. For each run it prints the wall
split into the driver's setup (the call to the first task), each rung (first start to last end),
the refit and the end (last task to the return), with the CPU seconds spent in the tasks and
the worker-seconds left idle inside each phase; every task's CPU time is measured on the worker
(``time.thread_time``), so the CPU figures hold on a loaded machine where walls do not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from tune_peers import read_idx  # noqa: E402


def _install_cpu_meter() -> None:
    """On a worker: time each ``train_candidate`` call's CPU (the task's thread)."""
    import rpicluster.tune.search as search
    from distributed import get_worker

    inner = getattr(search.train_candidate, "__wrapped__", search.train_candidate)

    def metered(*args, **kwargs):
        t0 = time.thread_time()
        try:
            return inner(*args, **kwargs)
        finally:
            worker = get_worker()
            worker.tune_cpu = getattr(worker, "tune_cpu", {})
            worker.tune_cpu[str(worker.get_current_task())] = time.thread_time() - t0

    metered.__wrapped__ = inner
    search.train_candidate = metered


def _collect_cpu(dask_worker) -> dict:
    return getattr(dask_worker, "tune_cpu", {})


def phases(stream: list[dict], cpu: dict, t_call: float, t_return: float, n_workers: int
           ) -> list[dict]:
    """The search's phases from Dask's task stream: setup, rung 1..R, refit, end (a refit that
    starts before the top rung, beside it or in the rung before, is one phase with it)."""
    tasks = []
    for t in stream:
        for s in t["startstops"]:
            if s["action"] == "compute":
                key = str(t["key"])
                rung = "refit" if "-refit" in key else f"rung {key.rsplit('-r', 1)[1]}"
                tasks.append((s["start"], s["stop"], rung, key, t["worker"]))
    tasks.sort()
    out = [{"phase": "setup (call to first task)", "wall": tasks[0][0] - t_call}]
    names = sorted({t[2] for t in tasks if t[2] != "refit"}, key=lambda n: int(n.split()[1]))
    top = names[-1]
    prev_stop = None
    for name in names + ["refit"]:
        mine = [t for t in tasks if t[2] == name]
        if not mine:
            continue
        if name == top and any(t[2] == "refit" for t in tasks):
            refit = [t for t in tasks if t[2] == "refit"]
            if refit[0][0] < max(t[1] for t in mine):  # the refit ran beside the top rung
                mine, name = mine + refit, f"{name} + refit"
        elif name == "refit" and out[-1]["phase"].endswith("+ refit"):
            continue
        start, stop = min(t[0] for t in mine), max(t[1] for t in mine)
        busy = sum(t[1] - t[0] for t in mine)
        out.append({"phase": name, "tasks": len(mine), "wall": stop - start,
                    "task_wall": busy, "task_cpu": sum(cpu.get(t[3], 0.0) for t in mine),
                    "idle_worker_s": n_workers * (stop - start) - busy,
                    "first_task_wall": mine[0][1] - mine[0][0],
                    # a refit may start in the rung before the top one (a worker left idle)
                    "overlap_s": max(0.0, prev_stop - start) if prev_stop else 0.0})
        prev_stop = stop
    gaps = [b[0] - a[1] for a, b in zip(tasks, tasks[1:]) if b[2] != a[2] and b[0] > a[1]]
    out.append({"phase": "end (last task to return)",
                "wall": t_return - max(t[1] for t in tasks)})
    out.append({"phase": "between phases (driver)", "wall": sum(gaps)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=12000)
    p.add_argument("--block-rows", type=int, default=1500)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--candidates", type=int, default=27)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import os

    from distributed import Client, LocalCluster, get_task_stream

    from rpicluster import config as rpicluster_config
    from rpicluster import ingest
    from rpicluster.tune import tune

    # Dask's clocks as on every cluster rpicluster starts (config.DASK_DEFAULTS).
    rpicluster_config.apply_dask_defaults()

    root = Path(tempfile.mkdtemp(prefix="tune-profile-"))
    X, y = read_idx("train")
    order = np.random.default_rng(0).permutation(len(y))[:args.rows]
    np.savez(root / "train.npz", X=X[order], y=y[order])
    ingest(str(root / "train.npz"), root / "train.zarr", block_rows=args.block_rows,
           shuffle=False)
    runs = []
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            client.run(_install_cpu_meter)
            for i in range(args.runs):
                shutil.rmtree(root / "tune", ignore_errors=True)
                before = client.run(time.process_time)
                load = os.getloadavg()
                c0, t0 = time.process_time(), time.time()
                with get_task_stream(client) as ts:
                    res = tune(str(root / "train.zarr"), model="sgd", budget="1000x",
                               client=client, seed=0, n_candidates=args.candidates,
                               max_epochs=args.epochs, tune_dir=root / "tune")
                    t1 = time.time()
                after = client.run(time.process_time)
                cpu = {k: v for d in client.run(_collect_cpu).values() for k, v in d.items()}
                run = {"run": i + 1, "wall": t1 - t0, "driver_cpu": time.process_time() - c0,
                       "worker_cpu": sum(after[w] - before[w] for w in after),
                       "load_before": load, "load_after": os.getloadavg(),
                       "best_score": res.best_score, "refit": res.refit,
                       "phases": phases(ts.data, cpu, t0, t1, len(after))}
                runs.append(run)
                print(f"run {i + 1} ({'cold' if i == 0 else 'warm'} workers): wall "
                      f"{run['wall']:.2f} s, driver CPU {run['driver_cpu']:.2f} s, workers' CPU "
                      f"{run['worker_cpu']:.2f} s, load {load[0]:.2f} -> "
                      f"{run['load_after'][0]:.2f}, best {res.best_score:.4f}")
                for ph in run["phases"]:
                    extra = "" if "tasks" not in ph else (
                        f"  {ph['tasks']:3d} tasks, task CPU {ph['task_cpu']:6.2f} s, idle "
                        f"worker-s {ph['idle_worker_s']:5.2f}, first task "
                        f"{ph['first_task_wall']:.2f} s") + (
                        f", began {ph['overlap_s']:.2f} s before the rung before it ended"
                        if ph.get("overlap_s") else "")
                    print(f"  {ph['phase']:28s} {ph['wall']:6.2f} s{extra}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
