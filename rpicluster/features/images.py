"""Image stores as the feature job reads them: the dataset layout contract with uint8 images.

An image store is a store of :mod:`rpicluster.data.store`'s layout (format version, ``classes``,
``n_rows``, ``block_rows``, ``n_blocks``, ``complete``; ``bytes`` + ``crc32c`` codecs; one block
per chunk row) whose ``X`` holds uint8 pixels instead of float features: one image per row,
flattened in (height, width, channel) order, with the attribute ``image_shape`` =
``[height, width, channels]``. ``rpicluster ingest images:DIR`` (and ``idx:``,
``fashion-mnist``) write them; :func:`write_image_store` writes one from arrays in memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from rpicluster.errors import DataError


class ImageStore:
    """A complete image store opened for reading; pickles as its URL (workers reopen it).

    Attributes
    ----------
    url : str
    n_rows, block_rows, n_blocks : int
    image_shape : tuple
        ``(H, W)`` or ``(H, W, C)``.
    classes : ndarray
    attrs : dict
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        from rpicluster.data.store import _normalize_url

        self.url = _normalize_url(url)
        self.storage_options = dict(storage_options) if storage_options else None
        self._open()

    def __getstate__(self):
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state):
        self.url, self.storage_options = state["url"], state["storage_options"]
        self._open()

    def _open(self) -> None:
        from rpicluster.data.sources import classes_from_json
        from rpicluster.data.store import Dataset

        # The store-level checks (format version, completion marker, attributes) are the
        # dataset's; only X's dtype differs.
        try:
            Dataset(self.url, self.storage_options)._validate()
        except DataError as exc:
            if "array 'X' has shape" not in str(exc):
                raise
        import zarr

        group = zarr.open_group(self.url, mode="r", zarr_format=3,
                                storage_options=self.storage_options)
        attrs = dict(group.attrs)
        X, y = group["X"], group["y"]
        n, b = int(attrs["n_rows"]), int(attrs["block_rows"])
        shape = attrs.get("image_shape")
        if X.dtype != np.uint8 or not shape or X.shape != (n, int(np.prod(shape))):
            raise DataError(f"{self.url} is not an image store: its X is {X.dtype} of shape "
                            f"{X.shape} and image_shape is {shape} (expected uint8 rows of "
                            "height x width x channels pixels); ingest images with "
                            "`rpicluster ingest images:DIR`")
        self.attrs, self._X, self._y = attrs, X, y
        self.n_rows, self.block_rows = n, b
        self.n_blocks = math.ceil(n / b)
        h, w, c = (list(shape) + [1])[:3]
        self.image_shape = (h, w) if c == 1 else (h, w, c)
        self.classes = classes_from_json(attrs["classes"])

    def block(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(uint8 images, int32 codes)`` of block ``i``; a damaged chunk names its key."""
        lo, hi = i * self.block_rows, min((i + 1) * self.block_rows, self.n_rows)
        try:
            images, y = self._X[lo:hi].reshape(-1, *self.image_shape), self._y[lo:hi]
        except (ValueError, OSError) as exc:
            key = f"X/c/{i}/0"
            raise DataError(f"{self.url}: chunk {key} (block {i}) is corrupted or unreadable "
                            f"({exc})") from None
        if len(y) and y.min() < 0:
            raise DataError(f"{self.url}: chunk y/c/{i} (block {i}) is missing")
        return images, y


def open_images(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None
                ) -> ImageStore:
    """Open a complete image store (see :class:`ImageStore`)."""
    return ImageStore(os.fspath(url), storage_options)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (MNIST / Fashion-MNIST; gzip or plain) as a uint8 array."""
    import gzip

    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims}, the file holds {body.size} values")
    return body.reshape(dims)


def write_image_store(out: str | os.PathLike, images: np.ndarray, y: np.ndarray, classes,
                      *, block_rows: int, source: str = "arrays") -> ImageStore:
    """Write uint8 ``images`` and int ``y`` codes (indices into ``classes``) as an image store."""
    import datetime

    import zarr
    from zarr.codecs import BytesCodec, Crc32cCodec

    from rpicluster.data import store
    from rpicluster.data.sources import classes_to_json

    images = np.asarray(images, np.uint8)
    n, shape = len(images), (list(images.shape[1:]) + [1])[:3]
    flat = images.reshape(n, -1)
    attrs = {store.FORMAT_KEY: store.FORMAT_VERSION,
             "classes": classes_to_json(np.asarray(classes)),
             "n_rows": n, "n_features": flat.shape[1], "image_shape": shape,
             "block_rows": block_rows,
             "n_blocks": math.ceil(n / block_rows), "source": source,
             "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "blocks_written": 0, "complete": False}
    root = zarr.open_group(store._normalize_url(out), mode="w", zarr_format=3, attributes=attrs)
    common = dict(serializer=BytesCodec(), compressors=[Crc32cCodec()], filters=None,
                  config={"write_empty_chunks": True})
    X = root.create_array("X", shape=flat.shape, dtype="uint8",
                          chunks=(block_rows, flat.shape[1]), fill_value=0, **common)
    Y = root.create_array("y", shape=(n,), dtype="int32", chunks=(block_rows,), fill_value=-1,
                          **common)
    codes = np.asarray(y, np.int32)
    X[:], Y[:] = flat, codes
    sums = {"X": [store._crc(flat[lo:lo + block_rows]) for lo in range(0, n, block_rows)],
            "y": [store._crc(codes[lo:lo + block_rows]) for lo in range(0, n, block_rows)]}
    root.attrs.update({"blocks_written": attrs["n_blocks"], store.CHECKSUMS_KEY: sums,
                       "complete": True})
    return open_images(out)
