"""Image stores as the feature job reads them: the dataset layout contract with uint8 images.

An image store is a store of :mod:`rpicluster.data.layout`'s layout whose rows are images: one
image per row, flattened in (height, width, channel) order, with the attribute ``image_shape`` =
``[height, width, channels]``. ``rpicluster ingest images:DIR`` writes uint8 pixels; ``idx:`` and
``fashion-mnist`` write float32 pixels / 255. :func:`write_image_store` writes uint8 images from
arrays in memory (through :func:`rpicluster.ingest`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from rpicluster.errors import DataError


class ImageStore:
    """A complete image store opened for reading: a :class:`~rpicluster.data.reader.Dataset`
    whose rows are images. Pickles as the dataset (its URL), so workers reopen it.

    Attributes
    ----------
    dataset : Dataset
    url : str
    n_rows, block_rows, n_blocks : int
    image_shape : tuple
        ``(H, W)`` or ``(H, W, C)``.
    classes : ndarray
    attrs : dict
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        from rpicluster.data.reader import open_dataset

        self.dataset = ds = open_dataset(url, storage_options)
        shape = ds.attrs.get("image_shape")
        if not shape:
            raise DataError(f"{ds.url} is not an image store: it has no image_shape attribute "
                            f"(its {ds.n_features} features are not pixels); ingest images with "
                            "`rpicluster ingest images:DIR` (or idx:, fashion-mnist)")
        h, w, c = (list(shape) + [1])[:3]
        self.image_shape = (h, w) if c == 1 else (h, w, c)

    def __getattr__(self, name):
        if name in ("url", "n_rows", "block_rows", "n_blocks", "classes", "attrs"):
            return getattr(self.__dict__["dataset"], name)
        raise AttributeError(name)

    def block(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(uint8 images (rows, *image_shape), int32 codes)`` of block ``i``, checked.

        Stores of float pixels (``idx:`` and ``fashion-mnist`` hold pixels / 255) are scaled
        back to 0..255.
        """
        X, y = self.dataset.block(i)
        if X.dtype != np.uint8:
            X = np.clip(np.rint(X * 255.0), 0, 255).astype(np.uint8)
        return X.reshape(-1, *self.image_shape), y


def open_images(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None
                ) -> ImageStore:
    """Open a complete image store (see :class:`ImageStore`)."""
    return ImageStore(os.fspath(url), storage_options)


def write_image_store(out: str | os.PathLike, images: np.ndarray, labels: np.ndarray, *,
                      block_rows: int, source: str = "arrays") -> ImageStore:
    """Ingest uint8 ``images`` ``(n, H, W[, C])`` with their labels as an image store.

    Rows keep their order (shuffle the arrays first if they are sorted by label).
    """
    from rpicluster.data.sources import ArraySource
    from rpicluster.data.writer import ingest

    images = np.asarray(images, np.uint8)
    shape = (list(images.shape[1:]) + [1])[:3]
    src = ArraySource(source, images.reshape(len(images), -1), np.asarray(labels))
    src.dtype = np.dtype(np.uint8)
    src.attrs = {"image_shape": shape}
    ingest(src, out, block_rows=block_rows, shuffle=False, overwrite=True)
    return open_images(out)
