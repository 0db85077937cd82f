"""The fault matrix as a table: run tests/test_fault_matrix.py and write what each fault did.

    python benchmarks/fault_matrix.py [--out benchmarks/results] [-k EXPR]

Runs the very cases of tests/test_fault_matrix.py (all of them, ``bench`` ones included; the
namespace-host cases need root), and the few it leaves to other modules (:data:`ELSEWHERE`),
through pytest, and writes ``--out``/fault_matrix.md: for each
case (named by its test's docstring) the guarantee, the result (kept, BROKEN, pending: a feature
of issue 16 not merged yet, or skipped with the reason) and the recovery time its ``recovery``
stopwatch took, from the fault to the guarantee holding again (what that spans is in the last
column). About five minutes on two cores; the load average before and after is printed and
recorded (a run with more runnable work than cores is labelled LOADED), since recovery times on a
shared machine are only as quiet as the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE = "tests/test_fault_matrix.py"
#: Cases that live in other modules (the matrix does not repeat them): node id -> (case,
#: guarantee).
SECURITY = "tests/test_deploy_security.py::"
NETNS = "tests/test_deploy_netns.py::"
FEATURES = "tests/test_features_memory.py::"
SERVE = "tests/test_data_serve.py::"
SOURCES = "tests/test_data_sources.py::"
ELSEWHERE = {
    SECURITY + "test_embedded_cluster_is_tls_on_loopback_and_refuses_strangers":
        ("another local user against the local cluster",
         "plain TCP, no certificate or another CA's is refused; scheduler and dashboard on "
         "loopback"),
    SECURITY + "test_scheduler_runs_no_client_code_but_serves_the_page":
        ("client-sent code on the scheduler",
         "`run_on_scheduler` and scheduler plugins are refused; the dashboard page still works"),
    SECURITY + "test_another_user_s_scratch_dir_is_never_used":
        ("another local user's dask-scratch-space made first (mode 777)",
         "the local cluster's workers work and spill in their own 0700 folder; the planted one "
         "stays empty"),
    SECURITY + "test_a_work_directory_another_user_owns_is_refused":
        ("a worker's work folder owned or writable by another user (SSH, systemd)",
         "refused in one line naming it; nothing starts"),
    SECURITY + "test_a_worker_certificate_cannot_unregister_another_worker_or_read_logs":
        ("a worker certificate unregistering another worker, reading logs or state",
         "refused by the guard; the worker stays; tasks still run"),
    SECURITY + "test_dashboards_listen_on_loopback_and_serve_no_logs":
        ("the dashboard's logs pages from another local user",
         "403; dashboards on 127.0.0.1 unless opened on request"),
    FEATURES + "test_a_run_whose_workers_restart_prints_the_resume_command":
        ("features workers restarted mid-run",
         "one line with the blocks kept and --resume; the resumed run equals an uninterrupted "
         "one"),
    SERVE + "test_a_damaged_zarr_json_is_one_line":
        ("damaged zarr.json (train, score, serve)", "one line naming the file"),
    SOURCES + "test_one_truncated_jpeg_is_skipped_not_fatal":
        ("one truncated JPEG in an images: folder", "skipped with a warning; the rest ingested"),
    NETNS + "test_workers_rejoin_a_restarted_scheduler_by_themselves_until_down":
        ("scheduler killed and started again at its address (namespace SSH hosts)",
         "the workers `up` started rejoin by themselves, `status` says `rejoining` meanwhile; "
         "`down` ends them for good"),
    NETNS + "test_worker_rejoins_after_a_link_cut_longer_than_the_timeouts":
        ("a worker's link cut past Dask's timeouts (namespace SSH hosts)",
         "its supervisor restarts it and it rejoins when the link is back, without `up`"),
}


class Collector:
    """A pytest plugin keeping each case's docstring, outcome and recorded properties."""

    def __init__(self):
        self.cases: dict[str, dict] = {}

    def pytest_itemcollected(self, item):
        if item.nodeid in ELSEWHERE:
            name, guarantee = ELSEWHERE[item.nodeid]
        else:
            doc = " ".join((item.function.__doc__ or item.name).split())
            name, _, guarantee = doc.partition(": ")
        param = getattr(item, "callspec", None)
        if param is not None:
            name = f"{name} [{param.id}]"
        self.cases[item.nodeid] = {"case": name, "guarantee": guarantee, "result": "not run"}

    def pytest_deselected(self, items):
        for item in items:
            self.cases.pop(item.nodeid, None)

    def pytest_runtest_logreport(self, report):
        case = self.cases.get(report.nodeid)
        if case is None:
            return
        case.update(dict(report.user_properties))
        if hasattr(report, "wasxfail"):
            if report.skipped:  # the strict xfail failed as expected: the feature is not in
                case["result"] = f"pending ({report.wasxfail})"
            elif report.when == "call":  # XPASS(strict) is reported as a failure
                case["result"] = "passes: flip its xfail"
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
            case["result"] = f"skipped ({reason.removeprefix('Skipped: ')})"
        elif report.failed:
            case["result"] = "BROKEN" if report.when == "call" else f"error in {report.when}"
        elif report.when == "call":
            case["result"] = "kept"


def _table(cases: list[dict]) -> str:
    rows = ["| case | guarantee | result | recovery (s) | from ... to |",
            "|---|---|---|---:|---|"]
    for c in cases:
        # A time is a recovery only where the guarantee held.
        kept = c["result"] == "kept" and "recovery_s" in c
        seconds, span = (f"{c['recovery_s']:.1f}", c["span"]) if kept else ("-", "-")
        rows.append(f"| {c['case']} | {c['guarantee']} | {c['result']} | {seconds} | {span} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("-k", default=None, help="only the cases pytest -k selects")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    load0 = os.getloadavg()
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    collector = Collector()
    started = time.monotonic()
    pytest_args = [MODULE, *ELSEWHERE, "-q", "-p", "no:cacheprovider", "-m", "bench or not bench",
                   "-rN"]
    if args.k:
        pytest_args += ["-k", args.k]
    code = pytest.main(pytest_args, plugins=[collector])
    wall = time.monotonic() - started
    load1 = os.getloadavg()
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    cases = list(collector.cases.values())
    # More runnable work than cores: the recovery times include waiting for a CPU.
    loaded = max(load0[0], load1[0]) > (os.cpu_count() or 1)
    text = (f"# Fault matrix\n\n"
            f"`python benchmarks/fault_matrix.py` at {commit}, {time.strftime('%Y-%m-%d')}: the "
            f"cases of `{MODULE}` on real clusters ({platform.machine()}, "
            f"{os.cpu_count()} cores), {wall:.0f} s in all; load average (1/5/15 min) "
            f"{load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f} before, "
            f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} after"
            + (": LOADED (more runnable work than cores; times are not quiet figures)"
               if loaded else "") + ".\n\n"
            "Recovery is the wall time from the fault to the guarantee holding again (the last "
            "column says what that spans); it includes starting commands and, where the case "
            "restarts a scheduler, its workers' start. Shortened timeouts a case sets are in "
            "its test.\n\n"
            f"{_table(cases)}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fault_matrix.md").write_text(text)
    print(f"wrote {args.out / 'fault_matrix.md'}")
    broken = [c["case"] for c in cases if re.match(r"BROKEN|error|passes", c["result"])]
    return 1 if broken or code not in (0, 5) else 0


if __name__ == "__main__":
    raise SystemExit(main())
