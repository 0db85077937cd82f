"""Reading the Zarr dataset store: :func:`open_dataset`, :class:`Dataset`, the per-block checks
(layout: :mod:`rpicluster.data.layout`)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from rpicluster.data.layout import (CHECKSUMS_KEY, FORMAT_KEY, READABLE_VERSIONS, Y_FILL,
                                    check_codes, crc, normalize_url)
from rpicluster.errors import DataError, DataWarning, StoreIncompleteError


def open_dataset(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None
                 ) -> "Dataset":
    """Open a complete rpicluster store for reading.

    Parameters
    ----------
    url : str or path
        A local path, ``http(s)://...`` (for example ``rpicluster serve``), ``s3://...`` or any
        fsspec URL (the matching fsspec backend must be installed, e.g. s3fs).
    storage_options : mapping, optional
        fsspec options (credentials, endpoint...), passed to the backend.

    Returns
    -------
    Dataset

    Raises
    ------
    DataError
        Nothing there, not an rpicluster store, an unknown format version, or inconsistent
        metadata.
    StoreIncompleteError
        The store has no completion marker (an interrupted ingest).
    """
    dataset = Dataset(url, storage_options)
    dataset._open()
    return dataset


def _damaged(where: str, exc: Exception) -> str:
    """One line for a metadata file that is not valid JSON or not Zarr metadata."""
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return (f"{where} is damaged ({type(exc).__name__}: {first}); restore it from a copy, or "
            "re-ingest the store (rpicluster ingest SOURCE OUT.zarr --overwrite)")


class Dataset:
    """A complete rpicluster store opened for reading (see :func:`open_dataset`).

    Pickling keeps only ``url`` and ``storage_options``: a Dask task ships the Dataset and the
    worker opens (and validates) the store itself on first use.

    Attributes
    ----------
    url : str
    storage_options : dict or None
    n_rows, n_features, block_rows, n_blocks : int
    classes : ndarray
        Original labels (int64 or str), sorted; ``y`` codes index into it.
    attrs : dict
        All group attributes.
    """

    def __init__(self, url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None):
        self.url = normalize_url(url)
        self.storage_options = dict(storage_options) if storage_options else None
        self._arrays = None

    def __getstate__(self):
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state):
        self.url, self.storage_options = state["url"], state["storage_options"]
        self._arrays = None

    def __dask_tokenize__(self):
        return ("rpicluster.Dataset", self.url, repr(sorted((self.storage_options or {}).items())))

    def __repr__(self) -> str:
        if self._arrays is None:
            return f"Dataset({self.url!r})"
        return (f"Dataset({self.url!r}, rows={self.n_rows}, features={self.n_features}, "
                f"classes={len(self.classes)}, blocks={self.n_blocks})")

    def _open(self):
        if self._arrays is None:
            self._arrays = self._validate()
        return self._arrays

    def _validate(self) -> dict:
        import zarr
        from zarr.errors import GroupNotFoundError

        from rpicluster.data.source import classes_from_json

        try:
            group = zarr.open_group(self.url, mode="r", zarr_format=3,
                                    storage_options=self.storage_options)
        except (FileNotFoundError, GroupNotFoundError):
            raise DataError(f"no Zarr store at {self.url}") from None
        except OSError as exc:
            raise DataError(f"cannot open the store at {self.url}: {exc}") from None
        except (ValueError, TypeError) as exc:  # JSONDecodeError, or metadata zarr refuses
            raise DataError(_damaged(f"{self.url}/zarr.json", exc)) from None
        attrs = dict(group.attrs)
        version = attrs.get(FORMAT_KEY)
        if version is None:
            raise DataError(f"{self.url} is not an rpicluster store (no {FORMAT_KEY!r} attribute)")
        if version not in READABLE_VERSIONS:
            raise DataError(f"{self.url}: unknown format version {version!r} in attribute "
                            f"{FORMAT_KEY!r} (this rpicluster reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}); re-ingest it with this "
                            "rpicluster (rpicluster ingest SOURCE OUT.zarr --overwrite)")
        if attrs.get("complete") is not True:
            raise StoreIncompleteError(
                f"{self.url} is incomplete (no completion marker; {attrs.get('blocks_written', 0)}"
                f" of {attrs.get('n_blocks', '?')} blocks written): an interrupted ingest; "
                "resume it with `rpicluster ingest ... --resume`")
        for key in ("classes", "n_rows", "n_features", "block_rows", "n_blocks"):
            if key not in attrs:
                raise DataError(f"{self.url}: attribute {key!r} is missing")
        n, d, b = attrs["n_rows"], attrs["n_features"], attrs["block_rows"]
        if version >= 2:
            sums = attrs.get(CHECKSUMS_KEY)
            n_blocks = math.ceil(n / b) if b else 0
            if not (isinstance(sums, dict) and all(
                    isinstance(sums.get(k), list) and len(sums[k]) == n_blocks for k in "Xy")):
                raise DataError(f"{self.url}: attribute {CHECKSUMS_KEY!r} is missing or does not "
                                f"list {n_blocks} checksums for X and y; re-ingest it "
                                "(rpicluster ingest SOURCE OUT.zarr --overwrite)")
        arrays = {}
        for name, shape, chunks, kind in (("X", (n, d), (b, d), "f"), ("y", (n,), (b,), "i")):
            try:
                arr = group[name]
            except KeyError:
                raise DataError(f"{self.url}: array {name!r} is missing") from None
            except (ValueError, TypeError) as exc:
                raise DataError(_damaged(f"{self.url}/{name}/zarr.json", exc)) from None
            if name == "X" and arr.dtype == np.uint8 and "image_shape" in attrs:
                kind = "u"  # an image store: uint8 pixels
            if arr.shape != shape or arr.chunks != chunks or arr.dtype.kind != kind:
                raise DataError(f"{self.url}: array {name!r} has shape {arr.shape}, chunks "
                                f"{arr.chunks}, dtype {arr.dtype}; the attributes say shape "
                                f"{shape}, chunks {chunks}, dtype kind {kind!r}")
            if not any(c.to_dict().get("name") == "crc32c" for c in arr.compressors):
                raise DataError(f"{self.url}: array {name!r} has no crc32c checksum codec")
            arrays[name] = arr
        self.attrs = attrs
        self.n_rows, self.n_features, self.block_rows = int(n), int(d), int(b)
        self.n_blocks = math.ceil(self.n_rows / self.block_rows)
        self.classes = classes_from_json(attrs["classes"])
        return arrays

    def __getattr__(self, name):
        # Metadata attributes appear once the store is opened; after unpickling that happens on
        # first access (on the worker), not at unpickle time.
        if name in ("attrs", "n_rows", "n_features", "block_rows", "n_blocks", "classes"):
            self._open()
            return self.__dict__[name]
        raise AttributeError(name)

    @property
    def nbytes(self) -> int:
        """Bytes of X and y (uncompressed, without the 4-byte checksum per chunk)."""
        return self.n_rows * (self.n_features * self.itemsize + 4)

    @property
    def itemsize(self) -> int:
        """Bytes per value of ``X``: 4 (float32 features) or 1 (uint8 image store)."""
        return self._open()["X"].dtype.itemsize

    @property
    def shuffled(self) -> bool | None:
        """Whether ingest shuffled the rows (None for stores that do not record it)."""
        value = self.attrs.get("shuffle")
        return None if value is None else bool(value)

    def check_trainable(self, n_clusters: int, *, allow_skewed: bool = False) -> None:
        """Refuse a store Inc-kSGD cannot train well on, before any task runs.

        Raises
        ------
        DataError
            A block with fewer rows than ``n_clusters`` (naming it and a ``--block-rows`` that
            works), or a store ingested with ``--no-shuffle`` whose blocks are class-skewed
            (unless ``allow_skewed``; a shuffled store with skewed blocks only warns, a
            :class:`~rpicluster.errors.DataWarning`).
        """
        import warnings

        lo, hi = self.block_slice(self.n_blocks - 1)
        if self.n_rows < n_clusters:
            raise DataError(f"{self.url} holds {self.n_rows} rows, fewer than "
                            f"n_clusters={n_clusters} (--clusters): lower --clusters to "
                            f"{self.n_rows} or less, or ingest more rows")
        if hi - lo < n_clusters:
            raise DataError(
                f"{self.url}: block {self.n_blocks - 1} holds {hi - lo} rows, fewer than "
                f"n_clusters={n_clusters} (--clusters): re-ingest with a --block-rows whose last "
                f"block keeps >= {n_clusters} rows (e.g. "
                f"{_fitting_block_rows(self.n_rows, self.block_rows, n_clusters)}), or lower "
                "--clusters")
        if len(self.classes) < 2:  # ingest refuses these; a store written otherwise can hold one
            warnings.warn(f"{self.url} holds a single class ({self.classes.tolist()[0]!r}): the "
                          "model will predict it for every row; ingest data with at least two "
                          "classes", DataWarning, stacklevel=3)
            return
        skewed = skewed_blocks(self)
        if not skewed:
            return
        b, seen, expected = skewed[0]
        text = (f"{self.url}: {len(skewed)} of {self.n_blocks} blocks are class-skewed (block "
                f"{b} holds {seen} of {len(self.classes)} classes, a random sample "
                f"~{expected:.0f}); each block model votes on classes it never saw")
        if self.attrs.get("shuffle") is False and not allow_skewed:
            raise DataError(f"{text}. The store was ingested with --no-shuffle: ingest it again "
                            "without it (or pass allow_skewed / --allow-skewed to train anyway)")
        warnings.warn(text, DataWarning, stacklevel=3)

    def block_slice(self, i: int) -> tuple[int, int]:
        """Rows ``(start, stop)`` of block ``i``."""
        if not 0 <= i < self.n_blocks:
            raise DataError(f"{self.url}: block {i} does not exist (blocks 0..{self.n_blocks - 1})")
        start = i * self.block_rows
        return start, min(start + self.block_rows, self.n_rows)

    def block(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(X_i float32 (rows, n_features), y_i int32 codes)`` of block ``i``.

        Raises
        ------
        DataError
            A chunk that is missing or fails its checksum, naming the array and chunk.
        """
        return self.read("X", i), self.read("y", i)

    def read(self, name: str, i: int) -> np.ndarray:
        """Block ``i`` of array ``name`` (``"X"`` or ``"y"``), checked (see :meth:`block`)."""
        arr = self._open()[name]
        start, stop = self.block_slice(i)
        coords = (i, 0) if name == "X" else (i,)
        key = f"{name}/{arr.metadata.encode_chunk_key(coords)}"
        try:
            data = self._read_local_chunk(arr, key, stop - start)
            if data is None:
                data = arr[start:stop]
        except ValueError as exc:
            raise DataError(f"{self.url}: array {name!r} chunk {key!r} (block {i}) is corrupted "
                            f"or truncated ({exc})") from None
        except OSError as exc:
            raise DataError(f"{self.url}: array {name!r} chunk {key!r} (block {i}) could not be "
                            f"read ({exc})") from None
        if name == "y":
            missing = data.min() == Y_FILL
        elif data.dtype.kind == "f":
            missing = np.isnan(data.min())
        else:  # uint8 pixels: 0 is a valid value, so ask the store whether the chunk is there
            from zarr.core.sync import sync

            missing = not sync(arr.store.exists(f"{arr.path}/{key.split('/', 1)[1]}"))
        if missing:
            raise DataError(f"{self.url}: array {name!r} chunk {key!r} (block {i}) is missing "
                            "(it reads as the fill value, which ingest never writes): the store "
                            "is damaged or was copied partially")
        return verify_chunk(self, name, i, data, key)

    def _read_local_chunk(self, arr, key: str, rows: int) -> np.ndarray | None:
        """Block ``rows`` of one chunk of a local store, read straight into the returned array.

        zarr's own read holds the file's bytes, the checksum codec's output and the decoded
        array at once (about three blocks for a moment); here the chunk file is read into one
        buffer with ``readinto``, its crc32c checked in place, and the array is a writable view
        of that buffer (the training task sorts it in place). Returns None where this fast path
        does not apply (a URL store, another codec chain), and zarr reads the chunk instead.
        """
        import google_crc32c

        if "://" in self.url or not _plain_checksummed(arr):
            return None
        path = os.path.join(self.url, *key.split("/"))
        shape = arr.chunks
        nbytes = math.prod(shape) * arr.dtype.itemsize
        # uint8 buffer of whole 8-byte words: the view below is aligned for any dtype
        buf = np.empty(nbytes + 8, dtype=np.uint8)
        try:
            with open(path, "rb", buffering=0) as f:
                got = f.readinto(memoryview(buf)[:nbytes + 4])
                extra = f.read(1)
        except FileNotFoundError:
            return None  # zarr reads it as the fill value, reported below as missing
        if got != nbytes + 4 or extra:
            raise ValueError(f"chunk file has {got + len(extra)} bytes, expected {nbytes + 4}")
        payload = buf[:nbytes].view()
        payload.flags.writeable = False  # google_crc32c takes read-only buffers only
        computed = np.uint32(google_crc32c.value(payload)).tobytes()
        if computed != buf[nbytes:nbytes + 4].tobytes():
            raise ValueError("stored and computed checksum do not match")
        dtype = arr.dtype.newbyteorder("<")
        data = buf[:nbytes].view(dtype).reshape(shape)[:rows]
        return data if dtype.isnative else data.astype(arr.dtype.newbyteorder("="))

    def _dask(self, name: str):
        import dask
        import dask.array as da

        read = dask.delayed(_read, pure=True)
        parts = []
        for i in range(self.n_blocks):
            start, stop = self.block_slice(i)
            shape = (stop - start, self.n_features) if name == "X" else (stop - start,)
            dtype = (np.uint8 if self.itemsize == 1 else np.float32) if name == "X" else np.int32
            parts.append(da.from_delayed(read(self, name, i), shape=shape, dtype=dtype))
        return da.concatenate(parts)

    @property
    def X(self):
        """Features as a dask array, one chunk per block (each read checked like :meth:`block`)."""
        return self._dask("X")

    @property
    def y(self):
        """Class codes as a dask array, one chunk per block."""
        return self._dask("y")


