"""Transfer learning on the cluster: a frozen ImageNet backbone, then a small head.

The shape of the on-device work this project grew from (a frozen MobileNetV2 / InceptionV3 on a
Pi 4, 1,000 labelled images, a trained head: 98 % / 91 % in 102 / 186 min). Two cases whose
data installs offline:

* ``fashion``: ``--images`` (default 1,000) Fashion-MNIST images (28x28 grayscale, 10 classes),
  a stratified sample of the Debian package ``dataset-fashion-mnist``;
* ``faces``: scikit-image's ``lfw_subset``, 100 faces and 100 non-faces (25x25 grayscale), the
  face-shaped case (no face-identity set installs offline).

Each case is split 75/25 (stratified), written as image stores, turned into EfficientNet-Lite0
features on the cluster (``rpicluster features``), and two heads are trained on the features:
Inc-kSGD on the cluster, and a plain linear head (scikit-learn's LogisticRegression) in memory.
Raw pixels with the same Inc-kSGD head are the baseline. The same run from the command line:

    rpicluster ingest fashion-mnist fashion.zarr --block-rows 250
    rpicluster features fashion.zarr -o fashion-features.zarr --input-size 96
    rpicluster train fashion-features.zarr -o head.skops --clusters 1
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from common import cluster, example_parser

#: The article's figures (Pi 4, 1,000 images, frozen backbone + head).
ARTICLE = "article (Pi 4, 1,000 images): MobileNetV2 98 % in 102 min, InceptionV3 91 % in 186 min"


def parser() -> argparse.ArgumentParser:
    p = example_parser(__doc__, "transfer-learning")
    p.add_argument("--cases", default="fashion,faces", help="comma-separated: fashion, faces")
    p.add_argument("--images", type=int, default=1000, help="Fashion-MNIST images to use")
    p.add_argument("--input-size", type=int, default=96, help="network input side (pixels)")
    p.add_argument("--block-rows", type=int, default=50, help="images per block (one task)")
    p.add_argument("--model", default="efficientnet-lite0", help="or a path to an .onnx file")
    return p


def load_case(name: str, n_images: int, seed: int):
    """(images uint8, labels, class names) of a case."""
    if name == "fashion":
        from rpicluster.data.sources import fashion_mnist_source

        src = fashion_mnist_source("train")
        # The source yields pixels / 255 as float32: back to the uint8 images they were.
        pixels = np.concatenate([X for X, _ in src.blocks(10_000)])
        images = np.rint(pixels * 255).astype(np.uint8).reshape(-1, 28, 28)
        labels = src.codes()
        per_class = n_images // 10
        rng = np.random.default_rng(seed)
        pick = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                               for c in range(10)])
        names = np.array(["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                          "Shirt", "Sneaker", "Bag", "Ankle boot"])
        return images[pick], names[labels[pick]], names
    if name == "faces":
        from skimage.data import lfw_subset

        images = (lfw_subset() * 255).round().astype(np.uint8)
        return images, np.repeat(["face", "non-face"], 100), np.array(["face", "non-face"])
    raise SystemExit(f"unknown case {name!r} (known: fashion, faces)")


def run_case(name: str, args, client) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from rpicluster import IncrementalKSGDClassifier, extract_features, open_dataset
    from rpicluster.features.images import write_image_store
    from rpicluster.train.mapping import score_dataset

    images, labels, names = load_case(name, args.images, args.seed)
    split = train_test_split(images, labels, test_size=0.25, stratify=labels,
                             random_state=args.seed)
    parts = {"train": split[::2], "test": split[1::2]}
    feats, seconds = {}, 0.0
    rates: dict[str, float] = {}
    for part, (X, y) in parts.items():
        store = write_image_store(args.workdir / f"{name}-{part}.zarr", X, y,
                                  block_rows=args.block_rows, source=f"{name} {part}")
        r = extract_features(store.url, str(args.workdir / f"{name}-{part}-features.zarr"),
                             model=args.model, input_size=args.input_size, client=client,
                             overwrite=True)
        feats[part], seconds = r.store, seconds + r.seconds
        rates.update({w: v for w, v in r.images_per_second().items()})
    t0 = time.perf_counter()
    # One block of all training rows: 750 rows are one Pi's work, not worth splitting.
    head = IncrementalKSGDClassifier(n_clusters=1, max_iter=20, random_state=args.seed,
                                     block_rows=feats["train"].n_rows)
    head.fit(open_dataset(feats["train"].url))
    ksgd_acc = score_dataset(head, open_dataset(feats["test"].url), client)
    head_seconds = time.perf_counter() - t0
    Xtr, ytr = (np.asarray(a.compute()) for a in (feats["train"].X, feats["train"].y))
    Xte, yte = (np.asarray(a.compute()) for a in (feats["test"].X, feats["test"].y))
    linear = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(Xtr, ytr)
    linear_acc = float(linear.score(Xte, yte))
    # Baseline: the same Inc-kSGD head on raw pixels (scaled to 0..1).
    (Ptr, Pte), (ltr, lte) = (parts["train"][0], parts["test"][0]), (parts["train"][1],
                                                                      parts["test"][1])
    raw = IncrementalKSGDClassifier(n_clusters=1, max_iter=20, random_state=args.seed,
                                    block_rows=len(ltr))
    raw.fit(Ptr.reshape(len(Ptr), -1) / 255.0, ltr)
    raw_acc = float(raw.score(Pte.reshape(len(Pte), -1) / 255.0, lte))
    return {"case": name, "train_images": int(len(parts["train"][1])),
            "test_images": int(len(parts["test"][1])), "classes": int(len(names)),
            "input_size": args.input_size, "extract_minutes": seconds / 60,
            "head_minutes": head_seconds / 60, "images_per_s_per_worker": rates,
            "ksgd_accuracy": float(ksgd_acc), "linear_accuracy": linear_acc,
            "raw_pixels_ksgd_accuracy": raw_acc}


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    with cluster(args) as client:
        workers = len(client.scheduler_info()["workers"])
        rows = [run_case(c, args, client) for c in cases]
    result = {"workers": workers, "model": args.model, "cases": rows, "article": ARTICLE}
    (args.workdir / "result.json").write_text(json.dumps(result, indent=1))
    print(f"| case | train/test images | extract min | head min | Inc-kSGD head | linear head "
          f"| Inc-kSGD raw pixels |  ({workers} workers, {args.model} at {args.input_size} px)")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['train_images']}/{r['test_images']} | "
              f"{r['extract_minutes']:.2f} | {r['head_minutes']:.2f} | {r['ksgd_accuracy']:.3f} "
              f"| {r['linear_accuracy']:.3f} | {r['raw_pixels_ksgd_accuracy']:.3f} |")
    print(ARTICLE)
    return result


if __name__ == "__main__":
    main()
