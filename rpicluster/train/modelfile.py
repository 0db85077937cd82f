"""Model files: skops archives, written atomically and deterministically, signed, and loaded
within limits without unpickling untrusted code.

A model file ``MODEL`` (skops format) is written to a temporary file in the same directory and
renamed into place, so a crash never leaves a half-written file under the final name. Its bytes
depend only on the model: skops names arrays and objects by ``id()`` and stamps members with the
clock, so the archive is rewritten with ids numbered in order and fixed timestamps (equal models,
byte-identical files). Its sha256 is written beside it (``MODEL.sha256``), and an HMAC-SHA256 of
that digest under this user's model key (``<rpicluster home>/model.key``, made 0600 on first
use) in ``MODEL.sig``: a checksum anyone can rewrite, a signature only this key can.

Loading checks, before any array is read: the archive's declared sizes (:data:`MAX_MODEL_BYTES`
in all, no member inflating more than :data:`MAX_INFLATION` times), every type named in its
schema against the types rpicluster writes (:data:`rpicluster.models.TRUSTED_TYPES` and what they
are made of: :data:`PARTS`), the recorded sha256, and the signature. A model file rpicluster did
not sign here (copied from another machine, or edited) is refused until the user vouches for it
with ``rpicluster trust MODEL`` (:func:`trust_model`), which signs it with this key.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import re
import secrets
import stat
import tempfile
import zipfile
from pathlib import Path

from rpicluster.errors import ModelError, WriteError, make_dirs

#: Largest total size a model archive may inflate to (its members' declared sizes).
#: ``RPICLUSTER_MAX_MODEL_BYTES`` overrides it.
MAX_MODEL_BYTES = 4 << 30
#: Largest ratio of a member's inflated to stored size (members over 1 MiB): rpicluster writes
#: its archives uncompressed (ratio 1); a zip bomb inflates hundreds of times.
MAX_INFLATION = 20
#: Types a model file's schema may name besides :data:`rpicluster.models.TRUSTED_TYPES`: the
#: containers, arrays, random state, label binarizer and SGD losses those estimators are made of.
PARTS = frozenset({
    "builtins.dict", "builtins.list", "builtins.tuple", "builtins.str", "builtins.int",
    "builtins.float", "builtins.bool", "builtins.NoneType", "numpy.ndarray", "numpy.dtype",
    "numpy.random.mtrand.RandomState", "sklearn.preprocessing._label.LabelBinarizer",
})
#: Modules whose every type is plain data (numpy scalars and dtypes, SGD loss objects).
PART_MODULES = ("numpy", "sklearn.linear_model._sgd_fast")
#: The signature file beside a model file, and its one line's prefix.
SIG_SUFFIX, SIG_PREFIX = ".sig", "hmac-sha256:"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` would, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (all or nothing).

    The file gets the mode a plain ``open`` would (0666 less the umask): it is an output, not a
    secret (``mkstemp`` alone would make every model and prediction file 0600).
    """
    path = Path(path)
    tmp = None
    try:
        make_dirs(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
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


# --- deterministic archives ---

_ID_FILE = re.compile(r"^(\d+)(\.\w+)$")


def deterministic_archive(data: bytes) -> bytes:
    """The skops archive ``data`` rewritten so that its bytes depend only on the model.

    skops names each array's member ``<id(obj)>.npy`` and records ``"__id__": id(obj)`` (memory
    addresses, new in every process) and stamps members with the current time. Here ids are
    renumbered 1, 2, ... in the schema's order, members are written in that order after
    ``schema.json`` with a fixed timestamp, and the schema is dumped as skops dumps it.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as src:
        schema = json.loads(src.read("schema.json"))
        ids: dict[str, int] = {}

        def new_id(old) -> int:
            return ids.setdefault(str(old), len(ids) + 1)

        files: list[tuple[str, str]] = []

        def walk(node):
            if isinstance(node, dict):
                for key, value in node.items():
                    if key == "__id__" and isinstance(value, int):
                        node[key] = new_id(value)
                    elif key == "file" and isinstance(value, str) and _ID_FILE.match(value):
                        old, suffix = _ID_FILE.match(value).groups()
                        node[key] = f"{new_id(old)}{suffix}"
                        if value not in dict(files):
                            files.append((value, node[key]))
                    else:
                        walk(value)
            elif isinstance(node, list):
                for item in node:
                    walk(item)

        walk(schema)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
            def put(name: str, payload: bytes) -> None:
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                dst.writestr(info, payload)

            put("schema.json", json.dumps(schema, indent=2).encode())
            for old, new in files:
                put(new, src.read(old))
    return out.getvalue()


# --- the model key and signatures ---

def key_path() -> Path:
    """This user's model signing key: ``<rpicluster home>/model.key``."""
    from rpicluster import config

    return config.state_dir() / "model.key"


def model_key() -> bytes:
    """This user's model signing key (32 random bytes), made mode 0600 on first use.

    Raises
    ------
    ModelError
        The key file is readable by other users or is not a 32-byte key.
    """
    path = key_path()
    try:
        make_dirs(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
    st = os.stat(path)
    if st.st_mode & 0o077 or st.st_uid != os.geteuid():
        raise ModelError(f"the model key {path} is not private (mode "
                         f"{stat.S_IMODE(st.st_mode):o}, uid {st.st_uid}): anyone who read it "
                         "can sign models; delete it (models signed with it then need "
                         "`rpicluster trust MODEL` again)")
    key = path.read_bytes()
    if len(key) != 32:
        raise ModelError(f"the model key {path} is damaged ({len(key)} bytes, not 32); delete it "
                         "(models signed with it then need `rpicluster trust MODEL` again)")
    return key


def _signature(digest: str) -> str:
    return hmac.new(model_key(), digest.encode(), hashlib.sha256).hexdigest()


def _write_sidecars(path: Path, digest: str) -> None:
    atomic_write_bytes(f"{path}.sha256", f"{digest}  {path.name}\n".encode())
    atomic_write_bytes(f"{path}{SIG_SUFFIX}", f"{SIG_PREFIX}{_signature(digest)}\n".encode())


def save_model(estimator, path: str | os.PathLike) -> str:
    """Save a fitted estimator to ``path`` (skops format, deterministic); returns its sha256.

    The file appears under its final name only once complete; ``path.sha256`` records the digest
    and ``path.sig`` its signature under this user's model key.
    """
    from rpicluster.train.archive import dumps

    path = Path(path)
    data = dumps(estimator)  # an Inc-kSGD/kSGD model without importing skops, as skops would
    if data is None:
        import skops.io as sio

        data = sio.dumps(estimator)
    data = deterministic_archive(data)
    atomic_write_bytes(path, data)
    digest = hashlib.sha256(data).hexdigest()
    _write_sidecars(path, digest)
    return digest


def trust_model(path: str | os.PathLike) -> str:
    """Vouch for the model file ``path``: sign it with this user's key; returns its sha256.

    For a model file written by rpicluster on another machine (or by another user). The archive
    must still pass every other check of :func:`load_model` (size limits, the types rpicluster
    writes): trusting a file does not make an unknown type loadable.

    Raises
    ------
    ModelError
        The file is missing, too large, not a skops archive, or holds other types.
    """
    path = Path(path)
    _check_archive(path)
    digest = file_sha256(path)
    _write_sidecars(path, digest)
    return digest


# --- checks before loading ---

def _max_model_bytes() -> int:
    raw = os.environ.get("RPICLUSTER_MAX_MODEL_BYTES", "").strip()
    try:
        return int(raw) if raw else MAX_MODEL_BYTES
    except ValueError:
        from dask.utils import parse_bytes

        return parse_bytes(raw)


def _types(node, found: set) -> set:
    if isinstance(node, dict):
        if "__class__" in node:
            found.add(f"{node.get('__module__')}.{node['__class__']}")
        for value in node.values():
            _types(value, found)
    elif isinstance(node, list):
        for item in node:
            _types(item, found)
    return found


def _check_sizes(path: Path) -> None:
    """Refuse an archive whose members' declared sizes pass the limits (nothing is inflated:
    ``zipfile`` never inflates a member past its declared size, so these bound what loads)."""
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    limit = _max_model_bytes()
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"{path} is not an rpicluster model file (skops archive): "
                         f"{exc}") from None
    for i in infos:
        if i.file_size > (1 << 20) and i.file_size > MAX_INFLATION * max(i.compress_size, 1):
            raise ModelError(
                f"model file {path} holds a member {i.filename!r} that inflates "
                f"{i.compress_size:,} bytes to {i.file_size:,} "
                f"({i.file_size // max(i.compress_size, 1)}x; rpicluster writes at most "
                f"{MAX_INFLATION}x): a zip bomb, not an rpicluster model; refusing to load it")
    total = sum(i.file_size for i in infos)
    if total > limit:
        raise ModelError(f"model file {path} would inflate to {total:,} bytes, more than the "
                         f"{limit:,} a model may (RPICLUSTER_MAX_MODEL_BYTES); refusing to load "
                         "it")


def _check_types(path: Path) -> list[str]:
    """Refuse an archive whose schema names a type rpicluster does not write; return its types."""
    try:
        with zipfile.ZipFile(path) as z:
            schema = json.loads(z.read("schema.json"))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise ModelError(f"{path} is not an rpicluster model file (skops archive): "
                         f"{exc}") from None
    from rpicluster.models import TRUSTED_TYPES

    top = (f"{schema.get('__module__')}.{schema.get('__class__')}" if isinstance(schema, dict)
           else type(schema).__name__)
    if top not in TRUSTED_TYPES:
        raise ModelError(f"model file {path} holds a {top}, which rpicluster does not write "
                         f"(it writes {', '.join(t.rsplit('.', 1)[1] for t in TRUSTED_TYPES)}); "
                         "refusing to load it")
    found = _types(schema, set())
    refused = sorted(t for t in found if t not in TRUSTED_TYPES and t not in PARTS
                     and not t.startswith(tuple(m + "." for m in PART_MODULES)))
    if refused:
        raise ModelError(f"model file {path} holds types rpicluster does not trust: {refused}; "
                         "refusing to load it")
    return sorted(found)


def _check_archive(path: Path) -> list[str]:
    _check_sizes(path)
    return _check_types(path)


def _recorded_sha256(path: Path) -> str | None:
    side = Path(f"{path}.sha256")
    if not side.is_file():
        return None
    fields = side.read_text(errors="replace").split()
    if not fields or not re.fullmatch(r"[0-9a-f]{64}", fields[0]):
        raise ModelError(f"{side} holds no sha256 (empty or damaged); delete it and, if you "
                         f"trust {path}, run `rpicluster trust {path}`")
    return fields[0]


def _check_signature(path: Path, digest: str) -> None:
    sig = Path(f"{path}{SIG_SUFFIX}")
    text = sig.read_text(errors="replace").strip() if sig.is_file() else ""
    if not text.startswith(SIG_PREFIX) or not hmac.compare_digest(
            text.removeprefix(SIG_PREFIX), _signature(digest)):
        why = "is not signed" if not text else "has a signature that does not match"
        raise ModelError(f"model file {path} {why} by this user's rpicluster key "
                         f"({key_path()}): it was written elsewhere or changed since; if you "
                         f"trust it, run `rpicluster trust {path}`")


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
        The file is missing, larger than the limits, not a skops archive, holds types outside
        those rpicluster writes (named in the message), its digest does not match, it is not
        signed with this user's key (see :func:`trust_model`), or its model is not of the
        ``expected`` kind.
    """
    path = Path(path)
    _check_sizes(path)
    if sha256 is None:
        sha256 = _recorded_sha256(path)
    actual = file_sha256(path)
    if sha256 is not None and actual != sha256:
        raise ModelError(f"model file {path} is corrupted: sha256 {actual} does not match "
                         f"the recorded {sha256}")
    trusted = _check_types(path)
    _check_signature(path, actual)
    from rpicluster.train.archive import read_model

    # An Inc-kSGD/kSGD file is rebuilt without importing skops (0.8 s of CPU here, seconds on
    # a Pi: it imports every scikit-learn estimator); anything else is skops' to read.
    model = read_model(path)
    if model is None:
        model = _load_with_skops(path, trusted)
    if expected is not None and not isinstance(model, expected):
        names = " or ".join(c.__name__ for c in (expected if isinstance(expected, tuple)
                                                 else (expected,)))
        raise ModelError(f"model file {path} holds a {type(model).__name__}, not a {names}; "
                         "give a model file made for this command")
    return model


def _load_with_skops(path: Path, trusted: list[str]):
    import skops.io as sio  # after the checks: its import alone takes seconds on a Pi

    try:
        return sio.load(path, trusted=trusted)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ModelError(f"model file {path} holds a pickled array (a .npy member with "
                             "Python objects), which rpicluster never loads: refusing it; use "
                             "a model file written by rpicluster") from None
        raise ModelError(f"model file {path} could not be loaded: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - skops raises many kinds for a damaged archive
        raise ModelError(f"model file {path} could not be loaded ({type(exc).__name__}: "
                         f"{exc}); it is damaged or not written by rpicluster") from None