def _plain_checksummed(arr) -> bool:
    """Whether ``arr``'s chunks are stored as the layout says: raw little-endian bytes, then a
    crc32c (so that :meth:`Dataset._read_local_chunk` can decode them itself)."""
    codecs = [c.to_dict() for c in (*arr.filters, arr.serializer, *arr.compressors)
              if c is not None]
    return (len(codecs) == 2 and codecs[0].get("name") == "bytes"
            and codecs[0].get("configuration", {}).get("endian", "little") == "little"
            and codecs[1].get("name") == "crc32c"
            and arr.metadata.chunk_key_encoding.to_dict().get("name") == "default")


def _read(dataset: Dataset, name: str, i: int) -> np.ndarray:
    return dataset.read(name, i)


def _fitting_block_rows(n_rows: int, block_rows: int, n_clusters: int) -> int:
    """The block size nearest ``block_rows`` whose last block has ``n_clusters`` rows or more:
    the largest one not above it, else the smallest one above it (``n_rows >= n_clusters``)."""
    def fits(b: int) -> bool:
        return n_rows - (n_rows - 1) // b * b >= n_clusters

    below = range(min(block_rows, n_rows), n_clusters - 1, -1)
    return next((b for b in below if fits(b)),
                next((b for b in range(block_rows + 1, n_rows) if fits(b)), n_rows))


