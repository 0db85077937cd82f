"""A user's commands on real stores, through click's CliRunner (issue 26, items 1-4).

Early checks from store metadata, the model file's memory of its training store, raw pixels
refused, and one-block stores run in this process when no cluster is running (the same model
as on a cluster).
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import rpicluster
from rpicluster.cli import main
from rpicluster.deploy.state import local_record
from rpicluster.train.modelfile import load_model


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """digits in 3 blocks of 600 rows, a 3-block 784-feature synthetic store, and a store of 24
    small photos (two classes) as raw uint8 pixels."""
    from PIL import Image

    root = tmp_path_factory.mktemp("friction")
    rpicluster.ingest("sklearn:digits", root / "digits.zarr", block_rows=600)
    rpicluster.ingest("synthetic:rows=300,features=784,classes=3,seed=0", root / "wide.zarr",
                      block_rows=100)
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / "photos" / label).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "photos" / label / f"{i}.png")
    rpicluster.ingest(f"images:{root / 'photos'}", root / "photos.zarr", block_rows=24,
                      source_options={"image_size": 32})
    return root


def test_a_small_store_trains_and_scores_in_process_like_on_a_cluster(home, tmp_path, stores):
    """No cluster running: train and score a small store here, start no cluster, and write
    the model a cluster writes; scoring the training store says they are training rows."""
    from distributed import LocalCluster

    here, there = tmp_path / "here.skops", tmp_path / "there.skops"
    code, out = _run("train", stores / "digits.zarr", "-o", here, "--clusters", 2, "--seed", 0)
    assert code == 0, out
    assert "this process" in out and local_record() is None
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        code, out = _run("train", stores / "digits.zarr", "-o", there, "--clusters", 2,
                         "--seed", 0, "--scheduler", cluster.scheduler_address)
        assert code == 0, out
    a, b = load_model(here), load_model(there)
    assert len(a.estimators_) == len(b.estimators_) == 3
    for ea, eb in zip(a.estimators_, b.estimators_):
        np.testing.assert_array_equal(ea.cluster_centers_, eb.cluster_centers_)
        np.testing.assert_array_equal(ea.local_coef_, eb.local_coef_)
    assert a.proba_scale_ == b.proba_scale_
    X = rpicluster.open_dataset(stores / "digits.zarr").block(1)[0]
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    code, out = _run("score", here, stores / "digits.zarr")
    assert code == 0, out
    assert "(1797 TRAINING rows (not a held-out estimate))" in out
    assert local_record() is None


def test_a_model_scored_on_a_store_of_another_width_fails_at_once(home, tmp_path, stores):
    model = tmp_path / "m.skops"
    assert _run("train", stores / "digits.zarr", "-o", model, "--clusters", 2)[0] == 0
    for command in (["score", model, stores / "wide.zarr"],
                    ["predict", model, stores / "wide.zarr", "-o", tmp_path / "p.npy"]):
        code, out = _run(*command)
        assert code == 1
        assert out.strip().splitlines() == [
            f"error: {model} was trained on 64 features, {stores / 'wide.zarr'} has 784; use a "
            "store made the same way as the training store"]
        assert local_record() is None  # nothing was started, nothing submitted


def test_train_on_a_csv_file_says_ingest_it_first(home, tmp_path):
    csv = tmp_path / "small.csv"
    csv.write_text("a,b,label\n1,2,x\n3,4,y\n")
    code, out = _run("train", csv, "-o", tmp_path / "m.skops")
    assert code == 1
    assert f"ingest it first (rpicluster ingest {csv} small.zarr)" in out
    assert len(out.strip().splitlines()) == 1


def test_train_on_raw_pixels_is_refused_unless_allowed(home, tmp_path, stores):
    photos = stores / "photos.zarr"
    code, out = _run("train", photos, "-o", tmp_path / "m.skops", "--clusters", 2)
    assert code == 1 and len(out.strip().splitlines()) == 1
    assert f"rpicluster features {photos} -o FEATURES.zarr" in out
    assert "--allow-pixels" in out and "3,072 uint8 columns" in out
    code, out = _run("train", photos, "-o", tmp_path / "m.skops", "--clusters", 2,
                     "--allow-pixels")
    assert code == 0, out


def test_ingest_of_a_folder_suggests_images(home, tmp_path, stores):
    code, out = _run("ingest", stores / "photos", tmp_path / "p.zarr")
    assert code != 0
    assert f"images:{stores / 'photos'}" in out


def test_train_help_shows_the_estimators_defaults():
    """``train --help`` names the default of every training flag (they are the estimator's,
    written out so that --help imports no scikit-learn)."""
    from rpicluster.cli.train import INC_KSGD_DEFAULTS
    from rpicluster.models.incremental import IncrementalKSGDClassifier

    defaults = IncrementalKSGDClassifier().get_params()
    assert INC_KSGD_DEFAULTS == {k: defaults[k] for k in INC_KSGD_DEFAULTS}
    code, out = _run("train", "--help")
    assert code == 0
    text = " ".join(out.split())
    for flag, key in (("--clusters", "n_clusters"), ("--epochs", "max_iter"), ("--eta", "eta0"),
                      ("--alpha", "alpha"), ("--batch-size", "batch_size"),
                      ("--solver", "solver"), ("--vote", "vote")):
        section = text.split(f"{flag} ", 1)[1].split(" --", 1)[0]
        assert f"[default: {defaults[key]}]" in section, (flag, section)
    assert "[default: none, a new model each run]" in text


def test_a_cluster_started_for_one_command_suggests_up_local(home, tmp_path, stores,
                                                              monkeypatch):
    """A slow start (any start, with the threshold at 0) says once that `up --local` helps."""
    from rpicluster.deploy import resolve

    model = tmp_path / "m.skops"
    assert _run("train", stores / "digits.zarr", "-o", model, "--clusters", 2)[0] == 0
    monkeypatch.setattr(resolve, "SLOW_START_SECONDS", 0.0)
    code, out = _run("score", model, stores / "digits.zarr", "--local", 1)
    assert code == 0, out
    assert out.count("`rpicluster up --local` keeps one running for the next commands") == 1
    assert local_record() is None  # stopped after the command
