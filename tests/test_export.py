"""ONNX export: the file's labels are ``model.predict``'s on held-out rows of real data (digits,
Fashion-MNIST) and of a 1,000-class ImageNet-shaped synthetic set, for every model ``train`` and
``federate`` write; model files and their refusals."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import SGDClassifier
from sklearn.neural_network import MLPClassifier

from rpicluster import IncrementalKSGDClassifier, KSGDClassifier, save_model
from rpicluster.errors import ConfigError, ModelError
from rpicluster.export import export_onnx


def run_onnx(path, X):
    """(label, scores) of the exported file on float32 rows."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["label", "scores"], {"rows": np.asarray(X, np.float32)})


def reference_scores(model, X):
    return model.predict_proba(X) if isinstance(model, MLPClassifier) else \
        model.decision_function(X)


def assert_parity(model, X, path):
    """Same labels as predict on every row; scores as decision_function (predict_proba)."""
    r = export_onnx(model, path)
    assert r.size_bytes == path.stat().st_size and r.input == "rows"
    label, scores = run_onnx(path, X)
    expected = model.predict(X)
    mismatches = int(np.count_nonzero(label != expected))
    assert mismatches == 0, f"{mismatches} / {len(X)} rows differ"
    ref = reference_scores(model, X)
    # float32 models sum in another order than BLAS; Inc-kSGD majority scores go through a
    # float32 arctan (ONNX Runtime has no float64 Atan)
    tol = 1e-4 if scores.dtype == np.float32 else 1e-5
    np.testing.assert_allclose(scores, ref, rtol=tol, atol=tol * np.abs(ref).max())
    return mismatches


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    X, y = X[order].astype(np.float32), y[order]
    return X[:1300], y[:1300], X[1300:], y[1300:]


KSGD_CASES = [
    pytest.param(dict(block_rows=1300, n_clusters=1), id="one-block-one-cluster"),
    pytest.param(dict(block_rows=260, n_clusters=6), id="5-blocks-majority"),
    pytest.param(dict(block_rows=260, n_clusters=6, vote="soft"), id="5-blocks-soft"),
    pytest.param(dict(block_rows=325, n_clusters=12), id="4-blocks-even-votes"),
    pytest.param(dict(block_rows=100, n_clusters=20, solver="sklearn"), id="13-blocks-sklearn"),
]


@pytest.mark.parametrize("params", KSGD_CASES)
def test_inc_ksgd_parity_on_digits(digits, params, tmp_path):
    Xtr, ytr, Xte, _ = digits
    model = IncrementalKSGDClassifier(**params, random_state=0).fit(Xtr, ytr)
    assert_parity(model, Xte, tmp_path / "m.onnx")


@pytest.mark.parametrize("vote", ["majority", "soft"])
def test_two_string_classes_and_single_class_cells(digits, vote, tmp_path):
    """Two classes (decision scores are 1-d), string labels, and cells holding one class."""
    Xtr, ytr, Xte, _ = digits
    y = np.where(ytr < 5, "low", "high")
    model = IncrementalKSGDClassifier(400, n_clusters=30, vote=vote, random_state=1).fit(Xtr, y)
    sizes = np.concatenate([np.diff(e.local_ptr_) for e in model.estimators_])
    assert (sizes == 1).any()  # some cells scored by their one class
    assert_parity(model, Xte, tmp_path / "m.onnx")


def test_one_ksgd_parity(digits, tmp_path):
    Xtr, ytr, Xte, _ = digits
    assert_parity(KSGDClassifier(8, random_state=0).fit(Xtr, ytr), Xte, tmp_path / "m.onnx")


@pytest.mark.parametrize("make", [
    pytest.param(lambda: MLPClassifier((32, 16), max_iter=60, random_state=0), id="mlp-relu"),
    pytest.param(lambda: MLPClassifier((24,), activation="tanh", max_iter=60, random_state=0),
                 id="mlp-tanh"),
    pytest.param(lambda: SGDClassifier(random_state=0), id="sgd"),
])
@pytest.mark.parametrize("binary", [False, True], ids=["10-classes", "2-classes"])
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_mlp_and_sgd_parity(digits, make, binary, tmp_path):
    Xtr, ytr, Xte, _ = digits
    y = ytr >= 5 if binary else ytr
    for dtype in (np.float32, np.float64):  # a model keeps the dtype it was fitted on
        model = make().fit(Xtr.astype(dtype), y)
        assert_parity(model, Xte, tmp_path / "m.onnx")


@pytest.fixture(scope="module")
def fashion():
    """Fashion-MNIST (Debian's dataset-fashion-mnist): 12,000 training rows and the 10,000 test
    rows, pixels / 255 as the source yields them."""
    from rpicluster.data.sources import FASHION_MNIST_DIR, fashion_mnist_source

    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")

    def rows(split, n):
        src = fashion_mnist_source(split)
        X = np.concatenate([X for X, _ in src.blocks(10_000)])[:n]
        return X.astype(np.float32), src.classes[src.codes()][:n]

    return (*rows("train", 12_000), *rows("test", 10_000))


