"""One block of `bench paper`'s store, in process: CPU seconds of its k-means and fits, and accuracy.

    python benchmarks/paper_block.py                       # --paper-config: k=300, 50 epochs, eta 0.001
    python benchmarks/paper_block.py --clusters 20 --epochs 5 --rate optimal
    python benchmarks/paper_block.py --every 10            # fit every 10th cluster only (CPU only)

Block 0 of the paper's shape (126,141 rows of ``synthetic:rows=1009124,features=2048,
classes=1000,seed=0``, the rows `bench paper` ingests first) and 20,000 held-out rows after
them, generated once into ``--cache``. It times the task's own functions
(:func:`~rpicluster.models.ksgd.partition_block`, then :func:`~rpicluster.models.ksgd.fit_cluster`
of every cluster, one BLAS thread, as a worker runs them) by **thread CPU time**, which the
machine's load does not inflate (much: shared caches), and prints the held-out accuracy of the
block's model, the number of minibatches and a hash of the model (the same hash = the same
model bit for bit). One block is an eighth of `bench paper`'s work.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np

ROWS, BLOCK_ROWS, FEATURES, CLASSES, TEST_ROWS = 1_009_124, 126_141, 2048, 1000, 20_000


def load(cache: Path):
    """Block 0 and the held-out rows, generated once into ``cache`` (about 1.2 GB)."""
    from rpicluster.data.synthetic import SyntheticSpec, _generate

    cache.mkdir(parents=True, exist_ok=True)
    names = ("X", "y", "X_test", "y_test")
    if not all((cache / f"{n}.npy").exists() for n in names):
        spec = SyntheticSpec(rows=ROWS + TEST_ROWS, features=FEATURES, classes=CLASSES, seed=0)
        X, y = _generate(spec, 0, BLOCK_ROWS)
        X_test, y_test = _generate(spec, ROWS, ROWS + TEST_ROWS)
        for name, a in zip(names, (X, y, X_test, y_test)):
            np.save(cache / f"{name}.npy", a)
    return [np.load(cache / f"{n}.npy") for n in names]


def main() -> None:
    from rpicluster.models import _sgd
    from rpicluster.models.ksgd import (KSGDClassifier, cluster_epochs, fit_cluster,
                                        group_rows, partition_block, task_seed)
    from rpicluster.train.tasks import one_blas_thread

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clusters", type=int, default=300)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--rate", default="constant", help="learning_rate (default: constant)")
    p.add_argument("--eta", type=float, default=0.001)
    p.add_argument("--every", type=int, default=1, help="fit every N-th cluster only")
    p.add_argument("--cache", type=Path, default=Path("/tmp/paper_block"))
    args = p.parse_args()

    X, y, X_test, y_test = load(args.cache)
    classes, codes = np.unique(y, return_inverse=True)
    params = {"n_clusters": args.clusters, "max_iter": args.epochs, "alpha": 1e-4,
              "learning_rate": args.rate, "eta0": args.eta, "power_t": 0.5, "batch_size": 256,
              "average": True, "solver": "minibatch"}
    with one_blas_thread():
        c0 = time.thread_time()
        centers, labels = partition_block(X, args.clusters, seed=task_seed(0, 0))
        kmeans_cpu = time.thread_time() - c0
        order, bounds = group_rows(labels, centers.shape[0])
        k = centers.shape[0]
        fitted = range(0, k, args.every)
        c0 = time.thread_time()
        models = {j: fit_cluster(X, codes, params=params, rows=order[bounds[j]:bounds[j + 1]],
                                 seed=task_seed(0, 0, j)) for j in fitted}
        fit_cpu = time.thread_time() - c0
    batches = sum(len(_sgd.batch_sizes(int(bounds[j + 1] - bounds[j]),
                                       cluster_epochs(args.epochs, int(bounds[j + 1] - bounds[j])),
                                       batch_size=256, alpha=1e-4))
                  for j in fitted if len(models[j].classes) > 1)
    digest = hashlib.sha256(b"".join(m.coef.tobytes() + m.intercept.tobytes()
                                     for m in models.values())).hexdigest()[:16]
    print(f"k={args.clusters} epochs={args.epochs} rate={args.rate} eta={args.eta}: "
          f"{len(fitted)} of {k} clusters fitted, {batches} minibatches")
    print(f"k-means CPU {kmeans_cpu:.2f} s; fits CPU {fit_cpu:.2f} s; model sha256 {digest}")
    if args.every == 1:
        est = KSGDClassifier.from_parts(classes, centers, [models[j] for j in range(k)], params)
        print(f"held-out accuracy {float(np.mean(est.predict(X_test) == y_test)):.4f} "
              f"({TEST_ROWS} rows)")


if __name__ == "__main__":
    main()
