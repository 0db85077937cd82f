"""The Zarr dataset store's layout contract, shared by its reader and its writer.

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
(:func:`rpicluster.data.reader.verify_chunk`). Stores of format 1 (no ``chunk_crc32c``) are
still read, with the class code check only; ``rpicluster ingest ... --overwrite`` rewrites them
as format 2.
"""

from __future__ import annotations

import os

import numpy as np

from rpicluster.errors import DataError

FORMAT_VERSION = 2
#: Versions this rpicluster reads: 1 lacks the per-position checksums (class codes still checked).
READABLE_VERSIONS = (1, 2)
CHECKSUMS_KEY = "chunk_crc32c"
FORMAT_KEY = "rpicluster_format"
X_FILL = float("nan")
Y_FILL = -1


def crc(a: np.ndarray) -> int:
    """crc32c of an array's rows as little-endian bytes (the layout's per-position checksum)."""
    import google_crc32c

    return int(google_crc32c.value(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
                                   .tobytes()))


def check_codes(codes: np.ndarray, n_classes: int, where: str) -> None:
    """DataError naming ``where`` when a class code is outside ``0 .. n_classes - 1``."""
    bad = (codes < 0) | (codes >= n_classes)
    if bad.any():
        raise DataError(f"{where} holds class code {int(codes[bad][0])} ({int(bad.sum())} rows "
                        f"with impossible codes), but the store has {n_classes} classes (codes "
                        f"0..{n_classes - 1})")


def normalize_url(url: str | os.PathLike) -> str:
    """A store location as every reader and writer names it: a URL without its trailing
    slash, or an absolute local path (``~`` expanded)."""
    text = os.fspath(url)
    if "://" in text:
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text))
