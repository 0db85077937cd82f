"""The edge runner: classify photos with one exported ONNX file, on a Pi or anywhere.

    python -m rpicluster.edge MODEL.onnx IMAGES...|DIR [--threads N] [--batch N]

prints one ``path<TAB>label`` line per image, then the images per second (on stderr). This module
imports only onnxruntime, numpy and Pillow (an import-linter contract holds it to that): copy this
one file and the ``.onnx`` file that ``rpicluster export --features ...`` wrote to a board that has
``pip install onnxruntime numpy pillow`` and run ``python edge.py MODEL.onnx photos/``.

Each photo is decoded and fitted to the model's input with :func:`fit_image`, the very function
``rpicluster features`` preprocesses with, so the runner's labels are those of ``features`` +
``predict``. Decoding the next batch overlaps the model's run on the current one (Pillow and ONNX
Runtime both release the GIL), so the runner keeps ONNX Runtime busy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

#: The ImageNet evaluation rule: shorter side to size / 0.875 (224 -> 256), then a centre crop.
CROP_FRACTION = 0.875
#: File suffixes a directory argument is scanned for.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                  ".pgm")
#: Images per ONNX Runtime call by default (the feature job's batch).
BATCH = 32


class EdgeError(Exception):
    """A user's mistake (a file, a flag), printed by :func:`main` as one ``error:`` line as the
    rpicluster CLI prints its errors (the runner imports nothing of rpicluster, so it cannot
    share ``rpicluster.errors``)."""


def fit_image(image, size: int, channels: int = 3) -> np.ndarray:
    """A Pillow image as the network sees it: uint8 ``(size, size, channels)``.

    Converted to RGB (or luminance for a 1-channel network; alpha dropped), shorter side
    resized (bilinear) to ``round(size / 0.875)``, centre ``size x size`` crop.
    """
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    short = round(size / CROP_FRACTION)
    w, h = image.size
    scale = short / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                         Image.BILINEAR)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    crop = np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)
    return crop.reshape(size, size, channels)


def load_image(path, size: int, channels: int = 3, image_size: int | None = None) -> np.ndarray:
    """:func:`fit_image` of an image file, read as ``rpicluster ingest images:`` reads it.

    The EXIF orientation is applied; with ``image_size`` (the ``ingest --image-size`` the
    training photos were stored at) the photo is first fitted to ``image_size x image_size``
    (``ImageOps.fit``, bilinear, RGB) as ingest does, so the crop the network sees is the one
    it saw in training. EdgeError names a file Pillow cannot read.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image_size:
                image = ImageOps.fit(image.convert("RGB"), (image_size, image_size),
                                     method=Image.Resampling.BILINEAR)
            return fit_image(image, size, channels)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise EdgeError(f"cannot read image {path}: {exc} (not an image Pillow can decode, or "
                        "damaged); remove or replace it") from None


