"""Small commands fast (issue 26): what a small in-process ``score`` imports, the model files
read without skops, and the in-process and cluster paths saying the same things.

Import graphs are asserted, never times: a cold ``score`` of digits' held-out store imports no
skops (its import builds a list of every scikit-learn estimator), no Dask, no distributed.
Real stores from scikit-learn's digits, real model files, a real in-process Dask cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier

import rpicluster
from rpicluster.cli import main
from rpicluster.models.incremental import IncrementalKSGDClassifier
from rpicluster.models.ksgd import KSGDClassifier
from rpicluster.train.modelfile import load_model, save_model
from rpicluster.train.archive import dumps, read_model

#: Modules a small in-process score has no use for (each took CPU on every cold score).
NOT_FOR_A_SMALL_SCORE = ("skops", "dask", "distributed", "sklearn.model_selection",
                         "sklearn.metrics", "numba", "pytest")
#: ... and a small in-process train (it needs more of scikit-learn: k-means, calibration);
#: skops' package is imported for its version only.
NOT_FOR_A_SMALL_TRAIN = ("skops.io", "dask", "distributed")


@pytest.fixture
def digits_split(home, tmp_path):
    """README's quickstart: digits ingested with a 25 % held-out store, a model trained on it
    in this process (no cluster running), all under an empty RPICLUSTER_HOME."""
    train, test = tmp_path / "digits.zarr", tmp_path / "digits-test.zarr"
    rpicluster.ingest("sklearn:digits", train, block_rows=600, test_fraction=0.25,
                      test_out=test)
    model = tmp_path / "digits.skops"
    result = CliRunner().invoke(main, ["train", str(train), "-o", str(model), "--clusters", "2",
                                       "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert "this process" in result.output
    return train, test, model


def _cold(home, *args) -> tuple[list[str], list[str]]:
    """``rpicluster ARGS`` in a new Python process: its output lines and the modules it
    imported."""
    code = ("import sys, json\n"
            "from rpicluster.cli import main\n"
            "try:\n"
            f"    main({[str(a) for a in args]!r})\n"
            "except SystemExit as exc:\n"
            "    assert not exc.code, exc.code\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "RPICLUSTER_HOME": str(home)}, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    return lines[:-1], json.loads(lines[-1])


def test_a_cold_small_score_imports_no_skops_dask_or_distributed(digits_split, home):
    """A cold `rpicluster score MODEL digits-test.zarr` with no cluster running scores in this
    process and never imports skops (whose import alone imported every scikit-learn estimator,
    scipy.stats' and dask.array's users among them: 0.8 s of CPU of a 2.4 s score), dask or
    distributed."""
    _, test, model = digits_split
    lines, loaded = _cold(home, "score", model, test)
    assert lines[0].startswith("accuracy: ") and "(449 held-out rows)" in lines[0]
    assert "rpicluster.models.incremental" in loaded  # the model was loaded and used
    unneeded = sorted(m for m in loaded if m.split(".")[0] in NOT_FOR_A_SMALL_SCORE
                      or m.startswith(NOT_FOR_A_SMALL_SCORE))
    assert unneeded == []


def test_a_cold_small_train_imports_no_distributed_or_skops_io(digits_split, home, tmp_path):
    """A cold `rpicluster train` of a small store with no cluster running trains in this
    process without importing distributed (it was imported to quiet its loggers and for the
    run's result class) or skops.io (to write the model file)."""
    train, _, _ = digits_split
    lines, loaded = _cold(home, "train", train, "-o", tmp_path / "cold.skops", "--clusters", 2)
    assert "this process" in "\n".join(lines)
    assert sorted(m for m in loaded if m.startswith(NOT_FOR_A_SMALL_TRAIN)) == []


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


def _same(a, b, where="model"):
    """``a`` and ``b`` are the same object graph: types, arrays (dtype and values), keys."""
    assert type(a) is type(b), where
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__"):
        _same(vars(a), vars(b), where)
    else:
        assert a == b or (a != a and b != b), where


def test_rpicluster_model_files_read_and_written_without_skops_as_skops_does(
        digits_split, digits, home, tmp_path):
    """Inc-kSGD and kSGD model files are written without skops byte for byte as skops writes
    them, and rebuilt without skops into the very objects skops builds (every attribute, array
    dtype and value; the same predictions); a scikit-learn model (MLP) is left to skops both
    ways and still loads."""
    import skops.io as sio

    from rpicluster.train.modelfile import deterministic_archive

    X, y = digits
    models = {"inc": IncrementalKSGDClassifier(n_clusters=2, max_iter=2, random_state=0,
                                               block_rows=600).fit(X, y),
              "ksgd": KSGDClassifier(n_clusters=3, max_iter=2, random_state=0).fit(X, y),
              "trained": load_model(digits_split[2])}  # with the store it was trained on
    for name, model in models.items():
        assert (deterministic_archive(dumps(model))
                == deterministic_archive(sio.dumps(model))), name
        path = tmp_path / f"{name}.skops"
        save_model(model, path)
        ours = read_model(path)
        assert ours is not None, name
        _same(ours, sio.load(path, trusted=sio.get_untrusted_types(file=path)), name)
        np.testing.assert_array_equal(load_model(path).predict(X), model.predict(X))
    mlp = MLPClassifier((8,), random_state=0).partial_fit(X, y, classes=np.unique(y))
    assert dumps(mlp) is None
    save_model(mlp, tmp_path / "mlp.skops")
    assert read_model(tmp_path / "mlp.skops") is None
    np.testing.assert_array_equal(load_model(tmp_path / "mlp.skops").predict(X), mlp.predict(X))


def test_labels_the_model_never_saw_warn_alike_here_and_on_a_cluster(digits, home, tmp_path):
    """Scoring a store with classes the model was not trained on warns with the same counts in
    this process as on a cluster (the in-process path said nothing); a store of only such
    classes is one error on both paths."""
    from distributed import LocalCluster

    X, y = digits
    model = tmp_path / "low.skops"
    save_model(IncrementalKSGDClassifier(n_clusters=2, max_iter=2, random_state=0)
               .fit(X[y < 5], y[y < 5]), model)
    rpicluster.ingest((X[:400], y[:400]), tmp_path / "all.zarr", block_rows=200)
    rpicluster.ingest((X[y >= 5][:200], y[y >= 5][:200]), tmp_path / "high.zarr",
                      block_rows=100)
    unseen = int((y[:400] >= 5).sum())
    said = f"{unseen} of 400 rows of {tmp_path / 'all.zarr'} have labels {model} never saw"

    def score(store, *extra):
        result = CliRunner().invoke(main, ["score", str(model), str(tmp_path / store), *extra])
        return result.exit_code, result.output

    here = score("all.zarr")
    assert here[0] == 0 and f"warning: {said}" in here[1], here
    assert "cluster:" not in here[1]  # scored in this process: no cluster was resolved
    code, out = score("high.zarr")
    assert code == 1 and "accuracy would be 0" in out
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        there = score("all.zarr", "--scheduler", cluster.scheduler_address)
        assert there[0] == 0 and f"warning: {said}" in there[1], there
        code, out = score("high.zarr", "--scheduler", cluster.scheduler_address)
        assert code == 1 and "accuracy would be 0" in out
    [warned_here] = [line for line in here[1].splitlines() if line.startswith("warning:")]
    assert warned_here in there[1].splitlines()
    assert here[1].splitlines()[-1] == there[1].splitlines()[-1]  # the same accuracy line


def test_the_training_rows_reingested_with_another_block_size_are_still_training_rows(
        home, tmp_path):
    """The store fingerprint was taken over the block size and the per-block checksums, so
    digits re-ingested with another --block-rows counted as other data and `score` called the
    training rows "rows". It is now the checksum of all the rows: the same rows in the same
    order, in any blocks, are the model's training rows."""
    from rpicluster.train.checks import fingerprint

    stores = {}
    for name, block_rows, seed in (("a", 600, 0), ("b", 256, 0), ("c", 600, 1)):
        stores[name] = tmp_path / f"{name}.zarr"
        rpicluster.ingest("sklearn:digits", stores[name], block_rows=block_rows, seed=seed)
    a, b, c = (rpicluster.open_dataset(stores[k]) for k in "abc")
    assert (a.n_blocks, b.n_blocks) == (3, 8)
    # c holds the same rows in another order: the fingerprint (of metadata only, never of
    # the rows themselves) is of the rows in order, so it counts as other data.
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    model = tmp_path / "a.skops"
    trained = CliRunner().invoke(main, ["train", str(stores["a"]), "-o", str(model),
                                        "--clusters", "2"])
    assert trained.exit_code == 0, trained.output
    result = CliRunner().invoke(main, ["score", str(model), str(stores["b"])])
    assert result.exit_code == 0, result.output
    assert "(1797 TRAINING rows (not a held-out estimate))" in result.output


def test_a_train_on_a_cluster_still_quiets_dask_logs_once_connected(digits_split, home,
                                                                     tmp_path):
    """Dask's client loggers are quieted when `train` reaches a cluster (no longer at the
    command's start, which imported distributed for runs that never use it)."""
    from distributed import LocalCluster

    train, _, _ = digits_split
    code = ("import logging\n"
            "from rpicluster.cli import main\n"
            "try:\n"
            f"    main(['train', {str(train)!r}, '-o', {str(tmp_path / 'c.skops')!r},\n"
            "          '--clusters', '2', '--scheduler', ADDRESS])\n"
            "except SystemExit as exc:\n"
            "    assert not exc.code, exc.code\n"
            "print([logging.getLogger(n).level for n in ('distributed.client', 'asyncio')])\n")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                      dashboard_address=None) as cluster:
        out = subprocess.run([sys.executable, "-c",
                              code.replace("ADDRESS", repr(cluster.scheduler_address))],
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "RPICLUSTER_HOME": str(home)})
    assert out.returncode == 0, out.stderr
    assert "1 workers" in out.stdout and "this process" not in out.stdout
    assert out.stdout.splitlines()[-1] == "[50, 50]"  # logging.CRITICAL
