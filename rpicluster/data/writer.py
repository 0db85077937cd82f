"""Writing the Zarr dataset store: :func:`ingest` (shuffle, stratified split, resume) and
:class:`StoreWriter`, the one way every writer of stores creates and fills one (layout:
:mod:`rpicluster.data.layout`)."""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from rpicluster import config
from rpicluster.data.layout import (CHECKSUMS_KEY, FORMAT_KEY, FORMAT_VERSION, X_FILL, Y_FILL,
                                    check_codes, crc, normalize_url)
from rpicluster.data.reader import Dataset, open_dataset, skewed_blocks
from rpicluster.errors import (ConfigError, DataError, DataWarning, RPiClusterError, WriteError,
                               make_dirs)
from rpicluster.progress import Progress


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
    source : str, path or :class:`~rpicluster.data.source.Source`
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
    from rpicluster.data.source import Source, classes_to_json
    from rpicluster.data.sources import open_source

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
    url = normalize_url(out)
    test_url = normalize_url(test_out) if test_out is not None else None
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
    existing = existing_attrs(url, storage_options)
    if existing is None or overwrite:
        return None
    state = "complete" if existing.get("complete") is True else "incomplete"
    if not resume:
        hint = ("add --overwrite to replace it" if state == "complete" else
                "add --resume to continue it, or --overwrite to start over")
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
        return {"X": crc(X), "y": crc(y)}

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
            check_codes(yb, len(counts), f"{src.description}: block {written}")
            block_sums = out.write_block(written, np.asarray(Xb, dtype=src.dtype), yb)
            sums["X"].append(block_sums["X"])
            sums["y"].append(block_sums["y"])
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
    :class:`~rpicluster.data.source.ArraySource`); else a scatter pass writing each target
    block's rows to its own bucket file, and a gather pass per block.
    """

    def __init__(self, src, orders, block_rows, starts, out_url):
        from rpicluster.data.source import ArraySource

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


def existing_attrs(url: str, storage_options) -> dict | None:
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
        attrs = existing_attrs(normalize_url(url), storage_options)
    except DataError:
        return None
    if attrs is None:
        return None
    return (int(attrs.get("blocks_written", 0)), int(attrs.get("n_blocks", 0)),
            attrs.get("complete") is True)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
