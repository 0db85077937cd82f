"""Federated rounds on real SSH hosts in network namespaces (rpicluster.testing), each holding
its own store (its inventory entry's ``data``): one host is killed mid-round and the round
completes without it; ``up`` restarts it and it rejoins; a host whose store has another feature
count is named and left out; only weights leave the hosts."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from rpicluster import ingest, open_dataset
from rpicluster.cli import main
from rpicluster.deploy import cluster
from rpicluster.testing import NamespaceHosts, cli_argv, unavailable, wait_until
from rpicluster.train.federated import federate
from rpicluster.train.modelfile import load_model
from rpicluster.train.rounds import RoundDir

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Three sshd hosts pi1..pi3 in network namespaces on a private bridge (torn down after)."""
    with NamespaceHosts(tmp_path_factory.mktemp("fed-netns"), 3) as h:
        yield h


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("RPICLUSTER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def stores(tmp_path):
    """A store per host (digits split three ways; pi3's keeps only 32 features) and a
    validation store on the desktop."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    paths = {}
    for name, lo, hi, cols in (("pi1", 0, 600, 64), ("pi2", 600, 1200, 64),
                               ("pi3", 1200, 1500, 32), ("validation", 1500, 1797, 64)):
        np.savez(tmp_path / f"{name}.npz", X=X[lo:hi, :cols], y=y[lo:hi])
        paths[name] = tmp_path / name / "local.zarr"
        paths[name].parent.mkdir()
        ingest(str(tmp_path / f"{name}.npz"), paths[name], block_rows=150)
    return paths


def test_a_host_killed_mid_round_is_left_out_then_rejoins(hosts, home, stores, tmp_path):
    path = hosts.write_inventory(tmp_path / "cluster.toml", local_directory=tmp_path / "w",
                                 nthreads=1, memory="1GiB", data=lambda n: stores[n])
    addr = {n: h.address for n, h in hosts.hosts.items()}
    report = cluster.up(path)
    pids = {r.host: r.pid for r in report.rows}
    seen = []

    def on_round_start(r, participants):
        if r == 2:
            assert addr["pi2"] in participants
            os.killpg(pids[addr["pi2"]], signal.SIGKILL)   # nanny and worker: gone

    def on_round(rep):
        seen.append(rep)
        if rep["round"] == 2:
            cluster.up(path)                               # starts only pi2's worker again

    try:
        result, digest = federate(path, tmp_path / "fed.skops", model="mlp",
                                  params={"hidden_layer_sizes": (16,), "random_state": 0,
                                          "learning_rate_init": 0.01},
                                  rounds=4, local_epochs=20,
                                  validation=str(stores["validation"]), show_progress=False,
                                  on_round=on_round, on_round_start=on_round_start)
    finally:
        cluster.down(path)
    r1, r2, r3, r4 = result.rounds
    assert r1["participants"] == sorted([addr["pi1"], addr["pi2"]])
    assert "has 32 features, the run 64" in result.excluded[addr["pi3"]]
    assert str(stores["pi3"]) in result.excluded[addr["pi3"]]
    assert r2["participants"] == [addr["pi1"]]
    assert r2["left_out"][addr["pi2"]].startswith("lost during the round")
    assert r2["rows"] == 20 * 600
    assert addr["pi2"] in r4["participants"]
    assert all(r["accuracy"] is not None for r in result.rounds)
    assert r4["accuracy"] > 0.8
    model = load_model(tmp_path / "fed.skops")
    np.testing.assert_array_equal(model.coefs_[0], result.model.coefs_[0])
    # What left the hosts per round: weights and optimizer state, far below one store's rows.
    store_bytes = open_dataset(stores["pi1"]).nbytes
    assert all(r["bytes_up"] < store_bytes for r in result.rounds)
    assert seen == result.rounds


def test_cli_federate_names_bad_hosts(hosts, home, stores, tmp_path):
    """The command line, with --data overriding the inventory: the same (missing) path on every
    host is refused, naming each host."""
    path = hosts.write_inventory(tmp_path / "cluster.toml", local_directory=tmp_path / "w",
                                 nthreads=1, memory="1GiB", names=["pi1", "pi2"],
                                 data=lambda n: stores[n])
    cluster.up(path)
    try:
        runner = CliRunner()
        res = runner.invoke(main, ["federate", "-c", str(path), "-o", str(tmp_path / "m.skops"),
                                   "--data", str(tmp_path / "absent.zarr"), "--rounds", "1"])
        assert res.exit_code == 1, res.output
        [line] = res.output.strip().splitlines()
        assert line.startswith("error: no host holds a usable store: ")
        for name in ("pi1", "pi2"):
            assert f"{hosts.hosts[name].address}: no Zarr store at {tmp_path / 'absent.zarr'}" \
                in line
        res = runner.invoke(main, ["federate", "-c", str(path), "-o", str(tmp_path / "m.skops"),
                                   "--model", "sgd", "--rounds", "2", "--seed", "1",
                                   "--validation", str(stores["validation"])])
        assert res.exit_code == 0, res.output
        assert "round 2: 2 hosts, 1200 rows" in res.output and "accuracy" in res.output

        # Like train: the model is not replaced without --overwrite, and Ctrl-C prints one line
        # with the rounds kept and the exact command that continues the run.
        model, run_dir = tmp_path / "m.skops", tmp_path / "m.skops.run"
        res = runner.invoke(main, ["federate", "-c", str(path), "-o", str(model), "--rounds",
                                   "1"])
        assert res.exit_code == 1 and "already exists" in res.output, res.output
        proc = subprocess.Popen(
            cli_argv("federate", "-c", str(path), "-o", str(model), "--model", "sgd",
                     "--rounds", "500", "--seed", "1", "--overwrite"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        before = RoundDir(run_dir).meta()["created"]  # the 2-round run above; --overwrite's
        wait_until(lambda: RoundDir(run_dir).meta()["created"] != before
                   and len(RoundDir(run_dir).history()) >= 2, 300,
                   what=f"two rounds of the new run in {run_dir}", process=proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "Traceback" not in out, out
        kept = len(RoundDir(run_dir).history())
        assert f"error: interrupted: {kept} of 500 rounds are finished in {run_dir}; " in out
        again = shlex.split(re.search(r"continue with: (.*)$", out, re.M).group(1))
        assert again == ["rpicluster", "federate", "-c", str(path), "-o", str(model),
                         "--resume", str(run_dir), "--model", "sgd", "--rounds", "500",
                         "--local-epochs", "1", "--fraction", "1.0", "--min-clients", "1",
                         "--overwrite"]
        again[again.index("--rounds") + 1] = str(kept + 1)
        res = runner.invoke(main, again[1:])
        assert res.exit_code == 0, res.output
        assert f"federated 1 rounds (+{kept} resumed)" in res.output
    finally:
        cluster.down(path)
