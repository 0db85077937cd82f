"""The Zarr dataset store: layout contract, ingest, open, validation.

Layout (format version 2; docs/data-format.md is the user-facing copy)
----------------------------------------------------------------------
A Zarr v3 group holding:

``X``
    float32, shape ``(n_rows, n_features)``, chunks ``(block_rows, n_features)``: chunk row ``i``
    is training block ``i`` (rows ``i*block_rows`` up to ``min((i+1)*block_rows, n_rows)``).
    Fill value NaN. An **image store** (``images:DIR``) holds uint8 pixels instead: each row is
    one image flattened in (height, width, channel) order, the attribute ``image_shape`` gives
    ``[height, width, channels]``, the fill value is 0 and a missing chunk is found by its
    absent key (0 is a valid pixel).
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
``shuffle``             ``{"seed": s}`` when rows were shuffled at ingest (the default), ``false``
                        when the source order was kept (``--no-shuffle``)
``split``               with ``--test-fraction``: ``{"part": "train"|"test", "fraction": f,
                        "seed": s}``; both stores share ``classes``
``class_counts``        rows per class (indices as ``classes``) in this store
``block_classes``       distinct classes in each block (how well each block samples the classes)
``image_shape``         image stores only: ``[height, width, channels]`` of every uint8 row
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
from rpicluster.errors import (ConfigError, DataError, DataWarning, RPiClusterError,
                               StoreIncompleteError, WriteError, make_dirs)
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
           shuffle: bool = True, seed: int = 0, test_fraction: float | None = None,
           test_out: str | os.PathLike | None = None, source_options: Mapping | None = None,
           resume: bool = False, overwrite: bool = False,
           storage_options: Mapping[str, Any] | None = None,
           progress: Progress | None = None) -> "Dataset":
    """Write a source into a Zarr store block by block (see the module docstring for the layout).

    Rows are shuffled by default (seeded): Inc-kSGD trains one model per block and needs every
    block to be a random sample of the data, and most sources (image folders, CSV exports,
    scikit-learn's iris) come sorted by label. Sources larger than memory are shuffled in two
    passes: rows are scattered into one bucket file per block in a temporary folder beside
    ``out`` (as much disk as the data), then each block is read back, put in order and written.
    Memory stays at about two blocks whatever the source's size, plus about 13 bytes per row for
    the shuffle's row map and labels (svmlight files, held whole as a sparse matrix, are the
    exception). After the last block, the class spread per block is
    recorded (``block_classes``) and a :class:`~rpicluster.errors.DataWarning` names blocks that
    hold far fewer classes than a random sample of their size would.

    Parameters
    ----------
    source : str, path or :class:`~rpicluster.data.sources.Source`
        A file (``.npz``, ``.npy``, ``.csv``, svmlight), ``sklearn:NAME``, ``idx:IMAGES,LABELS``,
        ``fashion-mnist[:train|:test]``, ``images:DIR`` or
        ``synthetic:rows=..,features=..,classes=..,seed=..``.
    out : str or path
        Store location: a local path or an fsspec URL.
    block_rows : int
        Rows per block (one chunk row of ``X``).
    label_column : str, optional
        CSV label column.
    labels : path, optional
        Labels ``.npy`` of a ``.npy`` features file.
    shuffle : bool, default=True
        Shuffle the rows (seeded by ``seed``); False keeps the source order.
    seed : int, default=0
        Seed of the shuffle and of the test split.
    test_fraction : float, optional
        Fraction in (0, 1) of each class's rows written to ``test_out`` instead (stratified,
        seeded; a class with a single row stays in training).
    test_out : str or path, optional
        The held-out store (required with ``test_fraction``); same ``classes`` as ``out``.
    source_options : mapping, optional
        ``image_size``, ``image_mode``, ``bad_images`` of an ``images:DIR`` source.
    resume : bool
        Continue an interrupted ingest of the same source (same seed and split) from its last
        complete block.
    overwrite : bool
        Replace an existing rpicluster store at ``out`` (and ``test_out``).
    storage_options : mapping, optional
        fsspec options for URL outputs.
    progress : Progress, optional
        Not yet entered; ingest sets its total (blocks) and advances it per block.

    Returns
    -------
    Dataset
        The finished store (``out``), opened.

    Raises
    ------
    DataError
        Invalid data (naming the row), a single class, an existing store that would be
        overwritten, or a store to resume that holds a different source. Bad rows found while
        shuffling are reported before any store is created; a failure while writing leaves the
        store marked incomplete, to be resumed.
    """
    from rpicluster.data.sources import Source, classes_to_json, open_source

    if block_rows < 1:
        raise ConfigError(f"block_rows must be >= 1, got {block_rows}")
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other")
    if (test_fraction is None) != (test_out is None):
        raise ConfigError("test_fraction (--test-fraction) and test_out (--test-out) go together")
    if test_fraction is not None and not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    src = source if isinstance(source, Source) else open_source(
        source, labels=labels, label_column=label_column, **dict(source_options or {}))
    if len(src.classes) < 2:
        only = np.asarray(src.classes).tolist()[0]
        raise DataError(f"{src.description}: every row has the label {only!r}; a "
                        "classifier needs at least 2 classes (check the label column/file)")
    url = _normalize_url(out)
    test_url = _normalize_url(test_out) if test_out is not None else None
    if test_url == url:
        raise ConfigError(f"the test store must differ from the training store ({url})")
    shuffle_attr = {"seed": int(seed)} if shuffle else False
    plan = _plan(src, shuffle=shuffle, seed=seed, test_fraction=test_fraction)
    parts = [("train", url, plan[0])] + ([("test", test_url, plan[1])] if test_url else [])
    targets = []
    for part, where, order in parts:
        n_rows = src.n_rows if order is None else len(order)
        layout = {
            FORMAT_KEY: FORMAT_VERSION,
            "classes": classes_to_json(src.classes),
            "n_rows": n_rows,
            "n_features": src.n_features,
            "block_rows": block_rows,
            "n_blocks": math.ceil(n_rows / block_rows),
            "source": src.description,
            "shuffle": shuffle_attr,
            **src.attrs,
        }
        if test_fraction is not None:
            layout["split"] = {"part": part, "fraction": float(test_fraction), "seed": int(seed)}
        existing = check_output(where, layout, resume=resume, overwrite=overwrite,
                                storage_options=storage_options)
        # Block to start writing at (0: a new store), or None when it is complete (resume).
        start = (0 if existing is None else None if existing.get("complete") is True
                 else int(existing.get("blocks_written", 0)))
        targets.append((where, order, layout, start))
    for where, _, _, start in targets:
        if start == 0:
            make_parent(where)  # before the shuffle's bucket folder goes there
    progress = Progress.null() if progress is None else progress
    progress.total = sum(t[2]["n_blocks"] for t in targets)
    progress.completed = sum(t[2]["n_blocks"] if t[3] is None else t[3] for t in targets)
    with progress, _Reorder(src, [t[1] for t in targets], block_rows,
                            [0 if t[3] is None else t[3] for t in targets], url) as reorder:
        reorder.prepare(progress)  # the scatter pass: a bad row stops us before any store exists
        for k, (where, _, layout, start) in enumerate(targets):
            if start is None:
                continue  # complete already (resume)
            _write_blocks(where, layout, start, src, reorder.blocks(k), storage_options,
                          progress)
    for where, _, layout, _ in targets:
        _warn_skewed(open_dataset(where, storage_options))
    return open_dataset(url, storage_options)


def check_output(url: str, layout: dict, *, resume: bool, overwrite: bool,
                 storage_options: Mapping[str, Any] | None = None,
                 writer: str = "ingest") -> dict | None:
    """Whether a store may be written at ``url``: the one check of every writer of stores.

    Parameters
    ----------
    url : str
        Where the store goes (normalized, see :func:`open_dataset`).
    layout : dict
        The attributes the new store will have; a store to resume must have the same.
    resume, overwrite : bool
        Continue the store at ``url``, or replace it.
    writer : str
        What writes the store, for the messages (``"ingest"``, ``"run"``).

    Returns
    -------
    dict or None
        None when a new store is to be created (nothing there, or ``overwrite``); else the
        attributes of the store to resume (complete or not).

    Raises
    ------
    DataError
        Something other than an rpicluster store is at ``url`` (never overwritten); a store is
        there and neither ``resume`` nor ``overwrite`` is given; or ``resume`` finds a store of
        another layout (naming the first key that differs).
    """
    existing = _existing_attrs(url, storage_options)
    if existing is None or overwrite:
        return None
    state = "complete" if existing.get("complete") is True else "incomplete"
    if not resume:
        hint = ("pass overwrite (--overwrite) to replace it" if state == "complete" else
                "pass resume (--resume) to continue it, or overwrite (--overwrite)")
        article = "an" if state == "incomplete" else "a"
        raise DataError(f"{url} already holds {article} {state} rpicluster store "
                        f"({existing.get('source')}); {hint}")
    # The specific keys first: "source" often repeats them all in one string.
    for key in sorted(layout, key=lambda k: k == "source"):
        if existing.get(key) != layout[key]:
            raise DataError(f"cannot resume {url}: its {key} is {_short(existing.get(key))}, "
                            f"this {writer}'s is {_short(layout[key])} (use overwrite to start over)")
    return existing


def make_parent(url: str) -> None:
    """Create the local folder a new store at ``url`` goes in, with its parents (as zarr and
    ``mkdir -p`` do; a URL's backend makes its own); WriteError naming what is in the way."""
    if "://" not in url:
        make_dirs(os.path.dirname(url))


class StoreWriter:
    """Writes an rpicluster store block by block (the layout of the module docstring).

    :meth:`create` makes a new, incomplete store (after :func:`check_output`); :meth:`reopen`
    opens one to continue, also on a worker that writes some of its blocks. Each
    :meth:`write_block` returns the block's per-position checksums, which the writer records
    (:meth:`record`, with ``blocks_written``) once the block counts as written; :meth:`finish`
    marks the store complete.
    """

    def __init__(self, root) -> None:
        self.root = root

    @classmethod
    def create(cls, url: str, layout: dict, *, dtype,
               storage_options: Mapping[str, Any] | None = None) -> "StoreWriter":
        """A new store at ``url`` (replacing one there) with ``layout``'s attributes and empty
        ``X`` (``dtype``; ``n_rows x n_features`` in chunks of ``block_rows`` rows) and ``y``."""
        import zarr
        from zarr.codecs import BytesCodec, Crc32cCodec

        dtype = np.dtype(dtype)
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        make_parent(url)
        try:
            root = zarr.open_group(url, mode="w", zarr_format=3, storage_options=storage_options,
                                   attributes={**layout, "created": created,
                                               "blocks_written": 0, "complete": False,
                                               CHECKSUMS_KEY: {"X": [], "y": []}})
        except OSError as exc:
            raise WriteError(f"cannot write the store {url}: {exc.strerror or exc}") from None
        common = dict(serializer=BytesCodec(), compressors=[Crc32cCodec()], filters=None,
                      config={"write_empty_chunks": True})
        n_rows, n_features, block_rows = (layout["n_rows"], layout["n_features"],
                                          layout["block_rows"])
        root.create_array("X", shape=(n_rows, n_features), dtype=dtype.name,
                          chunks=(block_rows, n_features),
                          fill_value=0 if dtype == np.uint8 else X_FILL, **common)
        root.create_array("y", shape=(n_rows,), dtype="int32", chunks=(block_rows,),
                          fill_value=Y_FILL, **common)
        return cls(root)

    @classmethod
    def reopen(cls, url: str, storage_options: Mapping[str, Any] | None = None
               ) -> "StoreWriter":
        """The store at ``url``, to write more blocks into."""
        import zarr

        return cls(zarr.open_group(url, mode="r+", zarr_format=3,
                                   storage_options=storage_options))

    @property
    def attrs(self) -> dict:
        return dict(self.root.attrs)

    def write_block(self, block: int, X: np.ndarray, y: np.ndarray) -> dict[str, int]:
        """Write block ``block``'s rows (``X`` in the store's dtype, class codes ``y``);
        returns its checksums ``{"X": crc, "y": crc}`` for :data:`CHECKSUMS_KEY`."""
        lo = int(block) * int(self.root.attrs["block_rows"])
        X, y = np.asarray(X, dtype=self.root["X"].dtype), np.asarray(y, dtype=np.int32)
        self.root["X"][lo:lo + len(y)] = X
        self.root["y"][lo:lo + len(y)] = y
        return {"X": _crc(X), "y": _crc(y)}

    def record(self, **attrs) -> None:
        """Update the store's attributes (progress: blocks written, their checksums, ...) in
        one write of ``zarr.json``: ``root.attrs.update`` writes it once per key, so a Ctrl-C or
        kill between two keys left ``blocks_written`` counting a block whose checksums were
        not recorded, and the resumed store was refused."""
        self.root.update_attributes(attrs)

    def finish(self) -> None:
        """Mark the store complete (readers refuse an incomplete one)."""
        self.root.update_attributes({"complete": True})


def _write_blocks(url, layout, start, src, blocks, storage_options, progress) -> None:
    """Write ``blocks`` (from block ``start``) into the store at ``url``, then mark it complete."""
    n_blocks, block_rows = layout["n_blocks"], layout["block_rows"]
    if start == 0:
        out = StoreWriter.create(url, layout, dtype=src.dtype, storage_options=storage_options)
        counts = np.zeros(len(layout["classes"]), dtype=np.int64)
        spread: list[int] = []
    else:
        out = StoreWriter.reopen(url, storage_options)
        counts = np.asarray(out.attrs.get("class_counts"), dtype=np.int64)
        spread = list(out.attrs.get("block_classes", []))[:start]
    sums = {k: list(v)[:start] for k, v in out.attrs.get(CHECKSUMS_KEY, {}).items()}
    sums = {"X": sums.get("X", []), "y": sums.get("y", [])}
    written = start
    try:
        for Xb, yb in blocks:
            yb = np.asarray(yb, dtype=np.int32)
            _check_codes(yb, len(counts), f"{src.description}: block {written}")
            crc = out.write_block(written, np.asarray(Xb, dtype=src.dtype), yb)
            sums["X"].append(crc["X"])
            sums["y"].append(crc["y"])
            written += 1
            block_counts = np.bincount(yb, minlength=len(counts))
            counts += block_counts
            spread.append(int(np.count_nonzero(block_counts)))
            # Recorded only after both chunks are stored: resume restarts from here.
            out.record(blocks_written=written, class_counts=counts.tolist(),
                       block_classes=spread, **{CHECKSUMS_KEY: sums})
            rows = min(written * block_rows, layout["n_rows"])
            progress.advance(note=f"{url.rsplit('/', 1)[-1]}: {rows} rows")
    except RPiClusterError as exc:
        raise DataError(f"{exc} [ingest stopped: {url} holds {written} of {n_blocks} blocks "
                        "and is marked incomplete; fix the source and resume, or overwrite]"
                        ) from exc
    out.finish()


def _plan(src, *, shuffle: bool, seed: int, test_fraction: float | None):
    """Source row indices of the training store and of the test store, in store order.

    ``(None, None)`` means the source order, all rows, no test store. The test split is
    stratified: ``round(f * n_c)`` rows of each class ``c`` (at least one when the class has two
    rows or more, never all of them), drawn with ``seed``.
    """
    if not shuffle and test_fraction is None:
        return None, None
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 12]))
    n = src.n_rows
    if test_fraction is None:
        return rng.permutation(n), None
    codes = src.codes()
    quota = split_quotas(np.bincount(codes, minlength=len(src.classes)), test_fraction)
    test_mask = np.zeros(n, dtype=bool)
    for c in np.flatnonzero(quota):
        rows = np.flatnonzero(codes == c)
        test_mask[rng.choice(rows, int(quota[c]), replace=False)] = True
    train, test = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    if shuffle:
        train, test = rng.permutation(train), rng.permutation(test)
    return train, test


