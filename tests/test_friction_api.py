"""The Python API's gaps against scikit-learn and the user's first calls (issue 26, items 4, 6).

Real stores (ingested from scikit-learn's digits and Debian's Fashion-MNIST files), a real
in-process Dask cluster, the real embedded local cluster.
"""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
from sklearn.datasets import load_digits

import rpicluster
from rpicluster.errors import ConfigError, DataError
from rpicluster import IncrementalKSGDClassifier  # registers the distributed fit

FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return (X / 16).astype(np.float32), y


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory, digits):
    """digits ingested from arrays, unshuffled, in 4 blocks of 450 rows (the last 447)."""
    X, y = digits
    out = tmp_path_factory.mktemp("digits") / "digits.zarr"
    return rpicluster.ingest((X, y), out, block_rows=450, shuffle=False)


@pytest.fixture(scope="module")
def threads_client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as client:
        yield client


def test_ingest_takes_arrays(digits, digits_store):
    X, y = digits
    assert (digits_store.n_rows, digits_store.n_features, digits_store.n_blocks) == (1797, 64, 4)
    Xb, yb = digits_store.block(1)
    np.testing.assert_array_equal(Xb, X[450:900])
    np.testing.assert_array_equal(digits_store.classes[yb], y[450:900])


def test_ingest_of_a_non_pair_tuple_is_one_config_error(tmp_path, digits):
    with pytest.raises(ConfigError, match=r"pair \(X, y\)"):
        rpicluster.ingest(digits + (None,), tmp_path / "x.zarr")


def test_ingest_of_a_folder_suggests_the_images_source(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    with pytest.raises(ConfigError, match=rf"images:{photos}"):
        rpicluster.ingest(str(photos), tmp_path / "x.zarr")


@pytest.mark.skipif(not shutil.os.path.isdir(FASHION),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_idx_finds_a_bare_labels_name_beside_the_images(tmp_path):
    """``idx:DIR/images.gz,labels.gz`` (labels without a folder): read beside the images."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name, n, header in (("t10k-images-idx3-ubyte.gz", 300, 16),
                            ("t10k-labels-idx1-ubyte.gz", 300, 8)):
        with gzip.open(f"{FASHION}/{name}") as f:
            raw = bytearray(f.read())
        raw[4:8] = n.to_bytes(4, "big")  # the first n records only
        size = 784 if "images" in name else 1
        with gzip.open(folder / name, "wb") as f:
            f.write(bytes(raw[:header + n * size]))
    ds = rpicluster.ingest(f"idx:{folder}/t10k-images-idx3-ubyte.gz,t10k-labels-idx1-ubyte.gz",
                           tmp_path / "m.zarr", block_rows=300)
    assert (ds.n_rows, ds.n_features) == (300, 784)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz does not exist"):
        rpicluster.ingest(f"idx:{folder}/t10k-images-idx3-ubyte.gz,missing/"
                          "t10k-labels-idx1-ubyte.gz".replace("missing/", "nowhere/"),
                          tmp_path / "n.zarr")


def test_decision_function_and_predict_proba_take_a_store(digits, digits_store,
                                                         threads_client):
    """Like predict and score: a store is computed block by block, on the current client's
    workers, with the values of the same rows given as an array."""
    X, y = digits
    est = IncrementalKSGDClassifier(block_rows=450, n_clusters=2, random_state=0).fit(X, y)
    for method in ("decision_function", "predict_proba"):
        expected = getattr(est, method)(X)
        np.testing.assert_array_equal(getattr(est, method)(digits_store), expected)
        with threads_client.as_current():
            np.testing.assert_array_equal(getattr(est, method)(digits_store), expected)


def test_predict_proba_calibration_is_the_same_in_every_fit_path(digits, digits_store,
                                                                 threads_client):
    """Arrays, a store in this process and a store on the cluster: one temperature."""
    X, y = digits
    kw = dict(block_rows=450, n_clusters=2, random_state=0)
    arrays = IncrementalKSGDClassifier(**kw).fit(X, y)
    here = IncrementalKSGDClassifier(**kw).fit(digits_store)
    with threads_client.as_current():
        cluster = IncrementalKSGDClassifier(**kw).fit(digits_store)
    assert arrays.proba_scale_ != 1.0
    assert arrays.proba_scale_ == here.proba_scale_ == cluster.proba_scale_
    np.testing.assert_array_equal(cluster.predict_proba(X), arrays.predict_proba(X))


def test_status_sees_the_running_local_cluster(home):
    from rpicluster.deploy.local import start_local, stop_local

    with pytest.raises(ConfigError, match="up --local"):
        rpicluster.status()
    start_local(1, threads_per_worker=1)
    try:
        rows = rpicluster.status()
    finally:
        stop_local()
    assert [r.role for r in rows] == ["scheduler", "worker"]
    assert rows[0].state == rows[1].state == "running"
    assert rows[1].threads == 1 and rows[1].memory


def test_connect_to_an_inventory_path_is_one_line(home, tmp_path):
    """``rpicluster.connect("cluster.toml")``: the inventory's cluster, or one line saying
    that nothing was started from it (was distributed's ``missing port number``)."""
    inventory = tmp_path / "cluster.toml"
    inventory.write_text("")
    with pytest.raises(ConfigError) as info:
        rpicluster.connect(str(inventory))
    assert "\n" not in str(info.value)
    assert "cluster.toml" in str(info.value) and "rpicluster up" in str(info.value)


def test_a_block_too_small_for_the_clusters_suggests_a_block_rows_that_works(tmp_path):
    """The hint names a --block-rows that works (it named 2 for 10 clusters, and nothing above
    --block-rows), or says that the store itself has too few rows."""
    rng = np.random.default_rng(0)
    X, y = rng.random((1001, 4), dtype=np.float32), np.arange(1001) % 2
    ds = rpicluster.ingest((X, y), tmp_path / "a.zarr", block_rows=10)
    with pytest.raises(DataError, match=r"last block keeps >= 10 rows \(e\.g\. 11\)"):
        ds.check_trainable(10)
    tiny = rpicluster.ingest((X[:8], y[:8]), tmp_path / "b.zarr", block_rows=8)
    with pytest.raises(DataError, match="holds 8 rows, fewer than n_clusters=10 .*lower "
                                        "--clusters to 8 or less"):
        tiny.check_trainable(10)


def test_rows_per_worker_count_each_trained_row_once(tmp_path, digits_store, threads_client):
    """The tasks-per-worker table's rows sum to the store's rows (a block's partition and its
    fits both read its rows: they were counted twice)."""
    from rpicluster.train.api import ClusterChoice, train_model

    summary = train_model(digits_store.url, tmp_path / "m.skops", {"n_clusters": 2},
                          cluster=ClusterChoice(scheduler=threads_client.scheduler.address),
                          show_progress=False)
    r = summary.result
    assert sum(r.rows_per_worker.values()) == digits_store.n_rows == 1797
    assert sum(r.tasks_per_worker.values()) >= 2 * digits_store.n_blocks
