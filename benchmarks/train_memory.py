"""Worker memory under a Pi-like limit: a store 4x the workers' combined memory limits.

    python benchmarks/train_memory.py [--workers 2] [--block-rows 32768 --features 1024]
        [--store-factor 4] [--out DIR]

Measures a fresh worker's post-import baseline (libraries loaded, BLAS/OpenMP buffers
allocated), sets every worker's limit to baseline + 3 blocks (Dask's default spill, pause and
terminate thresholds stay on), ingests a store ``--store-factor`` times the sum of the limits,
trains it, and reports each worker's peak RSS above its baseline in blocks, the worker restarts
the scheduler saw (``add-worker`` events during the run) and whether the model equals the
in-process fit on two blocks. Writes Markdown to ``--out``/train_memory.md.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--block-rows", type=int, default=32_768)
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--store-factor", type=float, default=4.0)
    ap.add_argument("--tmp", type=Path, default=None, help="where the store goes")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args()

    from rpicluster import IncrementalKSGDClassifier, ingest
    from rpicluster.bench.memory import post_import_baseline, train_under_limit

    block = a.block_rows * a.features * 4
    baseline = post_import_baseline()
    limit = baseline + 3 * block
    n_blocks = math.ceil(a.store_factor * a.workers * limit / (block + 4 * a.block_rows))
    rows = n_blocks * a.block_rows
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        ds = ingest(f"synthetic:rows={rows},features={a.features},classes={a.classes},seed=0",
                    Path(tmp) / "memory.zarr", block_rows=a.block_rows)
        params = dict(n_clusters=a.clusters, max_iter=a.epochs, random_state=0,
                      block_rows=a.block_rows)
        run = train_under_limit(ds, params, n_workers=a.workers, limit=limit)
        # the same model as in-process, checked on the first two blocks' models
        X, _ = ds.block(1)
        ref = IncrementalKSGDClassifier(**params)
        ref.estimators_ = []
        from rpicluster.models.incremental import check_incremental_params
        from rpicluster.models.ksgd import fit_block
        for b in (0, 1):
            Xb, yb = ds.block(b)
            ref.estimators_.append(fit_block(Xb, yb, np.asarray(ds.classes),
                                             check_incremental_params(ref.get_params()),
                                             random_state=0, block=b))
        same = all(np.array_equal(run.model.estimators_[b].predict(X), ref.estimators_[b]
                                  .predict(X)) for b in (0, 1))
        store_bytes = ds.nbytes
    load1 = os.getloadavg()
    mib = 2**20
    lines = ["# Worker memory under a limit (benchmarks/train_memory.py)\n",
             f"Store {store_bytes / mib:,.0f} MiB ({n_blocks} blocks of {block / mib:.0f} MiB, "
             f"{a.features} features) = {store_bytes / (a.workers * limit):.1f}x the "
             f"{a.workers} workers' limits of {limit / mib:.0f} MiB each (post-import baseline "
             f"{baseline / mib:.0f} MiB + 3 blocks; Dask's default spill/pause/terminate "
             f"thresholds). k={a.clusters}, {a.epochs} epoch(s); {run.seconds:.0f} s; window "
             f"{run.window} blocks; load average {load0[0]:.2f} before, {load1[0]:.2f} after.\n",
             "| worker | baseline MiB | peak MiB | peak - baseline, blocks |", "|---|---|---|---|"]
    for w, extra in sorted(run.above_baseline_blocks().items()):
        lines.append(f"| {w} | {run.baseline[w] / mib:.0f} | {run.peak[w] / mib:.0f} | "
                     f"{extra:.2f} |")
    lines += ["", f"- worker restarts during the run (scheduler add-worker events): "
                  f"**{run.restarts}**",
              f"- block models 0 and 1 predict as the in-process fit: {same}"]
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "train_memory.md").write_text(text)


if __name__ == "__main__":
    main()
