"""Parts of the SSH bring-up that need no host: health decoding, version checks, TLS files,
the remote entry point's process handling, provisioning inputs, and the CLI surface."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner

from rpicluster.cli import main
from rpicluster.deploy import health, remote
from rpicluster.deploy.doctor import compare, local_versions
from rpicluster.deploy.provision import pinned_requirements, platform_tags
from rpicluster.deploy.ssh import shell_path
from rpicluster.deploy.tls import CertificateAuthority
from rpicluster.inventory import NodeSpec
from rpicluster.testing import wait_until


@pytest.mark.parametrize("output, flags", [
    ("throttled=0x0\n", []),
    ("throttled=0x50005\n", ["under-voltage", "throttled", "under-voltage occurred",
                             "throttling occurred"]),
    ("throttled=0x2", ["frequency capped"]),
    ("throttled=0x80000", ["soft temperature limit occurred"]),
])
def test_decode_vcgencmd_get_throttled(output, flags):
    assert health.decode_throttled(output) == flags


def test_decode_throttled_refuses_other_text():
    with pytest.raises(ValueError, match="expected throttled=0x"):
        health.decode_throttled("error: VCHI not available")


def test_temperature_read_from_thermal_zones(tmp_path):
    for i, milli in enumerate(["48312", "61500"]):
        (tmp_path / f"thermal_zone{i}").mkdir()
        (tmp_path / f"thermal_zone{i}" / "temp").write_text(milli + "\n")
    assert health.read_temperature(str(tmp_path)) == 61.5
    assert health.read_temperature(str(tmp_path / "absent")) is None


def _node(**kw) -> NodeSpec:
    return NodeSpec(host="pi1", user="pi", port=22, key="k", known_hosts="kh", python="p",
                    local_directory="d", **kw)


def test_version_mismatch_is_an_error_showing_both():
    desktop = health.probe()
    facts = json.loads(json.dumps(desktop))
    facts["versions"]["distributed"] = "2024.1.0"
    facts["versions"]["zarr"] = None
    facts["throttled"] = ["under-voltage", "throttling occurred"]
    errors, warnings = compare(facts, desktop, _node(memory=1 << 60))
    want = desktop["versions"]["distributed"]
    assert f"distributed 2024.1.0 here, {want} on the desktop" in errors
    assert any(e.startswith("zarr missing here") for e in errors)
    assert "Pi health: under-voltage" in warnings
    assert any(w.startswith("memory limit") for w in warnings)
    assert compare(desktop, desktop, _node()) == ([], [])


def test_local_versions_cover_the_issue_list():
    assert set(local_versions()) == {"dask", "distributed", "numpy", "scikit-learn", "zarr",
                                     "numcodecs", "cloudpickle", "msgpack", "rpicluster"}


def test_shell_path_quotes_but_keeps_home():
    assert shell_path("~/.venvs/rpi/bin/python") == '"$HOME"/.venvs/rpi/bin/python'
    assert shell_path("/tmp/a b;c") == "'/tmp/a b;c'"


def test_certificates_are_private_and_signed_by_the_ca(tmp_path):
    from cryptography import x509

    ca = CertificateAuthority(tmp_path / "tls")
    files = ca.issue("10.0.0.11")
    for p in (files.ca, files.cert, files.key, tmp_path / "tls" / "ca-key.pem"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    ca_cert = x509.load_pem_x509_certificate(files.ca.read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    # Reopened: the same CA and the same node certificate, not new ones.
    again = CertificateAuthority(tmp_path / "tls").issue("10.0.0.11")
    assert again.cert.read_bytes() == files.cert.read_bytes()


def test_remote_worker_command_carries_per_host_options():
    cmd = remote.command({"role": "worker", "name": "pi1", "scheduler": "tls://s:1",
                          "nthreads": 4, "memory_limit": 3 << 30, "local_directory": "/w/pi1",
                          "resources": {"rpi4": 4},
                          "tls": {"ca": "c", "cert": "n", "key": "k"}})
    assert cmd[1:3] == ["-m", "distributed.cli.dask_worker"]
    for pair in (["--name", "pi1"], ["--nthreads", "4"], ["--memory-limit", str(3 << 30)],
                 ["--local-directory", "/w/pi1"], ["--resources", "rpi4=4"],
                 ["--tls-ca-file", "c"], ["--tls-key", "k"]):
        i = cmd.index(pair[0])
        assert cmd[i:i + 2] == pair


def test_remote_stop_only_touches_its_own_marked_processes(tmp_path):
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                start_new_session=True)
    try:
        res = remote.stop(stranger.pid, "pi1", timeout=2)
        assert res == {"pid": stranger.pid, "was_running": False, "left": []}
        assert stranger.poll() is None          # not ours: left alone
    finally:
        stranger.kill()
        stranger.wait()
    out = subprocess.run([sys.executable, "-m", "rpicluster.deploy.remote", "--spec", json.dumps({
        "action": "start", "role": "worker", "name": "t1", "scheduler": "tcp://127.0.0.1:9",
        "nthreads": 1, "local_directory": str(tmp_path / "t1")})],
        capture_output=True, text=True, check=True).stdout
    started = json.loads(out)
    assert remote.is_ours(started["pid"], "t1")
    wait_until(lambda: (remote.check(started["pid"], "t1", str(tmp_path / "t1"))["supervisor"]
                        or {}).get("state") == "running", 60,
               what="t1's supervisor to say its worker is running")
    assert remote.check(started["pid"], "t1", str(tmp_path / "t1"))["alive"]
    res = remote.stop(started["pid"], "t1", timeout=30)   # SIGTERM, not SIGKILL
    assert res["was_running"] and res["left"] == []
    assert not remote.is_ours(started["pid"], "t1")
    assert "rpicluster start" in open(started["log"]).read()
    # The supervisor took the stop signal: stopped, the worker never restarted.
    checked = remote.check(started["pid"], "t1", str(tmp_path / "t1"))
    assert not checked["alive"]
    assert checked["supervisor"]["state"] == "stopped" and checked["supervisor"]["restarts"] == 0


def test_supervisor_restarts_an_exiting_worker_with_backoff_until_stopped(tmp_path):
    code = ("import sys; from rpicluster.deploy.supervise import Supervisor; "
            "sys.exit(Supervisor([sys.executable, '-c', 'raise SystemExit(3)'], "
            f"{str(tmp_path)!r}, first_delay=0.1, max_delay=0.4).run())")
    with open(tmp_path / "worker.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: (remote.check(proc.pid, "-", str(tmp_path))["supervisor"] or {}).get(
            "restarts", 0) >= 5, 60, what="the supervisor's fifth restart")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    text = (tmp_path / "worker.log").read_text()
    delays = [line.rsplit("restarting in ", 1)[1] for line in text.splitlines()
              if "restarting in" in line]
    assert delays[:5] == ["0.1 s", "0.2 s", "0.4 s", "0.4 s", "0.4 s"]
    assert "worker exited with status 3" in text
    info = json.loads((tmp_path / remote.SUPERVISOR_FILE).read_text())
    assert info["state"] == "stopped" and info["last_status"] == 3 and info["restarts"] >= 5


def test_remote_entry_point_imports_only_the_standard_library():
    code = ("import sys, rpicluster.deploy.remote; "
            "print(sorted(m for m in ('dask', 'distributed', 'numpy', 'paramiko') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_pinned_requirements_are_the_installed_closure():
    from importlib import metadata

    pins = dict(r.split("==") for r in pinned_requirements())
    for name in ("rpicluster", "distributed", "dask", "numpy", "scikit-learn", "zarr", "pip"):
        assert pins[name] == metadata.version(name)
    assert "pytest" not in pins          # a test extra, not a runtime dependency


def test_platform_tags_for_a_pi():
    tags = platform_tags("aarch64", "2.36")
    assert tags[0] == "manylinux_2_36_aarch64" and "manylinux_2_17_aarch64" in tags
    assert tags[-1] == "linux_aarch64" and "manylinux1_aarch64" not in tags
    assert platform_tags("armv7l", None) == ["linux_armv7l"]


def test_cli_init_writes_an_inventory_and_refuses_to_overwrite(tmp_path):
    runner = CliRunner()
    path = tmp_path / "cluster.toml"
    assert runner.invoke(main, ["init", str(path)]).exit_code == 0
    assert "[[workers]]" in path.read_text()
    result = runner.invoke(main, ["init", str(path)])
    assert result.exit_code == 1 and "already exists" in result.output


def test_cli_status_and_down_without_a_cluster_say_so_and_succeed(home):
    """Nothing running is an answer, not an error (issue 26: both exited 1 with error:)."""
    for command in ("status", "down"):
        result = CliRunner().invoke(main, [command])
        assert result.exit_code == 0, result.output
        assert result.output.startswith("no cluster running (start one with rpicluster up")
        assert "error" not in result.output


def test_cli_up_refuses_an_injection_before_connecting(tmp_path, monkeypatch):
    monkeypatch.setenv("RPICLUSTER_HOME", str(tmp_path))
    path = tmp_path / "cluster.toml"
    path.write_text('[scheduler]\nhost = "127.0.0.1"\n[[workers]]\nhost = "pi1 && reboot"\n')
    result = CliRunner().invoke(main, ["up", "-c", str(path)])
    assert result.exit_code == 1
    assert "workers[0].host: 'pi1 && reboot' is not a host name" in result.output
    assert not (tmp_path / "clusters").exists()
    assert os.listdir(tmp_path) == ["cluster.toml"]


def test_status_says_when_a_worker_killed_outright_was_last_alive(tmp_path, home):
    """The whole group of a supervised worker SIGKILLed (as the OOM killer or a power cut would):
    nothing records an exit, but the supervisor's heartbeat says when it was last alive."""
    from rpicluster.deploy import cluster
    from rpicluster.deploy.ssh import HostResult
    from rpicluster.deploy.state import ClusterState

    code = ("import sys; from rpicluster.deploy.supervise import Supervisor; "
            "sys.exit(Supervisor([sys.executable, '-c', 'import time; time.sleep(600)'], "
            f"{str(tmp_path)!r}, heartbeat=0.2).run())")
    env = {**os.environ, remote.MARKER: "pi1"}
    with open(tmp_path / "worker.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    try:
        state_file = tmp_path / remote.SUPERVISOR_FILE
        wait_until(state_file.exists, 60, what=f"the supervisor's {state_file}")
        first = state_file.stat().st_mtime_ns
        wait_until(lambda: state_file.stat().st_mtime_ns > first, 60,
                   what="the supervisor's heartbeat rewriting its state file")
        assert json.loads(state_file.read_text())["state"] == "running"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    wait_until(lambda: not remote.check(proc.pid, "pi1", str(tmp_path))["alive"], 60,
               what="the SIGKILLed group to be gone")
    checked = remote.check(proc.pid, "pi1", str(tmp_path))
    assert checked["supervisor"]["last_exit"] is None and checked["last_alive_ago"] >= 0
    state = ClusterState(cid="c", inventory="-", workers={"pi1": {"pid": proc.pid}})
    row = cluster._absent("pi1", state, HostResult("pi1", value=checked))
    assert row.state == "lost"
    assert row.detail.startswith("killed outright (or the host restarted); last alive at 20")
    assert row.detail.endswith("no process left on the host; run rpicluster up")


def test_up_table_names_a_failed_host_once():
    from rpicluster.deploy.cluster import HostRow, Report

    row = HostRow("10.0.0.7", "worker", "failed", None, "10.0.0.7: python 3.9.2 is older than 3.11")
    assert row.reason == "python 3.9.2 is older than 3.11"
    assert Report("", "", (row,)).failures() == "10.0.0.7: python 3.9.2 is older than 3.11"
    assert HostRow("pi1", "worker", "failed", None, "timed out").reason == "timed out"
