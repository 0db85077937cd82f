"""Peak memory and images/s of one feature-extraction worker, per input size and batch size.

Each configuration runs in a fresh process (peak RSS is per process): import, build the ONNX
Runtime session, extract features of a block of random uint8 photos. This is what a worker
holds besides Dask itself (about 100 MB).

    .venv/bin/python benchmarks/features_memory.py [--threads 4] [--images 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = [(224, 1), (224, 8), (224, 32), (224, 64), (96, 32), (64, 32)]


def one(size: int, batch: int, threads: int, images: int, model: str) -> dict:
    import numpy as np

    from rpicluster.features.model import Extractor, load_network

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ex = Extractor(load_network(model), input_size=size, batch_size=batch, threads=threads)
    # Photo-sized inputs (resized to size/0.875 and centre-cropped, as in the job).
    side = max(size + size // 7, 32)
    imgs = np.random.default_rng(0).integers(0, 256, (images, side, side, 3), dtype=np.uint8)
    ex.transform(imgs[:batch])  # warm-up: ONNX Runtime allocates its arena on the first run
    t0 = time.perf_counter()
    ex.transform(imgs)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"model": model, "input": size, "batch": batch, "threads": threads,
            "images_per_s": images / seconds, "peak_rss_mb": peak / 1024,
            "import_rss_mb": base / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.threads, args.images, args.model)))
        return
    print("| model | input | batch | threads | images/s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for size, batch in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--one", str(size), str(batch),
                              "--threads", str(args.threads), "--images", str(args.images),
                              "--model", args.model],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {r['model']} | {r['input']} | {r['batch']} | {r['threads']} | "
              f"{r['images_per_s']:.1f} | {r['peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
