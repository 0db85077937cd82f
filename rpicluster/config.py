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
