"""Report writers of ``rpicluster bench scaling``: CSV, JSON, Markdown and a PNG plot.

Every writer takes the document :func:`rpicluster.bench.scaling.run_scaling` returns. The
Markdown table has the cluster paper's columns (hardware, cores, memory, ideal, measured,
scalability) followed by the capacity ideal, the simulator's prediction and its error.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from rpicluster.errors import ConfigError

#: Columns of scaling.csv, in order (lists are joined with "+").
CSV_COLUMNS = ("step", "workers", "cores", "memory", "median", "min", "max", "ideal_cores",
               "scalability_cores", "capacity", "ideal_capacity", "scalability_capacity",
               "speedup", "rows_per_s_per_core", "predicted", "prediction_error",
               "tasks_outside_step", "warmup_seconds")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _hardware(doc: dict, names: list[str]) -> str:
    parts = []
    for n in names:
        hw = doc["workers"][n].get("hardware") or {}
        arch = f" {hw['arch']}" if hw.get("arch") else ""
        parts.append(f"{n} ({doc['workers'][n]['threads']} thr{arch})")
    return ", ".join(parts)


def step_hardware(doc: dict) -> list[str]:
    """Per step: its workers, or "+ the added ones" when it grows the previous step."""
    out, prev = [], []
    for s in doc["steps"]:
        cur = s["workers"]
        if prev and set(prev) < set(cur):
            out.append("+ " + _hardware(doc, [n for n in cur if n not in prev]))
        else:
            out.append(_hardware(doc, cur))
        prev = cur
    return out


def _per_step(method: dict) -> str:
    """"3 timed repeats per step after an untimed warm-up" (the heading's words)."""
    n = method["repeats"]
    warm = " after an untimed warm-up" if method["warmup_runs"] else ", no warm-up"
    return f"{n} timed repeat{'s' * (n != 1)} per step{warm}"


def _ratio(step: dict) -> str:
    """A step's measured rows/s over its capacity, or "-" in a report written before it was."""
    r = step.get("run_over_capacity")
    return "-" if r is None else f"{r:.2f}"


def _spread(step: dict) -> str:
    """A step's per-run capacities as " (min-max)", or "" in a report written before them."""
    caps = step.get("capacities")
    return f" ({min(caps):,.0f}-{max(caps):,.0f})" if caps and len(caps) > 1 else ""


def _tail_text(step: dict) -> str:
    before = ", ".join(f"{w} {t:.2f} s" for w, t in sorted(step.get("finished_before_end", {})
                                                          .items()) if t > 0)
    waited = step.get("tail_waited") or [None] * len(step.get("last_worker", []))
    last = ", ".join(str(w) if t is None else f"{w} ({t:.2f} s)"
                     for w, t in zip(step.get("last_worker", []), waited))
    return (f"step {step['step']}: last {last}"
            + (f"; in the median run the others were done {before} earlier" if before else ""))


def to_markdown(doc: dict) -> str:
    """The scaling table (paper's columns, then capacity and prediction columns) and notes."""
    d = doc["dataset"]
    lines = [
        f"## Scaling: {doc['job']} on {d['rows']:,} x {d['features']} rows, {d['classes']} "
        f"classes ({d['blocks']} blocks), {_per_step(doc['method'])}",
        "",
        "| step | hardware | cores | memory | ideal (cores) s | measured s (min-max) | "
        "scalability (cores) | ideal (capacity) s | scalability (capacity) | speedup | "
        "rows/s/core | predicted s | error |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, hw in zip(doc["steps"], step_hardware(doc)):
        err = "fit" if s["step"] == doc["simulation"]["reference_step"] else \
            f"{s['prediction_error']:+.0%}"
        lines.append(
            f"| {s['step']} | {hw} | {s['cores']} | {_gib(s['memory'])} | "
            f"{s['ideal_cores']:.2f} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | "
            f"{s['scalability_cores']:.2f} | {s['ideal_capacity']:.2f} | "
            f"{s['scalability_capacity']:.2f} | {s['speedup']:.2f} | "
            f"{s['rows_per_s_per_core']:,.0f} | {s['predicted']:.2f} | {err} |")
    cal = ", ".join(f"{n} {w['calibration']['rate']:,.0f}" for n, w in doc["workers"].items())
    load = doc["load"]
    lines += [
        "",
        f"Method: {doc['method']['text']}",
        "Calibrated throughput (sustained rows/s of back-to-back tasks over at least "
        f"{doc['calibration'].get('window_s', 0):g} s, all threads, one worker at a time): "
        f"{cal}. A step's capacity is its workers' rows/s measured together (workers sharing "
        "a machine share its cores), right before and right after each of its timed runs "
        "(a run's is the mean of its two, a step's the median of its runs'); step capacities "
        "(their range, and the run's rows/s over the capacity): "
        + ", ".join(f"{s['step']}: {s['capacity']:,.0f}{_spread(s)} ({_ratio(s)})"
                    for s in doc["steps"])
        + ". "
        "Ideals are anchored at step 1's "
        "median; scalability = ideal / measured. Predictions replay step 1's task costs on each "
        f"step's workers (per-task overhead {doc['simulation']['overhead_s'] * 1000:.1f} ms, "
        "fitted on step 1).",
        f"Load average before/after: {load['before'][0]:.2f} / {load['after'][0]:.2f} "
        f"on {load['cpus']} CPUs.",
    ]
    tails = [_tail_text(s) for s in doc["steps"] if len(s["workers"]) > 1]
    if tails:
        lines.append("The tail: the worker whose last task ended last, per timed run, and how "
                     "long the next worker had been done by then: "
                     + "; ".join(tails) + ".")
    hyp = doc["simulation"].get("hypothetical")
    if hyp:
        lines.append(f"Simulated cluster '{hyp['spec']}' ({hyp['workers']} workers, "
                     f"{hyp['threads']} threads): predicted {hyp['predicted']:.2f} s.")
    return "\n".join(lines) + "\n"


def write_csv(doc: dict, path: Path) -> None:
    """One row per step, :data:`CSV_COLUMNS`."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for s in doc["steps"]:
            w.writerow(["+".join(s[c]) if c == "workers" else s[c] for c in CSV_COLUMNS])


def write_png(doc: dict, path: Path) -> None:
    """Measured (median, min-max bars), both ideals and the prediction over the steps.

    Raises
    ------
    ConfigError
        matplotlib is not installed (it comes with the ``bench`` extra).
    """
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("the scaling plot needs matplotlib: pip install 'rpicluster[bench]'"
                          ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = doc["steps"]
    x = list(range(1, len(steps) + 1))
    med = [s["median"] for s in steps]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.errorbar(x, med, yerr=[[m - s["min"] for m, s in zip(med, steps)],
                              [s["max"] - m for m, s in zip(med, steps)]],
                fmt="o-", color="black", capsize=4, label="measured (median, min-max)")
    ax.plot(x, [s["ideal_cores"] for s in steps], "s--", color="tab:blue",
            label="ideal: cores (paper)")
    ax.plot(x, [s["ideal_capacity"] for s in steps], "^--", color="tab:green",
            label="ideal: calibrated capacity")
    ax.plot(x, [s["predicted"] for s in steps], "x:", color="tab:red",
            label="predicted (list scheduling)")
    ax.set_xticks(x, [f"{s['step']}\n{s['cores']} core{'s' * (s['cores'] != 1)}"
                      for s in steps])
    ax.set_xlabel("step")
    ax.set_ylabel("wall time (s)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{doc['job']}: {doc['dataset']['rows']:,} rows x "
                 f"{doc['dataset']['features']} features")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_all(doc: dict, out_dir: Path) -> dict[str, str]:
    """Write scaling.{json,csv,md,png} into ``out_dir``; returns their paths by kind."""
    out = Path(out_dir)
    files = {k: str(out / f"scaling.{k}") for k in ("json", "csv", "md", "png")}
    doc["files"] = {**files, "html": [str(out / doc["report_html"])]}
    write_png(doc, Path(files["png"]))
    write_csv(doc, Path(files["csv"]))
    Path(files["md"]).write_text(to_markdown(doc))
    Path(files["json"]).write_text(json.dumps(doc, indent=2, default=_plain))
    return files


def _plain(value):
    """numpy scalars and other stragglers as JSON values."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
