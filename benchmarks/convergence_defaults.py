"""Held-out accuracy of round-based training with its defaults: the stopping rule decides.

    python benchmarks/convergence_defaults.py [--fashion] [--out benchmarks/results]

Issue 25's targets, each trained with the library entry points' defaults only (the stopping
rule of :mod:`rpicluster.train.stopping`, ``max_rounds`` 200, one local epoch per round):

- ``train --model mlp`` and ``--model sgd`` on digits (75/25 stratified split at ingest, two
  workers, blocks of 700 rows): >= 0.95;
- federated MLP on digits split over 3 hosts by Dirichlet(0.5) class shares (non-IID):
  >= 0.90;
- ``--fashion``: ``train --model mlp`` on Fashion-MNIST (60,000 rows, blocks of 15,000, the
  10,000 test rows held out): >= 0.88 (minutes on a quiet machine).

The test rows are only scored, never monitored: the rule watches the training loss (the
``train``/``federate`` runs score them after every round too, for the curve in the JSON and the
best accuracy on the way). Results go to ``--out``/convergence_defaults.{md,json}; timings are
labelled ``--label``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def digits_stores(root: Path):
    from sklearn.datasets import load_digits

    from rpicluster import ingest

    X, y = load_digits(return_X_y=True)
    np.savez(root / "digits.npz", X=(X / 16.0).astype(np.float32), y=y)
    ingest(str(root / "digits.npz"), root / "train.zarr", block_rows=700, test_fraction=0.25,
           test_out=root / "test.zarr")
    return root / "train.zarr", root / "test.zarr"


def trained(train, test, model: str, client) -> dict:
    from rpicluster import open_dataset
    from rpicluster.train.averaging import train_averaged
    from rpicluster.train.stopping import RoundStopper, default_rule

    stopper = RoundStopper(default_rule(model, validated=False))
    t0 = time.perf_counter()
    # The test store is scored after every round to draw the curve; the rule never sees it
    # (validated=False: it watches the training loss).
    r = train_averaged(open_dataset(train), client, model=model, params={"random_state": 0},
                       rounds=200, stop=stopper, validation=open_dataset(test))
    curve = [x["accuracy"] for x in r.rounds]
    best = int(np.argmax(curve))
    return {"rounds": len(r.rounds), "stopped": stopper.reason,
            "test": curve[-1], "best_test": curve[best], "best_round": best + 1, "curve": curve,
            "seconds": time.perf_counter() - t0}


def federated(root: Path) -> dict:
    from distributed import Client, LocalCluster
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from rpicluster import ingest, open_dataset
    from rpicluster.train.federated import federate_on
    from rpicluster.train.stopping import RoundStopper, default_rule

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
    rng = np.random.default_rng(0)
    parts: list[list[int]] = [[], [], []]
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(ytr == c))
        cuts = (np.cumsum(rng.dirichlet([0.5] * 3))[:-1] * len(rows)).astype(int)
        for h, chunk in enumerate(np.split(rows, cuts)):
            parts[h] += chunk.tolist()
    hosts = {}
    for h, idx in enumerate(parts):
        np.savez(root / f"h{h}.npz", X=Xtr[idx], y=ytr[idx])
        ingest(str(root / f"h{h}.npz"), root / f"h{h}.zarr")
        hosts[str(h)] = str(root / f"h{h}.zarr")
    np.savez(root / "fte.npz", X=Xte, y=yte)
    ingest(str(root / "fte.npz"), root / "fte.zarr")
    test = open_dataset(root / "fte.zarr")
    Xt, yt = test.block(0)
    stopper = RoundStopper(default_rule("mlp", validated=False))
    t0 = time.perf_counter()
    with LocalCluster(n_workers=3, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        r = federate_on(client, hosts, model="mlp", params={"random_state": 0}, rounds=200,
                        stop=stopper)
    return {"rounds": len(r.rounds), "stopped": stopper.reason,
            "test": float(r.model.score(Xt, np.asarray(test.classes)[yt])),
            "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fashion", action="store_true")
    p.add_argument("--label", default="loaded")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()

    from distributed import Client, LocalCluster

    from rpicluster import ingest

    out = {"label": args.label}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train, test = digits_stores(root)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            out["digits mlp"] = trained(train, test, "mlp", client)
            out["digits sgd"] = trained(train, test, "sgd", client)
            if args.fashion:
                ingest("fashion-mnist:train", root / "f.zarr", block_rows=15000)
                ingest("fashion-mnist:test", root / "ft.zarr", block_rows=10000)
                out["fashion mlp"] = trained(root / "f.zarr", root / "ft.zarr", "mlp", client)
        out["federated digits mlp (3 non-IID hosts)"] = federated(root)
    lines = [f"# Round-based training with its defaults ({args.label} machine)", "",
             "| run | held-out accuracy | rounds | best on the way (round) | seconds "
             "| why it stopped |",
             "|---|---:|---:|---:|---:|---|"]
    for name, r in out.items():
        if isinstance(r, dict):
            best = f"{r['best_test']:.4f} ({r['best_round']})" if "best_test" in r else ""
            lines.append(f"| {name} | {r['test']:.4f} | {r['rounds']} | {best} | "
                         f"{r['seconds']:.0f} | {r['stopped']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convergence_defaults.json").write_text(json.dumps(out, indent=1))
    (args.out / "convergence_defaults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
