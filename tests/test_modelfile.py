"""Model files: deterministic bytes, modes that follow the umask, a private signing key, one-line
refusals. Real estimators fitted on digits, real skops archives on disk. (Tampered, oversized
and foreign model files met by `score` are fault-matrix cases: tests/test_fault_matrix.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import SGDClassifier
from sklearn.neural_network import MLPClassifier

from rpicluster.errors import ModelError
from rpicluster.models.incremental import IncrementalKSGDClassifier
from rpicluster.train.modelfile import file_sha256, key_path, load_model, save_model, trust_model


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


def _fits(X, y):
    """Each of the kinds rpicluster writes, fitted from scratch (new objects, new ids)."""
    return [IncrementalKSGDClassifier(n_clusters=2, max_iter=2, random_state=0).fit(X, y),
            MLPClassifier((8,), random_state=0).partial_fit(X, y, classes=np.unique(y)),
            SGDClassifier(max_iter=3, tol=None, random_state=0).fit(X, y)]


def test_equal_models_give_byte_identical_files(digits, home, tmp_path):
    """Issue 26 item 9: two runs README calls bitwise equal wrote model files with different
    sha256 (skops names members by id() and stamps them with the clock). Equal models, fitted
    apart and saved in another process too, now give the same bytes; they load and predict."""
    X, y = digits
    first = [save_model(m, tmp_path / f"a{i}.skops") for i, m in enumerate(_fits(X, y))]
    second = [save_model(m, tmp_path / f"b{i}.skops") for i, m in enumerate(_fits(X, y))]
    assert first == second
    code = ("import sys, numpy as np; from sklearn.datasets import load_digits; "
            "sys.path.insert(0, 'tests'); from test_modelfile import _fits; "
            "from rpicluster.train.modelfile import save_model; "
            "X, y = load_digits(return_X_y=True); "
            f"save_model(_fits(X.astype(np.float32), y)[0], {str(tmp_path / 'c0.skops')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.getcwd())
    assert file_sha256(tmp_path / "c0.skops") == first[0]
    for i, model in enumerate(_fits(X, y)):
        np.testing.assert_array_equal(load_model(tmp_path / f"a{i}.skops").predict(X),
                                      model.predict(X))


def test_model_files_follow_the_umask_and_the_key_is_private(digits, home, tmp_path):
    """Issue 26 item 9: models were written 0600 whatever the umask. A model is an output: it
    gets 0666 less the umask; the signing key is 0600 under any umask, and one others can read
    is refused."""
    X, y = digits
    model = _fits(X, y)[0]
    old = os.umask(0o022)
    try:
        save_model(model, tmp_path / "shared.skops")
        os.umask(0o077)
        save_model(model, tmp_path / "private.skops")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.skops").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "shared.skops.sha256").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.skops").stat().st_mode & 0o777 == 0o600
    # predict's labels (preds.csv, labels.npy) are written the same way.
    from rpicluster.train.modelfile import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "preds.csv", b"label\n0\n")
    finally:
        os.umask(old)
    assert (tmp_path / "preds.csv").stat().st_mode & 0o777 == 0o644
    assert key_path() == home / "model.key"
    assert key_path().stat().st_mode & 0o777 == 0o600
    os.chmod(key_path(), 0o644)
    with pytest.raises(ModelError, match=r"model key \S+model.key is not private \(mode 644"):
        load_model(tmp_path / "shared.skops")


def test_a_model_from_elsewhere_loads_once_trusted(digits, home, tmp_path, monkeypatch):
    """Issue 29 finding 9: a model whose .sha256 was rewritten loaded (a checksum is not a
    signature). A model signed with another home's key is refused, naming the one command that
    vouches for it; after `trust_model` it loads. An empty MODEL.sha256 was an IndexError."""
    X, y = digits
    model = _fits(X, y)[0]
    save_model(model, tmp_path / "m.skops")
    monkeypatch.setenv("RPICLUSTER_HOME", str(tmp_path / "other-home"))
    with pytest.raises(ModelError, match=r"m.skops has a signature that does not match by this "
                                         r"user's rpicluster key .*`rpicluster trust \S+m.skops`"):
        load_model(tmp_path / "m.skops")
    (tmp_path / "m.skops.sig").unlink()
    with pytest.raises(ModelError, match=r"m.skops is not signed by this user's rpicluster key"):
        load_model(tmp_path / "m.skops")
    from click.testing import CliRunner

    from rpicluster.cli import main

    res = CliRunner().invoke(main, ["trust", str(tmp_path / "m.skops")])
    digest = file_sha256(tmp_path / "m.skops")
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"trusted {tmp_path / 'm.skops'} (sha256 {digest[:16]}...)")
    np.testing.assert_array_equal(load_model(tmp_path / "m.skops").predict(X), model.predict(X))
    assert trust_model(tmp_path / "m.skops") == file_sha256(tmp_path / "m.skops")
    (tmp_path / "m.skops.sha256").write_text("")
    with pytest.raises(ModelError, match=r"m.skops.sha256 holds no sha256 \(empty or damaged\); "
                                         r"delete it and, if you trust \S+m.skops, run "
                                         r"`rpicluster trust \S+m.skops`"):
        load_model(tmp_path / "m.skops")
