"""The run directory: committed block models of one training run, so a killed run can resume.

Layout::

    RUN_DIR/
      lock                       the owner: pid, host, start time of the run writing here
      run.json                   parameters, dataset identity, classes (written once, at the start)
      blocks/block-000003.skops  one committed block model (KSGDClassifier, skops format)
      manifest.json              committed blocks with their files' sha256, the parameters and
                                 the data each was trained with; written last

A run directory has one writer at a time: :meth:`RunDir.begin` takes an exclusive lock
(``flock`` on ``RUN_DIR/lock``, which the kernel drops when its process dies, so the lock of a
killed run is never in the way) and refuses a second writer, naming the pid, host and start time
of the first. Without ``flock`` (some network filesystems) the recorded pid decides: a lock
whose pid no longer runs on this host is stale and taken over.

A block counts as committed only once the manifest names it, and the manifest is replaced
atomically after the block file is complete, so a crash at any point leaves either the old or the
new manifest, never a block that looks committed but is not. Resuming checks each listed file's
sha256, and that the block was trained with the run's parameters on the run's data (the store's
fingerprint and the block's chunk checksums); a block that fails either check is trained again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import warnings
import weakref
from pathlib import Path

from rpicluster.deploy.state import pid_alive
from rpicluster.errors import ConfigError, ModelError, RPiClusterWarning, make_dirs
from rpicluster.train.modelfile import atomic_write_bytes, file_sha256, load_model, save_model

#: Format 2 added the lock and the per-block records (parameters, data) that resume verifies.
FORMAT = 2


def dataset_identity(dataset) -> dict:
    """What must not change between a run and its resume: the dataset's shape and attributes."""
    attrs = json.dumps(dict(dataset.attrs), sort_keys=True, default=str)
    return {
        "url": str(dataset.url),
        "n_rows": int(dataset.n_rows),
        "n_features": int(dataset.n_features),
        "n_blocks": int(dataset.n_blocks),
        "fingerprint": hashlib.sha256(attrs.encode()).hexdigest()[:16],
    }


def blocks_data(dataset) -> dict[int, dict]:
    """The data each block is trained on: the store's fingerprint and the block's chunk
    checksums (stores of format 2 and later record one per chunk position)."""
    from rpicluster.data.reader import chunk_checksums

    fingerprint = dataset_identity(dataset)["fingerprint"]
    return {b: {"fingerprint": fingerprint, "chunks": chunk_checksums(dataset, b)}
            for b in range(int(dataset.n_blocks))}


def _manifest_line(block: int, entry: dict) -> str:
    return f'  "{block}": {json.dumps(entry, sort_keys=True)}'


def _manifest(lines: dict[int, str]) -> bytes:
    """The manifest, one committed block per line in block order: JSON, encoded one entry at
    a time (re-encoding every entry, indented, on each commit cost 31 ms of the driver's CPU a
    block at 150 blocks, quadratic in the blocks)."""
    body = ",\n".join(lines[b] for b in sorted(lines))
    return ('{"blocks": {\n' + body + "\n}}\n" if body else '{"blocks": {}}\n').encode()


# Locks this process holds, by resolved run directory: [file descriptor, holders]. A run
# directory is owned by a process; nested holders in it (train_model around train) share it.
_HELD: dict[str, list] = {}
_HELD_GUARD = threading.Lock()


def _release(key: str) -> None:
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
    fd = held[0]
    try:
        os.ftruncate(fd, 0)  # an empty lock file: nobody holds it
    finally:
        os.close(fd)  # closing drops the flock


