"""The paper's Table 1 on one machine: Inc-kSGD against global linear models, same data.

Every algorithm is trained on the same train/test split (of :mod:`rpicluster.data.synthetic`
features, or of a real data set: ``digits``, scikit-learn's 8x8 digits split 75/25 stratified,
raw pixels; ``fashion-mnist``, the official 60,000/10,000 split of the Debian package,
pixels/255), each in a fresh Python process (``python -m rpicluster.bench.algorithms``), so that
peak memory is per algorithm (the process's ``ru_maxrss``: the loaded data plus what training
adds) and a slow one can be stopped at the time cap and reported as "not finished in N s".

Rows (same epochs and L2 hinge objective everywhere):

=====================  ============================================================================
inc-ksgd               ``IncrementalKSGDClassifier`` with our minibatch kernel
inc-ksgd-sklearn       the same, ``solver="sklearn"`` (one ``SGDClassifier`` per cell: the paper's path)
ksgd                   ``KSGDClassifier`` (one block, the preset's clusters), our kernel
ksgd-sklearn           the same, ``solver="sklearn"``: our kernel's accuracy against the paper's path
minibatch-sgd          our kernel on all rows, no clusters (``KSGDClassifier(n_clusters=1)``)
sgd                    scikit-learn ``SGDClassifier`` (hinge), the reference of the ratio columns
liblinear              scikit-learn ``LinearSVC`` (LIBLINEAR, dual coordinate descent)
logreg                 scikit-learn ``LogisticRegression`` (lbfgs, multinomial), where it finishes
dask-ml                dask-ml ``Incremental(SGDClassifier)``: one ``partial_fit`` pass per epoch
=====================  ============================================================================

The Inc-kSGD row also records its k-means cells' **purity** per block (the share of a cell's
rows in its most frequent class, averaged over rows) and classes per cell: where cells are
impure, a cell's local model must still separate most classes, so clustering buys no locality
while each block model sees only its block's rows; that is where Inc-kSGD loses to one global
model, and the Markdown says so next to the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rpicluster import config
from rpicluster.errors import ConfigError, make_dirs
from rpicluster.progress import Progress


@dataclasses.dataclass(frozen=True)
class BenchSize:
    """One data set of the comparison, and the Inc-kSGD settings used on it."""

    name: str
    rows: int          # training rows
    features: int
    classes: int
    test_rows: int
    n_clusters: int    # k-means cells per block (Inc-kSGD)
    block_rows: int    # rows per Inc-kSGD block
    data: str = "synthetic"  # or a real data set: "digits", "fashion-mnist"

    @property
    def label(self) -> str:
        what = "" if self.data == "synthetic" else f"{self.data}: "
        return f"{what}{self.rows:,} x {self.features:,}, {self.classes:,} classes"


#: Named sizes. ``quick`` is a smoke test; the two defaults are the issue's required shapes;
#: ``1m`` is the full ImageNet shape (about 8 GB of float32 features, and hours for the
#: per-sample baselines on two cores). Blocks are sized so the vote has an odd number of
#: voters (or one block): with two voters every disagreement is a tie.
PRESETS: dict[str, BenchSize] = {s.name: s for s in (
    BenchSize("quick", 4_000, 32, 40, 1_000, n_clusters=4, block_rows=2_000),
    BenchSize("200k", 200_000, 512, 200, 20_000, n_clusters=10, block_rows=66_667),
    BenchSize("100k", 100_000, 2048, 1000, 20_000, n_clusters=10, block_rows=100_000),
    BenchSize("1m", 1_000_000, 2048, 1000, 50_000, n_clusters=10, block_rows=200_000),
    # real data (`--data`): digits at the split and settings (two blocks of ~700 rows);
    # Fashion-MNIST in three blocks of 20,000 rows, 10 cells each
    BenchSize("digits", 1_347, 64, 10, 450, n_clusters=4, block_rows=700, data="digits"),
    BenchSize("fashion-mnist", 60_000, 784, 10, 10_000, n_clusters=10, block_rows=20_000,
              data="fashion-mnist"),
)}
#: Presets of real data sets (``rpicluster bench algorithms --data``).
REAL_DATA = ("digits", "fashion-mnist")
DEFAULT_SIZES = ("200k", "100k")

#: Row keys in table order, with their display names.
ALGORITHMS: dict[str, str] = {
    "inc-ksgd": "Inc-kSGD (our kernel)",
    "inc-ksgd-sklearn": "Inc-kSGD (solver=sklearn)",
    "ksgd": "kSGD, one block (our kernel)",
    "ksgd-sklearn": "kSGD, one block (solver=sklearn)",
    "minibatch-sgd": "Minibatch SGD, our kernel (no clusters)",
    "sgd": "SGDClassifier (full, hinge)",
    "liblinear": "LIBLINEAR (LinearSVC)",
    "logreg": "LogisticRegression (lbfgs)",
    "dask-ml": "dask-ml Incremental(SGDClassifier)",
}
REFERENCE = "sgd"


def _estimator(algo: str, size: BenchSize, epochs: int, seed: int):
    """The estimator of one row (built in the child process)."""
    from sklearn.linear_model import SGDClassifier

    sgd = dict(loss="hinge", penalty="l2", alpha=1e-4, max_iter=epochs, tol=None,
               random_state=seed, n_jobs=-1)
    if algo in ("inc-ksgd", "inc-ksgd-sklearn"):
        from rpicluster.models.incremental import IncrementalKSGDClassifier

        return IncrementalKSGDClassifier(
            size.block_rows, n_clusters=size.n_clusters, max_iter=epochs, alpha=1e-4,
            solver="minibatch" if algo == "inc-ksgd" else "sklearn", n_jobs=-1,
            random_state=seed)
    if algo in ("ksgd", "ksgd-sklearn"):
        from rpicluster.models.ksgd import KSGDClassifier

        return KSGDClassifier(size.n_clusters, max_iter=epochs, alpha=1e-4,
                              solver="minibatch" if algo == "ksgd" else "sklearn",
                              random_state=seed)
    if algo == "logreg":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=200)
    if algo == "minibatch-sgd":
        from rpicluster.models.ksgd import KSGDClassifier

        return KSGDClassifier(1, max_iter=epochs, alpha=1e-4, random_state=seed)
    if algo == "sgd":
        return SGDClassifier(**sgd)
    if algo == "liblinear":
        from sklearn.svm import LinearSVC

        # LIBLINEAR's own default stopping rule: it runs until converged, however long that is.
        return LinearSVC(loss="hinge", dual=True, C=1.0, max_iter=1000, random_state=seed)
    if algo == "dask-ml":
        from dask_ml.wrappers import Incremental

        return Incremental(SGDClassifier(**{**sgd, "max_iter": 1}))
    raise ConfigError(f"unknown algorithm {algo!r} (known: {', '.join(ALGORITHMS)})")


def _fit(algo: str, est, X, y, size: BenchSize, epochs: int):
    if algo != "dask-ml":
        return est.fit(X, y)
    import dask
    import dask.array as da

    # dask-ml streams the chunks of a dask array through partial_fit; one call is one pass.
    chunk = min(size.block_rows, X.shape[0])
    dX = da.from_array(X, chunks=(chunk, X.shape[1]))
    dy = da.from_array(y, chunks=chunk)
    classes = np.unique(y)
    with dask.config.set(scheduler="threads"):
        for _ in range(epochs):
            est.partial_fit(dX, dy, classes=classes)
    return est


def _predict(algo: str, est, X):
    pred = est.predict(X)
    return np.asarray(pred.compute() if hasattr(pred, "compute") else pred)


def _peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def run_one(algo: str, data_dir: str | Path, size: BenchSize, *, epochs: int, seed: int) -> dict:
    """Train and score one algorithm on the arrays saved in ``data_dir`` (in this process).

    Returns
    -------
    dict
        ``train_s``, ``accuracy``, ``peak_rss_mib`` (this process's peak), ``data_rss_mib``
        (peak after loading the data, before training).
    """
    data_dir = Path(data_dir)
    X, y = np.load(data_dir / "X_train.npy"), np.load(data_dir / "y_train.npy")
    X_test, y_test = np.load(data_dir / "X_test.npy"), np.load(data_dir / "y_test.npy")
    data_rss = _peak_rss_mib()
    est = _estimator(algo, size, epochs, seed)
    start = time.perf_counter()
    _fit(algo, est, X, y, size, epochs)
    train_s = time.perf_counter() - start
    accuracy = float(np.mean(_predict(algo, est, X_test) == y_test))
    out = {"train_s": train_s, "accuracy": accuracy, "peak_rss_mib": _peak_rss_mib(),
           "data_rss_mib": data_rss}
    if algo in ("inc-ksgd", "inc-ksgd-sklearn"):
        out["cells"] = cell_purity(est, X, y)
    return out


def cell_purity(est, X, y) -> list[dict]:
    """Per block model of a fitted IncrementalKSGDClassifier: how pure its k-means cells are.

    Returns
    -------
    list of dict
        ``purity`` (rows in their cell's most frequent class / rows), ``classes_per_cell``
        (mean distinct classes per cell), ``block_classes``, per block, in block order.
    """
    from rpicluster.models.ksgd import nearest_center

    out = []
    starts = [0]
    for e in est.estimators_[:-1]:
        starts.append(starts[-1] + est.block_rows)
    stops = starts[1:] + [len(y)]
    for e, a, z in zip(est.estimators_, starts, stops):
        cells = nearest_center(X[a:z], e.cluster_centers_)
        yb = y[a:z]
        majority, per_cell = 0, []
        for c in np.unique(cells):
            counts = np.unique(yb[cells == c], return_counts=True)[1]
            majority += int(counts.max())
            per_cell.append(len(counts))
        out.append({"purity": majority / max(len(yb), 1),
                    "classes_per_cell": float(np.mean(per_cell)),
                    "block_classes": int(len(np.unique(yb)))})
    return out


def _run_child(algo: str, data_dir: Path, size: BenchSize, *, epochs: int, seed: int,
               time_cap: float) -> dict:
    """Run :func:`run_one` in a fresh interpreter, killed at ``time_cap`` seconds."""
    result_path = data_dir / f"result-{algo}.json"
    cmd = [sys.executable, "-m", "rpicluster.bench.algorithms", "--algo", algo,
           "--data", str(data_dir), "--size", json.dumps(dataclasses.asdict(size)),
           "--epochs", str(epochs), "--seed", str(seed), "--result", str(result_path)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=time_cap)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "time_cap_s": time_cap,
                "wall_s": time.perf_counter() - start}
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        return {"status": "failed", "returncode": proc.returncode, "error": "\n".join(tail),
                "wall_s": time.perf_counter() - start}
    return {"status": "ok", **json.loads(result_path.read_text()),
            "wall_s": time.perf_counter() - start}


def _save_split(size: BenchSize, seed: int, data_dir: Path) -> dict:
    """Generate the size's data once and save the split every row loads."""
    start = time.perf_counter()
    X_train, y_train, X_test, y_test = load_split(size, seed)
    for name, arr in (("X_train", X_train), ("y_train", y_train),
                      ("X_test", X_test), ("y_test", y_test)):
        np.save(data_dir / f"{name}.npy", arr)
    return {"generate_s": time.perf_counter() - start,
            "data_mib": sum(a.nbytes for a in (X_train, y_train, X_test, y_test)) / 2**20,
            "test_rows_classes": int(len(np.unique(y_test)))}


def load_split(size: BenchSize, seed: int):
    """``X_train, y_train, X_test, y_test`` (float32 features) of a preset.

    Raises
    ------
    DataError
        Fashion-MNIST is not installed (naming the package).
    """
    if size.data == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        X, y = load_digits(return_X_y=True)
        X_train, X_test, y_train, y_test = train_test_split(
            X.astype(np.float32), y, test_size=size.test_rows, stratify=y, random_state=seed)
        return X_train, y_train, X_test, y_test
    if size.data == "fashion-mnist":
        from rpicluster.data.sources import fashion_mnist_source

        parts = []
        for split in ("train", "test"):
            src = fashion_mnist_source(split)
            X = np.concatenate([Xb for Xb, _ in src.blocks(10_000)])
            parts += [X, src.classes[src.codes()]]
        return tuple(parts)
    from rpicluster.data.synthetic import make_imagenet_like

    X, y = make_imagenet_like(size.rows + size.test_rows, size.features, size.classes, seed=seed)
    return X[:size.rows], y[:size.rows], X[size.rows:], y[size.rows:]


def _add_ratios(rows: list[dict]) -> None:
    ref = next((r for r in rows if r["algo"] == REFERENCE and r["status"] == "ok"), None)
    for r in rows:
        ok = ref is not None and r["status"] == "ok"
        r["speedup_vs_sgd"] = ref["train_s"] / r["train_s"] if ok else None
        r["accuracy_vs_sgd"] = r["accuracy"] / ref["accuracy"] if ok and ref["accuracy"] else None


def run_algorithms(sizes=DEFAULT_SIZES, *, algorithms=tuple(ALGORITHMS), out_dir=None,
                   time_cap: float = config.BENCH_TIME_CAP_S, epochs: int = 5, seed: int = 0,
                   progress: Progress | None = None) -> dict:
    """Run the comparison and write ``algorithms.json`` and ``algorithms.md`` to ``out_dir``.

    Parameters
    ----------
    sizes : sequence of str
        Names from :data:`PRESETS`.
    algorithms : sequence of str
        Keys of :data:`ALGORITHMS` (table order is kept).
    out_dir : path, optional
        Output folder (default ``config.BENCH_OUT / "algorithms"``); the data of each size is
        saved there while it runs and removed afterwards.
    time_cap : float
        Seconds after which an algorithm's process is killed and reported as not finished.
    epochs : int
        Passes over the data for every SGD row (``max_iter``).
    seed : int
        Seed of the data and of every estimator.
    progress : Progress, optional
        Advanced once per finished row, with the row's result as note.

    Returns
    -------
    dict
        The JSON document written (``sizes``: per size, its settings and ``rows``).
    """
    unknown = [s for s in sizes if s not in PRESETS]
    if unknown:
        raise ConfigError(f"unknown size {unknown[0]!r} (known sizes: {', '.join(PRESETS)})")
    bad = [a for a in algorithms if a not in ALGORITHMS]
    if bad:
        raise ConfigError(f"unknown algorithm {bad[0]!r} (known: {', '.join(ALGORITHMS)})")
    if time_cap <= 0:
        raise ConfigError(f"time cap must be > 0 seconds, got {time_cap}")
    algorithms = [a for a in ALGORITHMS if a in algorithms]
    out_dir = Path(out_dir if out_dir is not None else config.BENCH_OUT / "algorithms")
    make_dirs(out_dir)
    progress = progress if progress is not None else Progress.null()
    doc = {"machine": _machine(), "epochs": epochs, "seed": seed, "time_cap_s": time_cap,
           "sizes": []}
    for name in sizes:
        size = PRESETS[name]
        with tempfile.TemporaryDirectory(prefix=f"data-{name}-", dir=out_dir) as tmp:
            entry = {"size": dataclasses.asdict(size), **_save_split(size, seed, Path(tmp)),
                     "rows": []}
            doc["sizes"].append(entry)
            for algo in algorithms:
                row = {"algo": algo, "name": ALGORITHMS[algo],
                       **_run_child(algo, Path(tmp), size, epochs=epochs, seed=seed,
                                    time_cap=time_cap)}
                entry["rows"].append(row)
                _add_ratios(entry["rows"])
                progress.advance(note=f"{name}: {_row_note(row)}")
                _write(doc, out_dir)
    return doc


def _row_note(row: dict) -> str:
    if row["status"] == "ok":
        return f"{row['name']}: {row['train_s']:.1f} s, accuracy {row['accuracy']:.4f}"
    return f"{row['name']}: {_status_text(row)}"


def _status_text(row: dict) -> str:
    if row["status"] == "timeout":
        return f"not finished in {row['time_cap_s']:.0f} s"
    return "failed: " + row["error"].splitlines()[-1] if row.get("error") else "failed"


def _machine() -> dict:
    import sklearn

    return {"python": platform.python_version(), "numpy": np.__version__,
            "scikit-learn": sklearn.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else \
        format(value, spec)


def to_markdown(doc: dict) -> str:
    """The result document as Markdown: one table per size."""
    m = doc["machine"]
    lines = ["# Inc-kSGD against global linear models (the paper's Table 1, one machine)", "",
             f"Machine: {m['cpus']} CPUs, {m['memory_gib']} GiB, {m['platform']}; Python "
             f"{m['python']}, numpy {m['numpy']}, scikit-learn {m['scikit-learn']}. "
             f"{doc['epochs']} epochs for every SGD row; time cap {doc['time_cap_s']:.0f} s "
             "per row. Each row runs in a fresh process; peak RSS includes the loaded data.",
             "Reproduce: `rpicluster bench algorithms "
             + ("--data " if all(e["size"].get("data", "synthetic") != "synthetic"
                                 for e in doc["sizes"]) else "--sizes ")
             + ",".join(e["size"]["name"] for e in doc["sizes"]) + "`.", ""]
    for entry in doc["sizes"]:
        s = BenchSize(**entry["size"])
        origin = (f"synthetic, seed {doc['seed']}" if s.data == "synthetic" else
                  {"digits": f"scikit-learn digits, stratified 75/25 split seed {doc['seed']}, "
                             "raw pixels",
                   "fashion-mnist": "Fashion-MNIST (dataset-fashion-mnist), official split, "
                                    "pixels/255"}[s.data])
        lines += [f"## {s.label} ({origin}; {s.test_rows:,} test rows)", "",
                  f"Inc-kSGD: {s.n_clusters} clusters per block, blocks of {s.block_rows:,} rows. "
                  f"Data {entry['data_mib']:.0f} MiB.", "",
                  "| Algorithm | train s | accuracy | peak RSS MiB | speed-up vs SGD | "
                  "accuracy / SGD |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in entry["rows"]:
            if r["status"] == "ok":
                lines.append(
                    f"| {r['name']} | {r['train_s']:.1f} | {r['accuracy']:.4f} | "
                    f"{r['peak_rss_mib']:.0f} | {_fmt(r['speedup_vs_sgd'], '.1f')}x | "
                    f"{_fmt(r['accuracy_vs_sgd'], '.3f')} |")
            else:
                lines.append(f"| {r['name']} | {_status_text(r)} | - | - | - | - |")
        lines.append("")
        verdict = _verdict(entry["rows"])
        if verdict:
            lines += [verdict, ""]
    return "\n".join(lines)


def _verdict(rows: list[dict]) -> str | None:
    """Plain sentences: Inc-kSGD against the best global model that finished, and against
    kSGD on all rows in one block (what splitting into blocks costs), with the cells' purity."""
    ok = {r["algo"]: r for r in rows if r["status"] == "ok"}
    inc = ok.get("inc-ksgd")
    others = [ok[a] for a in ("sgd", "liblinear", "logreg", "minibatch-sgd") if a in ok]
    if inc is None or not others:
        return None
    best = max(others, key=lambda r: r["accuracy"])
    cells = inc.get("cells") or []
    purity = ", ".join(f"{c['purity']:.2f}" for c in cells)
    per_cell = ", ".join(f"{c['classes_per_cell']:.1f}" for c in cells)
    text = [f"k-means cell purity per block: {purity} (classes per cell: {per_cell}, of "
            f"{cells[0]['block_classes'] if cells else '?'} in a block)."]
    gap = (best["accuracy"] - inc["accuracy"]) * 100
    if gap > 0.5:
        text.append(f"**Inc-kSGD loses {gap:.1f} points to {best['name']}** here: its cells "
                    "mix most classes, so each local model faces nearly the global problem with "
                    "a fraction of the rows, while the global model learns from every row.")
    elif gap < -0.5:
        text.append(f"Inc-kSGD beats the best global model that finished ({best['name']}) by "
                    f"{-gap:.1f} points: even impure cells make each local problem simpler.")
    else:
        text.append(f"Inc-kSGD ties the best global model that finished ({best['name']}).")
    one = ok.get("ksgd")
    if one is not None and (one["accuracy"] - inc["accuracy"]) * 100 > 0.5:
        text.append(f"**Splitting into {len(cells) or 'several'} blocks costs "
                    f"{(one['accuracy'] - inc['accuracy']) * 100:.1f} points** against kSGD on "
                    "all rows in one block: each block model learns from its block's rows only, "
                    "and the vote does not recover all of it.")
    return " ".join(text)


def _write(doc: dict, out_dir: Path) -> None:
    (out_dir / "algorithms.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out_dir / "algorithms.md").write_text(to_markdown(doc))


def _main(argv=None) -> int:
    """Child entry point: train one row and write its result JSON."""
    parser = argparse.ArgumentParser(prog="python -m rpicluster.bench.algorithms")
    parser.add_argument("--algo", required=True, choices=list(ALGORITHMS))
    parser.add_argument("--data", required=True)
    parser.add_argument("--size", required=True, help="BenchSize as JSON")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    # LIBLINEAR's "did not converge" and dask-ml's deprecations are expected in a benchmark.
    warnings.simplefilter("ignore", ConvergenceWarning)
    warnings.simplefilter("ignore", FutureWarning)
    result = run_one(args.algo, args.data, BenchSize(**json.loads(args.size)),
                     epochs=args.epochs, seed=args.seed)
    Path(args.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
