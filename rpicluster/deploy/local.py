"""The embedded default: a Dask cluster on this machine, no Pis needed.

``rpicluster up --local N`` starts it in the background: a detached process
(``python -m rpicluster.deploy.local --spec '{json}'``) runs a nanny-backed
:class:`distributed.LocalCluster` and records its address in ``<state dir>/local.json``
(:func:`rpicluster.deploy.state.local_record`) once the workers are up. ``down --local`` stops that
process and waits until it is gone. Commands find it through :mod:`rpicluster.deploy.resolve`.

It is secured like an SSH cluster: TLS on loopback (``tls://127.0.0.1``) with its own CA under
``<state dir>/local-tls`` (scheduler, worker and client certificates, rotated by ``up --local``
when one nears expiry), the dashboard on 127.0.0.1 unless asked otherwise, and a scheduler
guarded by :mod:`rpicluster.deploy.guard` (no client-sent code runs on it). Its workers work and
spill in ``<state dir>/local-work`` (mode 0700; :mod:`rpicluster.deploy.workdir`).
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
from rpicluster.deploy.guard import GUARD
from rpicluster.deploy.state import local_path, local_record, pid_alive
from rpicluster.deploy.workdir import private_directory
from rpicluster.errors import BootstrapError, ConfigError, RPiClusterWarning
from rpicluster.events import PRELOAD


def _same_memory(asked: str, running: str) -> bool:
    if asked == running:
        return True
    from dask.utils import parse_bytes

    try:
        return parse_bytes(asked) == parse_bytes(running)
    except (TypeError, ValueError):
        return False


def check_local(info: dict, n_workers: int | None = None, threads_per_worker: int | None = None,
                memory_limit: str | None = None) -> None:
    """Refuse a running local cluster that differs from what was asked for.

    Only what was asked (not None) is compared; a record that lacks a field passes it.

    Raises
    ------
    ConfigError
        Naming the running cluster's value, the one asked for, and how to change it.
    """
    asked = {"workers": (n_workers, info.get("n_workers")),
             "threads per worker": (threads_per_worker, info.get("threads_per_worker")),
             "memory limit": (memory_limit, info.get("memory_limit"))}
    for what, (want, have) in asked.items():
        if want is None or have is None:
            continue
        if what == "memory limit" and _same_memory(str(want), str(have)):
            continue
        if want != have:
            raise ConfigError(
                f"the local cluster at {info['scheduler_address']} runs with {what} = {have}, "
                f"not {want}; stop it with `rpicluster down --local`, then start the one you want "
                f"with `rpicluster up --local ...` (or leave {what} out to use the running one)")


def start_local(n_workers: int | None = None, threads_per_worker: int | None = None,
                memory_limit: str | None = None, dashboard_address: str | None = None,
                timeout: float | None = None, owner: int | None = None) -> dict:
    """Start the embedded local cluster in the background, or return the one already running.

    Parameters
    ----------
    n_workers, threads_per_worker
        Worker processes and threads each; by default one worker per core, one thread each
        (each task uses one BLAS thread, so this fills the cores without oversubscription).
    memory_limit
        Per-worker memory limit (default ``"auto"``: this machine's memory split between workers).
    dashboard_address
        Where the Dask dashboard listens (default ``127.0.0.1:<config.DASHBOARD_PORT>``: this
        machine only; ``:8787`` would listen on every interface).
    timeout
        Seconds to wait for every worker to join (default ``config.LOCAL_START_TIMEOUT``).
    owner
        The pid of the one command the cluster is started for: the cluster stops by itself
        once that process is gone (a command killed with SIGKILL cannot stop it; without this
        it would run on, unrecorded by anyone, until the machine restarts).

    Returns
    -------
    dict
        ``{"pid", "scheduler_address", "dashboard_link", "n_workers", "threads_per_worker",
        "memory_limit", "started", "already_running"}``.

    Raises
    ------
    ConfigError
        A local cluster runs with another size, thread count or memory limit than asked for.
    """
    if n_workers is not None and n_workers < 1:
        raise ConfigError(f"--local needs at least 1 worker, got {n_workers}")
    running = local_record()
    if running is not None:
        check_local(running, n_workers, threads_per_worker, memory_limit)
        return {**running, "already_running": True}
    bind = (dashboard_address or "127.0.0.1").rsplit(":", 1)[0].strip("[]")
    if bind not in ("127.0.0.1", "localhost", "::1"):
        import warnings

        warnings.warn(f"the dashboard listens on {dashboard_address}, not this machine's "
                      "loopback only: anyone who reaches it reads the cluster's logs, task keys "
                      "and exceptions, without a password", RPiClusterWarning, stacklevel=2)
    timeout = config.LOCAL_START_TIMEOUT if timeout is None else timeout
    spec = {
        "n_workers": n_workers or os.cpu_count() or 1,
        "threads_per_worker": threads_per_worker or 1,
        "memory_limit": memory_limit or "auto",
        "dashboard_address": dashboard_address or f"127.0.0.1:{config.DASHBOARD_PORT}",
        "state": str(local_path()),
        "tls": str(local_certificates()),
        # Workers spill here, not in a $TMPDIR/dask-scratch-space another user can make first.
        "local_directory": private_directory(work_dir()),
        "timeout": timeout,
        "owner": owner,
    }
    log_file = log_path()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rpicluster.deploy.local", "--spec", json.dumps(spec)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = local_record()
        if info is not None and info["pid"] == proc.pid:
            _warn_moved_dashboard(spec["dashboard_address"], info.get("dashboard_link"))
            return {**info, "already_running": False}
        if proc.poll() is not None:
            raise BootstrapError(
                f"the local cluster exited with status {proc.returncode} before it was ready; "
                f"log {log_file}:\n{_tail(log_file)}")
        time.sleep(0.2)
    proc.terminate()
    raise BootstrapError(f"the local cluster was not ready after {timeout:.0f} s; "
                         f"log {log_file}:\n{_tail(log_file)}")


def _warn_moved_dashboard(asked: str, link: str | None) -> None:
    """One warning when the dashboard port asked for was taken: distributed then serves the
    dashboard, the page and Prometheus' ``/metrics`` on another port, silently."""
    import re
    import warnings

    want = asked.rsplit(":", 1)[-1]
    got = re.search(r":(\d+)(/|$)", link or "")
    if got is None or want in ("", "0") or got.group(1) == want:
        return
    warnings.warn(f"the dashboard port {want} (the page and Prometheus' /metrics) was taken: the "
                  f"local cluster serves them on port {got.group(1)} instead ({link}); point "
                  f"Prometheus there, or free port {want} and restart the cluster (rpicluster "
                  "down --local, then rpicluster up --local)", RPiClusterWarning, stacklevel=3)


def stop_local(timeout: float | None = None) -> dict | None:
    """Stop the embedded local cluster; returns its record, or None when none was running.

    ``timeout`` (default ``config.LOCAL_STOP_TIMEOUT``) is how long it may take to close before
    its whole process group is killed.
    """
    info = local_record()
    if info is None:
        return None
    timeout = config.LOCAL_STOP_TIMEOUT if timeout is None else timeout
    pid = int(info["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            # The cluster did not close in time: take its whole process group down.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            time.sleep(0.5)
            break
        time.sleep(0.1)
    local_path().unlink(missing_ok=True)
    return info


def work_dir() -> Path:
    """The embedded cluster's work and spill directory (made private by :func:`start_local`)."""
    return config.state_dir() / "local-work"


def tls_dir() -> Path:
    """The embedded cluster's CA and certificates."""
    return config.state_dir() / "local-tls"


#: Certificates of the embedded cluster (names, and so roles: see :func:`tls.role_of`).
LOCAL_CERTS = ("scheduler", "worker", "client")


def local_certificates() -> Path:
    """Make (or rotate, when one nears expiry) the embedded cluster's certificates; their folder.

    Called only while no embedded cluster runs, so a rotation never cuts a running one off.
    """
    from rpicluster.deploy.tls import CertificateAuthority

    ca = CertificateAuthority(tls_dir())
    ca.rotate_if_needed(LOCAL_CERTS)
    for name in LOCAL_CERTS:
        ca.issue(name)
    return ca.directory


def local_security(role: str = "client"):
    """The ``distributed.Security`` of the embedded cluster's ``role`` (client by default)."""
    from distributed.security import Security

    d = tls_dir()
    return Security(tls_ca_file=str(d / "ca.pem"), tls_client_cert=str(d / f"{role}.pem"),
                    tls_client_key=str(d / f"{role}-key.pem"), require_encryption=True)


def log_path() -> Path:
    """The embedded cluster's log: scheduler, nannies and workers all write to it."""
    return config.state_dir() / "local.log"


def log_tail(lines: int = 100) -> str:
    """The last ``lines`` lines of :func:`log_path`."""
    return _tail(log_path(), lines) + "\n"


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _serve(spec: dict) -> None:
    """Run the cluster in this (detached) process until SIGTERM."""
    import dask
    from distributed import LocalCluster
    from distributed.security import Security

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    state = Path(spec["state"])
    tls = Path(spec["tls"])
    workdir = private_directory(spec["local_directory"])
    # The scheduler's scratch too; nannies pass this configuration on to their workers.
    dask.config.set({"temporary-directory": workdir})
    config.apply_dask_defaults()
    # Each process presents its role's certificate: the guard tells workers from the client.
    security = Security(
        tls_ca_file=str(tls / "ca.pem"), require_encryption=True,
        **{f"tls_{role}_{part}": str(tls / f"{role}{suffix}.pem")
           for role in LOCAL_CERTS for part, suffix in (("cert", ""), ("key", "-key"))})
    with LocalCluster(n_workers=spec["n_workers"], threads_per_worker=spec["threads_per_worker"],
                      memory_limit=spec["memory_limit"], processes=True,
                      host="127.0.0.1", protocol="tls", security=security,
                      local_directory=workdir,
                      dashboard_address=spec["dashboard_address"],
                      # Keep distributed's INFO lines: `rpicluster logs` shows this log.
                      silence_logs=False,
                      # The guard first, then the rpicluster page (training progress, health).
                      scheduler_kwargs={"preload": [GUARD, PRELOAD]}) as cluster:
        cluster.wait_for_workers(spec["n_workers"], timeout=spec["timeout"])
        info = {
            "pid": os.getpid(),
            "scheduler_address": cluster.scheduler_address,
            "dashboard_link": cluster.dashboard_link,
            "n_workers": spec["n_workers"],
            "threads_per_worker": spec["threads_per_worker"],
            "memory_limit": spec["memory_limit"],
            "tls": spec["tls"],
            "started": time.time(),
        }
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, state)
        owner = spec.get("owner")
        try:
            while not stop.wait(0.5):
                if owner is not None and not pid_alive(owner):
                    break
        finally:
            with contextlib.suppress(FileNotFoundError):
                if json.loads(state.read_text()).get("pid") == os.getpid():
                    state.unlink()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rpicluster.deploy.local")
    parser.add_argument("--spec", required=True, help="JSON: n_workers, threads_per_worker, ...")
    _serve(json.loads(parser.parse_args(argv).spec))


if __name__ == "__main__":
    main()
