"""Nothing in up/status waits without a bound, and what fails says so in one line: a real
Dask scheduler whose connection handler crashes (TCP timeout under Dask's least, 11 s) accepts
connections and never answers them, which distributed's own client waits for forever."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from rpicluster.deploy import cluster
from rpicluster.deploy.ssh import LocalConnection
from rpicluster.deploy.state import ClusterState, cluster_id, load_state, node_to_json
from rpicluster.errors import BootstrapError, ConfigError, SSHError
from rpicluster.inventory import NodeSpec, load_inventory
from rpicluster.testing import free_port, wait_until

#: Environment that makes a Dask process crash on every connection it accepts or makes.
TOO_LOW = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "5s"}


def _bounded(fn, guard: float = 120.0):
    """``fn()`` in a thread; fails the test if it has not returned after ``guard`` seconds (a
    guard against hanging forever, not a timing assertion)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:     # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(guard)
    assert not thread.is_alive(), "hung: the wait is not bounded"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _inventory(tmp_path, *, env: dict | None = None, worker_env: dict | None = None) -> str:
    """One local scheduler and one worker on a port where nothing listens (never reached when
    the scheduler fails)."""
    key = tmp_path / "id_ed25519"
    key.write_text("unused\n")
    fmt = lambda d: ", ".join(f'{k} = "{v}"' for k, v in (d or {}).items())  # noqa: E731
    path = tmp_path / "cluster.toml"
    path.write_text(f"""[scheduler]
host = "127.0.0.1"
scheduler_port = {free_port()}
dashboard_port = {free_port()}
[defaults]
key = "{key}"
known_hosts = "{tmp_path / 'known_hosts'}"
python = "{sys.executable}"
local_directory = "{tmp_path / 'workers'}"
env = {{ {fmt(env)} }}
[[workers]]
host = "127.0.0.1"
port = {free_port()}
env = {{ {fmt(worker_env)} }}
""")
    return str(path)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def crashing_scheduler(tmp_path):
    """A real scheduler (plain TCP) whose connection handler crashes: its port accepts, its
    handshake never comes. Yields its port."""
    port = free_port()
    with open(tmp_path / "crashing.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", str(port), "--dashboard-address", f"127.0.0.1:{free_port()}"],
            env={**os.environ, **TOO_LOW}, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _answers(port), 60, what=f"the scheduler on port {port}",
                   process=proc, interval=0.2)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_status_of_a_scheduler_that_accepts_but_never_answers_is_bounded(
        crashing_scheduler, tmp_path, home, monkeypatch):
    monkeypatch.setenv("RPICLUSTER_PROBE_TIMEOUT", "2")
    node = NodeSpec(host="127.0.0.1", user="root", port=22, key="k", known_hosts="kh",
                    python=sys.executable, local_directory=str(tmp_path))
    gone = tmp_path / "gone.toml"        # status falls back to what was recorded
    state = ClusterState(cid=cluster_id(gone), inventory=str(gone), tls=False,
                         address=f"tcp://127.0.0.1:{crashing_scheduler}",
                         scheduler={"local": True, "pid": 1, "log": "-",
                                    "node": node_to_json(node)})
    state.save()
    rows = _bounded(lambda: cluster.status())
    assert (rows[0].role, rows[0].state) == ("scheduler", "not answering")
    assert "within 2 s (RPICLUSTER_PROBE_TIMEOUT)" in rows[0].detail
    assert "rpicluster logs scheduler" in rows[0].detail


def test_up_gives_up_on_a_scheduler_that_never_answers_in_one_line(tmp_path, home, monkeypatch):
    """The scheduler's host has its own Dask config with a too-low TCP timeout (nothing up can
    see beforehand): up stops it after RPICLUSTER_JOIN_TIMEOUT and says why in one line."""
    monkeypatch.setenv("RPICLUSTER_JOIN_TIMEOUT", "6")
    monkeypatch.setenv("RPICLUSTER_PROBE_TIMEOUT", "2")
    dask_config = tmp_path / "dask-config"
    dask_config.mkdir()
    (dask_config / "distributed.yaml").write_text(
        "distributed:\n  comm:\n    timeouts:\n      tcp: 5s\n")
    monkeypatch.setenv("DASK_CONFIG", str(dask_config))   # read by the scheduler process only
    path = _inventory(tmp_path)
    port = load_inventory(path).scheduler.scheduler_port
    with pytest.raises(BootstrapError) as info:
        _bounded(lambda: cluster.up(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("scheduler on 127.0.0.1: not answering on tls://127.0.0.1:")
    assert "AssertionError: Timeout too low" in message
    assert message.endswith("full log: rpicluster logs scheduler")
    assert "Timeout too low" in cluster.logs("scheduler", path)
    assert load_state(path).scheduler is None        # stopped again, nothing left recorded
    assert not _answers(port)


@pytest.mark.parametrize("env, worker_env, where", [
    ({"DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "10s"}, None, "the scheduler's env"),
    (None, {"DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "5"}, "worker 127.0.0.1's env"),
    (None, {"DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "soon"}, "worker 127.0.0.1's env"),
])
def test_up_refuses_a_dask_tcp_timeout_that_cannot_work(tmp_path, home, env, worker_env,
                                                        where):
    path = _inventory(tmp_path, env=env, worker_env=worker_env)
    with pytest.raises(ConfigError) as info:
        cluster.up(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {where}: Dask TCP timeout")
    assert "11 s or more, or unset it" in message
    assert not (home / "clusters" / cluster_id(path) / "state.json").exists()


def test_a_dask_tcp_timeout_of_11_s_or_more_is_accepted(tmp_path):
    spec = load_inventory(_inventory(tmp_path, env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "12s"},
                                     worker_env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "11"}))
    cluster.check_dask_timeouts(spec)


def test_a_failed_remote_start_is_one_line_naming_host_reason_and_log(tmp_path, home):
    """The remote entry point fails (here: a role it does not know): one line with the host,
    the error's last line and where the whole output is; no command line, no JSON."""
    node = NodeSpec(host="127.0.0.1", user="root", port=22, key="k", known_hosts="kh",
                    python=sys.executable, local_directory=str(tmp_path))
    keep = tmp_path / "start-errors" / "pi9.log"
    spec = {"action": "start", "role": "bogus", "name": "pi9",
            "local_directory": str(tmp_path / "pi9")}
    with pytest.raises(SSHError) as info:
        cluster._remote(LocalConnection(node), spec, keep=keep)
    assert str(info.value) == (
        "127.0.0.1: rpicluster.deploy.remote start failed (exit status 1): ValueError: unknown "
        "role 'bogus' (known roles: scheduler, worker); full output: rpicluster logs pi9")
    assert "Traceback" in keep.read_text()
