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

#: Seconds for the TCP connect, the SSH banner and authentication of one host.
SSH_TIMEOUT = 10.0
#: Seconds for one remote command to finish.
COMMAND_TIMEOUT = 120.0
#: Seconds ``up`` waits for the scheduler to see every started worker.
JOIN_TIMEOUT = 60.0
#: Hosts contacted at the same time.
SSH_PARALLEL = 32

#: ``rpicluster serve``: bind loopback unless told otherwise (``--host 0.0.0.0`` lets the Pis on
#: the LAN read; anyone who can reach the port can then read the store).
SERVE_HOST = "127.0.0.1"
SERVE_PORT = 8788

#: ``rpicluster bench``: output folder (git-ignored) and the per-row time cap of ``bench
#: algorithms`` (a row still running then is killed and reported as not finished).
BENCH_OUT = Path("bench-out")
BENCH_TIME_CAP_S = 1200.0

#: ``rpicluster bench scaling``: synthetic rows when neither --data nor --rows is given, and rows
#: of the per-worker calibration task (capped at the store's block rows).
BENCH_SCALING_ROWS = 48_000
BENCH_CALIBRATION_ROWS = 2_000
