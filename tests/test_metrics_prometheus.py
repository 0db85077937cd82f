"""A real Prometheus server scrapes the embedded local cluster's /metrics during a training run.

The cluster is the one ``rpicluster up --local`` starts (TLS between scheduler, workers and
client, the guard and the page preloaded); its dashboard, and so ``/metrics``, is plain HTTP on
127.0.0.1. Its workers read a thermal zone and a ``vcgencmd`` made for the test (this machine
has neither): the values travel the real path (worker heartbeat, scheduler, collector, scrape).
Prometheus (Debian's ``prometheus``; CI installs it from .ci/apt-packages.txt) runs on a free
loopback port with its own config and storage, and the test asks its HTTP API for the series.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from rpicluster.dashboard.metrics import SERIES
from rpicluster.deploy.local import start_local, stop_local
from rpicluster.testing import wait_until
from rpicluster.train.api import train_model

PROMETHEUS = shutil.which("prometheus")
GRAFANA = Path(__file__).resolve().parent.parent / "deploy" / "grafana-dashboard.json"


@pytest.fixture
def pi_like_workers(tmp_path, monkeypatch):
    """A thermal zone at 61.5 °C and a vcgencmd reporting a capped, once-throttled Pi, seen by
    the workers through RPICLUSTER_THERMAL_ROOT and PATH."""
    zone = tmp_path / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("61500\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    vcgencmd = bin_dir / "vcgencmd"
    vcgencmd.write_text("#!/bin/sh\necho throttled=0x40002\n")
    vcgencmd.chmod(0o755)
    monkeypatch.setenv("RPICLUSTER_THERMAL_ROOT", str(tmp_path / "thermal"))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture
def local_cluster(home, pi_like_workers, free_port):
    info = start_local(n_workers=2, threads_per_worker=1, memory_limit="1.5GiB",
                       dashboard_address=f"127.0.0.1:{free_port()}")
    try:
        yield info
    finally:
        stop_local()


@pytest.fixture
def prometheus(tmp_path, free_port):
    """Start Prometheus scraping ``target`` every 200 ms; yields start(target) -> API base URL."""
    if PROMETHEUS is None:
        pytest.skip("the prometheus server is not installed (CI installs Debian's prometheus "
                    "from .ci/apt-packages.txt)")
    procs = []

    def start(target: str) -> str:
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "200ms", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "rpicluster", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [target]}]}]}))
        log = open(tmp_path / "prometheus.log", "wb")
        procs.append(subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log))
        base = f"http://127.0.0.1:{port}/api/v1"
        try:
            wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).ok,
                       60, what=f"prometheus ready on port {port}", process=procs[-1],
                       ignore=requests.ConnectionError, interval=0.2)
        except AssertionError as e:
            pytest.fail(f"{e}: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
        return base

    yield start
    for p in procs:
        p.terminate()
        p.wait(20)


def _query(base: str, promql: str) -> list[dict]:
    reply = requests.get(f"{base}/query", params={"query": promql}, timeout=10).json()
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def _store(root: Path):
    from rpicluster import ingest
    from rpicluster.data.sources import ArraySource
    from rpicluster.data.synthetic import make_imagenet_like

    X, y = make_imagenet_like(22_000, 32, 6, seed=1)
    train = ingest(ArraySource("metrics train", X[:20_000], y[:20_000]), root / "train.zarr",
                   block_rows=1_000)
    test = ingest(ArraySource("metrics test", X[20_000:], y[20_000:]), root / "test.zarr",
                  block_rows=1_000)
    return train, test


def test_prometheus_scrapes_the_cluster_during_a_training_run(local_cluster, prometheus,
                                                              tmp_path):
    dashboard = local_cluster["dashboard_link"]
    assert dashboard.startswith("http://127.0.0.1:"), dashboard  # plain HTTP on loopback
    target = re.match(r"http://([^/]+)/", dashboard).group(1)
    assert local_cluster["scheduler_address"].startswith("tls://")
    api = prometheus(target)
    train, test = _store(tmp_path)
    # Prometheus applies its targets a few seconds after it is ready (its discovery manager
    # sends updates on a 5 s tick): before that first scrape a short run goes unseen.
    wait_until(lambda: _query(api, 'up{job="rpicluster"} == 1'), 60, interval=0.2,
               what="prometheus's first scrape of the dashboard")
    # 20 blocks at 60 epochs and a 200 ms scrape: a run of ~3 s on CI, a dozen scrapes.
    summary = train_model(str(train.url), tmp_path / "m.skops",
                          {"n_clusters": 3, "max_iter": 60, "random_state": 0},
                          test=str(test.url), show_progress=False)
    # Scrapes land every second: wait for one after the run's end.
    wait_until(lambda: _query(api, 'rpicluster_run_info{status="done"}'), 30, interval=0.5,
               what="a scrape that sees the run done")

    up = _query(api, 'up{job="rpicluster"}')
    assert [r["value"][1] for r in up] == ["1"]
    found = {}
    for name in SERIES:
        found[name] = _query(api, name)
    print("\nPrometheus query results:")
    for name, results in found.items():
        for r in results:
            labels = {k: v for k, v in r["metric"].items()
                      if k not in ("__name__", "instance", "job")}
            print(f"  {name}{labels} = {r['value'][1]}")
    workers = {"0", "1"}
    temps = {r["metric"]["worker"]: float(r["value"][1])
             for r in found["rpicluster_worker_temperature_celsius"]}
    assert temps == {w: 61.5 for w in workers}
    flags = {(r["metric"]["worker"], r["metric"]["flag"]): r["value"][1]
             for r in found["rpicluster_worker_throttled"]}
    assert flags[("0", "frequency capped")] == "1" and flags[("1", "throttling occurred")] == "1"
    assert flags[("0", "under-voltage")] == "0"
    limits = {float(r["value"][1]) for r in found["rpicluster_worker_memory_limit_bytes"]}
    assert limits == {1.5 * 2**30}
    assert all(0 < float(r["value"][1]) < 1.5 * 2**30
               for r in found["rpicluster_worker_memory_used_bytes"])
    partition_rows = sum(float(r["value"][1]) for r in found["rpicluster_worker_rows_total"]
                         if r["metric"]["phase"] == "partition")
    assert partition_rows == train.n_rows
    run = found["rpicluster_run_info"][0]["metric"]["run"]
    assert [r["metric"]["run"] for r in found["rpicluster_run_progress_ratio"]] == [run]
    assert float(found["rpicluster_run_progress_ratio"][0]["value"][1]) == 1.0
    assert float(found["rpicluster_run_blocks_committed_total"][0]["value"][1]) == train.n_blocks
    assert float(found["rpicluster_run_eta_seconds"][0]["value"][1]) == 0.0
    assert 0 < float(found["rpicluster_run_accuracy_ratio"][0]["value"][1]) <= 1
    assert float(found["rpicluster_run_rows_per_second"][0]["value"][1]) > 0
    assert summary.test_accuracy is not None
    # Seen during the run too: progress between 0 and 1 in some scrape before the end.
    during = _query(api, f'max_over_time(rpicluster_run_progress_ratio{{run="{run}"}}[5m])'
                         f' - min_over_time(rpicluster_run_progress_ratio{{run="{run}"}}[5m])')
    assert float(during[0]["value"][1]) > 0, "every scrape saw the same progress"
    # Dask's own series come through the same endpoint.
    assert [r["value"][1] for r in _query(api, "dask_scheduler_workers{state='idle'}")
            + _query(api, "dask_scheduler_workers{state='saturated'}")
            + _query(api, "dask_scheduler_workers{state='partially_saturated'}")]
    rates = _query(api, "sum by (worker) (rate(rpicluster_worker_rows_total[1m]))")
    assert {r["metric"]["worker"] for r in rates} == workers
    # Every query of the shipped Grafana dashboard answers from this scrape (Dask's series
    # included: a renamed one would leave a panel empty).
    empty = [e for e in grafana_exprs() if not _query(api, e)]
    assert empty == []


def test_grafana_dashboard_references_only_exported_series():
    """deploy/grafana-dashboard.json parses, and every series its panels query is one this
    module exports or one of Dask's (dask_ prefix)."""
    exprs = grafana_exprs()
    assert len(exprs) >= 8
    names = set()
    for expr in exprs:
        # Series names: identifiers not followed by "(" (a function) and not label names.
        cleaned = re.sub(r"\{[^}]*\}", "", expr)
        cleaned = re.sub(r"\[[^\]]*\]", "", cleaned)
        for name in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?!\s*\()", cleaned):
            if name.startswith(("rpicluster_", "dask_")):
                names.add(name)
    ours = {n for n in names if n.startswith("rpicluster_")}
    assert ours <= set(SERIES), ours - set(SERIES)
    # What the issue asks Grafana users to see: temperature, throttling, memory and its limit,
    # rows/s; progress, ETA, blocks committed, accuracy.
    assert {"rpicluster_worker_temperature_celsius", "rpicluster_worker_throttled",
            "rpicluster_worker_memory_limit_bytes", "rpicluster_worker_memory_used_bytes",
            "rpicluster_worker_rows_total", "rpicluster_run_progress_ratio",
            "rpicluster_run_eta_seconds", "rpicluster_run_blocks_committed_total",
            "rpicluster_run_accuracy_ratio"} <= ours


