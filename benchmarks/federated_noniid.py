"""Federated averaging on non-IID hosts against centralised training of the same network.

    python benchmarks/federated_noniid.py --train fmnist.zarr --test fmnist-test.zarr
        [--hosts 5] [--alpha 0.3] [--rounds 10] [--local-epochs 1] [--hidden 128]
        [--rows 20000] [--out benchmarks/results]

The training store's first ``--rows`` rows are split over ``--hosts`` host stores three ways:
IID (equal random shares), Dirichlet(``--alpha``) class proportions per host (small alpha: each
host sees few classes), and 2 classes per host. Each split trains by
:func:`rpicluster.train.federated.federate_on` on a local cluster of one worker per host (each
worker reads only its own store); the centralised baseline trains the same MLP on all the rows
(one shard: plain ``partial_fit``, one epoch per round). Accuracy on ``--test`` after every round
and wall time are written to ``--out``/federated_noniid.{md,json}. Timings on a shared machine
are marked loaded.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def split(y: np.ndarray, hosts: int, how: str, alpha: float, seed: int) -> list[np.ndarray]:
    """Row indices per host: ``iid``, ``dirichlet`` or ``2-classes``."""
    rng = np.random.default_rng(seed)
    if how == "iid":
        return np.array_split(rng.permutation(len(y)), hosts)
    classes = np.unique(y)
    parts: list[list[int]] = [[] for _ in range(hosts)]
    if how == "dirichlet":
        for c in classes:
            rows = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * hosts))[:-1] * len(rows)).astype(int)
            for h, chunk in enumerate(np.split(rows, cuts)):
                parts[h] += chunk.tolist()
    else:  # 2 classes per host, dealt round-robin; a class's rows shared by its holders
        owns = [{classes[(2 * h) % len(classes)], classes[(2 * h + 1) % len(classes)]}
                for h in range(hosts)]
        for c in classes:
            holders = [h for h in range(hosts) if c in owns[h]]
            rows = rng.permutation(np.flatnonzero(y == c))
            for h, chunk in zip(holders, np.array_split(rows, max(len(holders), 1))):
                parts[h] += chunk.tolist()
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--hosts", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--hidden", default="128")
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    from rpicluster import ingest, open_dataset
    from rpicluster.train.averaging import _labelled, parse_hidden, train_averaged
    from rpicluster.train.federated import federate_on

    train, test = open_dataset(args.train), open_dataset(args.test)
    parts = [_labelled(train, b) for b in range(train.n_blocks)]
    X = np.concatenate([p[0] for p in parts])[:args.rows]
    y = np.concatenate([p[1] for p in parts])[:args.rows]
    params = {"hidden_layer_sizes": parse_hidden(args.hidden), "random_state": args.seed,
              "learning_rate_init": 0.001}
    doc = {"train": train.url, "test": test.url, "rows": int(len(y)), "hosts": args.hosts,
           "alpha": args.alpha, "rounds": args.rounds, "local_epochs": args.local_epochs,
           "params": {**params, "hidden_layer_sizes": list(params["hidden_layer_sizes"])},
           "runs": {}, "note": "loaded: timings from a shared 2-core machine"}
    with tempfile.TemporaryDirectory() as tmp, \
            LocalCluster(n_workers=args.hosts, threads_per_worker=1, processes=True,
                         dashboard_address=None) as cluster, Client(cluster) as client:
        root = Path(tmp)
        np.savez(root / "all.npz", X=X, y=y)
        whole = ingest(str(root / "all.npz"), root / "all.zarr", block_rows=5000)
        t0 = time.perf_counter()
        central = train_averaged(whole, client, model="mlp", params=params,
                                 rounds=args.rounds * args.local_epochs, local_epochs=1,
                                 shards=1, validation=test)
        doc["runs"]["centralised"] = {
            "seconds": time.perf_counter() - t0,
            "accuracy": [r["accuracy"] for r in central.rounds][args.local_epochs - 1::
                                                                 args.local_epochs]}
        for how in ("iid", "dirichlet", "2-classes"):
            hosts = {}
            classes_per_host = []
            for h, idx in enumerate(split(y, args.hosts, how, args.alpha, args.seed)):
                np.savez(root / f"{how}-{h}.npz", X=X[idx], y=y[idx])
                path = root / f"{how}-{h}.zarr"
                ingest(str(root / f"{how}-{h}.npz"), path, block_rows=5000)
                hosts[str(h)] = str(path)
                classes_per_host.append(int(len(np.unique(y[idx]))))
            t0 = time.perf_counter()
            fed = federate_on(client, hosts, model="mlp", params=params, rounds=args.rounds,
                              local_epochs=args.local_epochs, validation=test)
            doc["runs"][how] = {"seconds": time.perf_counter() - t0,
                                "classes_per_host": classes_per_host,
                                "accuracy": [r["accuracy"] for r in fed.rounds],
                                "mb_per_round": float(np.mean([
                                    (r["bytes_down"] + r["bytes_up"]) / 1e6 for r in fed.rounds]))}
            print(how, doc["runs"][how], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "federated_noniid.json").write_text(json.dumps(doc, indent=1))
    lines = [f"### FedAvg on non-IID hosts vs centralised ({doc['rows']:,} rows, {args.hosts} "
             f"hosts, MLP {args.hidden}, {args.rounds} rounds x {args.local_epochs} local "
             "epochs; loaded)", "",
             "| run | classes per host | s | " + " | ".join(
                 f"r{i + 1}" for i in range(args.rounds)) + " |",
             "|---|---|---|" + "---|" * args.rounds]
    for name, run in doc["runs"].items():
        lines.append(f"| {name} | {run.get('classes_per_host', 'all')} | {run['seconds']:.0f} | "
                     + " | ".join(f"{a:.3f}" for a in run["accuracy"]) + " |")
    (out / "federated_noniid.md").write_text("\n".join(lines) + "\n\n" + doc["note"] + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
