"""Images per second of the edge runner and of ``features`` against ONNX Runtime's own limit.

In one run, same graph, threads and batch:

* **limit (head)**: ``session.run`` of the exported file (EfficientNet-Lite0 + an Inc-kSGD head)
  on crops already decoded and resized: what ONNX Runtime alone can do;
* **runner**: ``rpicluster.edge.Classifier.classify`` on JPEG files (decode, resize, crop, run);
* **limit (network)**: ``session.run`` of the frozen network on preprocessed float batches;
* **features worker**: ``Extractor.transform`` (what a feature task runs) on uint8 images;
* **features job**: ``rpicluster.extract_features`` on an image store, one worker of one thread
  (per-worker rate over its task time).

The goal is >= 0.90 of the limit for the runner and for the feature worker. Timings on a loaded
machine are not comparable: the coordinator runs it quietly::

    /work/shared/tools/quiet-run python benchmarks/edge_throughput.py --threads 1 --batch 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def rate(fn, n_images: int, repeats: int) -> float:
    """Best images/s of ``repeats`` timed calls of ``fn`` (one warm-up call first)."""
    fn()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = max(best, n_images / (time.perf_counter() - t))
    return best


def photo_files(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs: random crops (about 300-500 px) of scikit-image's colour photos."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [data.chelsea(), data.coffee(), data.rocket(), data.astronaut()]
    paths = []
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        side = int(rng.integers(min(h, w) * 3 // 4, min(h, w)))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(p[top:top + side, left:left + side]).save(path, quality=90)
        paths.append(path)
    return paths


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--size", type=int, default=224, help="network input side")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-job", action="store_true", help="leave out the Dask feature job")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)

    import onnxruntime as ort

    from rpicluster.edge import Classifier, load_image
    from rpicluster.export import export_onnx
    from rpicluster.features.model import Extractor, _session, load_network, preprocess
    from rpicluster.models.incremental import IncrementalKSGDClassifier

    T, B, S = args.threads, args.batch, args.size
    out = {"threads": T, "batch": B, "size": S, "images": args.images}
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        tmp = Path(tmp)
        paths = photo_files(tmp, args.images)
        rng = np.random.default_rng(0)
        head = IncrementalKSGDClassifier(500, n_clusters=4, random_state=0).fit(
            rng.random((1000, 1280), dtype=np.float32), rng.integers(0, 10, 1000))
        model = export_onnx(head, tmp / "m.onnx", features="efficientnet-lite0", input_size=S)
        out["onnx_mb"] = round(model.size_bytes / 1e6, 2)

        clf = Classifier(tmp / "m.onnx", threads=T)
        crops = np.stack([load_image(q, S) for q in paths])

        def limit_head():
            for i in range(0, len(crops), B):
                clf.run(crops[i:i + B])

        def runner():
            for _ in clf.classify(paths, B):
                pass

        out["limit_head"] = rate(limit_head, len(crops), args.repeats)
        out["runner"] = rate(runner, len(crops), args.repeats)

        frozen = load_network("efficientnet-lite0")
        session = _session(frozen.onnx, T, frozen.name)
        pixels = preprocess(crops, S, frozen)
        ex = Extractor(frozen, input_size=S, batch_size=B, threads=T)
        # the images a feature store holds: decoded photos (here: the crops at 256 px)
        images = np.stack([load_image(q, round(S / 0.875)) for q in paths])

        def limit_net():
            for i in range(0, len(pixels), B):
                session.run([frozen.output_name], {frozen.input_name: pixels[i:i + B]})

        out["limit_network"] = rate(limit_net, len(pixels), args.repeats)
        out["features_worker"] = rate(lambda: ex.transform(images), len(images), args.repeats)
        if not args.skip_job:
            out["features_job"] = job_rate(images, S, B, T, tmp)
    out["runner_fraction"] = out["runner"] / out["limit_head"]
    out["features_worker_fraction"] = out["features_worker"] / out["limit_network"]
    if "features_job" in out:
        out["features_job_fraction"] = out["features_job"] / out["limit_network"]
    out["onnxruntime"] = ort.__version__
    for key, value in out.items():
        print(f"{key:26s} {value:.3f}" if isinstance(value, float) else f"{key:26s} {value}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


def job_rate(images, size: int, batch: int, threads: int, tmp: Path) -> float:
    """Per-worker images/s of ``extract_features`` (one worker process, ``threads`` threads)."""
    from distributed import Client, LocalCluster

    from rpicluster import extract_features
    from rpicluster.features.images import write_image_store

    store = write_image_store(tmp / "images.zarr", images, np.arange(len(images)) % 2,
                              block_rows=64)
    with LocalCluster(n_workers=1, threads_per_worker=threads, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        # a first run warms the worker (session built, modules imported), as a long job would be
        extract_features(store.url, str(tmp / "warm.zarr"), input_size=size,
                         batch_size=batch, client=client)
        r = extract_features(store.url, str(tmp / "f.zarr"), input_size=size,
                             batch_size=batch, client=client)
    return max(r.images_per_second().values())


if __name__ == "__main__":
    main()
