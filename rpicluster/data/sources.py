"""Readers that turn a dataset on disk (or a generator) into row blocks for :func:`ingest`.

A :class:`Source` knows its shape and its sorted class list before the first block is read, and
yields ``(X float32 (rows, features), y int32 class codes)`` one block at a time, starting at any
block (``--resume``). Only one block of features is held in memory at a time; labels, which are
small, may be held whole.

Source strings understood by :func:`open_source`:

==========================================  ====================================================
``data.npz``                                arrays ``X`` and ``y`` (``X`` is streamed from the zip)
``features.npy`` + ``labels=labels.npy``    ``X`` streamed from the file, labels loaded whole
``data.csv``                                header row; label column ``label_column``, else one
                                            named ``label``/``y``/``target``, else the last
``data.svm`` / ``.svmlight`` / ``.libsvm``  scikit-learn's ``load_svmlight_file`` (the sparse
(or ``svmlight:PATH`` / ``libsvm:PATH``)    matrix is held whole; blocks are densified one by one)
``sklearn:digits`` (``iris``, ``wine``,     scikit-learn's bundled data sets
``breast_cancer``)
``synthetic:rows=..,features=..,...``       :mod:`rpicluster.data.synthetic`, classes ``0..C-1``
``idx:IMAGES,LABELS``                       MNIST-format IDX files (gzip or not): pixels / 255
                                            as float32 features, images streamed
``fashion-mnist`` (``fashion-mnist:train``,  the Debian package ``dataset-fashion-mnist``
``fashion-mnist:test``)                     (IDX files under :data:`FASHION_MNIST_DIR`):
                                            60,000 train or 10,000 test 28x28 images, pixels / 255
``images:DIR``                              one subfolder per class of JPEG/PNG/... images, read
                                            with Pillow, stored as **uint8** (see
                                            :class:`ImageFolderSource`)
==========================================  ====================================================

Every source knows its labels before the first block is read (:meth:`Source.codes`), which is
what lets :func:`~rpicluster.data.writer.ingest` shuffle rows and split off a stratified test set.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from rpicluster.data.source import ArraySource, Source, encode_labels
from rpicluster.errors import ConfigError, DataError, DataWarning

#: Label column names picked (case-insensitively, in this order) when a CSV has no --label-column.
CSV_LABEL_NAMES = ("label", "y", "target")
SKLEARN_DATASETS = ("breast_cancer", "digits", "iris", "wine")
SVMLIGHT_SUFFIXES = (".svm", ".svmlight", ".libsvm")
SCHEMES = ("sklearn", "synthetic", "svmlight", "libsvm", "idx", "fashion-mnist", "images")
#: Where the Debian package ``dataset-fashion-mnist`` installs its IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: File suffixes ``images:DIR`` reads (case-insensitive); other files are ignored.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: Default side of the square images ``images:DIR`` stores.
IMAGE_SIZE = 64
FILE_SUFFIXES = (".npz", ".npy", ".csv") + SVMLIGHT_SUFFIXES


class NpySource(Source):
    """``X`` read sequentially from ``.npy`` bytes (a file, or a member of an ``.npz``)."""

    def __init__(self, description: str, opener, labels: np.ndarray):
        self._opener = opener
        with opener() as f:
            shape, fortran, dtype = _read_npy_header(f, description)
        if len(shape) != 2:
            raise DataError(f"{description}: X must be 2-D (rows, features), got shape {shape}")
        if dtype.kind not in "biuf":
            raise DataError(f"{description}: X has dtype {dtype}, expected numbers")
        if shape[0] != len(labels):
            raise DataError(f"{description}: X has {shape[0]} rows but y has {len(labels)}")
        classes, self._codes = encode_labels(labels, description)
        super().__init__(description, shape[0], shape[1], classes)
        self._fortran, self._dtype = fortran, dtype

    def _raw_blocks(self, block_rows, start_block):
        row_bytes = self.n_features * self._dtype.itemsize
        with self._opener() as f:
            if self._fortran:
                # Column-major bytes cannot be read row block by row block; such files are rare
                # (np.save of a transposed array) and are read whole.
                X = np.lib.format.read_array(f, allow_pickle=False)
            else:
                X = None
                _read_npy_header(f, self.description)
                f.seek(start_block * block_rows * row_bytes, os.SEEK_CUR)
            for start in range(start_block * block_rows, self.n_rows, block_rows):
                n = min(block_rows, self.n_rows - start)
                if X is not None:
                    block = X[start:start + n]
                else:
                    raw = f.read(n * row_bytes)
                    if len(raw) != n * row_bytes:
                        raise DataError(f"{self.description}: file is truncated at row {start}")
                    block = np.frombuffer(raw, dtype=self._dtype).reshape(n, self.n_features)
                yield block, self._codes[start:start + n]


def _read_npy_header(f: IO[bytes], description: str):
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        return np.lib.format.read_array_header_2_0(f)
    except ValueError as exc:
        raise DataError(f"{description}: not a valid .npy array ({exc})") from None


class CsvSource(Source):
    """A CSV file with a header row, read twice: labels first (classes, row count), then the
    features block by block."""

    def __init__(self, path: Path, label_column: str | None):
        self._path = path
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(_bounded_lines(f, path))
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}: empty CSV file (expected a header row)")
            self._label = _pick_label_column(header, label_column, path)
            description = f"csv:{path}:{header[self._label]}"
            seen: dict[str, int] = {}
            first_ids = []
            try:
                for fields in reader:
                    if len(fields) != len(header):
                        raise DataError(f"{path}: line {reader.line_num} has {len(fields)} "
                                        f"fields, the header has {len(header)}")
                    label = fields[self._label]
                    if not label.strip():
                        raise DataError(
                            f"{path}: data row {len(first_ids)} (line {reader.line_num}) "
                            f"has an empty label in column {header[self._label]!r}; fill it "
                            "in or remove the row (an empty string is not a class)")
                    first_ids.append(seen.setdefault(label, len(seen)))
            except csv.Error as exc:
                # Python's csv module refuses a field over csv.field_size_limit() characters;
                # no number is that long, so the file is not a CSV of numbers there (often an
                # unbalanced quote that swallows the lines after it).
                raise DataError(f"{path}: line {reader.line_num}: {exc} characters; a "
                                "feature value is never that long: check that line for an "
                                "unbalanced quote or a field that is not a number") from None
            if reader.line_num != len(first_ids) + 1:
                raise DataError(f"{path}: quoted line breaks inside fields are not supported")
        classes, order = _classes_from_strings(list(seen), first_ids, path)
        self._codes = order[np.asarray(first_ids, dtype=np.int64)] if first_ids else order[:0]
        self._header = header
        self._usecols = [i for i in range(len(header)) if i != self._label]
        super().__init__(description, len(first_ids), len(self._usecols), classes)

    def _raw_blocks(self, block_rows, start_block):
        # Parse in slices of about a million cells: numpy's loadtxt is fast on a list of lines,
        # and the slice keeps the text of only a few MB in memory next to the float32 block.
        step = max(1, 2**20 // (self.n_features + 1))
        with open(self._path, encoding="utf-8") as f:
            lines = itertools.islice(f, 1 + start_block * block_rows, None)
            for start in range(start_block * block_rows, self.n_rows, block_rows):
                n = min(block_rows, self.n_rows - start)
                X = np.empty((n, self.n_features), dtype=np.float32)
                for lo in range(0, n, step):
                    batch = list(itertools.islice(lines, min(step, n - lo)))
                    X[lo:lo + len(batch)] = self._parse(batch, start + lo)
                yield X, self._codes[start:start + n]

    def _parse(self, lines: list[str], first_row: int) -> np.ndarray:
        try:
            return np.loadtxt(lines, delimiter=",", quotechar='"', comments=None,
                              usecols=self._usecols, dtype=np.float32, ndmin=2)
        except ValueError as exc:
            m = re.search(r"at row (\d+), column (\d+)", str(exc))
            row = first_row + int(m.group(1)) if m else first_row
            column = self._header[int(m.group(2)) - 1] if m else None
            where = (f"data row {row} (line {row + 2}), column {column!r}" if m
                     else f"data rows {first_row}..{first_row + len(lines) - 1}")
            raise DataError(f"{self._path}: {where}: not a number ({exc})") from None


#: Longest CSV line read (bytes): a row of 100,000 numbers fits; a 2 GB "field" is refused
#: after this much, not after Python read all of it into one string.
MAX_CSV_LINE = 64 << 20


def _bounded_lines(f, path: Path):
    """The lines of ``f``, refusing one longer than :data:`MAX_CSV_LINE` as soon as that much
    of it is read (``for line in f`` would read a whole 2 GB line first)."""
    for number in itertools.count(1):
        line = f.readline(MAX_CSV_LINE + 1)
        if not line:
            return
        if len(line) > MAX_CSV_LINE:
            raise DataError(f"{path}: line {number} is longer than {MAX_CSV_LINE:,} characters; "
                            "a row of numbers is never that long: check that line for an "
                            "unbalanced quote or a field that is not a number")
        yield line


def _pick_label_column(header: list[str], label_column: str | None, path: Path) -> int:
    if label_column is not None:
        if label_column not in header:
            raise ConfigError(f"{path}: no column {label_column!r} (columns: {', '.join(header)})")
        return header.index(label_column)
    lowered = [h.strip().lower() for h in header]
    for name in CSV_LABEL_NAMES:
        if name in lowered:
            return lowered.index(name)
    return len(header) - 1


def _classes_from_strings(values: list[str], first_ids: list[int], path: Path
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted classes of the distinct CSV label strings ``values`` (numbers when every one is a
    whole number, else strings) and each value's class code."""
    try:
        labels = np.asarray([float(v) for v in values], dtype=np.float64)
    except ValueError:
        labels = np.asarray(values, dtype=str)
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            row = first_ids.index(i)
            raise DataError(f"{path}: label {values[i]!r} at data row {row} (line {row + 2}) is "
                            "not a whole number; numeric labels must be class ids")
    classes, codes = encode_labels(labels, str(path))
    return classes, codes.astype(np.int64)


