"""The embedded default: a Dask cluster on this machine, no Pis needed.

``rpicluster up --local N`` starts it in the background: a detached process
(``python -m rpicluster.deploy.local --spec '{json}'``) runs a nanny-backed
:class:`distributed.LocalCluster` and records its address in ``<state dir>/local.json`` once the
workers are up. ``down --local`` stops that process and waits until it is gone. Commands that need
a cluster (``train``, ``score``, ``predict``, ``demo``) find it through :func:`cluster_client`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rpicluster import config
from rpicluster.errors import BootstrapError, ConfigError

STATE_FILE = "local.json"


def _state_path() -> Path:
    return config.state_dir() / STATE_FILE


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    # A zombie still answers kill(0); it is not running.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def local_status() -> dict | None:
    """The running embedded cluster's record (address, dashboard, pid, workers), or None.

    A record whose process has died is removed and reported as None.
    """
    path = _state_path()
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        path.unlink(missing_ok=True)
        return None
    if not _pid_alive(int(info.get("pid", -1))):
        path.unlink(missing_ok=True)
        return None
    return info


def start_local(n_workers: int | None = None, threads_per_worker: int | None = None,
                memory_limit: str | None = "auto", dashboard_address: str | None = None,
                timeout: float = 120.0) -> dict:
    """Start the embedded local cluster in the background, or return the one already running.

    Parameters
    ----------
    n_workers, threads_per_worker
        Worker processes and threads each; by default one worker per core, one thread each
        (each task uses one BLAS thread, so this fills the cores without oversubscription).
    memory_limit
        Per-worker memory limit (``"auto"`` splits this machine's memory between workers).
    dashboard_address
        Where the Dask dashboard listens (default ``:<config.DASHBOARD_PORT>``).
    timeout
        Seconds to wait for every worker to join.

    Returns
    -------
    dict
        ``{"pid", "scheduler_address", "dashboard_link", "n_workers", "threads_per_worker",
        "started", "already_running"}``.
    """
    running = local_status()
    if running is not None:
        return {**running, "already_running": True}
    n_workers = n_workers or os.cpu_count() or 1
    if n_workers < 1:
        raise ConfigError(f"--local needs at least 1 worker, got {n_workers}")
    spec = {
        "n_workers": n_workers,
        "threads_per_worker": threads_per_worker or 1,
        "memory_limit": memory_limit,
        "dashboard_address": dashboard_address or f":{config.DASHBOARD_PORT}",
        "state": str(_state_path()),
    }
    log_path = config.state_dir() / "local.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rpicluster.deploy.local", "--spec", json.dumps(spec)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = local_status()
        if info is not None and info["pid"] == proc.pid:
            return {**info, "already_running": False}
        if proc.poll() is not None:
            raise BootstrapError(
                f"the local cluster exited with status {proc.returncode} before it was ready; "
                f"log {log_path}:\n{_tail(log_path)}")
        time.sleep(0.2)
    proc.terminate()
    raise BootstrapError(f"the local cluster was not ready after {timeout:.0f} s; "
                         f"log {log_path}:\n{_tail(log_path)}")


def stop_local(timeout: float = 60.0) -> dict | None:
    """Stop the embedded local cluster; returns its record, or None when none was running."""
    info = local_status()
    if info is None:
        return None
    pid = int(info["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            # The cluster did not close in time: take its whole process group down.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            time.sleep(0.5)
            break
        time.sleep(0.1)
    _state_path().unlink(missing_ok=True)
    return info


@contextlib.contextmanager
def cluster_client(scheduler: str | None = None, inventory: str | os.PathLike | None = None,
                   local: int | None = None):
    """Yield a :class:`distributed.Client` for the cluster a command should use.

    In order: an explicit ``scheduler`` address; an ``inventory`` (the SSH cluster ``up``
    started from it); ``local`` = N workers of the embedded cluster (started now, and stopped on
    exit, unless one was already running); otherwise the cluster ``up`` last recorded (SSH, then
    embedded); otherwise an embedded cluster started for this command only.
    """
    from distributed import Client

    if sum(x is not None for x in (scheduler, inventory, local)) > 1:
        raise ConfigError("give at most one of --scheduler, -c/--inventory and --local")
    if scheduler is not None:
        if _recorded_ssh(scheduler) is not None:  # `up`'s cluster: connect with its certificate
            from rpicluster.deploy.cluster import connect

            with connect(timeout="30s") as client:
                yield client
            return
        # Any other scheduler: Dask's own configuration supplies TLS settings when needed
        # (`rpicluster deploy systemd` writes them to client.env).
        with Client(scheduler, timeout="30s") as client:
            yield client
        return
    if inventory is not None:
        from rpicluster.deploy.cluster import connect

        with connect(inventory) as client:
            yield client
        return
    if local is None:
        recorded = _recorded_ssh_client()
        if recorded is not None:
            with recorded as client:
                yield client
            return
    info = start_local(local)
    try:
        with Client(info["scheduler_address"], timeout="30s") as client:
            yield client
    finally:
        if not info["already_running"]:
            stop_local()


def _recorded_ssh(address: str | None = None) -> dict | None:
    """The SSH cluster ``up`` last recorded (only if at ``address``, when given), or None."""
    from rpicluster.deploy.cluster import recorded_cluster

    recorded = recorded_cluster()
    if recorded is None or (address is not None and recorded["address"] != address):
        return None
    return recorded


def _recorded_ssh_client():
    """A client for the SSH cluster ``up`` last recorded, or None when there is none."""
    from rpicluster.deploy.cluster import connect

    return connect() if _recorded_ssh() is not None else None


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _serve(spec: dict) -> None:
    """Run the cluster in this (detached) process until SIGTERM."""
    from distributed import LocalCluster

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    state = Path(spec["state"])
    with LocalCluster(n_workers=spec["n_workers"], threads_per_worker=spec["threads_per_worker"],
                      memory_limit=spec["memory_limit"], processes=True,
                      dashboard_address=spec["dashboard_address"],
                      scheduler_kwargs=_scheduler_kwargs()) as cluster:
        cluster.wait_for_workers(spec["n_workers"], timeout=120)
        info = {
            "pid": os.getpid(),
            "scheduler_address": cluster.scheduler_address,
            "dashboard_link": cluster.dashboard_link,
            "n_workers": spec["n_workers"],
            "threads_per_worker": spec["threads_per_worker"],
            "started": time.time(),
        }
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, state)
        try:
            while not stop.wait(0.5):
                pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                if json.loads(state.read_text()).get("pid") == os.getpid():
                    state.unlink()


def _scheduler_kwargs() -> dict:
    """Scheduler options of the embedded cluster: the rpicluster dashboard page when present."""
    try:
        import rpicluster.dashboard as dashboard
    except ImportError:  # pragma: no cover
        return {}
    return {"preload": ["rpicluster.dashboard"]} if hasattr(dashboard, "dask_setup") else {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rpicluster.deploy.local")
    parser.add_argument("--spec", required=True, help="JSON: n_workers, threads_per_worker, ...")
    _serve(json.loads(parser.parse_args(argv).spec))


if __name__ == "__main__":
    main()
