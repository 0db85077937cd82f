"""Our minibatch SGD kernel against numpy's float32 matmul rate and scikit-learn's SGDClassifier.

    python benchmarks/kernel_gflops.py [--rows 50000 --features 512 --classes 100 --epochs 5]

Prints, on this machine and from one run:
* numpy's float32 matrix-product rate (one thread, and BLAS's default threads) at the kernel's
  shapes and at a large square shape;
* our kernel's achieved GFLOP/s (the FLOPs of its two products per batch, ``sgd_flops``),
  train time and test accuracy: plain and averaged on one thread, averaged on all cores;
* ``SGDClassifier(loss='hinge', penalty='l2')`` on the same rows and epochs (``tol=None``),
  with the speed-up.
Data: ``rpicluster.data.synthetic.make_imagenet_like`` (non-negative deep-feature-like rows),
split 80/20.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from threadpoolctl import threadpool_limits


def matmul_gflops(m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """GFLOP/s of ``(m, k) @ (k, n)`` in float32, best of repeated runs for ``seconds``."""
    rng = np.random.default_rng(0)
    a = rng.random((m, k), dtype=np.float32)
    b = rng.random((n, k), dtype=np.float32)
    out = np.empty((m, n), dtype=np.float32)
    best = float("inf")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        np.matmul(a, b.T, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def main() -> None:
    from sklearn.linear_model import SGDClassifier

    from rpicluster.data.synthetic import make_imagenet_like
    from rpicluster.models._sgd import sgd_flops, sgd_ovr_fit

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--features", type=int, default=512)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    n, d, c = args.rows, args.features, args.classes

    print(f"machine: {cores} cores; load average {os.getloadavg()[0]:.1f}")
    for threads in (1, None):
        label = "1 thread" if threads == 1 else "BLAS default threads"
        with threadpool_limits(threads):
            print(f"numpy float32 matmul, {label}: "
                  f"(64x{d})@({d}x{c}) {matmul_gflops(64, d, c):.1f} GFLOP/s, "
                  f"(256x{d})@({d}x{c}) {matmul_gflops(256, d, c):.1f} GFLOP/s, "
                  f"(2048x2048)@(2048x2048) {matmul_gflops(2048, 2048, 2048):.1f} GFLOP/s")

    X, y = make_imagenet_like(n + n // 4, d, c, seed=args.seed)
    Xtr, ytr, Xte, yte = X[:n], y[:n], X[n:], y[n:]
    flops = sgd_flops(n, d, c, args.epochs)
    rows = []
    for average, jobs in ((False, 1), (True, 1), (True, cores)):
        with threadpool_limits(1):
            t = time.perf_counter()
            coef, intercept = sgd_ovr_fit(Xtr, ytr, c, epochs=args.epochs, average=average,
                                          seed=args.seed, n_jobs=jobs)
            dt = time.perf_counter() - t
        acc = float(((Xte @ coef.T + intercept).argmax(axis=1) == yte).mean())
        rows.append((f"ours{', averaged' if average else ''}, {jobs} thread(s)", dt, acc,
                     flops / dt / 1e9))
    t = time.perf_counter()
    ref = SGDClassifier(loss="hinge", penalty="l2", max_iter=args.epochs, tol=None,
                        random_state=args.seed, n_jobs=-1).fit(Xtr, ytr)
    dt_ref = time.perf_counter() - t
    rows.append(("SGDClassifier", dt_ref, float(ref.score(Xte, yte)), flops / dt_ref / 1e9))

    print(f"\ndata: make_imagenet_like {n} train rows x {d} features x {c} classes, "
          f"{args.epochs} epochs; kernel FLOPs {flops / 1e9:.1f} G")
    print(f"{'model':28} {'train s':>8} {'accuracy':>9} {'GFLOP/s':>8} {'speed-up':>9}")
    for name, dt, acc, gf in rows:
        print(f"{name:28} {dt:8.2f} {acc:9.4f} {gf:8.1f} {dt_ref / dt:8.1f}x")


if __name__ == "__main__":
    main()
