"""Model files: skops archives, written atomically, loaded without unpickling untrusted code.

A model file ``MODEL`` (skops format) is written to a temporary file in the same directory and
renamed into place, so a crash never leaves a half-written file under the final name. Its sha256
is written beside it (``MODEL.sha256``) and checked on load. Loading accepts only rpicluster's own
estimator types and the numpy/scikit-learn types they are made of
(:data:`rpicluster.models.TRUSTED_TYPES`); anything else in the file is refused by name.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from rpicluster.errors import ModelError, WriteError, make_dirs


def _trusted_types() -> list[str]:
    from rpicluster.models import TRUSTED_TYPES

    return list(TRUSTED_TYPES)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (all or nothing)."""
    path = Path(path)
    tmp = None
    try:
        make_dirs(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            err = WriteError(f"cannot write {path}: {exc.strerror or exc} ({len(data):,} "
                             "bytes); free space there, or write elsewhere")
            err.errno = exc.errno
            raise err from exc
        raise


def save_model(estimator, path: str | os.PathLike) -> str:
    """Save a fitted estimator to ``path`` (skops format); returns its sha256.

    The file appears under its final name only once complete; ``path.sha256`` records the digest.
    """
    import skops.io as sio

    data = sio.dumps(estimator)
    atomic_write_bytes(path, data)
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(f"{os.fspath(path)}.sha256", f"{digest}  {Path(path).name}\n".encode())
    return digest


def load_model(path: str | os.PathLike, *, sha256: str | None = None, expected=None):
    """Load a model saved by :func:`save_model`.

    Parameters
    ----------
    path
        The model file.
    sha256
        Expected digest; by default the one recorded in ``path.sha256`` when that file exists.
    expected
        A class or tuple of classes the model must be an instance of (a model file of another
        kind is refused by name).

    Raises
    ------
    ModelError
        The file is missing, its digest does not match, it is not a skops archive, or it holds
        types outside rpicluster's trusted list (named in the message), or its model is not
        of the ``expected`` kind.
    """
    import skops.io as sio

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if sha256 is None:
        side = Path(f"{path}.sha256")
        if side.is_file():
            sha256 = side.read_text().split()[0]
    if sha256 is not None:
        actual = file_sha256(path)
        if actual != sha256:
            raise ModelError(f"model file {path} is corrupted: sha256 {actual} does not match "
                             f"the recorded {sha256}")
    trusted = _trusted_types()
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # skops raises zipfile/JSON errors for non-archives
        raise ModelError(f"{path} is not an rpicluster model file (skops archive): {exc}") from exc
    refused = sorted(set(untrusted) - set(trusted))
    if refused:
        raise ModelError(f"model file {path} holds types rpicluster does not trust: {refused}; "
                         "refusing to load it")
    try:
        model = sio.load(path, trusted=trusted)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ModelError(f"model file {path} holds a pickled array (a .npy member with "
                             "Python objects), which rpicluster never loads: refusing it; use "
                             "a model file written by rpicluster") from None
        raise ModelError(f"model file {path} could not be loaded: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - skops raises many kinds for a damaged archive
        raise ModelError(f"model file {path} could not be loaded ({type(exc).__name__}: "
                         f"{exc}); it is damaged or not written by rpicluster") from None
    if expected is not None and not isinstance(model, expected):
        names = " or ".join(c.__name__ for c in (expected if isinstance(expected, tuple)
                                                 else (expected,)))
        raise ModelError(f"model file {path} holds a {type(model).__name__}, not a {names}; "
                         "give a model file made for this command")
    return model