def expected_classes(class_counts, rows: int) -> float:
    """Distinct classes expected in ``rows`` rows drawn at random from data with these counts."""
    counts = np.asarray(class_counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0 or rows <= 0:
        return 0.0
    p = counts / total
    # sampling without replacement holds at least as many classes; this is a safe lower side
    return float(np.sum(1.0 - (1.0 - p) ** rows))


def skewed_blocks(dataset: "Dataset", ratio: float = 0.5) -> list[tuple[int, int, float]]:
    """Blocks holding fewer than ``ratio`` times the classes a random sample would.

    Returns
    -------
    list of (block, distinct classes, expected distinct classes)
        Empty for stores written before class spreads were recorded.
    """
    spread = dataset.attrs.get("block_classes")
    counts = dataset.attrs.get("class_counts")
    if not spread or counts is None or len(spread) != dataset.n_blocks:
        return []
    out = []
    for b, seen in enumerate(spread):
        lo, hi = dataset.block_slice(b)
        expected = expected_classes(counts, hi - lo)
        if seen < ratio * expected:
            out.append((b, int(seen), expected))
    return out


def class_spread_text(dataset: "Dataset") -> str | None:
    """One line about the classes per block, e.g. ``classes per block: 3-3 of 3``."""
    spread = dataset.attrs.get("block_classes")
    if not spread:
        return None
    n = len(dataset.classes)
    how = "shuffled" if dataset.attrs.get("shuffle") else "source order"
    return (f"classes per block: min {min(spread)}, median {int(np.median(spread))}, max "
            f"{max(spread)} of {n} ({how})")


def chunk_checksums(dataset: "Dataset", block: int) -> dict | None:
    """``{"X": crc, "y": crc}`` recorded at ingest for ``block``; None in a format-1 store."""
    sums = dataset.attrs.get(CHECKSUMS_KEY)
    return None if sums is None else {k: int(sums[k][block]) for k in ("X", "y")}


def verify_chunk(dataset: "Dataset", name: str, block: int, data: np.ndarray, key: str
                 ) -> np.ndarray:
    """Check that ``data``, read from chunk ``key``, is block ``block``'s data of array ``name``.

    Its crc32c must be the one ingest recorded for the position (format 2), and class codes must
    index the class list. Returns ``data``.

    Raises
    ------
    DataError
        Naming the array, chunk and block, and which block's data the chunk holds if any.
    """
    where = f"{dataset.url}: array {name!r} chunk {key!r} (block {block})"
    sums = dataset.attrs.get(CHECKSUMS_KEY)
    if sums is not None:
        got, recorded = crc(data), sums[name]
        if got != recorded[block]:
            other = [b for b, c in enumerate(recorded) if c == got and b != block]
            what = f"it holds block {other[0]}'s data" if other else "its data is not what ingest wrote"
            raise DataError(f"{where} does not hold block {block}'s data ({what}: crc32c "
                            f"{got:#010x}, recorded at ingest {recorded[block]:#010x}): the store "
                            "was altered after ingest; re-ingest it (rpicluster ingest SOURCE "
                            "OUT.zarr --overwrite)")
    if name == "y":
        check_codes(data, len(dataset.classes), where)
    return data


def block_label_counts(dataset: "Dataset", block: int) -> np.ndarray:
    """Rows of each class (in ``dataset.classes`` order) in block ``block``; a small task."""
    return np.bincount(dataset.read("y", block), minlength=len(dataset.classes))