def split_quotas(counts, fraction: float) -> np.ndarray:
    """Test rows per class: ``fraction`` of each class, summing to ``round(fraction * rows)``.

    Largest-remainder rounding, so a split of ``rows + t`` rows with ``fraction = t / (rows +
    t)`` leaves exactly ``rows`` training rows; a class of two rows or more gives at least one
    and keeps at least one, a class of one row stays in training.
    """
    counts = np.asarray(counts, dtype=np.int64)
    eligible = counts >= 2
    want = fraction * counts * eligible
    quota = np.floor(want).astype(np.int64)
    lo = np.where(eligible, 1, 0)
    hi = np.where(eligible, counts - 1, 0)
    quota = np.clip(quota, lo, hi)
    left = int(round(fraction * counts[eligible].sum())) - int(quota.sum())
    order = np.argsort(-(want - quota), kind="stable")  # largest remainders first
    step = 1 if left > 0 else -1
    for c in np.concatenate([order, order[::-1]]) if left < 0 else order:
        if left == 0:
            break
        if lo[c] <= quota[c] + step <= hi[c]:
            quota[c] += step
            left -= step
    return quota


class _Reorder:
    """Blocks of a source in the order of each target store (see :func:`ingest`).

    Three ways, cheapest first: the source's own blocks (no reordering); everything in memory
    when the source is no larger than two blocks or is held in memory anyway (an
    :class:`~rpicluster.data.sources.ArraySource`); else a scatter pass writing each target
    block's rows to its own bucket file, and a gather pass per block.
    """

    def __init__(self, src, orders, block_rows, starts, out_url):
        from rpicluster.data.sources import ArraySource

        self.src, self.orders, self.block_rows, self.starts = src, orders, block_rows, starts
        self.codes = None
        self.X = None
        self.tmp = None
        if all(o is None for o in orders):
            self.mode = "stream"
        elif isinstance(src, ArraySource) or src.n_rows <= 2 * block_rows:
            self.mode = "memory"
        else:
            self.mode = "scatter"
            parent = os.path.dirname(out_url) if "://" not in out_url else None
            self._parent = parent

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.tmp is not None:
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)

    def prepare(self, progress) -> None:
        if self.mode == "stream":
            return
        if self.mode == "memory":
            parts = list(self.src.blocks(self.block_rows))
            self.X = np.concatenate([Xb for Xb, _ in parts])
            self.codes = np.concatenate([yb for _, yb in parts])
            return
        import tempfile

        self.tmp = tempfile.mkdtemp(prefix=".rpicluster-ingest-", dir=self._parent)
        n = self.src.n_rows
        # where every source row goes: target store, and position in that store
        store = np.full(n, -1, dtype=np.int8)
        pos = np.zeros(n, dtype=np.int64)
        for k, order in enumerate(self.orders):
            store[order] = k
            pos[order] = np.arange(len(order))
        row = 0
        codes = []  # labels as read (a synthetic source would regenerate everything for them)
        for Xb, yb in self.src.blocks(self.block_rows):
            codes.append(yb)
            rows = slice(row, row + len(Xb))
            s, p = store[rows], pos[rows]
            keep = s >= 0
            blk = np.where(keep, p // self.block_rows, -1)
            for k in range(len(self.orders)):
                mine = keep & (s == k) & (blk >= self.starts[k])
                if not mine.any():
                    continue
                idx = np.flatnonzero(mine)
                dest = blk[idx]
                by = np.argsort(dest, kind="stable")
                idx, dest = idx[by], dest[by]
                cuts = np.flatnonzero(np.diff(dest)) + 1
                for part in np.split(np.arange(len(idx)), cuts):
                    b = int(dest[part[0]])
                    base = os.path.join(self.tmp, f"{k}-{b}")
                    with open(base + ".x", "ab") as fx, open(base + ".p", "ab") as fp:
                        fx.write(np.ascontiguousarray(Xb[idx[part]]).tobytes())
                        fp.write((p[idx[part]] % self.block_rows).astype(np.int64).tobytes())
            row += len(Xb)
            progress.advance(0, note=f"shuffling: {row} of {n} rows scattered to block buckets")
        self.codes = np.concatenate(codes)

    def blocks(self, k: int):
        """``(X, y codes)`` of target ``k``'s blocks from its start block."""
        order = self.orders[k]
        if self.mode == "stream":
            yield from self.src.blocks(self.block_rows, self.starts[k])
            return
        R, d = self.block_rows, self.src.n_features
        for b in range(self.starts[k], math.ceil(len(order) / R)):
            rows = order[b * R:(b + 1) * R]
            if self.mode == "memory":
                yield self.X[rows], self.codes[rows]
                continue
            base = os.path.join(self.tmp, f"{k}-{b}")
            Xs = np.fromfile(base + ".x", dtype=self.src.dtype).reshape(-1, d)
            where = np.fromfile(base + ".p", dtype=np.int64)
            Xb = np.empty((len(rows), d), dtype=self.src.dtype)
            Xb[where] = Xs
            del Xs
            os.unlink(base + ".x")
            os.unlink(base + ".p")
            yield Xb, self.codes[rows]


def _fitting_block_rows(n_rows: int, block_rows: int, n_clusters: int) -> int:
    """The block size nearest ``block_rows`` (not above) whose last block has ``n_clusters``
    rows or more."""
    for b in range(block_rows, n_clusters - 1, -1):
        if n_rows - (n_rows - 1) // b * b >= n_clusters:
            return b
    return n_rows


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


def _warn_skewed(dataset: "Dataset") -> None:
    import warnings

    bad = skewed_blocks(dataset)
    if not bad:
        return
    shown = ", ".join(f"block {b} holds {seen} (a random sample: ~{exp:.0f})"
                      for b, seen, exp in bad[:3])
    more = f" and {len(bad) - 3} more blocks" if len(bad) > 3 else ""
    hint = ("ingest without --no-shuffle" if dataset.attrs.get("shuffle") is False else
            "use larger blocks (--block-rows)")
    warnings.warn(f"{dataset.url}: class-skewed blocks: {shown}{more} of "
                  f"{len(dataset.classes)} classes; Inc-kSGD's block models then vote on "
                  f"classes they never saw: {hint}", DataWarning, stacklevel=3)


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


def written_blocks(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None
                   ) -> tuple[int, int, bool] | None:
    """``(blocks written, blocks, complete)`` of the rpicluster store at ``url``, complete or
    not (what an interrupted writer leaves); None when there is none."""
    try:
        attrs = _existing_attrs(_normalize_url(url), storage_options)
    except DataError:
        return None
    if attrs is None:
        return None
    return (int(attrs.get("blocks_written", 0)), int(attrs.get("n_blocks", 0)),
            attrs.get("complete") is True)


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
