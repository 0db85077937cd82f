"""Peak memory of a streaming ingest: an 8 GB synthetic store must stay under 1 GB RSS.

Run:  python benchmarks/ingest_memory.py [--gb 8] [--features 2048] [--block-rows 16384] [--out DIR]

Prints the rows, bytes, seconds, throughput and peak RSS of this process (imports included), and
exits 1 when the peak RSS is over --limit-mb. The store is removed afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rpicluster.data.writer import ingest
from rpicluster.progress import Progress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=8.0, help="size of X in GiB")
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--block-rows", type=int, default=16_384)
    parser.add_argument("--limit-mb", type=float, default=1024.0)
    parser.add_argument("--out", type=Path, default=None, help="directory for the store")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    rows = int(args.gb * 2**30 / (args.features * 4))
    workdir = Path(tempfile.mkdtemp(prefix="ingest-memory-", dir=args.out))
    out = workdir / "data.zarr"
    source = f"synthetic:rows={rows},features={args.features},classes={args.classes},seed=0"
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    try:
        ds = ingest(source, out, block_rows=args.block_rows,
                    progress=Progress("ingest", unit="blocks", interval=15))
        seconds = time.perf_counter() - t0
        stored = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    block_mb = args.block_rows * args.features * 4 / 2**20
    print(f"source       {source}")
    print(f"rows         {ds.n_rows} x {ds.n_features} features, {ds.n_blocks} blocks of "
          f"{args.block_rows} rows ({block_mb:.0f} MiB each)")
    print(f"stored       {stored / 2**30:.2f} GiB in {seconds:.0f} s "
          f"({stored / 2**20 / seconds:.0f} MiB/s, synthetic generation included)")
    print(f"peak RSS     {peak:.0f} MiB (at start: {start_rss:.0f} MiB; "
          f"limit {args.limit_mb:.0f} MiB)")
    return 0 if peak < args.limit_mb else 1


if __name__ == "__main__":
    sys.exit(main())
