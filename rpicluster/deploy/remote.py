"""The entry point ``up``/``down`` run on a host: ``python -m rpicluster.deploy.remote --spec JSON``.

Actions (the ``action`` field of the spec):

``start``
    Start a Dask scheduler (``role = "scheduler"``) or a nanny-backed worker (``role = "worker"``)
    detached from the SSH session (new session, all three streams on a log file) and print
    ``{"pid": ..., "log": ...}``. The pid leads the process group that holds the nanny and its
    worker. A worker runs under :mod:`rpicluster.deploy.supervise`, which starts it again (with
    backoff) whenever it exits, until ``stop``.
``stop``
    Stop the process group of ``pid`` if it is still the process ``start`` made for ``name``
    (checked through its environment, so a recycled pid is never killed), then verify that no
    member is left; print ``{"pid", "was_running", "left"}``.
``check``
    Whether the process group of ``pid`` still runs for ``name``, the supervisor's state file in
    ``local_directory`` and how many seconds ago it was last written or refreshed (the
    supervisor's heartbeat): print ``{"alive", "supervisor", "last_alive_ago"}`` (for ``status``).

Standard library only at import time: this starts in well under a second on a Pi.

The start spec itself is built here too, by :func:`start_spec`, for both ``up`` (which sends it)
and ``deploy systemd`` (which renders its :func:`command` into a unit), so the two cannot drift.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from rpicluster import config
from rpicluster.deploy.guard import GUARD
from rpicluster.deploy.versions import PRELOAD as VERSIONS
from rpicluster.deploy.workdir import private_directory
from rpicluster.errors import ConfigError
from rpicluster.events import PRELOAD

#: Environment variable marking the processes started by ``start`` (value: the name).
MARKER = "RPICLUSTER_PROCESS"
#: File names of a node's TLS material in ``<workdir>/tls`` (the layout ``up`` pushes).
TLS_FILES = {"ca": "ca.pem", "cert": "node.pem", "key": "node-key.pem"}
#: File in a worker's directory where its supervisor records its state.
SUPERVISOR_FILE = "supervisor.json"


def tls_paths(tls_dir: str | None) -> dict | None:
    """``{"ca", "cert", "key"}`` paths of the :data:`TLS_FILES` in ``tls_dir`` (None: no TLS)."""
    return None if tls_dir is None else {k: f"{tls_dir}/{v}" for k, v in TLS_FILES.items()}


def start_spec(role: str, target, *, local_directory: str, tls: dict | None,
               scheduler: str | None = None, dashboard_host: str = "127.0.0.1") -> dict:
    """The ``start`` spec of the scheduler or of one worker, as ``up`` and ``deploy systemd`` use it.

    Parameters
    ----------
    role : {"scheduler", "worker"}
    target : SchedulerSpec or NodeSpec
        The inventory's scheduler (role ``"scheduler"``) or worker node (role ``"worker"``).
    local_directory : str
        The process's work directory on its host (resolved: no ``~``).
    tls : dict or None
        ``{"ca", "cert", "key"}`` paths on the host, None for plain TCP.
    scheduler : str, optional
        The scheduler address a worker joins.
    dashboard_host : str
        Where the scheduler's dashboard listens: its host's loopback by default (its pages show
        task keys, exceptions and logs, unauthenticated); the scheduler's own address only when
        asked (``up --open-dashboard``).

    Returns
    -------
    dict
        JSON-able; :func:`command` turns it into the ``dask`` command line.
    """
    if role == "scheduler":
        return {"action": "start", "role": "scheduler", "name": "scheduler", "host": target.host,
                "port": target.scheduler_port, "dashboard_port": target.dashboard_port,
                "dashboard_host": dashboard_host,
                "local_directory": local_directory, "tls": tls, "env": dict(target.node.env),
                # The guard (no client-sent code on the scheduler, worker certificates are not
                # clients), then the rpicluster dashboard page (training progress, worker health).
                # Dask's version warnings without the noise (deploy/versions.py).
                "preload": [GUARD, PRELOAD, VERSIONS]}
    if role == "worker":
        return {"action": "start", "role": "worker", "name": target.name, "scheduler": scheduler,
                "nthreads": target.nthreads, "memory_limit": target.memory,
                "local_directory": local_directory, "resources": target.resources,
                "env": dict(target.env), "tls": tls}
    raise ValueError(f"unknown role {role!r} (known roles: scheduler, worker)")


def _tls_args(tls: dict | None) -> list[str]:
    if not tls:
        return []
    return ["--tls-ca-file", tls["ca"], "--tls-cert", tls["cert"], "--tls-key", tls["key"]]


def command(spec: dict) -> list[str]:
    """The ``dask`` command line for a start spec."""
    if spec["role"] == "scheduler":
        proto = "tls" if spec.get("tls") else "tcp"
        return [sys.executable, "-m", "distributed.cli.dask_scheduler",
                "--host", spec["host"], "--port", str(spec["port"]), "--protocol", proto,
                "--dashboard-address",
                f"{spec.get('dashboard_host', '127.0.0.1')}:{spec['dashboard_port']}",
                *_tls_args(spec.get("tls")),
                *(arg for module in spec.get("preload", ()) for arg in ("--preload", module))]
    if spec["role"] == "worker":
        cmd = [sys.executable, "-m", "distributed.cli.dask_worker", spec["scheduler"],
               "--name", spec["name"], "--nthreads", str(spec["nthreads"]), "--nanny",
               "--local-directory", spec["local_directory"], "--no-dashboard",
               "--memory-limit", str(spec.get("memory_limit") or "auto"),
               *_tls_args(spec.get("tls"))]
        if spec.get("resources"):
            cmd += ["--resources", " ".join(f"{k}={v}" for k, v in spec["resources"].items())]
        return cmd
    raise ValueError(f"unknown role {spec['role']!r} (known roles: scheduler, worker)")


def start(spec: dict) -> dict:
    """Start the process described by ``spec`` detached; return its pid and log path.

    A worker is started under its supervisor (:mod:`rpicluster.deploy.supervise`), which runs
    :func:`command` in the same process group. The directory is made private first
    (:func:`rpicluster.deploy.workdir.private_directory`): one another user owns is refused.
    """
    directory = private_directory(spec["local_directory"])
    log = os.path.join(directory, f"{spec['role']}.log")
    env = dict(os.environ, **spec.get("env", {}))
    env.update(config.dask_environ(env))
    env[MARKER] = spec["name"]
    # Whatever Dask writes outside --local-directory (the scheduler's scratch) stays private too.
    env["DASK_TEMPORARY_DIRECTORY"] = directory
    with open(log, "ab") as out:
        out.write(f"--- rpicluster start {time.strftime('%Y-%m-%d %H:%M:%S')} "
                  f"{spec['role']} {spec['name']}\n".encode())
        out.flush()
        argv = (command(spec) if spec["role"] != "worker" else
                [sys.executable, "-m", "rpicluster.deploy.supervise", "--spec", json.dumps(spec)])
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=directory, env=env,
                                start_new_session=True)
    return {"pid": proc.pid, "log": log}


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of a live process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[2])


def _group(pgid: int) -> list[int]:
    """Live (non-zombie) members of a process group."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[1] == pgid and st[0] not in ("Z", "X"):
                members.append(int(entry))
    return members


