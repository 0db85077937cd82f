"""Scaling report: the training job on 1, 2, ... workers, measured against two ideals.

Runs :func:`rpicluster.bench.scaling.scaling_bench` (the library behind
``rpicluster bench scaling``) on a small synthetic store and prints, per step, the median time,
the speed-up over one worker and the scalability against the core ideal (every core equal) and
the capacity ideal (each step weighted by the throughput its workers reached together in
calibration, right before each of its timed runs). An untimed warm-up run on each step's
workers comes first; the timed runs then go in rounds across the steps. The reports land in
``--out``: scaling.csv, scaling.json, scaling.md, scaling.png, timed-runs.html.

    python examples/scaling_report.py                          # embedded cluster, small
    python examples/scaling_report.py -c cluster.toml --rows 400000 --repeats 3 \\
        --simulate "32x rpi4, 2x x86"                          # a real cluster, and a bigger one
The same from the command line:
    rpicluster bench scaling --local 2 --rows 6000 --features 64 --classes 10 --repeats 1
"""

from __future__ import annotations

import argparse

from common import example_parser


def parser() -> argparse.ArgumentParser:
    p = example_parser(__doc__, "scaling-report")
    p.add_argument("--job", choices=["inc-ksgd", "random-forest"], default="inc-ksgd")
    p.add_argument("--rows", type=int, default=6_000)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--block-rows", type=int, default=1_000)
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs per step (median reported)")
    p.add_argument("--warmup", choices=["reduced", "full", "none"], default="reduced",
                   help="untimed run on each step's workers first (default: a reduced run)")
    p.add_argument("--steps", help="worker sets, e.g. 'pi01; pi01,pi02; pi01,pi02,desktop'")
    p.add_argument("--simulate", help="a hypothetical cluster to predict, e.g. '32x rpi4'")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    from rpicluster.bench.scaling import scaling_bench

    doc = scaling_bench(args.workdir, scheduler=args.scheduler, inventory=args.inventory,
                        local=args.local, job=args.job, rows=args.rows,
                        features=args.features, classes=args.classes,
                        block_rows=args.block_rows, steps=args.steps, repeats=args.repeats,
                        warmup=args.warmup, simulate=args.simulate)
    print(f"{doc['job']} on {doc['dataset']['rows']:,} rows x {doc['dataset']['features']} "
          f"features, {doc['dataset']['blocks']} blocks")
    print(f"{'workers':>8} {'cores':>6} {'median s':>9} {'speed-up':>9} "
          f"{'scal. cores':>12} {'scal. capacity':>15}")
    for s in doc["steps"]:
        print(f"{len(s['workers']):>8} {s['cores']:>6} {s['median']:>9.2f} {s['speedup']:>9.2f} "
              f"{s['scalability_cores']:>12.0%} {s['scalability_capacity']:>15.0%}")
    print(doc["method"]["text"])
    hypothetical = doc["simulation"].get("hypothetical")
    if hypothetical:
        print(f"predicted for {hypothetical['spec']}: {hypothetical['predicted']:.1f} s")
    print(f"reports: {args.workdir}/scaling.{{csv,json,md,png}}")
    return doc


if __name__ == "__main__":
    main()
