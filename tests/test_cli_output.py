"""What the CLI prints: tables that never cut what a user compares, and `demo` run twice."""

import os
import subprocess
import sys

from rpicluster.cli._common import echo_table

FINGERPRINT = "SHA256:" + "x" * 43


def test_tables_are_plain_untruncated_lines_when_not_a_terminal(capsys):
    """Finding 8: doctor/status tables cut host names and the SHA256 fingerprint a user must
    compare when output was not a wide terminal."""
    host = "a-very-long-worker-host-name-in-the-lab.example.org"
    echo_table("rpicluster doctor", ["host", "ok", "fingerprint", "detail"],
               [[host, "yes", FINGERPRINT, "python 3.11.7, 4 cores, 3.7 GiB, " * 3]])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "rpicluster doctor"
    assert lines[1].split() == ["host", "ok", "fingerprint", "detail"]
    assert lines[2].startswith(f"{host}  yes  {FINGERPRINT}  python 3.11.7")
    assert "…" not in out and "\x1b[" not in out and "│" not in out


def test_tables_on_a_narrow_terminal_fold_instead_of_cutting():
    code = ("import sys; sys.stdout.isatty = lambda: True; from rpicluster.cli._common import "
            f"echo_table; echo_table('t', ['host', 'fingerprint'], [['q' * 30, {FINGERPRINT!r}]])")
    env = {**os.environ, "COLUMNS": "40", "TERM": "xterm", "FORCE_COLOR": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert "…" not in out  # rich's default would cut the cell with an ellipsis
    assert out.count("x") == 43 and out.count("q") == 30  # folded onto more lines, all there


def test_demo_can_be_run_again(tmp_path):
    """Finding 8: `rpicluster demo` failed when run a second time (its run directory)."""
    env = {**os.environ, "RPICLUSTER_HOME": str(tmp_path / "home")}
    args = [sys.executable, "-m", "rpicluster.cli", "demo", "--workdir", str(tmp_path / "demo"),
            "--rows", "800", "--block-rows", "400", "--features", "8", "--classes", "4",
            "--local", "1"]
    for _ in range(2):
        res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "test accuracy" in res.stdout
