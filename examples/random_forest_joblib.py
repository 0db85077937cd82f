"""The cluster paper's job: a scikit-learn RandomForest fitted through joblib's Dask backend.

scikit-learn builds its trees with joblib; inside ``joblib.parallel_config(backend="dask")`` each
batch of trees becomes a task on the cluster's workers, so a forest grows on every Pi at once
with no change to the estimator. This script fits the forest that way on seeded ImageNet-like
features, records which worker ran how many tasks (Dask's task stream), and compares accuracy
and time with the same forest fitted on this machine alone (``n_jobs=1``).

    python examples/random_forest_joblib.py                        # small
    python examples/random_forest_joblib.py --rows 100000 --trees 200 -c cluster.toml
"""

from __future__ import annotations

import argparse
import collections
import json
import time

from common import cluster, example_parser


def parser() -> argparse.ArgumentParser:
    p = example_parser(__doc__, "random-forest")
    p.add_argument("--rows", type=int, default=4_000)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--trees", type=int, default=40)
    p.add_argument("--max-depth", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    import joblib
    from distributed import get_task_stream
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import train_test_split

    from rpicluster.data.synthetic import make_imagenet_like

    X, y = make_imagenet_like(args.rows, args.features, args.classes, seed=args.seed)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25,
                                                        random_state=args.seed)

    def forest(n_jobs):
        return RandomForestClassifier(n_estimators=args.trees, max_depth=args.max_depth,
                                      n_jobs=n_jobs, random_state=args.seed)

    with cluster(args) as client:
        workers = {a: str(w["name"]) for a, w in client.scheduler_info()["workers"].items()}
        t0 = time.perf_counter()
        with joblib.parallel_config(backend="dask"), get_task_stream(client) as stream:
            model = forest(n_jobs=-1).fit(X_train, y_train)
        cluster_s = time.perf_counter() - t0
    tasks = collections.Counter(workers.get(t["worker"], t["worker"]) for t in stream.data)
    accuracy = float(model.score(X_test, y_test))

    t0 = time.perf_counter()
    local = forest(n_jobs=1).fit(X_train, y_train)
    local_s = time.perf_counter() - t0
    result = {"trees": len(model.estimators_), "accuracy": accuracy,
              "local_accuracy": float(local.score(X_test, y_test)),
              "cluster_s": round(cluster_s, 2), "local_s": round(local_s, 2),
              "tasks_per_worker": dict(sorted(tasks.items()))}
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "result.json").write_text(json.dumps(result, indent=1))
    print(f"random forest of {result['trees']} trees: on the cluster {cluster_s:.1f} s "
          f"(tasks per worker: {result['tasks_per_worker']}), accuracy {accuracy:.4f}; "
          f"here alone {local_s:.1f} s, accuracy {result['local_accuracy']:.4f}")
    return result


if __name__ == "__main__":
    main()
