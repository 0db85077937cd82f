"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from rpicluster import testing


@pytest.fixture(autouse=True, scope="session")
def _no_run_history_in_the_developer_home():
    """Runs are not recorded in the run history (``RPICLUSTER_HISTORY=0``) unless the test has
    its own ``home``: the suite's runs must not fill the developer's ``~/.rpicluster``. For the
    whole session, before any fixture: a module fixture that trains or extracts features (the
    edge tests' store) runs before a test's own fixtures, and recorded its run in the
    developer's history while this was set per test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RPICLUSTER_HISTORY", "0")
        yield


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty rpicluster state directory (``RPICLUSTER_HOME``) under tmp_path, with its own run
    history.

    State files, certificates and the local cluster's record stay in the test, and none of the
    developer's own recorded clusters leak in.
    """
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("RPICLUSTER_HOME", str(path))
    monkeypatch.delenv("RPICLUSTER_HISTORY", raising=False)
    return path


@pytest.fixture
def free_port():
    """A function returning a TCP port on 127.0.0.1 that is free right now."""
    return testing.free_port


@pytest.fixture(scope="module")
def cluster():
    """A nanny-backed 2-worker LocalCluster (separate processes, like real workers; a killed
    client's CLI can join it over TCP), one per test module."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as c:
        yield c


@pytest.fixture
def client(cluster):
    """A client of the module's ``cluster``."""
    from distributed import Client

    with Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A 4-block synthetic store (2,400 rows x 32 features, 12 classes, blocks of 600 rows),
    one per test module: the store the training safety, watch and fault-matrix modules share
    (a module that needs another defines its own ``store``)."""
    import numpy as np

    from rpicluster import ingest
    from rpicluster.data.synthetic import make_imagenet_like

    root = tmp_path_factory.mktemp("four-blocks")
    X, y = make_imagenet_like(2400, n_features=32, n_classes=12, seed=3)
    np.savez(root / "train.npz", X=X, y=y)
    ingest(str(root / "train.npz"), root / "train.zarr", block_rows=600)
    return root / "train.zarr"
