"""The Zarr dataset store: layout contract, ingest, open, validation.

Layout (format version 2; docs/data-format.md is the user-facing copy)
----------------------------------------------------------------------
A Zarr v3 group holding:

``X``
    float32, shape ``(n_rows, n_features)``, chunks ``(block_rows, n_features)``: chunk row ``i``
    is training block ``i`` (rows ``i*block_rows`` up to ``min((i+1)*block_rows, n_rows)``).
    Fill value NaN.
``y``
    int32 class codes (indices into ``classes``), shape ``(n_rows,)``, chunks ``(block_rows,)``.
    Fill value -1.

Both arrays use the codecs ``bytes`` + ``crc32c`` (a checksum on every chunk, no compression:
float features barely compress and Pis decode faster without it) and no sharding (one file per
chunk, so writers of different blocks never touch the same object). Every chunk is written, even
an all-zero one (``write_empty_chunks``).

Group attributes:

``rpicluster_format``   format version (int, 2)
``classes``             sorted original labels (JSON ints or strings); ``y`` holds their indices
``n_rows``, ``n_features``, ``block_rows``, ``n_blocks``
``source``              what was ingested (``npz:/path``, ``sklearn:digits``, ``synthetic:...``)
``created``             ISO-8601 UTC time the ingest started
``blocks_written``      blocks fully written so far (where ``--resume`` continues)
``complete``            the completion marker: ``true`` only after every chunk is written, set by
                        the last write of an ingest
``chunk_crc32c``        ``{"X": [...], "y": [...]}``: per chunk position (block), the crc32c of the
                        block's rows as written (little-endian float32 / int32 bytes); ingest
                        appends one per block with ``blocks_written``

Readers refuse a store with no or an unknown ``rpicluster_format`` and one whose ``complete`` is
not true (:class:`~rpicluster.errors.StoreIncompleteError`). Zarr reads a missing chunk as the
fill value; ingest never writes NaN or -1, so a read that finds them reports the chunk as
missing. A checksum mismatch (a corrupted or truncated chunk) is reported with the chunk's key.

The codec's crc32c proves a chunk is intact, not that it is the chunk of its position: a chunk
copied over another block's is intact. Reads therefore also check every block against the
``chunk_crc32c`` recorded for its position at ingest, and every class code against the class
list (codes ``0 .. len(classes) - 1``); either failure names the array, chunk and block
(:func:`verify_chunk`). Stores of format 1 (no ``chunk_crc32c``) are still read, with the class
code check only; ``rpicluster ingest ... --overwrite`` rewrites them as format 2.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from rpicluster import config
from rpicluster.errors import ConfigError, DataError, RPiClusterError, StoreIncompleteError
from rpicluster.progress import Progress

FORMAT_VERSION = 2
#: Versions this rpicluster reads: 1 lacks the per-position checksums (class codes still checked).
READABLE_VERSIONS = (1, 2)
CHECKSUMS_KEY = "chunk_crc32c"
FORMAT_KEY = "rpicluster_format"
X_FILL = float("nan")
Y_FILL = -1


def ingest(source, out: str | os.PathLike, *, block_rows: int = config.BLOCK_ROWS,
           label_column: str | None = None, labels: str | os.PathLike | None = None,
           resume: bool = False, overwrite: bool = False,
           storage_options: Mapping[str, Any] | None = None,
           progress: Progress | None = None) -> "Dataset":
    """Write a source into a Zarr store block by block (see the module docstring for the layout).

    Memory stays at about two blocks whatever the source's size (svmlight files, held whole as a
    sparse matrix, are the exception).

    Parameters
    ----------
    source : str, path or :class:`~rpicluster.data.sources.Source`
        A file (``.npz``, ``.npy``, ``.csv``, svmlight), ``sklearn:NAME`` or
        ``synthetic:rows=..,features=..,classes=..,seed=..``.
    out : str or path
        Store location: a local path or an fsspec URL.
    block_rows : int
        Rows per block (one chunk row of ``X``).
    label_column : str, optional
        CSV label column.
    labels : path, optional
        Labels ``.npy`` of a ``.npy`` features file.
    resume : bool
        Continue an interrupted ingest of the same source from its last complete block.
    overwrite : bool
        Replace an existing rpicluster store at ``out``.
    storage_options : mapping, optional
        fsspec options for a URL ``out``.
    progress : Progress, optional
        Not yet entered; ingest sets its total (blocks) and advances it per block.

    Returns
    -------
    Dataset
        The finished store, opened.

    Raises
    ------
    DataError
        Invalid data (naming the row), an existing store that would be overwritten, or a store to
        resume that holds a different source. A failure mid-way leaves the store marked
        incomplete, to be resumed.
    """
    import zarr

    from rpicluster.data.sources import Source, classes_to_json, open_source

    if block_rows < 1:
        raise ConfigError(f"block_rows must be >= 1, got {block_rows}")
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other")
    src = source if isinstance(source, Source) else open_source(
        source, labels=labels, label_column=label_column)
    url = _normalize_url(out)
    n_blocks = math.ceil(src.n_rows / block_rows)
    layout = {
        FORMAT_KEY: FORMAT_VERSION,
        "classes": classes_to_json(src.classes),
        "n_rows": src.n_rows,
        "n_features": src.n_features,
        "block_rows": block_rows,
        "n_blocks": n_blocks,
        "source": src.description,
    }
    existing = _existing_attrs(url, storage_options)
    start = 0
    if existing is not None and not overwrite:
        state = "complete" if existing.get("complete") is True else "incomplete"
        if not resume:
            hint = ("pass overwrite (--overwrite) to replace it" if state == "complete" else
                    "pass resume (--resume) to continue it, or overwrite (--overwrite)")
            raise DataError(f"{url} already holds a {state} rpicluster store "
                            f"({existing.get('source')}); {hint}")
        diff = [k for k in layout if existing.get(k) != layout[k]]
        if diff:
            k = diff[0]
            raise DataError(f"cannot resume {url}: its {k} is {_short(existing.get(k))}, this "
                            f"ingest's is {_short(layout[k])} (use overwrite to start over)")
        if state == "complete":
            return open_dataset(url, storage_options)
        start = int(existing.get("blocks_written", 0))
        root = zarr.open_group(url, mode="r+", zarr_format=3, storage_options=storage_options)
    else:
        root = _create(url, src, block_rows, layout, storage_options)
    X, y = root["X"], root["y"]
    sums = {k: list(v)[:start] for k, v in root.attrs.get(CHECKSUMS_KEY, {}).items()}
    sums = {"X": sums.get("X", []), "y": sums.get("y", [])}
    progress = Progress.null() if progress is None else progress
    progress.total, progress.completed = n_blocks, start
    written = start
    with progress:
        try:
            for Xb, yb in src.blocks(block_rows, start):
                lo = written * block_rows
                Xb, yb = np.asarray(Xb, dtype=np.float32), np.asarray(yb, dtype=np.int32)
                _check_codes(yb, len(src.classes), f"{src.description}: block {written}")
                X[lo:lo + len(yb)] = Xb
                y[lo:lo + len(yb)] = yb
                sums["X"].append(_crc(Xb))
                sums["y"].append(_crc(yb))
                written += 1
                # Recorded only after both chunks are stored: resume restarts from here.
                root.attrs.update({"blocks_written": written, CHECKSUMS_KEY: sums})
                progress.advance(note=f"{lo + len(yb)} rows")
        except RPiClusterError as exc:
            raise DataError(f"{exc} [ingest stopped: {url} holds {written} of {n_blocks} blocks "
                            "and is marked incomplete; fix the source and resume, or overwrite]"
                            ) from exc
        root.attrs.update({"complete": True})
    return open_dataset(url, storage_options)


def _crc(a: np.ndarray) -> int:
    """crc32c of an array's rows as little-endian bytes (the layout's per-position checksum)."""
    import google_crc32c

    return int(google_crc32c.value(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
                                   .tobytes()))


def _check_codes(codes: np.ndarray, n_classes: int, where: str) -> None:
    """DataError naming ``where`` when a class code is outside ``0 .. n_classes - 1``."""
    bad = (codes < 0) | (codes >= n_classes)
    if bad.any():
        raise DataError(f"{where} holds class code {int(codes[bad][0])} ({int(bad.sum())} rows "
                        f"with impossible codes), but the store has {n_classes} classes (codes "
                        f"0..{n_classes - 1})")


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
        crc, recorded = _crc(data), sums[name]
        if crc != recorded[block]:
            other = [b for b, c in enumerate(recorded) if c == crc and b != block]
            what = f"it holds block {other[0]}'s data" if other else "its data is not what ingest wrote"
            raise DataError(f"{where} does not hold block {block}'s data ({what}: crc32c "
                            f"{crc:#010x}, recorded at ingest {recorded[block]:#010x}): the store "
                            "was altered after ingest; re-ingest it (rpicluster ingest SOURCE "
                            "OUT.zarr --overwrite)")
    if name == "y":
        _check_codes(data, len(dataset.classes), where)
    return data


def block_label_counts(dataset: "Dataset", block: int) -> np.ndarray:
    """Rows of each class (in ``dataset.classes`` order) in block ``block``; a small task."""
    return np.bincount(dataset.read("y", block), minlength=len(dataset.classes))


def _create(url, src, block_rows, layout, storage_options):
    import zarr
    from zarr.codecs import BytesCodec, Crc32cCodec

    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    root = zarr.open_group(url, mode="w", zarr_format=3, storage_options=storage_options,
                           attributes={**layout, "created": created, "blocks_written": 0,
                                       "complete": False, CHECKSUMS_KEY: {"X": [], "y": []}})
    common = dict(serializer=BytesCodec(), compressors=[Crc32cCodec()], filters=None,
                  config={"write_empty_chunks": True})
    root.create_array("X", shape=(src.n_rows, src.n_features), dtype="float32",
                      chunks=(block_rows, src.n_features), fill_value=X_FILL, **common)
    root.create_array("y", shape=(src.n_rows,), dtype="int32", chunks=(block_rows,),
                      fill_value=Y_FILL, **common)
    return root


def _existing_attrs(url: str, storage_options) -> dict | None:
    """Attributes of an rpicluster store at ``url``; None when nothing is there.

    Raises DataError when something that is not an rpicluster store is there, so that overwrite
    never deletes an unrelated directory.
    """
    import zarr

    if "://" not in url:
        if not os.path.exists(url):
            return None
        if os.path.isdir(url) and not os.listdir(url):
            return None
    try:
        group = zarr.open_group(url, mode="r", zarr_format=3, storage_options=storage_options)
    except FileNotFoundError:
        if "://" in url:
            return None
        raise DataError(f"{url} exists and is not a Zarr store; refusing to write there") from None
    except Exception as exc:  # noqa: BLE001 - zarr raises many kinds for foreign content
        raise DataError(f"{url} exists and is not a readable Zarr store ({exc}); "
                        "refusing to write there") from None
    attrs = dict(group.attrs)
    if FORMAT_KEY not in attrs:
        raise DataError(f"{url} is a Zarr store but not an rpicluster one (no {FORMAT_KEY!r} "
                        "attribute); refusing to write there")
    return attrs


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _normalize_url(url: str | os.PathLike) -> str:
    text = os.fspath(url)
    if "://" in text:
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text))


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
        self.url = _normalize_url(url)
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

        from rpicluster.data.sources import classes_from_json

        try:
            group = zarr.open_group(self.url, mode="r", zarr_format=3,
                                    storage_options=self.storage_options)
        except (FileNotFoundError, GroupNotFoundError):
            raise DataError(f"no Zarr store at {self.url}") from None
        except OSError as exc:
            raise DataError(f"cannot open the store at {self.url}: {exc}") from None
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
        return self.n_rows * (self.n_features * 4 + 4)

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
            data = arr[start:stop]
        except ValueError as exc:
            raise DataError(f"{self.url}: array {name!r} chunk {key!r} (block {i}) is corrupted "
                            f"or truncated ({exc})") from None
        except OSError as exc:
            raise DataError(f"{self.url}: array {name!r} chunk {key!r} (block {i}) could not be "
                            f"read ({exc})") from None
        missing = np.isnan(data.min()) if name == "X" else data.min() == Y_FILL
        if missing:
            raise DataError(f"{self.url}: array {name!r} chunk {key!r} (block {i}) is missing "
                            "(it reads as the fill value, which ingest never writes): the store "
                            "is damaged or was copied partially")
        return verify_chunk(self, name, i, data, key)

    def _dask(self, name: str):
        import dask
        import dask.array as da

        read = dask.delayed(_read, pure=True)
        parts = []
        for i in range(self.n_blocks):
            start, stop = self.block_slice(i)
            shape = (stop - start, self.n_features) if name == "X" else (stop - start,)
            dtype = np.float32 if name == "X" else np.int32
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


def _read(dataset: Dataset, name: str, i: int) -> np.ndarray:
    return dataset.read(name, i)
