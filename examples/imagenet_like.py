"""End to end on synthetic ImageNet-shaped features: ingest, train on the cluster, score, save.

Seeded ImageNet-like rows (class structure of pooled CNN features: super-classes, several modes
per class, ReLU) are ingested into a Zarr training store block by block, and rows that continue
the same generator into a held-out store. Inc-kSGD is fitted on the cluster (each worker reads its
blocks from the store itself), scored on the held-out store on the cluster, compared with one
scikit-learn SGDClassifier on the same rows in memory, and saved as a skops model file.

    python examples/imagenet_like.py                       # small: well under a minute
    python examples/imagenet_like.py --rows 500000 --features 2048 --classes 1000 \\
        --block-rows 65536 -c cluster.toml                 # the paper's shape, on real Pis

With no --scheduler/-c/--local it uses the cluster `rpicluster up` recorded, else starts the
embedded local cluster for the run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np

from common import cluster, example_parser


def parser() -> argparse.ArgumentParser:
    p = example_parser(__doc__, "imagenet-like")
    p.add_argument("--rows", type=int, default=12_000, help="training rows")
    p.add_argument("--test-rows", type=int, default=3_000)
    p.add_argument("--features", type=int, default=128)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--block-rows", type=int, default=3_000, help="rows per block (one model each)")
    p.add_argument("--clusters", type=int, default=8, help="k-means clusters per block")
    p.add_argument("--epochs", type=int, default=5)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    from sklearn.linear_model import SGDClassifier

    from rpicluster import IncrementalKSGDClassifier, ingest, open_dataset
    from rpicluster.data.sources import ArraySource
    from rpicluster.data.synthetic import SyntheticSpec
    from rpicluster.train.mapping import score_dataset
    from rpicluster.train.modelfile import save_model

    args.workdir.mkdir(parents=True, exist_ok=True)
    knobs = f"features={args.features},classes={args.classes},seed={args.seed}"
    t0 = time.perf_counter()
    train = ingest(f"synthetic:rows={args.rows},{knobs}", args.workdir / "train.zarr",
                   block_rows=args.block_rows, overwrite=True)
    # Held out: the generator continued past the training rows (same classes, new draws).
    spec = SyntheticSpec.from_string(f"rows={args.rows + args.test_rows},{knobs}")
    tail = itertools.islice(spec.iter_blocks(args.test_rows), args.rows // args.test_rows, None)
    X_test, y_test = (np.concatenate(parts) for parts in zip(*tail))
    X_test, y_test = X_test[-args.test_rows:], y_test[-args.test_rows:]
    test = ingest(ArraySource("held-out rows", X_test, y_test), args.workdir / "test.zarr",
                  block_rows=args.block_rows, overwrite=True)
    ingest_s = time.perf_counter() - t0

    model = IncrementalKSGDClassifier(n_clusters=args.clusters, max_iter=args.epochs,
                                      random_state=args.seed)
    with cluster(args) as client:
        n_workers = len(client.scheduler_info()["workers"])
        t0 = time.perf_counter()
        model.fit(open_dataset(train.url))      # with a client: blocks are fitted on the cluster
        train_s = time.perf_counter() - t0
        accuracy = score_dataset(model, open_dataset(test.url), client)
    digest = save_model(model, args.workdir / "model.skops")

    # Reference: one linear model on all training rows in this process's memory.
    X, y = (np.concatenate(p) for p in zip(*spec.iter_blocks(args.block_rows)))
    t0 = time.perf_counter()
    sgd = SGDClassifier(max_iter=args.epochs, tol=None, random_state=args.seed).fit(
        X[:args.rows], y[:args.rows])
    sgd_s = time.perf_counter() - t0
    result = {"rows": args.rows, "features": args.features, "classes": args.classes,
              "blocks": train.n_blocks, "workers": n_workers, "ingest_s": round(ingest_s, 2),
              "train_s": round(train_s, 2), "accuracy": accuracy,
              "sgd_accuracy": float(sgd.score(X_test, y_test)), "sgd_s": round(sgd_s, 2),
              "model": str(args.workdir / "model.skops"), "sha256": digest}
    (args.workdir / "result.json").write_text(json.dumps(result, indent=1))
    print(f"Inc-kSGD: {train.n_blocks} blocks on {n_workers} workers in {train_s:.1f} s, "
          f"held-out accuracy {accuracy:.4f} (SGDClassifier in memory: "
          f"{result['sgd_accuracy']:.4f} in {sgd_s:.1f} s); model {result['model']}")
    return result


if __name__ == "__main__":
    main()
