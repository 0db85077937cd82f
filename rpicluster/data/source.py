"""The block source contract every reader of :mod:`rpicluster.data.sources` implements
(:class:`Source`), the in-memory :class:`ArraySource`, and the label coding stores use
(:func:`encode_labels`, :func:`classes_to_json`, :func:`classes_from_json`)."""

from __future__ import annotations

import abc
from collections.abc import Iterator

import numpy as np

from rpicluster.errors import DataError


class Source(abc.ABC):
    """A dataset read block by block.

    Subclasses set the attributes in ``__init__`` (through ``super().__init__``) and implement
    :meth:`_raw_blocks`; :meth:`blocks` checks every block (shape, finite values, codes).

    Attributes
    ----------
    description : str
        Names the source; stored in the Zarr attributes and compared on ``--resume``.
    n_rows, n_features : int
    classes : ndarray
        Sorted original labels (int64 or str); ``y`` codes index into it.
    dtype : numpy dtype
        What ``X`` is stored as: float32 (features), or uint8 (images, see
        :class:`~rpicluster.data.sources.ImageFolderSource`).
    attrs : dict
        Extra store attributes (``image_shape`` of an image source).
    """

    dtype = np.dtype(np.float32)

    def __init__(self, description: str, n_rows: int, n_features: int, classes: np.ndarray):
        if n_rows < 1:
            raise DataError(f"{description}: no rows (X has 0 rows)")
        if n_features < 1:
            raise DataError(f"{description}: no features (X has 0 columns)")
        self.description = description
        self.n_rows = int(n_rows)
        self.n_features = int(n_features)
        self.classes = classes
        self.attrs: dict = {}

    def codes(self) -> np.ndarray:
        """Class codes (int32) of every row, in source order.

        Sources that hold their labels return them; the default reads the source once.
        """
        held = getattr(self, "_codes", None)
        if held is not None:
            return np.asarray(held, dtype=np.int32)
        return np.concatenate([y for _, y in self._raw_blocks(4096, 0)]).astype(np.int32)

    @abc.abstractmethod
    def _raw_blocks(self, block_rows: int, start_block: int
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(X, codes)`` for blocks ``start_block, start_block+1, ...`` (unchecked)."""

    def blocks(self, block_rows: int, start_block: int = 0
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(X float32 (r, n_features), y int32 (r,))`` for each block from ``start_block``.

        Raises
        ------
        DataError
            A block with NaN/inf (naming the row), the wrong width, or a row count that does not
            add up to ``n_rows``.
        """
        row = start_block * block_rows
        for X, y in self._raw_blocks(block_rows, start_block):
            expected = min(block_rows, self.n_rows - row)
            X = np.asarray(X)
            if X.ndim != 2 or X.shape[1] != self.n_features or len(X) != expected:
                raise DataError(f"{self.description}: block at row {row} has X shape {X.shape}, "
                                f"expected ({expected}, {self.n_features})")
            if len(y) != expected:
                raise DataError(f"{self.description}: block at row {row} has {len(y)} labels, "
                                f"expected {expected}")
            X = X.astype(self.dtype, copy=False)
            if self.dtype.kind == "f":
                _check_finite(X, row, self.description)
            yield X, np.asarray(y, dtype=np.int32)
            row += expected
        if row < self.n_rows:
            raise DataError(f"{self.description}: ended at row {row}, expected {self.n_rows} rows")


def _check_finite(X: np.ndarray, first_row: int, description: str) -> None:
    # The sum is NaN/inf exactly when a value is (or values overflow, then we look closer); it
    # avoids a block-sized boolean temporary in the common, clean case.
    if np.isfinite(X.sum(dtype=np.float64)):
        return
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        col = int(np.flatnonzero(~np.isfinite(X[r]))[0])
        raise DataError(f"{description}: X row {first_row + r} column {col} is {X[r, col]} "
                        "(NaN and inf are not allowed; clean or impute the data first)")


def encode_labels(labels: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted classes and int32 codes for a 1-D array of labels (ints, whole floats, strings).

    Raises
    ------
    DataError
        Labels that are not 1-D, non-integer or non-finite floats (naming the row), or of an
        unsupported type.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"{where}: labels must be 1-D, got shape {labels.shape}")
    kind = labels.dtype.kind
    if kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where}: label at row {r} is {labels[r]!r}; float labels must be "
                            "whole numbers (class ids)")
        labels = labels.astype(np.int64)
    elif kind in "biu":
        labels = labels.astype(np.int64)
    elif kind == "S":
        labels = labels.astype(str)
    elif kind != "U":
        raise DataError(f"{where}: labels of dtype {labels.dtype} are not supported "
                        "(expected integers, whole floats or strings)")
    classes, codes = np.unique(labels, return_inverse=True)
    return classes, codes.astype(np.int32)


def classes_to_json(classes: np.ndarray) -> list:
    """The class list as JSON values (Python ints or strs)."""
    return [str(c) if classes.dtype.kind == "U" else int(c) for c in classes]


def classes_from_json(values: list) -> np.ndarray:
    """Inverse of :func:`classes_to_json`."""
    if any(isinstance(v, str) for v in values):
        return np.asarray(values, dtype=str)
    return np.asarray(values, dtype=np.int64)


class ArraySource(Source):
    """Blocks of an in-memory (or sparse) ``X`` with labels; used for scikit-learn data sets and
    svmlight files."""

    def __init__(self, description: str, X, labels: np.ndarray):
        if X.ndim != 2:
            raise DataError(f"{description}: X must be 2-D (rows, features), got shape {X.shape}")
        if X.shape[0] != len(labels):
            raise DataError(f"{description}: X has {X.shape[0]} rows but y has {len(labels)}")
        classes, self._codes = encode_labels(labels, description)
        super().__init__(description, X.shape[0], X.shape[1], classes)
        self._X = X

    def _raw_blocks(self, block_rows, start_block):
        for start in range(start_block * block_rows, self.n_rows, block_rows):
            block = self._X[start:start + block_rows]
            dense = block.toarray() if hasattr(block, "toarray") else block
            yield dense, self._codes[start:start + block_rows]