def is_ours(pid: int, name: str) -> bool:
    """Whether ``pid`` is a live process that ``start`` made for ``name``."""
    st = _stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return False
    return f"{MARKER}={name}".encode() in env


def _ours(pgid: int, name: str) -> list[int]:
    """Live members of group ``pgid`` that ``start`` made for ``name`` (they inherit the marker)."""
    return [p for p in _group(pgid) if is_ours(p, name)]


def stop(pid: int, name: str, timeout: float | None = None) -> dict:
    """Stop the group of ``pid`` (SIGTERM, then SIGKILL after ``timeout``) and verify it.

    ``timeout`` defaults to ``config.STOP_TIMEOUT``.

    Only processes carrying ``name``'s marker count, so a recycled pid is never signalled; the
    group is searched even when its leader is gone (an orphaned worker of a killed nanny).
    """
    if timeout is None:
        from rpicluster import config

        timeout = config.STOP_TIMEOUT
    was_running = bool(_ours(pid, name))
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not _ours(pid, name):
            break
        for member in _ours(pid, name):
            try:
                os.kill(member, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _ours(pid, name) and time.monotonic() < deadline:
            time.sleep(0.1)
    return {"pid": pid, "was_running": was_running, "left": _ours(pid, name)}


def check(pid: int, name: str, local_directory: str) -> dict:
    """Whether ``name``'s process group still runs, its supervisor's last recorded state, and
    the seconds since the supervisor last wrote or refreshed it (None: no state file)."""
    path = os.path.join(os.path.expanduser(local_directory), SUPERVISOR_FILE)
    try:
        with open(path) as f:
            ago = time.time() - os.fstat(f.fileno()).st_mtime
            supervisor = json.load(f)
    except (OSError, ValueError):
        supervisor = ago = None
    return {"alive": bool(_ours(pid, name)), "supervisor": supervisor, "last_alive_ago": ago}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rpicluster.deploy.remote")
    parser.add_argument("--spec", required=True, help="JSON action spec")
    spec = json.loads(parser.parse_args(argv).spec)
    action = spec.get("action")
    if action == "start":
        try:
            result = start(spec)
        except ConfigError as exc:
            # One line for `up` to relay (it shows the last line naming an error).
            print(f"ConfigError: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
    elif action == "stop":
        timeout = spec.get("timeout")
        result = stop(int(spec["pid"]), spec["name"], None if timeout is None else float(timeout))
    elif action == "check":
        result = check(int(spec["pid"]), spec["name"], spec["local_directory"])
    else:
        parser.error(f"unknown action {action!r} (known actions: start, stop, check)")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
