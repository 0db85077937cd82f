"""Scaling benchmark: list-scheduling simulator, step parsing, and small real runs.

The runs use a real in-process Dask cluster of two single-thread workers (names "0" and "1") and
a real Zarr store in tmp_path; sizes are tiny, so only sanity of the numbers is checked.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys

import pytest
from click.testing import CliRunner

from rpicluster.bench import report, scaling
from rpicluster.bench.scaling import run_scaling
from rpicluster.bench.steps import parse_steps, worker_order, worker_table
from rpicluster.bench.simulate import (SimTask, Slot, fit_overhead, list_schedule, parse_cluster,
                                       slots_for)
from rpicluster.cli import main
from rpicluster.errors import ConfigError


# --- simulator ---

def _graph():
    """Group 0: A then B and C (both need A); group 1: D alone."""
    return [SimTask("A", 4, 0), SimTask("B", 2, 0, ("A",)), SimTask("C", 2, 0, ("A",)),
            SimTask("D", 3, 1)]


SLOTS = [Slot("fast", 2.0), Slot("slow", 1.0)]


def test_list_schedule_window_one_by_hand():
    # A on fast [0,2]; B fast [2,3], C slow [2,4]; group 1 opens at 4: D on fast [4,5.5].
    s = list_schedule(_graph(), SLOTS, window=1)
    assert s.placed == {"A": (0, 0, 2), "B": (0, 2, 3), "C": (1, 2, 4), "D": (0, 4, 5.5)}
    assert s.makespan == 5.5


def test_list_schedule_unbounded_by_hand():
    # A fast [0,2] and D slow [0,3]; B fast [2,3]; C takes fast again [3,4].
    s = list_schedule(_graph(), SLOTS)
    assert s.placed["D"] == (1, 0, 3)
    assert s.placed["C"] == (0, 3, 4)
    assert s.makespan == 4


def test_overhead_is_added_per_task_and_fitted_back():
    s = list_schedule(_graph(), SLOTS, window=1, overhead=0.5)
    assert s.makespan == pytest.approx(7.0)  # A 2.5, C to 5.0, D 5.0 + 1.5 + 0.5
    assert fit_overhead(_graph(), SLOTS, 7.0, window=1) == pytest.approx(0.5, abs=1e-6)
    assert fit_overhead(_graph(), SLOTS, 1.0, window=1) == 0.0


def test_simulator_errors():
    with pytest.raises(ConfigError, match="empty cluster"):
        list_schedule(_graph(), [])
    with pytest.raises(ConfigError, match="unknown task 'Z'"):
        list_schedule([SimTask("A", 1, 0, ("Z",))], SLOTS)
    with pytest.raises(ConfigError, match="cycle"):
        list_schedule([SimTask("A", 1, 0, ("B",)), SimTask("B", 1, 0, ("A",))], SLOTS)


CALIBRATED = {"pi01": {"threads": 2, "rate": 4.0, "tags": ["pi4"]},
              "pi02": {"threads": 2, "rate": 8.0, "tags": ["pi4"]},
              "desktop": {"threads": 4, "rate": 40.0, "tags": []}}


def test_parse_cluster_names_and_tags():
    terms = parse_cluster("32x pi4, 2 x desktop, pi01", CALIBRATED)
    assert terms == [(32, "pi4"), (2, "desktop"), (1, "pi01")]
    slots = slots_for(terms, CALIBRATED)
    # pi4 = mean over pi01, pi02: 2 threads of (2 + 4) / 2 = 3 units/s each.
    assert len(slots) == 32 * 2 + 2 * 4 + 2
    assert {s.rate for s in slots if s.worker.startswith("pi4#")} == {3.0}
    assert {s.rate for s in slots if s.worker.startswith("desktop#")} == {10.0}


@pytest.mark.parametrize("text, message", [
    ("", "expected terms"),
    ("3x pi5", "unknown worker or tag 'pi5'.*desktop, pi01, pi02, pi4"),
    ("0x pi4", "asks for 0 workers"),
    ("3x big desktop", "cannot read"),
])
def test_parse_cluster_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_cluster(text, CALIBRATED)


# --- steps ---

WORKERS = {"pi01": {"address": "tcp://10.0.0.1:1"}, "desktop": {"address": "tcp://10.0.0.9:1"},
           "pi02": {"address": "tcp://10.0.0.2:1"}}


def test_default_steps_add_one_worker_in_order():
    order = worker_order(WORKERS)
    assert order == ["desktop", "pi01", "pi02"]
    assert parse_steps(None, WORKERS, ["pi01", "desktop", "pi02"]) == [
        ["pi01"], ["pi01", "desktop"], ["pi01", "desktop", "pi02"]]


def test_steps_by_name_and_address():
    assert parse_steps("pi01; pi01, tcp://10.0.0.9:1", WORKERS, list(WORKERS)) == [
        ["pi01"], ["pi01", "desktop"]]


@pytest.mark.parametrize("text, message", [
    ("pi01;;pi02", "step 2 is empty"),
    ("pi01; pi01,", "step 2 is empty"),
    ("pi01; pi03", "step 2 names unknown worker 'pi03' \\(workers: pi01, desktop, pi02\\)"),
    ("pi01, pi01", "step 1 names worker 'pi01' twice"),
])
def test_steps_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_steps(text, WORKERS, list(WORKERS))


# --- calibration ---

def _quota_stamps(quota: float, cpu: float, rows: int, n: int, gap: float = 0.0,
                  period: float = 0.1):
    """``(rows, start, end)`` of ``n`` tasks of ``cpu`` CPU-seconds each, ``gap`` idle seconds
    after each, under a CFS bandwidth quota (``quota`` of a core per ``period``) as the kernel
    runs them: a task runs while its group has quota left in the period, else waits for the
    next period, which brings a fresh quota (unused quota is not carried over)."""
    t, left, out = 0.0, quota * period, []

    def advance(to: float) -> None:
        nonlocal t, left
        if math.floor(to / period + 1e-9) > math.floor(t / period + 1e-9):
            left = quota * period
        t = to

    for _ in range(n):
        start, need = t, cpu
        while need > 1e-12:
            run = min(need, left)
            t, need, left = t + run, need - run, left - run
            if need > 1e-12:  # throttled until the next period
                advance((math.floor(t / period + 1e-9) + 1) * period)
        out.append((rows, start, t))
        advance(t + gap)
    return out


@pytest.mark.parametrize("gap", [0.0, 0.08])
def test_sustained_rate_is_not_fooled_by_quota_bursts(gap):
    """A quarter core's quota, 20 ms tasks. With a pause after each (a worker waiting for its
    next task), every task starts on a fresh period's 25 ms and runs unthrottled: the median
    task reads 4x what the quota sustains. The sustained rate never exceeds the quota's, and
    equals it for back-to-back tasks."""
    stamps = _quota_stamps(quota=0.25, cpu=0.02, rows=1000, n=300, gap=gap)
    quota_rate = 0.25 / 0.02 * 1000  # rows/s a quarter core sustains
    rate, span = scaling.sustained_rate(stamps)
    assert span == pytest.approx(stamps[-1][2] - stamps[0][1]) and span >= 6.0
    assert rate <= quota_rate * 1.01
    if gap:
        per_task = sorted(r / (e - s) for r, s, e in stamps)
        assert per_task[len(per_task) // 2] >= 4 * quota_rate * 0.99  # the old rule
    else:
        assert rate == pytest.approx(quota_rate, rel=0.02)


def test_sustained_rate_counts_the_wall_between_tasks():
    rate, span = scaling.sustained_rate([(100, 0.0, 1.0), (100, 3.0, 4.0)])
    assert (rate, span) == (50.0, 4.0)
    with pytest.raises(ValueError):
        scaling.sustained_rate([])


# --- real runs ---

@pytest.fixture(scope="module")
def cluster():
    """An in-process Dask cluster: two workers ("0", "1") of one thread; a client on it."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as lc, Client(lc) as client:
        yield client


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 1,200-row synthetic store of 16 features, 4 classes, in 6 blocks of 200 rows."""
    from rpicluster.data.writer import ingest

    return ingest("synthetic:rows=1200,features=16,classes=4,seed=0",
                  tmp_path_factory.mktemp("scaling") / "data.zarr", block_rows=200)


def _check_reports(out, doc, n_steps):
    for name in ("scaling.csv", "scaling.json", "scaling.md", "scaling.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<html" in (out / "timed-runs.html").read_text()[:2000].lower()
    assert doc["files"]["html"] == [str(out / "timed-runs.html")]
    steps = doc["steps"]
    assert [s["step"] for s in steps] == list(range(1, n_steps + 1))
    cores = [s["cores"] for s in steps]
    assert cores == sorted(cores) and cores[0] >= 1
    for s in steps:
        assert 0 < s["min"] <= s["median"] <= s["max"]
        assert s["memory"] > 0 and s["predicted"] > 0 and s["capacity"] > 0
        for k in ("scalability_cores", "scalability_capacity", "prediction_error",
                  "rows_per_s_per_core"):
            assert math.isfinite(s[k]), k
        assert s["tasks_outside_step"] == 0
        assert set(s["busy_seconds"]) <= set(s["workers"])
        # the tail: one of the step's workers ended each run; in the median run it is the one
        # that was done 0 s before the end, the others no later than it
        assert len(s["last_worker"]) == len(s["seconds"])
        assert set(s["last_worker"]) <= set(s["workers"])
        assert len(s["tail_waited"]) == len(s["seconds"])
        assert all(t >= 0 for t in s["tail_waited"])
        if len(s["workers"]) == 1:
            assert s["tail_waited"] == [0.0] * len(s["seconds"])
        tail = s["finished_before_end"]
        assert set(tail) <= set(s["workers"]) and min(tail.values()) == 0
        assert all(t >= 0 for t in tail.values())
    if any(len(s["workers"]) > 1 for s in steps):
        assert "The tail: the worker whose last task ended last" in (out / "scaling.md").read_text()
    # The timed runs in rounds: run r of every step, in step order, before any run r + 1; each
    # between two capacity measurements of its own, and its capacity their mean.
    repeats = doc["repeats"]
    assert [(r["step"], r["repeat"]) for r in doc["runs"]] == [
        (i, r) for r in range(1, repeats + 1) for i in range(1, n_steps + 1)]
    stamps = [t for r in doc["runs"] for t in (r["capacity_at"], r["started"], r["ended"])]
    assert stamps == sorted(stamps)
    for r in doc["runs"]:
        s = steps[r["step"] - 1]
        assert (r["seconds"], r["capacity"]) == (s["seconds"][r["repeat"] - 1],
                                                 s["capacities"][r["repeat"] - 1])
        assert r["ended"] - r["started"] >= r["seconds"]
        assert min(r["capacity_before"], r["capacity_after"]) > 0
        assert r["capacity"] == pytest.approx((r["capacity_before"] + r["capacity_after"]) / 2)
    assert doc["method"]["order"] == "rounds"
    assert steps[0]["scalability_cores"] == pytest.approx(1.0)
    assert steps[-1]["ideal_cores"] == pytest.approx(
        steps[0]["median"] * steps[0]["cores"] / steps[-1]["cores"])
    # Capacity: measured with the step's workers together (not the sum of their one-at-a-time
    # rates, kept alongside) around each timed run, step 1's too; the step's is the median of
    # the runs', and each run's rows/s is set against its own.
    rates = {n: w["calibration"]["rate"] for n, w in doc["workers"].items()}
    rows = doc["dataset"]["rows"]
    for s in steps:
        assert len(s["capacities"]) == len(s["seconds"]) and min(s["capacities"]) > 0
        assert s["capacity"] == statistics.median(s["capacities"])
        assert s["runs_over_capacity"] == pytest.approx(
            [rows / t / c for t, c in zip(s["seconds"], s["capacities"])])
        assert s["capacity_one_at_a_time"] == pytest.approx(sum(rates[n] for n in s["workers"]))
        assert s["ideal_capacity"] == pytest.approx(
            steps[0]["median"] * steps[0]["capacity"] / s["capacity"])
    with open(out / "scaling.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_steps and list(rows[0]) == list(report.CSV_COLUMNS)
    written = json.loads((out / "scaling.json").read_text())
    assert written["versions"]["distributed"] and written["dataset"]["rows"] == 1200
    assert all(w["calibration"]["rate"] > 0 for w in written["workers"].values())
    md = (out / "scaling.md").read_text()
    assert "| step | hardware | cores | memory | ideal (cores) s" in md
    assert md.count("\n| ") == n_steps + 1  # header and one row per step


def _run_starts(client) -> list[str]:
    """Run ids of the training runs announced on the scheduler so far."""
    from rpicluster import events as ev

    return [e[1]["run_id"] for e in client.get_events(ev.TOPIC)
            if e[1].get(ev.KIND) == ev.RUN_START]


def _run_workers(client) -> dict[str, set[str]]:
    """By training run id: the workers that partitioned its blocks."""
    from rpicluster import events as ev

    out: dict[str, set[str]] = {}
    for _, e in client.get_events(ev.TOPIC):
        if e.get(ev.KIND) == ev.PARTITIONED:
            out.setdefault(e["run_id"], set()).add(str(e["worker"]))
    return out


@pytest.fixture(autouse=True)
def short_calibration(monkeypatch):
    """Calibration windows of 0.3 s: the tiny test blocks' tasks still run more than the
    3 rounds to fill them, in a fraction of the 6 s a worker gets by default."""
    monkeypatch.setattr(scaling, "CALIBRATION_WINDOW_S", 0.3)
    monkeypatch.setattr(scaling, "CAPACITY_WINDOW_S", 0.3)


def test_inc_ksgd_scaling_writes_every_report(cluster, dataset, tmp_path):
    out = tmp_path / "out"
    before = len(_run_starts(cluster))
    doc = run_scaling(cluster, dataset, out, params={"n_clusters": 2, "max_iter": 3},
                      repeats=2, simulate="3x 0, 1")
    _check_reports(out, doc, 2)
    # Each worker's warm calibration tasks (after its first, cold, round) span the window, and
    # its rate is their rows over that wall, which is at least their summed durations: never
    # above their rows over those durations, the harmonic mean of the tasks' rows/s (the median
    # task's rate can be lower: a few fast tasks lift the mean).
    for w in doc["workers"].values():
        cal = w["calibration"]
        warm = cal["samples"][1:]
        assert cal["span"] >= 0.3 and len(cal["samples"]) > 3, cal
        assert 0 < cal["rate"] <= statistics.harmonic_mean(warm) * 1.01, cal
    for s in doc["steps"]:
        assert s["run_over_capacity"] == pytest.approx(1200 / s["median"] / s["capacity"])
    assert "sustained rows/s of back-to-back tasks over at least 0.3 s" in \
        (out / "scaling.md").read_text()
    # Each step: one untimed warm-up run on its workers (both first), then the 2 timed repeats,
    # in rounds; the scheduler's events say which workers partitioned blocks in each run.
    started = _run_starts(cluster)[before:]
    assert len(started) == 2 * (1 + 2)
    used = _run_workers(cluster)
    steps_run = [1, 2] + [r["step"] for r in doc["runs"]]
    assert steps_run == [1, 2, 1, 2, 1, 2]
    for run_id, step in zip(started, steps_run):
        assert used[run_id] <= set(doc["steps"][step - 1]["workers"]), (run_id, step)
        if step == 1:
            assert used[run_id] == {"0"}
    assert any("1" in used[run_id] for run_id, step in zip(started[2:], steps_run[2:])
               if step == 2)
    method = doc["method"]
    assert (method["warmup"], method["warmup_runs"], method["repeats"], method["statistic"]) == \
        ("reduced", 1, 2, "median")
    assert "max_iter=1" in method["warmup_run"]
    for s in doc["steps"]:
        assert len(s["seconds"]) == 2 and s["warmup_seconds"] > 0
        assert s["warmup_workers"] and set(s["warmup_workers"]) <= set(s["workers"])
    assert doc["steps"][0]["warmup_workers"] == ["0"]
    md = (out / "scaling.md").read_text()
    assert "2 timed repeats per step after an untimed warm-up" in md
    assert "Method: Every step: warm-up on the step's workers: one untimed reduced run" in md
    assert "then 2 timed repeats; measured = median (min-max)" in md
    with open(out / "scaling.csv") as f:
        assert all(float(r["warmup_seconds"]) > 0 for r in csv.DictReader(f))
    assert [s["workers"] for s in doc["steps"]] == [["0"], ["0", "1"]]
    assert len(doc["steps"][0]["seconds"]) == 2
    assert list(doc["steps"][0]["busy_seconds"]) == ["0"]
    hyp = doc["simulation"]["hypothetical"]
    assert hyp["workers"] == 4 and hyp["threads"] == 4 and hyp["predicted"] > 0
    assert "Simulated cluster '3x 0, 1'" in (out / "scaling.md").read_text()


def test_random_forest_through_cli_stays_on_step_workers(cluster, dataset, tmp_path):
    """joblib's dask backend with workers=: every tree batch of step 1 runs on worker 1 only."""
    out = tmp_path / "rf"
    res = CliRunner().invoke(main, [
        "bench", "scaling", "--scheduler", cluster.scheduler.address, "--job", "random-forest",
        "--data", str(dataset.url), "--steps", "1; 1,0", "--repeats", "1", "--trees", "4",
        "--warmup", "full", "-o", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "scaling.json").read_text())
    _check_reports(out, doc, 2)
    assert list(doc["steps"][0]["busy_seconds"]) == ["1"]
    assert doc["steps"][0]["warmup_workers"] == ["1"]  # the warm-up, too, kept to the step
    assert doc["params"]["n_estimators"] == 4
    assert "| 2 | + 0 (1 thr) | 2 |" in res.output
    assert doc["method"]["warmup"] == "full" and doc["method"]["repeats"] == 1
    assert "1 timed repeat per step after an untimed warm-up" in res.output
    assert "one untimed run of the job as timed; then 1 timed repeat;" in res.output


