"""Scaling of model-averaging training (``bench scaling --job mlp``): parameter server vs local SGD.

For each synchronisation mode and each worker set, the same epoch budget is trained with
:func:`rpicluster.train.averaging.train_averaged` restricted to the step's workers (one shard per
worker) and measured: seconds per epoch, held-out accuracy after the budget, bytes moved per
round and per epoch (global model out to each worker, updates back), and CPU use per worker
(the worker process's CPU seconds over the wall time, as the boards paper reported it).
``sync="batch"`` averages after every minibatch (the paper's parameter-server pattern);
``sync="round"`` after ``local_epochs`` local passes.

Measured as :mod:`rpicluster.bench.scaling` measures the block jobs: a warm-up on every worker
first (imports and a first read), then per (sync, worker set) an untimed warm-up run on those
workers (reduced: one round of the same sync and local epochs; every round of the timed run is
the same work, so one pays each worker's first round trip, first model transfer and first
local fit), all warm-ups before the first timed run; then ``repeats`` timed runs of every pair
in rounds (round r: run r of every pair, in order), so that a slow stretch of the machine
weighs on every pair alike. The row reports a pair's median (min and max beside it), and the
median run's accuracy, traffic and CPU use.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from rpicluster.bench.method import check_method, in_rounds, method
from rpicluster.errors import make_dirs
from rpicluster.progress import Progress
from rpicluster.train.averaging import SYNC, _labelled, train_averaged

COLUMNS = ["sync", "workers", "epochs", "seconds", "seconds_min", "seconds_max", "s_per_epoch",
           "accuracy", "rounds", "syncs_per_epoch", "mb_per_round", "mb_per_epoch", "cpu_mean",
           "cpu_per_worker", "warmup_seconds"]
#: What the reduced warm-up run is (the report's method line).
REDUCED = "one round of the same sync and local epochs"



def _cpu_seconds() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


def _warm(dataset) -> None:
    import sklearn.linear_model  # noqa: F401
    import sklearn.neural_network  # noqa: F401

    _labelled(dataset, 0)


def _timed(client, dataset, *, workers: list[str], **run):
    """One run of :func:`train_averaged` on ``workers``: (result, wall seconds, CPU use by
    worker address: its process's CPU seconds over the wall time)."""
    before = client.run(_cpu_seconds, workers=workers)
    t0 = time.perf_counter()
    res = train_averaged(dataset, client, workers=workers, **run)
    wall = time.perf_counter() - t0
    after = client.run(_cpu_seconds, workers=workers)
    return res, wall, {a: (after[a] - before[a]) / wall for a in workers}


def run_averaging_scaling(client, dataset, out_dir, *, steps: list[list[str]],
                          addresses: dict[str, str], model: str = "mlp",
                          params: dict | None = None, syncs=("batch", "round"),
                          epochs: int = 4, local_epochs: int = 2, test=None,
                          repeats: int = 3, warmup: str = "reduced",
                          progress: Progress | None = None) -> dict:
    """Measure every (sync, worker set) pair; write ``averaging.{json,csv,md}`` to ``out_dir``.

    ``epochs`` is the budget (passes over the data) of every run; with ``sync="round"`` it is
    trained as ``epochs // local_epochs`` rounds, otherwise as ``epochs`` rounds of one epoch.
    Each pair gets an untimed warm-up (``warmup``: ``"reduced"``, one round; ``"full"``, the
    timed run; ``"none"``) and ``repeats`` timed runs (median, min, max).
    """
    check_method(repeats, warmup)
    load_before = os.getloadavg()
    out = Path(out_dir)
    make_dirs(out)
    params = {"random_state": 0, **(params or {})}
    X_test = y_test = None
    if test is not None:
        parts = [_labelled(test, b) for b in range(test.n_blocks)]
        X_test, y_test = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    # Imports and a first read on every worker before any clock starts.
    client.run(_warm, dataset)
    for sync in syncs:
        if sync not in SYNC:
            raise ValueError(f"unknown sync {sync!r}")
    pairs = []  # (sync, step, the run's arguments, rounds, label)
    for sync in syncs:
        for step in steps:
            local = local_epochs if sync == "round" else 1
            run = dict(model=model, params=params, local_epochs=local, sync=sync,
                       workers=[addresses[n] for n in step])
            pairs.append((sync, step, run, max(1, epochs // local),
                          f"sync {sync}, {len(step)} workers"))
    warm: list[float | None] = []
    runs: list[list] = [[] for _ in pairs]
    progress = progress or Progress.null()
    progress.total = len(pairs) * (repeats + (warmup != "none"))
    with progress:
        # Every pair's warm-up first, then the timed runs in rounds (run r of every pair before
        # any run r + 1), so that a slow stretch of the machine hits every pair alike.
        for _, _, run, n_rounds, label in pairs:
            warm.append(None)
            if warmup != "none":
                warm[-1] = _timed(client, dataset,
                                  rounds=1 if warmup == "reduced" else n_rounds, **run)[1]
                progress.advance(note=f"{label}: warm-up, untimed: {warm[-1]:.1f} s")
        for r in range(repeats):
            for i, (_, _, run, n_rounds, label) in enumerate(pairs):
                runs[i].append(_timed(client, dataset, rounds=n_rounds, **run))
                progress.advance(note=f"round {r + 1}: {label}: {runs[i][-1][1]:.1f} s")
    rows = [_row(sync, step, run, n_rounds, pair_runs, w, X_test, y_test)
            for (sync, step, run, n_rounds, _), pair_runs, w in zip(pairs, runs, warm)]
    doc = {"job": model, "params": {k: (list(v) if isinstance(v, tuple) else v)
                                    for k, v in params.items()},
           "dataset": {"url": dataset.url, "rows": int(dataset.n_rows),
                       "features": int(dataset.n_features), "classes": len(dataset.classes)},
           "test": None if test is None else test.url, "epochs": epochs,
           "local_epochs": local_epochs, "steps": steps, "rows": rows, "repeats": repeats,
           "method": in_rounds(method(warmup, repeats, REDUCED)),
           "load": {"before": list(load_before), "after": list(os.getloadavg()),
                    "cpus": os.cpu_count()}}
    (out / "averaging.json").write_text(json.dumps(doc, indent=1))
    with open(out / "averaging.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "cpu_per_worker": json.dumps(r["cpu_per_worker"])})
    (out / "averaging.md").write_text(to_markdown(doc))
    return doc


def _row(sync: str, step: list[str], run: dict, n_rounds: int, runs: list, warm,
         X_test, y_test) -> dict:
    """The report row of one (sync, worker set): its timed runs' median (min, max), and the
    median run's accuracy, traffic and CPU use."""
    walls = [w for _, w, _ in runs]
    med = statistics.median(walls)
    res, _, cpu = min(runs, key=lambda x: abs(x[1] - med))
    moved = [r["bytes_down"] + r["bytes_up"] for r in res.rounds]
    done_epochs = n_rounds * run["local_epochs"]
    return {
        "sync": sync, "workers": len(step), "epochs": done_epochs,
        "seconds": round(med, 3), "seconds_min": round(min(walls), 3),
        "seconds_max": round(max(walls), 3), "runs": [round(w, 3) for w in walls],
        "warmup_seconds": None if warm is None else round(warm, 3),
        "s_per_epoch": round(med / done_epochs, 3),
        "accuracy": (None if X_test is None
                     else round(float(res.model.score(X_test, y_test)), 4)),
        "rounds": n_rounds,
        "syncs_per_epoch": sum(r["steps"] for r in res.rounds) / done_epochs,
        "mb_per_round": round(float(np.mean(moved)) / 1e6, 3),
        "mb_per_epoch": round(sum(moved) / done_epochs / 1e6, 3),
        "cpu_mean": round(float(np.mean(list(cpu.values()))), 3),
        "cpu_per_worker": {n: round(cpu[a], 3) for n, a in zip(step, run["workers"])},
    }


def to_markdown(doc: dict) -> str:
    """The report table: one row per (sync, workers)."""
    d = doc["dataset"]
    lines = [f"### {doc['job']} by model averaging: {d['rows']:,} rows x {d['features']} "
             f"features, {d['classes']} classes, {doc['epochs']} epochs per run "
             f"(round sync: {doc['local_epochs']} local epochs per round)", "",
             "| sync | workers | s/epoch (min-max) | accuracy | syncs/epoch | MB/round | "
             "MB/epoch | CPU per worker |", "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        lo, hi = (r[k] / r["epochs"] for k in ("seconds_min", "seconds_max"))
        lines.append(f"| {r['sync']} | {r['workers']} | {r['s_per_epoch']:.2f} "
                     f"({lo:.2f}-{hi:.2f}) | {acc} | "
                     f"{r['syncs_per_epoch']:g} | {r['mb_per_round']:.2f} | "
                     f"{r['mb_per_epoch']:.1f} | {r['cpu_mean'] * 100:.0f} % |")
    load = doc["load"]
    lines += ["", f"Method: {doc['method']['text']}",
              f"Load average before/after: {load['before'][0]:.2f} / {load['after'][0]:.2f} "
              f"on {load['cpus']} CPUs."]
    return "\n".join(lines) + "\n"
