"""Checks made on the desktop, from the store's metadata, before anything is submitted.

A model scored on a store of another width, a CSV file given where a store is expected, raw
image pixels given to ``train``: each is one line naming the file and the next command, at once,
instead of a scikit-learn ValueError from a worker ten seconds later. The model file also
records which store it was trained on, so that scoring those rows says so.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from rpicluster.errors import DataError

#: A store of at most this many bytes (and rows of one default block) is trained, scored and
#: predicted in this process when no cluster runs: starting one costs more than the work.
IN_PROCESS_BYTES = 64 * 2**20

#: Where a model remembers the store it was trained on (an attribute saved in the skops file;
#: a leading underscore: metadata about the fit, not a learned parameter).
TRAINED_ON = "_rpicluster_trained_on"

def open_store(data: str | os.PathLike, storage_options: dict | None = None):
    """:func:`~rpicluster.open_dataset`, with a next step when ``data`` is not a store.

    Raises
    ------
    DataError
        ``data`` is a source file (``small.csv``: ingest it first, with the command) or a
        folder of images, or any reason :func:`~rpicluster.open_dataset` gives.
    """
    from rpicluster import open_dataset

    text = os.fspath(data)
    path = Path(text).expanduser()
    if "://" not in text and path.is_file():  # a Zarr store is a folder
        raise DataError(f"{text} is a data file, not a Zarr store: ingest it first "
                        f"(rpicluster ingest {text} {path.with_suffix('.zarr').name})")
    try:
        return open_dataset(text, storage_options=storage_options)
    except DataError:
        if "://" not in text and path.is_dir() and not (path / "zarr.json").exists():
            raise DataError(f"{text} is a folder, not a Zarr store: if it holds images, ingest "
                            f"them first (rpicluster ingest images:{text} "
                            f"{path.name or 'images'}.zarr)") from None
        raise


def fits_in_process(dataset) -> bool:
    """Whether ``dataset`` is small enough to run in this process (:data:`IN_PROCESS_BYTES`,
    at most ``config.BLOCK_ROWS`` rows)."""
    from rpicluster import config

    return dataset.n_rows <= config.BLOCK_ROWS and dataset.nbytes <= IN_PROCESS_BYTES


def fingerprint(dataset) -> str:
    """A store's content fingerprint from its metadata only: the crc32c of all its rows (X and
    y), shape and classes. The same rows in the same order give the same fingerprint wherever
    the store lives and whatever its block size. The model file and the run history use it.

    The block size is layout, not data: digits re-ingested with another ``--block-rows`` (same
    source and seed: the same rows in the same order) are still the rows a model was trained
    on, so ``score`` says so. The per-block checksums recorded at ingest are combined into the
    checksum of the whole array, which no grouping of the rows changes.
    """
    from rpicluster import history

    dataset = getattr(dataset, "dataset", dataset)  # features' ImageStore wraps its Dataset
    attrs = dataset.attrs
    sums = attrs.get("chunk_crc32c")
    whole = None
    if sums:
        rows = [min(dataset.block_rows, dataset.n_rows - b * dataset.block_rows)
                for b in range(dataset.n_blocks)]
        whole = {"X": crc32c_concat(sums["X"], [r * dataset.n_features * dataset.itemsize
                                                for r in rows]),
                 "y": crc32c_concat(sums["y"], [r * 4 for r in rows])}  # int32 codes
    return history.fingerprint({"crc32c": whole, "n_rows": attrs.get("n_rows"),
                                "n_features": attrs.get("n_features"),
                                "classes": attrs.get("classes")})


# crc32c of a concatenation from its parts' crc32c and lengths (zlib's crc32_combine, with the
# Castagnoli polynomial): appending n zero bytes to a CRC is a linear map over GF(2).
_CRC32C_POLY = 0x82F63B78  # reflected


def _gf2_times(matrix: list[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


@functools.lru_cache(maxsize=16)
def _zeros_operator(nbytes: int) -> tuple[int, ...]:
    """The 32x32 GF(2) matrix that advances a crc32c over ``nbytes`` zero bytes."""
    result = [1 << n for n in range(32)]  # identity
    power = [_CRC32C_POLY] + [1 << n for n in range(31)]  # one zero bit
    for _ in range(3):  # one zero byte = 8 bits
        power = [_gf2_times(power, power[n]) for n in range(32)]
    while nbytes:
        if nbytes & 1:
            result = [_gf2_times(power, result[n]) for n in range(32)]
        nbytes >>= 1
        if nbytes:
            power = [_gf2_times(power, power[n]) for n in range(32)]
    return tuple(result)


def crc32c_concat(crcs: list[int], lengths: list[int]) -> int:
    """The crc32c of the concatenation of byte strings whose crc32c and lengths are given."""
    total = 0
    for crc, n in zip(crcs, lengths, strict=True):
        total = _gf2_times(_zeros_operator(n), total) ^ int(crc)
    return total


def record_training_store(model, dataset) -> None:
    """Remember on ``model`` (saved with it) the store it was trained on."""
    setattr(model, TRAINED_ON, {"url": dataset.url, "fingerprint": fingerprint(dataset),
                                "n_rows": int(dataset.n_rows)})


def rows_kind(model, dataset) -> str:
    """What ``dataset``'s rows are to ``model``: ``"TRAINING rows (not a held-out estimate)"``
    when it was trained on them (recorded in the model file, or a store's training part of an
    ``ingest --test-fraction`` split), ``"held-out rows"`` for the split's test part, else
    ``"rows"``."""
    trained_on = getattr(model, TRAINED_ON, None) or {}
    split = (dataset.attrs.get("split") or {}).get("part")
    if trained_on.get("fingerprint") == fingerprint(dataset) or split == "train":
        return "TRAINING rows (not a held-out estimate)"
    return "held-out rows" if split == "test" else "rows"


def _label_kind(labels: np.ndarray) -> str:
    return "string" if labels.dtype.kind in "USO" else "numeric"


def check_scoreable(model, dataset, *, name: str = "the model") -> None:
    """Refuse, from metadata alone, a store the model cannot predict: another number of
    features (e.g. raw pixels given to a features model), or labels of another kind.

    Raises
    ------
    DataError
        One line naming the model, the store, both values and what to do.
    """
    expected = getattr(model, "n_features_in_", None)
    if expected is not None and int(expected) != int(dataset.n_features):
        hint = ("; it holds raw image pixels: extract features first (rpicluster features "
                f"{dataset.url} -o FEATURES.zarr) and use that store"
                if is_image_store(dataset) else
                "; use a store made the same way as the training store")
        raise DataError(f"{name} was trained on {int(expected)} features, {dataset.url} has "
                        f"{dataset.n_features}{hint}")
    known = getattr(model, "classes_", None)
    if known is not None:
        known, labels = np.asarray(known), np.asarray(dataset.classes)
        ours, theirs = _label_kind(known), _label_kind(labels)
        if ours != theirs:
            raise DataError(f"{name} was trained on {ours} labels (e.g. {some_values(known)}), "
                            f"{dataset.url} holds {theirs} labels (e.g. {some_values(labels)}): no "
                            "prediction can match; score a store ingested from the same kind "
                            "of labels")


def is_image_store(dataset) -> bool:
    """Whether the store holds raw uint8 image pixels (``ingest images:DIR``)."""
    return "image_shape" in dataset.attrs and dataset.itemsize == 1


def check_not_pixels(dataset, *, allow_pixels: bool = False) -> None:
    """Refuse to train on raw image pixels unless ``allow_pixels``.

    Raises
    ------
    DataError
        The store is an image store: extract features first (the command), or pass
        ``allow_pixels`` (``--allow-pixels``).
    """
    if allow_pixels or not is_image_store(dataset):
        return
    raise DataError(f"{dataset.url} holds raw image pixels ({dataset.n_features:,} uint8 columns "
                    "per image): extract features first (rpicluster features "
                    f"{dataset.url} -o FEATURES.zarr, then train on FEATURES.zarr), or pass "
                    "--allow-pixels to train on the pixels")


def some_values(values: np.ndarray, n: int = 5) -> str:
    """The first ``n`` values, quoted, for a message."""
    shown = ", ".join(repr(v) for v in values.tolist()[:n])
    return shown + (", ..." if len(values) > n else "")
