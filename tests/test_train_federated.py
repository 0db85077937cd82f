"""Federated averaging on a real Dask cluster: one store per worker read inside its pinned task,
FedAvg weighted by rows, bad stores named and left out, non-IID class subsets, a host missing
the deadline, no training rows through the scheduler, resume after the client is killed."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import cloudpickle
import numpy as np
import pytest
from distributed import Client, LocalCluster, SchedulerPlugin, WorkerPlugin
from sklearn.neural_network import MLPClassifier

from rpicluster import ingest, open_dataset
from rpicluster.errors import DataError
from rpicluster.testing import wait_until
from rpicluster.train.averaging import weighted_average
from rpicluster.train.federated import federate_on
from rpicluster.train.rounds import RoundDir

# Plugins defined here run inside worker processes that cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MLP = dict(hidden_layer_sizes=(16,), random_state=5, learning_rate_init=0.01, shuffle=False)


def _digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return (X / 16.0).astype(np.float32), y


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Per-host stores of digits: three IID shards (sizes 500, 400, 300), two non-IID (classes
    0-4 and 5-9), a held-out store, and bad ones: 32 features, string labels."""
    root = tmp_path_factory.mktemp("fed-data")
    X, y = _digits()
    out = {}

    def put(name, Xs, ys, block_rows=200):
        np.savez(root / f"{name}.npz", X=Xs, y=ys)
        ingest(str(root / f"{name}.npz"), root / f"{name}.zarr", block_rows=block_rows)
        out[name] = str(root / f"{name}.zarr")

    put("a", X[:500], y[:500])
    put("b", X[500:900], y[500:900])
    put("c", X[900:1200], y[900:1200])
    low, high = y[:1200] < 5, y[:1200] >= 5
    put("low", X[:1200][low], y[:1200][low])
    put("high", X[:1200][high], y[:1200][high])
    put("test", X[1200:], y[1200:], block_rows=600)
    put("narrow", X[:300, :32], y[:300])
    put("strings", X[:300], np.array([f"c{v}" for v in y[:300]]))
    out["missing"] = str(root / "nothing-here.zarr")
    return out


@pytest.fixture(scope="module")
def cluster():
    """Three single-thread worker processes, named 0, 1, 2 (the "hosts")."""
    with LocalCluster(n_workers=3, threads_per_worker=1, processes=True,
                      dashboard_address=None) as c:
        yield c


@pytest.fixture
def client(cluster):
    with Client(cluster) as c:
        c.wait_for_workers(3, timeout=60)
        yield c


def _labelled(path):
    ds = open_dataset(path)
    X, y = zip(*(ds.block(b) for b in range(ds.n_blocks)))
    return np.concatenate(X), np.asarray(ds.classes)[np.concatenate(y)]


def test_one_round_is_the_row_weighted_average_of_local_fits(stores, client):
    hosts = {"0": stores["a"], "1": stores["b"], "2": stores["c"]}
    result = federate_on(client, hosts, model="mlp", params=MLP, rounds=1, local_epochs=2)
    [report] = result.rounds
    assert report["participants"] == ["0", "1", "2"] and report["left_out"] == {}
    assert report["rows"] == 2 * (500 + 400 + 300)
    # Reference: each host's fit from the same seeded start, averaged by rows, here.
    locals_, rows = [], []
    for name in ("a", "b", "c"):
        X, y = _labelled(stores[name])
        m = MLPClassifier(**MLP)
        for _ in range(2):
            for lo in range(0, len(y), 200):  # the store's blocks, in order
                m.partial_fit(X[lo:lo + 200], y[lo:lo + 200], classes=np.arange(10))
        locals_.append(m.coefs_ + m.intercepts_)
        rows.append(len(y))
    expected = weighted_average(locals_, rows)
    for got, want in zip(result.model.coefs_ + result.model.intercepts_, expected):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_non_iid_hosts_cover_the_union_of_classes(stores, client):
    hosts = {"0": stores["low"], "1": stores["high"]}
    result = federate_on(client, hosts, model="sgd", params={"random_state": 0}, rounds=4,
                         validation=open_dataset(stores["test"]))
    assert list(result.model.classes_) == list(range(10))
    accuracies = [r["accuracy"] for r in result.rounds]
    assert all(a is not None for a in accuracies)
    X, y = _labelled(stores["test"])
    assert accuracies[-1] == pytest.approx(result.model.score(X, y))
    # Each host alone knows half the classes; the average predicts classes from both halves.
    predicted = set(result.model.predict(X).tolist())
    assert predicted & {0, 1, 2, 3, 4} and predicted & {5, 6, 7, 8, 9}


