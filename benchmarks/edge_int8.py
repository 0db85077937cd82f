"""int8 network against float32: accuracy on the transfer-learning task and images per second.

examples/transfer_learning.py's ``fashion`` case (1,000 Fashion-MNIST images, 75/25 stratified
split, EfficientNet-Lite0 features at 96 px, an Inc-kSGD head with one cluster and 20 epochs):
the head is exported with the float32 network and with an int8 one (static quantization,
calibrated on 200 training images of the image store), and both files classify the held-out
photos. Then both run on crops already made (ONNX Runtime's own rate) at 96 and 224 px.
Timings on a loaded machine are not comparable; the coordinator runs it quietly::

    /work/shared/tools/quiet-run python benchmarks/edge_int8.py --threads 1 --batch 32
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import onnxruntime as ort
    from PIL import Image
    from sklearn.model_selection import train_test_split
    from transfer_learning import load_case

    from rpicluster.edge import fit_image
    from rpicluster.export import export_onnx
    from rpicluster.features.images import write_image_store
    from rpicluster.features.model import Extractor, load_network
    from rpicluster.models.incremental import IncrementalKSGDClassifier

    images, labels, _ = load_case("fashion", args.images, args.seed)
    Xtr, Xte, ytr, yte = train_test_split(images, labels, test_size=0.25, stratify=labels,
                                          random_state=args.seed)
    frozen = load_network("efficientnet-lite0")
    out = {"threads": args.threads, "batch": args.batch, "train": len(ytr), "test": len(yte)}
    with tempfile.TemporaryDirectory(prefix="edge-int8-") as tmp:
        tmp = Path(tmp)
        store = write_image_store(tmp / "train.zarr", Xtr, ytr, block_rows=50)
        ex = Extractor(frozen, input_size=96)
        head = IncrementalKSGDClassifier(n_clusters=1, max_iter=20, random_state=args.seed,
                                         block_rows=len(ytr)).fit(ex.transform(Xtr), ytr)
        reference = head.predict(ex.transform(Xte))
        out["accuracy_features_predict"] = float(np.mean(reference == yte))

        def session(path):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        for size in (96, 224):
            crops = np.stack([fit_image(Image.fromarray(x), size) for x in Xte])
            for kind in ("fp32", "int8"):
                path = tmp / f"{kind}-{size}.onnx"
                t = time.perf_counter()
                r = export_onnx(head, path, features="efficientnet-lite0", input_size=size,
                                quantize="int8" if kind == "int8" else None,
                                calibration=store.url)
                out[f"export_s_{kind}_{size}"] = time.perf_counter() - t
                out[f"mb_{kind}_{size}"] = r.size_bytes / 1e6
                s = session(path)

                def run_all():
                    return np.concatenate([s.run(["label"], {"images": crops[i:i + args.batch]})[0]
                                           for i in range(0, len(crops), args.batch)])

                got = run_all()
                if size == 96:  # the size the head was trained at
                    out[f"accuracy_{kind}"] = float(np.mean(got == yte))
                    out[f"agree_with_predict_{kind}"] = float(np.mean(got == reference))
                best = 0.0
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    run_all()
                    best = max(best, len(crops) / (time.perf_counter() - t))
                out[f"images_per_s_{kind}_{size}"] = best
            out[f"speedup_{size}"] = (out[f"images_per_s_int8_{size}"]
                                      / out[f"images_per_s_fp32_{size}"])
    out["accuracy_change_points"] = 100 * (out["accuracy_int8"] - out["accuracy_fp32"])
    for key, value in out.items():
        print(f"{key:28s} {value:.4f}" if isinstance(value, float) else f"{key:28s} {value}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
