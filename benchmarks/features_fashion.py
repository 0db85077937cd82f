"""The paper's pipeline end to end on real images: Fashion-MNIST -> EfficientNet-Lite0 features
on the cluster -> Inc-kSGD, against Inc-kSGD on the raw pixels.

Fashion-MNIST (Debian package ``dataset-fashion-mnist``: 60,000 training and 10,000 test images,
28x28 grayscale, 10 classes) is written as two image stores; ``extract_features`` runs on the
cluster (images/s per worker, extraction time); Inc-kSGD trains on the feature store and on the
pixels (scaled to 0..1) with the same parameters on the same cluster (train time, held-out
accuracy). Results: ``benchmarks/results/features_fashion.{md,json}``.

    .venv/bin/python benchmarks/features_fashion.py --local 2 --input-size 64
    .venv/bin/python benchmarks/features_fashion.py --rows 6000 --test-rows 1000   # quick
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=60_000, help="training images (first N)")
    ap.add_argument("--test-rows", type=int, default=10_000)
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--image-block-rows", type=int, default=2_500, help="images per task")
    ap.add_argument("--block-rows", type=int, default=15_000, help="rows per training block")
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--local", type=int, help="embedded cluster workers (default: recorded "
                    "or one per core)")
    ap.add_argument("--scheduler")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/features-fashion"))
    ap.add_argument("--note", default="loaded: shared 2-core machine",
                    help="how the machine was while measuring (goes into the results)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from rpicluster import IncrementalKSGDClassifier, extract_features, ingest, open_dataset
    from rpicluster.data.sources import ArraySource, fashion_mnist_source
    from rpicluster.deploy.resolve import client as cluster_client
    from rpicluster.features.images import write_image_store
    from rpicluster.train.job import train
    from rpicluster.train.mapping import score_dataset

    args.workdir.mkdir(parents=True, exist_ok=True)
    block = args.block_rows - args.block_rows % args.image_block_rows
    parts = {"train": args.rows, "test": args.test_rows}
    images, pixels = {}, {}
    for part, n in parts.items():
        name = f"fashion-mnist:{part}"
        if n >= fashion_mnist_source(part).n_rows:
            # The whole split: the real image-store ingest (pixels / 255 with image_shape).
            images[part] = ingest(name, args.workdir / f"images-{part}.zarr",
                                  block_rows=args.image_block_rows, overwrite=True)
            pixels[part] = ingest(name, args.workdir / f"pixels-{part}.zarr", block_rows=block,
                                  overwrite=True)
            continue
        src = fashion_mnist_source(part)  # a quick run: the first n images
        X = np.concatenate([b for b, _ in src.blocks(10_000)])[:n]
        y = src.codes()[:n]
        images[part] = write_image_store(args.workdir / f"images-{part}.zarr",
                                         np.rint(X * 255).astype(np.uint8).reshape(-1, 28, 28),
                                         y, block_rows=args.image_block_rows, source=name)
        pixels[part] = ingest(ArraySource(f"{name} pixels", X, y),
                              args.workdir / f"pixels-{part}.zarr", block_rows=block,
                              overwrite=True)
    doc = {"note": args.note, "rows": args.rows, "test_rows": args.test_rows,
           "input_size": args.input_size, "clusters": args.clusters, "epochs": args.epochs,
           "block_rows": block, "rows_out": []}
    with cluster_client(args.scheduler, local=args.local) as client:
        workers = client.scheduler_info()["workers"]
        doc["workers"] = len(workers)
        doc["threads_per_worker"] = sorted({w["nthreads"] for w in workers.values()})
        feats, extract_s, rates = {}, {}, {}
        for part in parts:
            r = extract_features(images[part].url, str(args.workdir / f"features-{part}.zarr"),
                                 input_size=args.input_size, block_rows=block, client=client,
                                 overwrite=True)
            feats[part], extract_s[part] = r.store, r.seconds
            if part == "train":
                rates = r.images_per_second()
        for name, stores, extra in (("EfficientNet-Lite0 features", feats, extract_s),
                                    ("raw pixels", pixels, None)):
            model = IncrementalKSGDClassifier(n_clusters=args.clusters, max_iter=args.epochs,
                                              random_state=0)
            t0 = time.perf_counter()
            train(model, open_dataset(stores["train"].url), client)
            train_s = time.perf_counter() - t0
            acc = score_dataset(model, open_dataset(stores["test"].url), client)
            doc["rows_out"].append({
                "input": name, "features": int(stores["train"].n_features),
                "extract_s": None if extra is None else extra["train"] + extra["test"],
                "images_per_s_per_worker": rates if extra is not None else None,
                "train_s": train_s, "accuracy": acc})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "features_fashion.json").write_text(json.dumps(doc, indent=1))
    lines = [f"# Fashion-MNIST: EfficientNet-Lite0 features vs raw pixels ({args.note})", "",
             f"{args.rows:,} training / {args.test_rows:,} test images, input "
             f"{args.input_size} px, {doc['workers']} workers x {doc['threads_per_worker']} "
             f"threads, Inc-kSGD k={args.clusters}, {args.epochs} epochs, blocks of {block:,} "
             "rows.", "",
             "| input | features | extraction s | images/s per worker | train s | accuracy |",
             "|---|---:|---:|---|---:|---:|"]
    for r in doc["rows_out"]:
        per = ", ".join(f"{w}: {v:.0f}" for w, v in (r["images_per_s_per_worker"] or {}).items())
        ext = "-" if r["extract_s"] is None else f"{r['extract_s']:.0f}"
        lines.append(f"| {r['input']} | {r['features']} | {ext} | {per or '-'} | "
                     f"{r['train_s']:.1f} | {r['accuracy']:.4f} |")
    (args.out / "features_fashion.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