class SyntheticSource(Source):
    """Rows of :mod:`rpicluster.data.synthetic`; classes are ``0 .. classes-1``."""

    def __init__(self, spec_text: str):
        from rpicluster.data.synthetic import SyntheticSpec

        self._spec = SyntheticSpec.from_string(spec_text)
        fields = ",".join(f"{k}={v}" for k, v in vars(self._spec).items())
        super().__init__(f"synthetic:{fields}", self._spec.rows, self._spec.features,
                         np.arange(self._spec.classes, dtype=np.int64))

    def _raw_blocks(self, block_rows, start_block):
        # The generator has no start offset; skipped blocks are generated and dropped, which only
        # costs time on --resume, and keeps resumed rows identical to a clean run.
        return itertools.islice(self._spec.iter_blocks(block_rows), start_block, None)


def open_source(source: str | os.PathLike, *, labels: str | os.PathLike | None = None,
                label_column: str | None = None, image_size: int | None = None,
                image_mode: str | None = None, bad_images: str | None = None) -> Source:
    """Open a source string or path (see the module docstring for the forms).

    Parameters
    ----------
    source : str or path
    labels : path, optional
        Labels ``.npy`` for a ``.npy`` features file (required there, refused elsewhere).
    label_column : str, optional
        Label column of a CSV file (refused for other sources).
    image_size, image_mode, bad_images : optional
        ``images:DIR`` only: see :class:`ImageFolderSource`.

    Raises
    ------
    ConfigError
        An unknown scheme or suffix (listing the known ones), or options that do not apply.
    DataError
        A missing file or invalid data.
    """
    if isinstance(source, tuple):
        return _arrays_source(source, labels, label_column, image_size, image_mode, bad_images)
    text = os.fspath(source)
    if text.lower() == "fashion-mnist" and not Path(text).exists():
        text = "fashion-mnist:"  # the bare name: the training split
    m = re.match(r"^([A-Za-z][A-Za-z0-9_+.-]*):(?!//)(.*)$", text)
    is_scheme = m is not None and len(m.group(1)) > 1 and not Path(text).exists()
    kind = m.group(1).lower() if is_scheme else Path(text).suffix.lower()
    if is_scheme and kind not in SCHEMES:
        raise ConfigError(f"unknown source scheme {m.group(1)!r} (known schemes: "
                          f"{', '.join(s + ':' for s in SCHEMES)}; or a file ending "
                          f"{', '.join(FILE_SUFFIXES)})")
    if labels is not None and kind != ".npy":
        raise ConfigError(f"labels= (--labels) only applies to a .npy features file, not {text}")
    if label_column is not None and kind != ".csv":
        raise ConfigError(f"label_column= (--label-column) only applies to .csv, not {text}")
    image_opts = {k: v for k, v in (("image_size", image_size), ("image_mode", image_mode),
                                    ("bad_images", bad_images)) if v is not None}
    if image_opts and kind != "images":
        raise ConfigError(f"{', '.join(image_opts)} only appl{'ies' if len(image_opts) == 1 else 'y'}"
                          f" to an images:DIR source, not {text}")
    if kind == "images":
        return ImageFolderSource(Path(m.group(2)).expanduser(), **{
            {"image_size": "size", "image_mode": "mode", "bad_images": "bad"}[k]: v
            for k, v in image_opts.items()})
    if kind == "idx":
        return _idx_source(m.group(2))
    if kind == "fashion-mnist":
        return fashion_mnist_source(m.group(2) or "train")
    if kind == "sklearn":
        return _sklearn_source(m.group(2))
    if kind == "synthetic":
        return SyntheticSource(m.group(2))
    path = Path(m.group(2) if is_scheme else text).expanduser().resolve()
    if not is_scheme and Path(text).expanduser().is_dir():
        raise ConfigError(f"{text} is a folder, not a data file: to ingest the images in it, "
                          f"give it as images:{text} (rpicluster ingest images:{text} OUT.zarr)")
    if not is_scheme and kind not in FILE_SUFFIXES:
        raise ConfigError(f"unknown source file type {kind or '(no suffix)'!r} for {text} "
                          f"(known: {', '.join(FILE_SUFFIXES)}; or a scheme "
                          f"{', '.join(s + ':' for s in SCHEMES)})")
    if not path.is_file():
        raise DataError(f"source file {path} does not exist")
    if kind in ("svmlight", "libsvm") or kind in SVMLIGHT_SUFFIXES:
        return _svmlight_source(path)
    if kind == ".csv":
        return CsvSource(path, label_column)
    if kind == ".npz":
        return _npz_source(path)
    if labels is None:
        raise ConfigError(f"{path}: a .npy features file needs labels (--labels labels.npy)")
    labels_path = Path(labels).expanduser().resolve()
    if not labels_path.is_file():
        raise DataError(f"labels file {labels_path} does not exist")
    y = _load_npy(labels_path)
    return NpySource(f"npy:{path}+{labels_path}", lambda: open(path, "rb"), y)


