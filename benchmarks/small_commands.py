"""Cold small commands (issue 26): README's quickstart `score` and `train` on digits from a new
process, no cluster running (an empty RPICLUSTER_HOME), wall and CPU time of each run.

    python benchmarks/small_commands.py [--runs 7] [--tree SRC]...

``--tree SRC`` also times the package found in SRC (e.g. an older commit unpacked with
``git archive COMMIT rpicluster | tar -x -C SRC``) in the same session, for a before/after.
Targets: score < 2 s, train < 4 s (quiet machine; CPU time is the load-robust figure).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _time(cmd: list[str], env: dict, runs: int) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, cwd=env["RPICLUSTER_HOME"])
        _, status, usage = os.wait4(proc.pid, 0)
        walls.append(time.perf_counter() - start)
        cpus.append(usage.ru_utime + usage.ru_stime)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
        proc.stderr.close()
    return walls, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tree", action="append", default=[], metavar="SRC",
                        help="another source tree to time as well (its rpicluster package)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="small-commands-") as tmp:
        work = Path(tmp)
        # cwd: -m puts it first on sys.path, where a checkout's package would shadow --tree's
        env = {**os.environ, "RPICLUSTER_HOME": str(work / "home")}
        env.pop("PYTHONPATH", None)
        (work / "home").mkdir()
        cli = [sys.executable, "-m", "rpicluster.cli"]
        subprocess.run([*cli, "ingest", "sklearn:digits", str(work / "digits.zarr"),
                        "--block-rows", "600", "--test-fraction", "0.25", "--test-out",
                        str(work / "digits-test.zarr")], env=env, check=True,
                       capture_output=True)
        commands = {
            "score": [*cli, "score", str(work / "digits.skops"), str(work / "digits-test.zarr")],
            "train": [*cli, "train", str(work / "digits.zarr"), "-o", str(work / "digits.skops"),
                      "--clusters", "2", "--test", str(work / "digits-test.zarr"),
                      "--overwrite"],
        }
        subprocess.run(commands["train"], env=env, check=True, capture_output=True)
        print(f"cold commands, {args.runs} runs each, load average before "
              f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs\n")
        print("| tree | command | wall min | wall median | CPU min | CPU median |")
        print("|---|---|---|---|---|---|")
        for tree in ["installed", *args.tree]:
            tree_env = env if tree == "installed" else {**env, "PYTHONPATH": tree}
            for name in ("score", "train"):
                walls, cpus = _time(commands[name], tree_env, args.runs)
                print(f"| {tree} | {name} | {min(walls):.2f} s | {statistics.median(walls):.2f}"
                      f" s | {min(cpus):.2f} s | {statistics.median(cpus):.2f} s |")
        print(f"\nload average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
