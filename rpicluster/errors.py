"""One error hierarchy for rpicluster.

Every error a user can meet derives from :class:`RPiClusterError`, so the CLI can print it as a
clear one-line message (no traceback) and library users can catch the family. Messages name the
thing at fault (file, host, block, chunk, field) and what was expected.
"""

from __future__ import annotations


class RPiClusterError(Exception):
    """Base class of every error rpicluster raises on purpose."""


class ConfigError(RPiClusterError, ValueError):
    """A configuration value (inventory file, flag, parameter) is wrong."""


class OptionsError(ConfigError):
    """Options that do not go together; the CLI shows it as a usage error (exit status 2)."""


class InventoryError(ConfigError):
    """The TOML inventory is invalid; the message names the file and the key."""


class SSHError(RPiClusterError):
    """An SSH connection or remote command failed; the message names the host."""


class HostKeyError(SSHError):
    """A host key is unknown or has changed; the message shows the offered fingerprint."""


class BootstrapError(RPiClusterError):
    """Bringing a worker or the scheduler up failed (the message names the host)."""


class DataError(RPiClusterError, ValueError):
    """A dataset or store is invalid; the message names the array, chunk, row or field."""


class StoreIncompleteError(DataError):
    """A Zarr store has no completion marker: an interrupted ingest, not a dataset."""


class ModelError(RPiClusterError):
    """A model file is missing, corrupted or of an unknown format."""


class TrainingError(RPiClusterError):
    """A distributed training run failed; the message names the block or cluster."""


class TrainingStopped(TrainingError):
    """A training run stopped before its end (Ctrl-C, lost scheduler, full disk, a failed block).

    Its committed blocks are kept: ``run_dir`` resumes it (``rpicluster train ... --resume``).
    ``interrupted`` is true for Ctrl-C.
    """

    def __init__(self, message: str, run_dir: object = None, interrupted: bool = False) -> None:
        super().__init__(message)
        self.run_dir = run_dir
        self.interrupted = interrupted


class WriteError(RPiClusterError, OSError):
    """A file could not be written (disk full, no permission); the message names the path."""


def make_dirs(path) -> None:
    """Create the folder ``path`` with its parents, as ``mkdir -p`` (nothing when it exists).

    Every writer of a local output (store, model, labels, report folder) makes its folder this
    way, so ``-o new/dir/out`` works; what cannot be made is a :class:`WriteError` naming the
    folder, or the file that stands where a folder should be.
    """
    import os

    path = os.path.abspath(os.fspath(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        up = path
        while up != os.path.dirname(up) and not os.path.exists(up):
            up = os.path.dirname(up)
        why = (f"{up} is a file, not a folder" if os.path.exists(up) and not os.path.isdir(up)
               else exc.strerror or str(exc))
        raise WriteError(f"cannot create the folder {path}: {why}; choose another path"
                         ) from None


class HostsFailedError(BootstrapError):
    """Some hosts failed while the others went ahead; ``report`` holds every host's outcome."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class RPiClusterWarning(UserWarning):
    """Something a user should know that does not stop the work (the CLI prints one line)."""


class DataWarning(RPiClusterWarning):
    """Data that works but probably not as intended (class-skewed blocks, skipped files)."""
