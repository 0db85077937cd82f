"""The one cluster resolver: its order, ``--local N`` everywhere, and the commands that use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dask
import pytest
from click.testing import CliRunner

import rpicluster
from rpicluster import config
from rpicluster.cli import main
from rpicluster.deploy.resolve import find_cluster
from rpicluster.deploy.state import ClusterState, cluster_id
from rpicluster.errors import ConfigError
from rpicluster.testing import wait_until


def _record_local(home, address="tcp://127.0.0.1:1", n_workers=2, **extra) -> None:
    """A local cluster record naming a live process (this one), as ``up --local`` writes it."""
    (home / "local.json").write_text(json.dumps(
        {"pid": os.getpid(), "scheduler_address": address, "n_workers": n_workers,
         "threads_per_worker": 1, "memory_limit": "auto", **extra}))


def _record_ssh(tmp_path, address="tls://127.0.0.1:2"):
    """An SSH cluster's state file as ``up -c`` leaves it (scheduler recorded)."""
    inventory = tmp_path / "cluster.toml"
    inventory.write_text("")
    ClusterState(cid=cluster_id(inventory), inventory=str(inventory), address=address,
                 scheduler={"local": True, "pid": 1, "log": "", "node": {}}).save()
    return inventory


def test_order_explicit_then_inventory_then_local_then_recorded(home, tmp_path):
    with pytest.raises(ConfigError, match="no cluster recorded in"):
        find_cluster()
    _record_local(home)
    assert find_cluster().kind == "local"           # the only one: used without flags
    inventory = _record_ssh(tmp_path)
    assert (find_cluster().kind, find_cluster().inventory) == ("ssh", str(inventory))
    assert find_cluster(local=True).address == "tcp://127.0.0.1:1"
    assert find_cluster(local=2).kind == "local"
    assert find_cluster(inventory=inventory).address == "tls://127.0.0.1:2"
    # An explicit address wins, and is recognised as a recorded cluster when it is one.
    assert find_cluster("tcp://10.0.0.1:8786").kind == "address"
    assert find_cluster("tls://127.0.0.1:2").kind == "ssh"
    assert find_cluster("tcp://127.0.0.1:1").kind == "local"
    with pytest.raises(ConfigError, match="at most one of --scheduler, -c/--inventory and --local"):
        find_cluster("tcp://10.0.0.1:8786", local=2)


def test_local_of_another_size_or_memory_is_refused_with_the_way_out(home):
    _record_local(home, memory_limit="2GiB")
    with pytest.raises(ConfigError, match=r"runs with workers = 2, not 3; stop it with "
                                          r"`rpicluster down --local`"):
        find_cluster(local=3)
    assert find_cluster(local=2, memory_limit="2 GiB").kind == "local"   # the same, spelled apart
    with pytest.raises(ConfigError, match="memory limit = 2GiB, not 4GiB"):
        find_cluster(local=2, memory_limit="4GiB")
    # The same refusal from every command that takes --local N.
    for args in (["up", "--local", "3"], ["status", "--local", "3"], ["dashboard", "--local", "3"],
                 ["logs", "--local", "3"], ["down", "--local", "3"]):
        out = CliRunner().invoke(main, args)
        assert out.exit_code == 1, (args, out.output)
        assert "runs with workers = 2, not 3" in out.output, args


def test_no_local_cluster_is_named(home):
    with pytest.raises(ConfigError, match=r"no local cluster running \(start one with "
                                          r"rpicluster up --local 4\)"):
        find_cluster(local=4)
    out = CliRunner().invoke(main, ["down", "--local"])
    assert out.exit_code == 0 and "no local cluster running" in out.output


def test_timeouts_come_from_the_environment_and_bad_ones_are_named(home, monkeypatch):
    assert config.JOIN_TIMEOUT == config.TIMEOUTS["JOIN_TIMEOUT"][0]
    monkeypatch.setenv("RPICLUSTER_JOIN_TIMEOUT", "300")
    assert config.JOIN_TIMEOUT == 300.0
    monkeypatch.setenv("RPICLUSTER_LOCAL_START_TIMEOUT", "soon")
    out = CliRunner().invoke(main, ["up", "--local", "1"])
    assert out.exit_code == 1
    assert "error: RPICLUSTER_LOCAL_START_TIMEOUT='soon': expected a number of seconds" in out.output
    assert not (home / "local.json").exists()


def test_up_local_then_every_command_finds_it_without_flags(home):
    """The embedded cluster as a user meets it: up --local, then connect/status/logs/dashboard/down
    with no flags act on it and say so."""
    cli = [sys.executable, "-m", "rpicluster.cli"]
    env = {**os.environ, "RPICLUSTER_HOME": str(home)}

    def run(*args, check=True):
        proc = subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=120)
        assert (proc.returncode == 0) == check, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    out = run("up", "--local", "2", "--memory-limit", "1GiB")
    try:
        assert "(2 workers)" in out
        with rpicluster.connect(timeout=30) as client:
            assert len(client.scheduler_info()["workers"]) == 2
            # Dask's clocks of every cluster rpicluster starts (config.DASK_DEFAULTS), passed
            # on by the nannies.
            for key in config.DASK_DEFAULTS:
                assert set(client.run(dask.config.get, key).values()) == {"100ms"}, key
        rows = rpicluster.status()          # the library's answer, which `status` prints
        assert [(r.role, r.state) for r in rows] == [("scheduler", "running")] + [
            ("worker", "running")] * 2
        assert {r.memory for r in rows[1:]} == {"1.00 GiB"}
        assert "already running" in run("up", "--local", "2")
        out = run("up", "--local", "3", check=False)
        assert "runs with workers = 2, not 3" in out and "rpicluster down --local" in out
        out = run("status")     # the same table as an SSH cluster's: scheduler, then workers
        assert "cluster: the local cluster at tls://127.0.0.1:" in out
        roles = [line.split()[1] for line in out.splitlines()
                 if line.split()[1:2] in (["scheduler"], ["worker"])]
        assert roles == ["scheduler", "worker", "worker"], out
        assert out.count(" running ") == 3, out
        assert "distributed" in run("logs", "-n", "500")
        out = run("dashboard")
        assert "training:  http://" in out and "cluster: the local cluster at" in out
        assert "cluster: the local cluster at" in run("logs")
    finally:
        out = run("down")
    assert "cluster: the local cluster at" in out and "stopped the local cluster" in out
    assert not (home / "local.json").exists()


def test_a_cluster_started_for_a_killed_command_stops_with_it(home):
    """A local cluster started for one command (no `up`) belongs to that command: when the
    command is killed outright (SIGKILL: no cleanup runs), the cluster stops by itself instead
    of running on, recorded by nobody."""
    import signal

    from rpicluster.deploy.state import local_record, pid_alive

    env = {**os.environ, "RPICLUSTER_HOME": str(home)}
    owner = subprocess.Popen(
        [sys.executable, "-c", "import time, rpicluster\n"
         "with rpicluster.client(local=1):\n    time.sleep(600)"], env=env)
    try:
        info = wait_until(local_record, 180, what="the command's local cluster recorded",
                          process=owner, interval=0.2)
        assert pid_alive(info["pid"])
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    wait_until(lambda: not pid_alive(info["pid"]), 60, interval=0.2,
               what="the cluster to stop with the command it was started for")
    assert local_record() is None