def test_bad_stores_are_named_and_left_out(stores, client):
    hosts = {"0": stores["missing"], "1": stores["narrow"], "2": stores["a"]}
    result = federate_on(client, hosts, model="mlp", params=MLP, rounds=1)
    assert result.rounds[0]["participants"] == ["2"]
    assert set(result.excluded) == {"0", "1"}
    assert "no Zarr store at" in result.excluded["0"] and stores["missing"] in result.excluded["0"]
    assert "has 32 features, the run 64" in result.excluded["1"]
    assert result.rounds[0]["left_out"] == result.excluded

    hosts = {"0": stores["strings"], "1": stores["a"], "2": stores["b"]}
    result = federate_on(client, hosts, model="mlp", params=MLP, rounds=1)
    assert "has str labels, the run int labels" in result.excluded["0"]
    assert result.rounds[0]["participants"] == ["1", "2"]

    with pytest.raises(DataError, match="no host holds a usable store: 0: .*no Zarr store"):
        federate_on(client, {"0": stores["missing"], "1": None}, model="mlp", rounds=1)


class _Stall(WorkerPlugin):
    """Holds tasks of round ``round`` on the worker named ``name`` for ``seconds``."""

    def __init__(self, name: str, round: int, seconds: float):
        self.name, self.round, self.seconds = name, round, seconds

    def setup(self, worker):
        self.worker = worker

    def transition(self, key, start, finish, **kwargs):
        if (finish == "executing" and str(self.worker.name) == self.name
                and f"-r{self.round}-" in str(key)):
            time.sleep(self.seconds)


class _KeySizes(SchedulerPlugin):
    """Records the size of every key that reaches memory and of every task's arguments."""

    def __init__(self):
        self.sizes: dict[str, int] = {}

    async def start(self, scheduler):
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs):
        from dask.sizeof import sizeof

        ts = self.scheduler.tasks.get(key)
        if ts is None:
            return
        if finish == "memory":
            self.sizes[str(key)] = max(self.sizes.get(str(key), 0), ts.nbytes)
        if finish in ("processing", "no-worker", "queued") and ts.run_spec is not None:
            self.sizes[f"spec:{key}"] = sizeof(ts.run_spec)


def test_a_late_host_is_left_out_and_no_rows_pass_the_scheduler(stores, client):
    """Round 2 stalls host 1 beyond the deadline: the round completes with 0 and 2 and names 1,
    which is back by round 4 (round 3 starts without waiting for the stalled host, which may
    still be busy with its cancelled round-2 task). No key and no task's inputs come near a
    store's size."""
    plugin = _KeySizes()
    client.register_plugin(plugin, name="key-sizes")
    client.register_plugin(_Stall("1", 2, 8.0), name="stall")
    try:
        hosts = {"0": stores["a"], "1": stores["b"], "2": stores["c"]}
        result = federate_on(client, hosts, model="mlp", params=MLP, rounds=4,
                             round_timeout=4.0)
        # Control: rows handed to a task as an argument are seen by the same plugin.
        X, _ = _labelled(stores["c"])
        client.submit(np.sum, X, key="control-rows").result()
        sizes = client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.plugins["key-sizes"].sizes)
    finally:
        client.unregister_worker_plugin("stall")
    r1, r2, r3, r4 = result.rounds
    assert r1["participants"] == ["0", "1", "2"]
    assert r2["participants"] == ["0", "2"]
    assert r2["left_out"] == {"1": "missed the 4 s round deadline"}
    assert r3["participants"] in (["0", "2"], ["0", "1", "2"])
    assert r4["participants"] == ["0", "1", "2"]
    store_bytes = min(open_dataset(stores[n]).nbytes for n in ("a", "b", "c"))
    model_bytes = sum(w.nbytes for w in result.model.coefs_ + result.model.intercepts_)
    assert store_bytes > 8 * model_bytes  # the check below can tell rows from weights
    assert sizes.pop("spec:control-rows") >= X.nbytes
    sizes.pop("control-rows", None)
    assert sizes and max(sizes.values()) < store_bytes / 2, sorted(
        sizes.items(), key=lambda kv: -kv[1])[:3]
    assert any(k.startswith("rpicluster-fed-") for k in sizes)


@pytest.mark.timeout(900)
def test_resume_after_the_client_is_killed(stores, cluster, client, tmp_path):
    run_dir = tmp_path / "run"
    hosts = {"0": stores["a"], "1": stores["b"], "2": stores["c"]}
    script = textwrap.dedent(f"""
        from distributed import Client
        from rpicluster.train.federated import federate_on
        with Client({cluster.scheduler_address!r}) as c:
            federate_on(c, {hosts!r}, model="mlp", params={MLP!r}, rounds=60,
                        run_dir={str(run_dir)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    # 400 s: a loaded machine starts the CLI slowly.
    wait_until(lambda: len(RoundDir(run_dir).history()) >= 2, 400,
               what=f"two rounds checkpointed in {run_dir}", process=proc, interval=0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(RoundDir(run_dir).history())
    assert 2 <= done < 60
    n = max(done, 5)
    resumed = federate_on(client, hosts, model="mlp", params={}, rounds=n, run_dir=run_dir,
                          resume=True)
    assert resumed.resumed_rounds == done
    whole = federate_on(client, hosts, model="mlp", params=MLP, rounds=n)
    for a, b in zip(resumed.model.coefs_, whole.model.coefs_):
        np.testing.assert_array_equal(a, b)
