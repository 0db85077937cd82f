"""Private work and spill directories for every scheduler and worker rpicluster starts.

A Dask worker spills task results to pickle files under its local directory and loads them back;
by default that is ``$TMPDIR/dask-scratch-space``, which any user of the machine can create
first (mode 777) and so own what is written there, and swap a spill file for a payload that runs
as the worker's user when it is read back. So every process rpicluster starts (the embedded
cluster, workers and schedulers over SSH, systemd units) works in a directory it made itself, mode
0700, owned by the user it runs as, and refuses one that another user owns or can write to.

``python -m rpicluster.deploy.workdir DIR`` makes or checks ``DIR`` (a systemd unit's
``ExecStartPre``) and exits 1 with one line when it is not private.

Standard library only at import time (``rpicluster.deploy.remote`` uses it on the hosts).
"""

from __future__ import annotations

import os
import stat
import sys

from rpicluster.errors import ConfigError

#: The folder Dask creates inside a local directory (it reuses an existing one it can write to).
SCRATCH = "dask-scratch-space"


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _check(path: str, st: os.stat_result, what: str) -> None:
    me = os.geteuid()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {path} is not a plain directory (a link or a file); remove it, "
                          "or set another local_directory")
    if st.st_uid != me:
        raise ConfigError(f"{what} {path} belongs to {_owner(st.st_uid)}, not to "
                          f"{_owner(me)}: another user could read or replace what Dask spills "
                          "there; remove it, or set another local_directory")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{what} {path} is writable by other users (mode "
                          f"{stat.S_IMODE(st.st_mode):o}): what is already in it cannot be "
                          "trusted; remove it (rpicluster makes it again, mode 700), or set "
                          "another local_directory")


def private_directory(path: str | os.PathLike, what: str = "work directory") -> str:
    """Make ``path`` (mode 0700) or check that the existing one is private; return it absolute.

    An existing directory must be owned by the user this process runs as and writable by nobody
    else (one only readable by others is narrowed to 0700); so must a ``dask-scratch-space``
    already inside it.

    Raises
    ------
    ConfigError
        Naming the directory, its owner or mode, and what to do.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise ConfigError(f"cannot make {what} {path}: {exc.strerror or exc}; set another "
                          "local_directory") from None
    _check(path, st, what)
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    scratch = os.path.join(path, SCRATCH)
    try:
        st = os.lstat(scratch)
    except FileNotFoundError:
        return path
    _check(scratch, st, "spill directory")
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m rpicluster.deploy.workdir DIR", file=sys.stderr)
        return 2
    try:
        private_directory(args[0])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