def grafana_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(GRAFANA.read_text())["panels"]
            for t in p.get("targets", [])]


def test_a_taken_metrics_port_is_one_warning_naming_the_port_used(home, free_port):
    """The dashboard port (the page and /metrics) is taken: the local cluster starts on another
    port, says so in one line, and serves /metrics there."""
    import socket
    import warnings

    from rpicluster.errors import RPiClusterWarning

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = start_local(n_workers=1, dashboard_address=f"127.0.0.1:{port}")
        try:
            lines = [str(w.message) for w in caught if issubclass(w.category, RPiClusterWarning)]
            used = re.search(r":(\d+)/", info["dashboard_link"]).group(1)
            assert used != str(port)
            assert lines == [f"the dashboard port {port} (the page and Prometheus' /metrics) was "
                             f"taken: the local cluster serves them on port {used} instead "
                             f"({info['dashboard_link']}); point Prometheus there, or free port "
                             f"{port} and restart the cluster (rpicluster down --local, then "
                             "rpicluster up --local)"]
            metrics = requests.get(f"http://127.0.0.1:{used}/metrics", timeout=30)
            assert "dask_scheduler_workers" in metrics.text
            assert "rpicluster_worker_memory_limit_bytes" in metrics.text
        finally:
            stop_local()
    finally:
        taken.close()