class OwnedDir:
    """A run directory with one writer at a time: ``run.json`` (what the run is) and the owner
    lock (see the module docstring); the base of :class:`RunDir` and
    :class:`~rpicluster.train.rounds.RoundDir`.

    :meth:`acquire` (or the object as a context manager) owns it, :meth:`release` gives it up;
    reading needs no lock.
    """

    #: How :meth:`meta` names a directory without ``run.json``.
    kind = "a run directory"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._key: str | None = None
        self._finalizer = None

    @property
    def meta_path(self) -> Path:
        return self.path / "run.json"

    @property
    def lock_path(self) -> Path:
        return self.path / "lock"

    def exists(self) -> bool:
        return self.meta_path.is_file()

    def meta(self) -> dict:
        try:
            return json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{self.path} is not {self.kind} (no run.json)") from None

    # --- ownership -------------------------------------------------------------------------

    def holder(self) -> dict | None:
        """Who the lock file names (pid, host, started), or None when it names nobody."""
        try:
            info = json.loads(self.lock_path.read_text() or "null")
        except (FileNotFoundError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def acquire(self) -> "OwnedDir":
        """Own the run directory; ConfigError naming the owner when another run holds it."""
        if self._key is not None:
            return self
        make_dirs(self.path)
        key = os.path.realpath(self.path)
        with _HELD_GUARD:
            if key in _HELD:
                _HELD[key][1] += 1
            else:
                _HELD[key] = [self._lock_file(), 1]
        self._key = key
        self._finalizer = weakref.finalize(self, _release, key)
        return self

    def _lock_file(self) -> int:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(self.holder()) from None
            except (ImportError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP,
                                                                  errno.ENOSYS):
                    raise
                # No flock here: trust the recorded pid where we can check it (this host).
                held = self.holder()
                if held and (held.get("host") != socket.gethostname()
                             or pid_alive(int(held.get("pid", 0)))):
                    raise self._busy(held) from None
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _busy(self, held: dict | None) -> ConfigError:
        who = (f"pid {held.get('pid')} on host {held.get('host')}, started {held.get('started')}"
               if held else "a process that is still starting")
        hint = ("; if that run is gone (its host is down), delete the lock file"
                f" {self.lock_path}" if held and held.get("host") != socket.gethostname() else "")
        return ConfigError(f"run directory {self.path} is in use by another training run ({who});"
                           f" wait for it to finish or train into another directory (-o/--run-dir)"
                           f"{hint}")

    def release(self) -> None:
        """Give up ownership (the last holder in this process unlocks the directory)."""
        if self._finalizer is not None:
            self._finalizer()
        self._key = self._finalizer = None

    def __enter__(self) -> "OwnedDir":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunDir(OwnedDir):
    """A training run's directory (see the module docstring for the layout).

    Use :meth:`begin` to own it for a run, and the object as a context manager (or
    :meth:`release`) to give it up; reading (``meta``, ``committed``, ``load_block``) needs no lock.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._run: dict | None = None  # meta of the run this object owns (set by begin)
        self._data: dict | None = None  # per-block data records (set by begin)
        # The manifest's lines as this owner wrote them, {block: line} (read at a run's first
        # commit): a commit encodes its own entry only, not every committed block's again.
        self._lines: dict[int, str] | None = None

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    # --- a run -------------------------------------------------------------------------------

    def begin(self, params: dict, dataset, *, resume: bool = False,
              overwrite: bool = False) -> dict[int, object]:
        """Own the directory and start (or, with ``resume``, continue) a run in it.

        Returns the committed block models that belong to this run, ``{block: model}``: empty
        for a new run. Ownership lasts until :meth:`release` (or the end of a ``with`` block).

        Raises
        ------
        ConfigError
            Another run owns the directory; a new run where blocks are committed (without
            ``overwrite``); a resume whose parameters or data differ from the run's.
        """
        self.acquire()
        try:
            if resume:
                self.check_resumable(params, dataset)
                self._own(self.meta(), dataset)
                return {b: self.load_block(b) for b in self.belonging()}
            self._own(self.create(params, dataset, overwrite=overwrite), dataset)
            return {}
        except BaseException:
            self.release()
            raise

    def _own(self, meta: dict, dataset) -> None:
        self._run = meta
        self._data = blocks_data(dataset)
        self._lines = None  # read from the manifest at this run's first commit

    def create(self, params: dict, dataset, *, overwrite: bool = False) -> dict:
        """Start a new run; refuses a directory that already holds committed blocks unless
        ``overwrite`` (they are then deleted)."""
        if self.committed() and not overwrite:
            raise ConfigError(f"run directory {self.path} already holds committed blocks; "
                              "resume it with --resume, start afresh with --overwrite, or "
                              "choose another directory")
        meta = {"format": FORMAT, "params": params, "dataset": dataset_identity(dataset),
                "created": time.time()}
        self.clear()
        atomic_write_bytes(self.meta_path, json.dumps(meta, indent=2).encode())
        return meta

    def clear(self) -> None:
        """Forget every committed block (its owner starts the run afresh)."""
        if self._key is None:
            raise ConfigError(f"clearing {self.path} needs its lock (RunDir.acquire)")
        # The empty manifest first: from then on no old block counts as committed.
        self._lines = {}
        atomic_write_bytes(self.manifest_path, _manifest(self._lines))
        shutil.rmtree(self.path / "blocks", ignore_errors=True)

    def check_resumable(self, params: dict, dataset) -> None:
        """Raise ConfigError naming what differs when ``params``/``dataset`` do not match the run."""
        meta = self.meta()
        if meta.get("format") != FORMAT:
            older = isinstance(meta.get("format"), int) and meta["format"] < FORMAT
            raise ConfigError(
                f"{self.meta_path}: run format {meta.get('format')!r}, this rpicluster reads "
                f"format {FORMAT}" + ("; the run was written by an older rpicluster whose blocks "
                                      "do not record their parameters: train afresh with "
                                      "--overwrite" if older else ""))
        for key, value in params.items():
            if key in meta["params"] and meta["params"][key] != value:
                raise ConfigError(f"cannot resume {self.path}: parameter {key!r} was "
                                  f"{meta['params'][key]!r} in the run, now {value!r}")
        now = dataset_identity(dataset)
        for key in ("n_rows", "n_features", "n_blocks", "fingerprint"):
            if meta["dataset"][key] != now[key]:
                raise ConfigError(f"cannot resume {self.path}: the dataset changed ({key} was "
                                  f"{meta['dataset'][key]!r}, now {now[key]!r})")

    def committed(self) -> dict[int, dict]:
        """Blocks the manifest lists as committed: ``{block: entry}``."""
        try:
            blocks = json.loads(self.manifest_path.read_text())["blocks"]
        except FileNotFoundError:
            return {}
        return {int(b): entry for b, entry in blocks.items()}

    def verified(self) -> dict[int, dict]:
        """Committed blocks whose file is present and matches its recorded sha256."""
        good = {}
        for b, entry in self.committed().items():
            f = self.path / entry["file"]
            if f.is_file() and file_sha256(f) == entry["sha256"]:
                good[b] = entry
        return good

    def belonging(self) -> dict[int, dict]:
        """Verified blocks trained with the run's parameters on the run's data (see begin).

        A block that was not (another run wrote it here) is left out with a warning naming it,
        so it is trained again.
        """
        run = self._run or self.meta()
        good, foreign = {}, []
        for b, entry in self.verified().items():
            expected = self._data.get(b) if self._data is not None else entry.get("data")
            if entry.get("params") == run["params"] and entry.get("data") == expected:
                good[b] = entry
            else:
                foreign.append((b, entry))
        if foreign:
            b, entry = foreign[0]
            diff = [f"{k}={v!r}" for k, v in (entry.get("params") or {}).items()
                    if run["params"].get(k) != v] or ["other data"]
            warnings.warn(f"run directory {self.path}: {len(foreign)} committed block(s) "
                          f"({', '.join(str(b) for b, _ in foreign)}) were not trained with this "
                          f"run's parameters and data (block {b}: {', '.join(diff)}); training "
                          "them again", RPiClusterWarning, stacklevel=2)
        return good

    def commit_block(self, block: int, model, info: dict | None = None) -> dict:
        """Write block ``block``'s model, then record it in the manifest (in that order).

        The record holds the parameters and the data (store fingerprint, chunk checksums) the
        block was trained with, which resume checks.
        """
        rel = f"blocks/block-{block:06d}.skops"
        digest = save_model(model, self.path / rel)
        run = self._run or self.meta()
        entry = {"file": rel, "sha256": digest, "committed": time.time(), **(info or {}),
                 "params": run["params"],
                 "data": (self._data or {}).get(block)}
        if self._lines is None:
            self._lines = {b: _manifest_line(b, e) for b, e in self.committed().items()}
        self._lines[block] = _manifest_line(block, entry)
        atomic_write_bytes(self.manifest_path, _manifest(self._lines))
        return entry

    def load_block(self, block: int):
        entry = self.committed().get(block)
        if entry is None:
            raise ModelError(f"block {block} is not committed in {self.path}")
        return load_model(self.path / entry["file"], sha256=entry["sha256"])
