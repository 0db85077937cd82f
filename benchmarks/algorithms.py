"""Inc-kSGD against SGDClassifier, LIBLINEAR and dask-ml (the paper's Table 1), published.

Run:  python benchmarks/algorithms.py [--sizes 200k,100k] [--time-cap 1800] [--out DIR]
      python benchmarks/algorithms.py --data digits        # -> results/algorithms-digits.md
      python benchmarks/algorithms.py --data fashion-mnist # -> results/algorithms-fashion-mnist.md

Runs ``rpicluster bench algorithms`` (each row in a fresh process, same data for every row) and
copies the resulting Markdown table to ``benchmarks/results/algorithms.md``, the committed copy
README's Performance section links to. The two default sizes take hours on two cores (the 200k
size alone took over an hour on a loaded machine), most of it in the per-sample baselines
(SGDClassifier, dask-ml, LIBLINEAR up to the time cap).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from rpicluster import config
from rpicluster.bench.algorithms import DEFAULT_SIZES, REAL_DATA, run_algorithms, to_markdown
from rpicluster.progress import Progress

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(DEFAULT_SIZES))
    parser.add_argument("--data", choices=REAL_DATA,
                        help="a real data set instead of --sizes (published as "
                             "algorithms-DATA.md)")
    parser.add_argument("--time-cap", type=float, default=config.BENCH_TIME_CAP_S)
    parser.add_argument("--out", type=Path, default=config.BENCH_OUT / "algorithms")
    args = parser.parse_args(argv)
    sizes = [args.data] if args.data else [s.strip() for s in args.sizes.split(",") if s.strip()]
    with Progress("bench algorithms", unit="rows", interval=0) as progress:
        doc = run_algorithms(sizes, out_dir=args.out, time_cap=args.time_cap,
                             progress=progress)
    RESULTS.mkdir(exist_ok=True)
    name = f"algorithms-{args.data}.md" if args.data else "algorithms.md"
    shutil.copyfile(args.out / "algorithms.md", RESULTS / name)
    print(to_markdown(doc))
    print(f"published {RESULTS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
