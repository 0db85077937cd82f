"""Defaults in one place. Inventory values override these, and command-line flags override both;
the same key name is used at every level."""

from __future__ import annotations

import os
from pathlib import Path

#: Dask scheduler and dashboard ports (Dask's own defaults).
SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787

#: Rows per training block (one Zarr chunk row = one block). The paper used ~127k rows of 2,048
#: float32 features (~1 GB) per block on a 4 GB Pi 4; 65,536 rows keeps a 2,048-feature block at
#: 512 MiB so a Pi 4 with 2 GB can hold one block and its working copies.
BLOCK_ROWS = 65_536


def state_dir() -> Path:
    """Directory for rpicluster's own state (cluster state file, certificates, local cluster).

    ``RPICLUSTER_HOME`` overrides the default ``~/.rpicluster``.
    """
    return Path(os.environ.get("RPICLUSTER_HOME", Path.home() / ".rpicluster")).expanduser()


# --- cluster bring-up over SSH (rpicluster.inventory, rpicluster.deploy) ---

#: Inventory defaults, used where neither [defaults] nor a group sets the key.
SSH_KEY = "~/.ssh/id_ed25519"
KNOWN_HOSTS = "~/.ssh/known_hosts"
#: Interpreter on a host, by absolute path (a non-interactive SSH session does not see a venv's
#: PATH); ``up --provision`` creates this venv.
REMOTE_PYTHON = "~/.venvs/rpicluster/bin/python"
#: Each worker works in ``<local_directory>/<host>`` (hosts may share a filesystem).
REMOTE_DIRECTORY = "~/.rpicluster/workers"

#: Hosts contacted at the same time.
SSH_PARALLEL = 32

#: Dask settings of every scheduler and worker rpicluster starts (the embedded cluster, `up`'s
#: hosts, the systemd kit), where the user's own Dask configuration does not set them. Dask's
#: worker profiler samples every running thread's stack every 10 ms and every server checks its
#: event loop every 20 ms: CPU outside the tasks, and switches of the task threads, that a Pi's
#: 4 slow cores would rather give to its blocks (measured in docs/performance.md, "Dask's
#: clocks"). Every 100 ms keeps the dashboard's profile and the unresponsive-loop warnings. Set
#: a key in Dask's configuration, or its ``DASK_...`` variable (a host's ``env`` in the
#: inventory), to override.
DASK_DEFAULTS = {
    "distributed.worker.profile.interval": "100ms",
    "distributed.admin.tick.interval": "100ms",
}


def _dask_variable(key: str) -> str:
    """The environment variable Dask reads for configuration ``key`` (``DASK_A__B_C``)."""
    return "DASK_" + key.upper().replace(".", "__").replace("-", "_")


def dask_environ(env) -> dict[str, str]:
    """The ``DASK_...`` variables of :data:`DASK_DEFAULTS` that ``env`` (a mapping, usually the
    environment a process will be started with) does not already set."""
    return {_dask_variable(key): value for key, value in DASK_DEFAULTS.items()
            if _dask_variable(key) not in env}


def apply_dask_defaults() -> None:
    """:data:`DASK_DEFAULTS` as Dask defaults of this process, before it starts a scheduler or
    workers: a value the user's Dask configuration sets stays, and so does one its ``DASK_...``
    variable sets (even to Dask's own default, which ``update_defaults`` alone would replace)."""
    import dask
    import distributed  # noqa: F401 - its own defaults first, so that ours replace them

    nested: dict = {}
    for key, value in DASK_DEFAULTS.items():
        if _dask_variable(key) in os.environ:
            continue
        *path, last = key.split(".")
        level = nested
        for part in path:
            level = level.setdefault(part, {})
        level[last] = value
    dask.config.update_defaults(nested)


#: Timeouts in seconds: name -> (default, what it bounds). Each is read when used, and
#: ``RPICLUSTER_<NAME>`` in the environment overrides it (e.g. ``RPICLUSTER_JOIN_TIMEOUT=300`` for
#: a shelf of slow Pis); read them as ``config.JOIN_TIMEOUT``. A function's own ``*timeout``
#: argument, where it has one, overrides both.
TIMEOUTS = {
    "SSH_TIMEOUT": (10.0, "TCP connect, SSH banner and authentication of one host"),
    "COMMAND_TIMEOUT": (120.0, "one remote command over SSH"),
    "PROVISION_TIMEOUT": (600.0, "installing the wheelhouse on one host (up --provision)"),
    "JOIN_TIMEOUT": (60.0, "up: a started scheduler answering, and every started worker joining"),
    "STOP_TIMEOUT": (20.0, "down: a process's grace between SIGTERM and SIGKILL"),
    "PROBE_TIMEOUT": (5.0, "up/status: whether a recorded scheduler answers"),
    "CONNECT_TIMEOUT": (30.0, "a command's client connecting to its cluster's scheduler"),
    "LOCAL_START_TIMEOUT": (120.0, "up --local: every worker of the embedded cluster joining"),
    "LOCAL_STOP_TIMEOUT": (60.0, "down --local: the embedded cluster exiting"),
    "NO_WORKER_TIMEOUT": (60.0, "train: waiting with no worker connected before the run stops"),
    "SILENT_WORKER_TIMEOUT": (15.0, "train: a worker's missing heartbeats before the progress "
                                    "line names it (the run goes on)"),
    "PAUSED_TIMEOUT": (300.0, "train: every worker of the run paused for memory before the "
                              "run stops (Dask would wait for them forever)"),
}


def timeout(name: str) -> float:
    """The timeout ``name`` (a key of :data:`TIMEOUTS`), from ``RPICLUSTER_<NAME>`` if set.

    Raises
    ------
    ConfigError
        The environment variable is not a number of seconds above 0.
    """
    default, _ = TIMEOUTS[name]
    raw = os.environ.get(f"RPICLUSTER_{name}")
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        from rpicluster.errors import ConfigError

        raise ConfigError(f"RPICLUSTER_{name}={raw!r}: expected a number of seconds above 0 "
                          f"(default {default:g}); fix or unset it")
    return value


def __getattr__(name: str):
    # Timeouts are looked up when used, so the environment of the moment counts.
    if name in TIMEOUTS:
        return timeout(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: ``rpicluster serve``: bind loopback unless told otherwise (``--host 0.0.0.0`` lets the Pis on
#: the LAN read; anyone who can reach the port can then read the store).
SERVE_HOST = "127.0.0.1"
SERVE_PORT = 8788

#: ``rpicluster bench``: output folder (git-ignored) and the per-row time cap of ``bench
#: algorithms`` (a row still running then is killed and reported as not finished).
BENCH_OUT = Path("bench-out")
BENCH_TIME_CAP_S = 1200.0

#: ``rpicluster bench scaling``: synthetic rows when neither --data nor --rows is given, and rows
#: of the random forest's per-worker calibration tree (None: one block; Inc-kSGD's calibration
#: is always one block).
BENCH_SCALING_ROWS = 48_000
BENCH_CALIBRATION_ROWS = None
