"""Handwritten digits (scikit-learn's 8x8 images): the smallest real data set, start to finish.

The 1,797 images are split 75/25, each part ingested into a Zarr store in blocks of
``--block-rows``; Inc-kSGD is fitted on the cluster (one kSGD per block, majority vote),
scored on the held-out store, and compared with one scikit-learn SGDClassifier trained on all
training rows in memory. The same run from the command line (rows shuffled, a stratified
quarter held out):

    rpicluster ingest sklearn:digits digits.zarr --block-rows 600 \
        --test-fraction 0.25 --test-out digits-test.zarr
    rpicluster train digits.zarr -o digits.skops --clusters 2
    rpicluster score digits.skops digits-test.zarr
"""

from __future__ import annotations

import argparse
import json

from common import cluster, example_parser


def parser() -> argparse.ArgumentParser:
    p = example_parser(__doc__, "digits")
    p.add_argument("--block-rows", type=int, default=450, help="rows per block (one model each)")
    p.add_argument("--clusters", type=int, default=2, help="k-means clusters per block")
    p.add_argument("--epochs", type=int, default=20)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    from sklearn.datasets import load_digits
    from sklearn.linear_model import SGDClassifier
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    from rpicluster import IncrementalKSGDClassifier, ingest, open_dataset
    from rpicluster.data.sources import ArraySource

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=y,
                                                        random_state=args.seed)
    # Pixel intensities 0..16: standardised, as SGD needs features on one scale.
    scaler = StandardScaler().fit(X_train)
    X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)
    args.workdir.mkdir(parents=True, exist_ok=True)
    stores = {name: ingest(ArraySource(f"digits {name}", Xs, ys), args.workdir / f"{name}.zarr",
                           block_rows=args.block_rows, overwrite=True)
              for name, Xs, ys in (("train", X_train, y_train), ("test", X_test, y_test))}

    model = IncrementalKSGDClassifier(n_clusters=args.clusters, max_iter=args.epochs,
                                      random_state=args.seed)
    with cluster(args):
        model.fit(open_dataset(stores["train"].url))
        accuracy = model.score(open_dataset(stores["test"].url))  # on the cluster
    sgd = SGDClassifier(max_iter=args.epochs, tol=None, random_state=args.seed).fit(X_train,
                                                                                    y_train)
    result = {"blocks": stores["train"].n_blocks, "accuracy": accuracy,
              "sgd_accuracy": float(sgd.score(X_test, y_test)),
              "test_rows": int(len(y_test))}
    (args.workdir / "result.json").write_text(json.dumps(result, indent=1))
    print(f"digits: Inc-kSGD ({result['blocks']} blocks) held-out accuracy {accuracy:.4f}; "
          f"SGDClassifier on all rows {result['sgd_accuracy']:.4f}")
    return result


if __name__ == "__main__":
    main()