def _arrays_source(pair: tuple, *options) -> Source:
    """An in-memory ``(X, y)`` pair (``rpicluster.ingest((X, y), "out.zarr")``)."""
    if len(pair) != 2:
        raise ConfigError(f"an in-memory source is a pair (X, y), got a tuple of {len(pair)}")
    if any(o is not None for o in options):
        raise ConfigError("labels, label_column and the image options do not apply to an "
                          "in-memory (X, y) source")
    X, y = pair
    if not hasattr(X, "toarray"):
        X = np.asarray(X)
    if X.dtype.kind not in "fiub":
        raise DataError(f"(X, y): X must hold numbers, got dtype {X.dtype}")
    return ArraySource(f"arrays ({X.shape[0]} rows)", X, np.asarray(y))


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from None


def _npz_source(path: Path) -> Source:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("X", "y") if k not in z.files]
            if missing:
                raise DataError(f"{path}: no array {missing[0]!r} (arrays in the file: "
                                f"{', '.join(z.files) or 'none'}; expected X and y)")
            y = z["y"]
    except (ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None

    @contextlib.contextmanager
    def opener():
        with zipfile.ZipFile(path) as archive, archive.open("X.npy") as member:
            yield member

    return NpySource(f"npz:{path}", opener, y)


def _svmlight_source(path: Path) -> Source:
    from sklearn.datasets import load_svmlight_file

    try:
        X, y = load_svmlight_file(str(path), dtype=np.float32)
    except ValueError as exc:
        raise DataError(f"{path}: not a readable svmlight/libsvm file ({exc})") from None
    return ArraySource(f"svmlight:{path}", X, y)


def _sklearn_source(name: str) -> Source:
    if name not in SKLEARN_DATASETS:
        raise ConfigError(f"unknown scikit-learn data set {name!r} "
                          f"(known: {', '.join('sklearn:' + n for n in SKLEARN_DATASETS)})")
    import sklearn.datasets

    X, y = getattr(sklearn.datasets, f"load_{name}")(return_X_y=True)
    return ArraySource(f"sklearn:{name}", X, y)


# --- IDX files (MNIST, Fashion-MNIST) -------------------------------------------------------

#: IDX type byte -> numpy dtype (big-endian, as the format stores it).
_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _open_idx(path: Path) -> IO[bytes]:
    """The file, decompressed when it starts with the gzip magic bytes."""
    import gzip

    with open(path, "rb") as probe:
        gz = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _idx_header(f: IO[bytes], path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    head = f.read(4)
    if len(head) != 4 or head[:2] != b"\0\0" or head[2] not in _IDX_TYPES or head[3] < 1:
        raise DataError(f"{path}: not an IDX file (magic bytes {head.hex() or 'none'}; "
                        "expected 00 00, a type byte and the number of dimensions)")
    raw = f.read(4 * head[3])
    if len(raw) != 4 * head[3]:
        raise DataError(f"{path}: IDX header is truncated")
    return _IDX_TYPES[head[2]], tuple(int(v) for v in np.frombuffer(raw, dtype=">u4"))


class IdxSource(Source):
    """MNIST-format IDX files: an image file (n, rows, cols[, ...]) and a label file (n,).

    Features are the pixels flattened row-major; integer pixels (MNIST's uint8) are divided by
    255, so features lie in [0, 1] (the usual "pixels/255" preprocessing). The image shape is
    recorded as the store attribute ``image_shape``. Images are streamed block by block; gzip
    files (``.gz``, recognised by their magic bytes) are decompressed on the fly.
    """

    def __init__(self, images: Path, labels: Path, description: str | None = None):
        for p in (images, labels):
            if not p.is_file():
                raise DataError(f"IDX file {p} does not exist")
        with _open_idx(labels) as f:
            ldtype, lshape = _idx_header(f, labels)
            if len(lshape) != 1:
                raise DataError(f"{labels}: an IDX label file has 1 dimension, this one has "
                                f"{len(lshape)} ({lshape}); are IMAGES and LABELS swapped?")
            y = np.frombuffer(f.read(), dtype=ldtype)
        if len(y) != lshape[0]:
            raise DataError(f"{labels}: truncated: {len(y)} labels, the header says {lshape[0]}")
        with _open_idx(images) as f:
            self._dtype, shape = _idx_header(f, images)
        if shape[0] != len(y):
            raise DataError(f"{images} holds {shape[0]} images but {labels} {len(y)} labels")
        classes, self._codes = encode_labels(y, str(labels))
        super().__init__(description or f"idx:{images},{labels}", shape[0],
                         int(np.prod(shape[1:])), classes)
        self._images = images
        self.attrs = {"image_shape": list(shape[1:])}

    def _raw_blocks(self, block_rows, start_block):
        row_bytes = self.n_features * self._dtype.itemsize
        scale = 1 / 255 if self._dtype.kind in "iu" else None
        with _open_idx(self._images) as f:
            _idx_header(f, self._images)
            f.seek(start_block * block_rows * row_bytes, os.SEEK_CUR)
            for start in range(start_block * block_rows, self.n_rows, block_rows):
                n = min(block_rows, self.n_rows - start)
                raw = f.read(n * row_bytes)
                if len(raw) != n * row_bytes:
                    raise DataError(f"{self._images}: file is truncated at image {start}")
                X = np.frombuffer(raw, dtype=self._dtype).reshape(n, self.n_features)
                X = X.astype(np.float32)
                if scale is not None:
                    X *= np.float32(scale)
                yield X, self._codes[start:start + n]


def _idx_source(spec: str) -> Source:
    parts = spec.split(",")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"idx:{spec}: expected idx:IMAGES,LABELS (two IDX files, e.g. "
                          "idx:train-images-idx3-ubyte.gz,train-labels-idx1-ubyte.gz)")
    images, labels = (Path(p).expanduser() for p in parts)
    if labels.parent == Path(".") and not labels.exists():
        labels = images.parent / labels  # a bare LABELS name: beside IMAGES
    for path in (images, labels):
        if not path.is_file():
            raise DataError(f"idx:{spec}: {path.resolve()} does not exist (a relative IMAGES "
                            "path is read from the current folder, a bare LABELS name beside "
                            "IMAGES; e.g. idx:/usr/share/datasets/fashion-mnist/"
                            "train-images-idx3-ubyte.gz,train-labels-idx1-ubyte.gz)")
    return IdxSource(images.resolve(), labels.resolve())


def fashion_mnist_source(split: str = "train", directory: Path | None = None) -> Source:
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (offline).

    Parameters
    ----------
    split : {'train', 'test'}
        The 60,000 training or the 10,000 test images (the official split).
    directory : path, optional
        Folder of the four IDX files (default :data:`FASHION_MNIST_DIR`).

    Raises
    ------
    DataError
        The files are not there (the message says which package installs them).
    """
    names = {"train": "train", "test": "t10k"}
    if split not in names:
        raise ConfigError(f"fashion-mnist:{split}: unknown split (known: fashion-mnist:train, "
                          "fashion-mnist:test)")
    folder = Path(directory) if directory is not None else FASHION_MNIST_DIR
    images = folder / f"{names[split]}-images-idx3-ubyte.gz"
    labels = folder / f"{names[split]}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise DataError(f"Fashion-MNIST is not installed ({images} is missing): "
                        "apt-get install dataset-fashion-mnist")
    return IdxSource(images, labels, description=f"fashion-mnist:{split}")


# --- image folders ----------------------------------------------------------------------------

#: What ``bad_images`` accepts: skip unreadable files (with a warning naming them) or refuse.
BAD_IMAGE_POLICIES = ("skip", "error")
IMAGE_MODES = ("RGB", "L")


class ImageFolderSource(Source):
    """An image folder: one subfolder per class, stored as uint8 pixels.

    ``DIR/<class>/<file>`` for every file ending in one of :data:`IMAGE_SUFFIXES`; the class
    labels are the subfolder names (strings), rows come class by class in sorted file order
    (ingest shuffles them). Every image is read with Pillow and

    * converted to ``mode`` ('RGB' default, or 'L' grayscale): palette, RGBA (alpha dropped),
      CMYK, 16-bit and grayscale images all become the same mode;
    * scaled and centre-cropped to ``size x size`` (``PIL.ImageOps.fit``: the aspect ratio is
      kept, the longer side is cropped), whatever its own size;
    * stored as one row of ``size * size * channels`` uint8 values (height, width, channel
      order); the store attribute ``image_shape`` is ``[size, size, channels]``.

    Unreadable files are found when the source is opened (each is opened and checked by Pillow),
    before anything is written: ``bad='skip'`` (default) leaves them out with one warning that
    names them, ``bad='error'`` refuses the folder naming the first one. A file that passes the
    check but fails to decode later stops the ingest naming it (the store stays incomplete).
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, folder: Path, *, size: int = IMAGE_SIZE, mode: str = "RGB",
                 bad: str = "skip"):
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - Pillow comes with matplotlib/scikit-image
            raise ConfigError("images:DIR needs Pillow: pip install pillow") from None
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"image size must be an int >= 1, got {size!r}")
        if mode not in IMAGE_MODES:
            raise ConfigError(f"image mode {mode!r} is not supported (known: "
                              f"{', '.join(IMAGE_MODES)})")
        if bad not in BAD_IMAGE_POLICIES:
            raise ConfigError(f"bad image policy {bad!r} is not known (known: "
                              f"{', '.join(BAD_IMAGE_POLICIES)})")
        folder = folder.resolve()
        if not folder.is_dir():
            raise DataError(f"image folder {folder} does not exist")
        class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
        if not class_dirs:
            raise DataError(f"{folder}: no subfolders (expected one subfolder of images per "
                            "class, e.g. DIR/cat/*.jpg, DIR/dog/*.jpg)")
        files, labels, skipped = [], [], []
        for d in class_dirs:
            for p in sorted(d.iterdir()):
                if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                problem = _image_problem(Image, p, size)
                if problem is None:
                    files.append(p)
                    labels.append(d.name)
                elif bad == "error":
                    raise DataError(f"{p}: not a readable image ({problem}); remove it, or "
                                    "skip unreadable files (--bad-images skip)")
                else:
                    skipped.append(f"{p.relative_to(folder)} ({problem})")
        if skipped:
            shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more"
                                               if len(skipped) > 5 else "")
            warnings.warn(f"{folder}: skipped {len(skipped)} unreadable image file"
                          f"{'s' if len(skipped) > 1 else ''}: {shown}", DataWarning,
                          stacklevel=2)
        if not files:
            raise DataError(f"{folder}: no readable images in its subfolders (looked for "
                            f"{', '.join(IMAGE_SUFFIXES)})")
        channels = 3 if mode == "RGB" else 1
        classes, self._codes = encode_labels(np.asarray(labels, dtype=str), str(folder))
        super().__init__(f"images:{folder}", len(files), size * size * channels, classes)
        self.attrs = {"image_shape": [size, size, channels], "image_mode": mode}
        self._files, self._size, self._mode = files, size, mode

    def _raw_blocks(self, block_rows, start_block):
        for start in range(start_block * block_rows, self.n_rows, block_rows):
            paths = self._files[start:start + block_rows]
            X = np.empty((len(paths), self.n_features), dtype=np.uint8)
            for i, p in enumerate(paths):
                X[i] = load_image(p, self._size, self._mode).reshape(-1)
            yield X, self._codes[start:start + len(paths)]


def _image_problem(Image, path: Path, size: int | None = None) -> str | None:
    """Why Pillow cannot read ``path`` (None when it can): header and structure checked, then
    the whole image decoded (at the draft scale nearest ``size``: a JPEG decodes 2-8x smaller,
    fast), since ``verify`` passes a truncated JPEG that would fail half-way through a block."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            if size:
                im.draft(None, (size, size))
            im.load()
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for bad files
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


def load_image(path: Path, size: int, mode: str = "RGB") -> np.ndarray:
    """One image as uint8 ``(size, size, channels)``: converted to ``mode``, fitted, cropped.

    Raises
    ------
    DataError
        Pillow cannot decode the file (naming it).
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert(mode)
            im = ImageOps.fit(im, (size, size), method=Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: cannot decode the image ({type(exc).__name__}: {exc})"
                        ) from None
    return arr.reshape(size, size, -1)