def test_without_warmup_the_report_says_so(cluster, dataset, tmp_path):
    doc = run_scaling(cluster, dataset, tmp_path, job="random-forest", steps="0",
                      params={"n_estimators": 2}, repeats=1, warmup="none")
    assert doc["method"]["warmup_runs"] == 0
    assert doc["steps"][0]["warmup_seconds"] is None
    md = (tmp_path / "scaling.md").read_text()
    assert "1 timed repeat per step, no warm-up" in md and "none (cold workers)" in md


def test_random_forest_refuses_a_one_thread_cluster(dataset, tmp_path):
    """joblib runs a dask backend of one thread sequentially, on the client: refused up front
    rather than measured as the cluster's time."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as lc, Client(lc) as client:
        with pytest.raises(ConfigError, match="--job random-forest needs at least 2 worker "
                                              "threads in the cluster.*--local 2"):
            run_scaling(client, dataset, tmp_path, job="random-forest", repeats=1)


def test_cli_errors_name_the_problem(cluster, dataset, tmp_path):
    runner = CliRunner()
    base = ["bench", "scaling", "--scheduler", cluster.scheduler.address, "-o", str(tmp_path)]
    res = runner.invoke(main, base + ["--data", str(dataset.url), "--steps", "0; 7"])
    assert res.exit_code == 1
    assert "error: --steps: step 2 names unknown worker '7' (workers: 0, 1)" in res.output
    res = runner.invoke(main, base + ["--data", str(dataset.url), "--rows", "10"])
    assert res.exit_code == 1 and "give --data or --rows, not both" in res.output
    res = runner.invoke(main, base + ["--data", str(dataset.url), "--warmup", "some"])
    assert res.exit_code == 2 and "'some' is not one of 'reduced', 'full', 'none'" in res.output
    with pytest.raises(ConfigError, match="--warmup 'some': expected one of reduced, full, none"):
        run_scaling(cluster, dataset, tmp_path, warmup="some")
    with pytest.raises(ConfigError, match="--repeats must be an integer >= 1, got 0"):
        run_scaling(cluster, dataset, tmp_path, repeats=0)


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match="pip install 'rpicluster\\[bench\\]'"):
        report.write_png({"steps": []}, tmp_path / "x.png")


def test_worker_table_reads_the_scheduler(cluster):
    table = worker_table(cluster)
    assert sorted(table) == ["0", "1"]
    assert all(w["threads"] == 1 and w["memory"] > 0 for w in table.values())


def test_bench_scaling_is_recorded_in_the_run_history(cluster, dataset, tmp_path, home):
    """`rpicluster runs` lists a bench run: its job, data, cluster, workers and step times."""
    from rpicluster import history

    res = CliRunner().invoke(main, [
        "bench", "scaling", "--scheduler", cluster.scheduler.address, "--job", "random-forest",
        "--data", str(dataset.url), "--steps", "1", "--repeats", "1", "--trees", "2",
        "--warmup", "none", "-o", str(tmp_path / "rf")])
    assert res.exit_code == 0, res.output
    run = history.get_run(history.list_runs()[0]["id"])
    assert run["kind"] == "bench" and run["outcome"] == "done"
    assert run["params"]["job"] == "random-forest" and run["params"]["n_estimators"] == 2
    assert run["data"] == str(dataset.url) and run["cluster"] == cluster.scheduler.address
    assert run["workers"] == ["0", "1"]
    assert list(run["phases"]) == ["step 1 (1 workers)"] and run["phases"]["step 1 (1 workers)"] > 0