@pytest.mark.parametrize("vote", ["majority", "soft"])
def test_inc_ksgd_parity_on_fashion_mnist(fashion, vote, tmp_path):
    Xtr, ytr, Xte, _ = fashion
    model = IncrementalKSGDClassifier(3000, n_clusters=10, vote=vote,
                                      random_state=0).fit(Xtr, ytr)
    assert_parity(model, Xte, tmp_path / "m.onnx")


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_mlp_parity_on_fashion_mnist(fashion, tmp_path):
    Xtr, ytr, Xte, _ = fashion
    model = MLPClassifier((64,), max_iter=8, random_state=0).fit(Xtr, ytr)
    assert_parity(model, Xte, tmp_path / "m.onnx")


def test_imagenet_shaped_1000_classes(tmp_path):
    """1,000 classes from rpicluster's synthetic generator, ingested as a store and fitted block
    by block; each cell keeps only its own classes, so the file is the model's size."""
    from rpicluster import ingest, open_dataset
    from rpicluster.data.synthetic import make_imagenet_like

    ingest("synthetic:rows=16000,features=64,classes=1000,seed=0", tmp_path / "train.zarr",
           block_rows=8000)
    Xte, yte = make_imagenet_like(4000, 64, 1000, seed=1)
    model = IncrementalKSGDClassifier(n_clusters=8, random_state=0).fit(
        open_dataset(str(tmp_path / "train.zarr")))
    assert len(model.estimators_) == 2
    assert_parity(model, Xte, tmp_path / "m.onnx")
    local_rows = sum(e.local_coef_.size for e in model.estimators_)
    dense = 2 * 8 * 1000 * 64  # blocks x clusters x all classes x features
    size = (tmp_path / "m.onnx").stat().st_size
    assert local_rows < dense / 2
    assert size < 4 * 1.2 * local_rows + 200_000  # float32 coefficients, nothing per class


def test_model_files(digits, tmp_path):
    """From the file train writes; a tampered one, a file of another kind and an .onnx are
    refused in one line naming the file."""
    Xtr, ytr, Xte, _ = digits
    model = IncrementalKSGDClassifier(650, n_clusters=4, random_state=0).fit(Xtr, ytr)
    save_model(model, tmp_path / "m.skops")
    r = export_onnx(tmp_path / "m.skops", tmp_path / "m.onnx")
    assert r.model == "IncrementalKSGDClassifier"
    np.testing.assert_array_equal(run_onnx(tmp_path / "m.onnx", Xte)[0], model.predict(Xte))

    data = bytearray((tmp_path / "m.skops").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "m.skops").write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"m\.skops"):
        export_onnx(tmp_path / "m.skops", tmp_path / "t.onnx")
    assert not (tmp_path / "t.onnx").exists()

    save_model(np.arange(3.0), tmp_path / "array.skops")
    with pytest.raises(ModelError, match=r"array\.skops holds a (numpy\.)?ndarray"):
        export_onnx(tmp_path / "array.skops", tmp_path / "a.onnx")
    with pytest.raises(ModelError, match=r"m\.onnx is an ONNX file already"):
        export_onnx(tmp_path / "m.onnx", tmp_path / "b.onnx")
    from sklearn.linear_model import LogisticRegression

    with pytest.raises(ModelError, match="LogisticRegression has no ONNX export"):
        export_onnx(LogisticRegression().fit(Xtr, ytr), tmp_path / "c.onnx")
    with pytest.raises(ModelError, match="not fitted"):
        export_onnx(SGDClassifier(), tmp_path / "d.onnx")
    with pytest.raises(ConfigError, match="give features too"):
        export_onnx(model, tmp_path / "e.onnx", quantize="int8")
    with pytest.raises(ConfigError, match="unknown quantize 'int4'"):
        export_onnx(model, tmp_path / "e.onnx", features="efficientnet-lite0", quantize="int4")


def test_cli_export(digits, tmp_path):
    """`rpicluster export MODEL -o MODEL.onnx`: one summary line; a mistake is one error line."""
    from click.testing import CliRunner

    from rpicluster.cli import main

    Xtr, ytr, Xte, _ = digits
    model = IncrementalKSGDClassifier(650, n_clusters=4, random_state=0).fit(Xtr, ytr)
    save_model(model, tmp_path / "m.skops")
    run = CliRunner().invoke
    res = run(main, ["export", str(tmp_path / "m.skops"), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"wrote {tmp_path / 'm.onnx'} (") and "input rows (N, 64)" in \
        res.output
    np.testing.assert_array_equal(run_onnx(tmp_path / "m.onnx", Xte)[0], model.predict(Xte))
    res = run(main, ["export", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "x.onnx")])
    assert res.exit_code == 1 and res.output.count("\n") == 1
    assert res.output.startswith(f"error: {tmp_path / 'm.onnx'} is an ONNX file already")
    res = run(main, ["export", str(tmp_path / "m.skops"), "-o", str(tmp_path / "x.onnx"),
                     "--quantize", "int8", "--features", "efficientnet-lite0"])
    assert res.exit_code == 1 and "give calibration (--calibration IMAGES.zarr" in res.output