def image_paths(args) -> list[Path]:
    """Files named, and the image files (by suffix, sorted) of directories named."""
    out = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted(f for f in p.iterdir()
                           if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise EdgeError(f"directory {p} holds no image ({', '.join(IMAGE_SUFFIXES)}); "
                                "give image files or a directory of them")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise EdgeError(f"image {p} does not exist; give image files or a directory of them")
    return out


def prefetched(load, items):
    """Yield ``load(item)`` for each of ``items`` (any iterable, advanced on the same thread),
    computing the next one on a second thread while the caller works on this one (decoding
    overlaps ONNX Runtime; both release the GIL)."""
    items, done = iter(items), object()

    def step():
        for item in items:
            return load(item)
        return done

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(step)
        while (result := pending.result()) is not done:
            pending = pool.submit(step)
            yield result


class Classifier:
    """An exported model in an ONNX Runtime session, fed uint8 image batches.

    Parameters
    ----------
    model : path
        A ``.onnx`` file from ``rpicluster export --features ...``.
    threads : int, optional
        ONNX Runtime intra-op threads (default: every core).
    image_size : int, optional
        The ``ingest --image-size`` of the training photos (see :func:`load_image`); default
        the one ``rpicluster export --image-size`` recorded in the file, if any.

    Attributes
    ----------
    size, channels : int
        The input crops' side and channels.
    """

    def __init__(self, model, threads: int | None = None, image_size: int | None = None):
        import onnxruntime as ort

        self.model = Path(model)
        if not self.model.is_file():
            raise EdgeError(f"model {model} does not exist; give the .onnx file "
                            "`rpicluster export` wrote")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.model), sess_options=opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are untyped
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise EdgeError(f"cannot load model {model}: not a valid ONNX model ({first}); "
                            "give the .onnx file `rpicluster export` wrote") from None
        inp = self.session.get_inputs()[0]
        self.input_name, shape = inp.name, list(inp.shape)
        if inp.type == "tensor(float)" and len(shape) == 2:
            raise EdgeError(f"model {model} takes feature rows ({shape[1]} features), not "
                            "images: it was exported without --features; export it again "
                            f"with `rpicluster export MODEL -o {model} --features "
                            "efficientnet-lite0 --input-size SIZE` (the network and size its "
                            "features were made with)")
        if (inp.type != "tensor(uint8)" or len(shape) != 4 or not isinstance(shape[1], int)
                or shape[1] != shape[2] or shape[3] not in (1, 3)):
            raise EdgeError(f"model {model} takes input {inp.name!r} of type {inp.type} and "
                            f"shape {shape}, not a batch of uint8 images (N, size, size, 1 or "
                            "3); export the model with `rpicluster export ... --features ...`")
        self.size, self.channels = int(shape[1]), int(shape[3])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.image_size = image_size or int(meta.get("rpicluster.image_size", 0)) or None
        self.output_names = [o.name for o in self.session.get_outputs()]
        if "label" not in self.output_names:
            raise EdgeError(f"model {model} has no 'label' output (outputs: "
                            f"{self.output_names}); export the model with `rpicluster export`")

    def run(self, images: np.ndarray) -> np.ndarray:
        """Labels of uint8 crops ``(n, size, size, channels)``."""
        (labels,) = self.session.run(["label"], {self.input_name: images})
        return labels

    def classify(self, paths, batch: int = BATCH):
        """Yield ``(path, label)`` of image files, decoding the next batch while one runs."""
        paths = list(paths)
        batches = [paths[i:i + batch] for i in range(0, len(paths), batch)]

        def load(group):
            return group, np.stack([load_image(p, self.size, self.channels, self.image_size)
                                    for p in group])

        for group, images in prefetched(load, batches):
            yield from zip(group, self.run(images))


def main(argv=None) -> int:
    """``python -m rpicluster.edge MODEL.onnx IMAGES...|DIR [--threads N] [--batch N]``."""
    p = argparse.ArgumentParser(prog="python -m rpicluster.edge", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the .onnx file `rpicluster export --features ...` wrote")
    p.add_argument("images", nargs="+", help="image files, or directories of them")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime threads (default: every core)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"images per run (default {BATCH})")
    p.add_argument("--image-size", type=int, default=None,
                   help="fit photos to this square first, as `rpicluster ingest images: "
                        "--image-size` did (default: the size recorded by export, if any)")
    args = p.parse_args(argv)
    if min(args.batch, args.threads or 1, args.image_size or 1) < 1:
        p.error("--batch, --threads and --image-size must be >= 1")
    try:
        clf = Classifier(args.model, args.threads, args.image_size)
        paths = image_paths(args.images)
        start = time.perf_counter()
        n = 0
        for path, label in clf.classify(paths, args.batch):
            print(f"{path}\t{label}")
            n += 1
        seconds = time.perf_counter() - start
    except EdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{n} images in {seconds:.2f} s: {n / seconds:.1f} images/s "
          f"({clf.session.get_session_options().intra_op_num_threads} threads, batch "
          f"{args.batch})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
