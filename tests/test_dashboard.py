"""The rpicluster dashboard page: event folding, links, installation on real schedulers."""

from __future__ import annotations

import asyncio
import time

import pytest
import requests
from click.testing import CliRunner
from distributed import Client, LocalCluster, Worker

from rpicluster.cli import main
from rpicluster.dashboard import dask_setup, install
from rpicluster.dashboard import events as ev
from rpicluster.dashboard.health import METRIC, snapshot
from rpicluster.dashboard.links import build_links, dashboard_links
from rpicluster.dashboard.server import PLUGIN
from rpicluster.dashboard.state import TrainingState, format_duration
from rpicluster.errors import ConfigError


def _run(run_id="r1", n_blocks=4, k=2, t0=1000.0):
    """Events of a run that partitioned blocks 0-1, fitted three clusters, committed block 0."""
    e = ev.make_event
    return [
        e(ev.RUN_START, run_id=run_id, n_blocks=n_blocks, n_clusters=k, t=t0),
        e(ev.PARTITIONED, run_id=run_id, block=0, rows=100, worker="tcp://a:1", seconds=1.0,
          t=t0 + 1),
        e(ev.PARTITIONED, run_id=run_id, block=1, rows=100, worker="tcp://b:1", seconds=2.0,
          t=t0 + 2),
        e(ev.FITTED, run_id=run_id, block=0, cluster=0, rows=60, worker="tcp://a:1", seconds=0.5,
          t=t0 + 3),
        e(ev.FITTED, run_id=run_id, block=0, cluster=1, rows=40, worker="tcp://b:1", seconds=0.5,
          t=t0 + 3),
        e(ev.FITTED, run_id=run_id, block=1, cluster=0, rows=50, worker="tcp://a:1", seconds=0.5,
          t=t0 + 4),
        e(ev.COMMITTED, run_id=run_id, block=0, t=t0 + 4),
        e(ev.VALIDATION, run_id=run_id, block=0, accuracy=0.75, t=t0 + 4),
    ]


def test_state_counts_progress_throughput_and_accuracy():
    s = TrainingState()
    s.update(_run())
    assert (s.run_id, s.n_blocks, s.n_clusters, s.total_fits) == ("r1", 4, 2, 8)
    assert (len(s.partitioned), len(s.fitted), len(s.committed)) == (2, 3, 1)
    assert s.accuracy == {0: 0.75}
    a = s.workers["tcp://a:1"]
    assert a.partition_rate == pytest.approx(100 / 1.0)
    assert a.fit_rate == pytest.approx((60 + 50) / 1.0)
    # 2 partitions + 3 fits of 4 x (1 + 2) tasks.
    assert s.fraction() == pytest.approx(5 / 12)
    # 4 s elapsed for 5/12 of the work: 7/12 left at the same rate.
    assert s.eta(now=1004.0) == pytest.approx(4.0 * 7 / 5)
    assert s.status() == "running"


def test_state_counts_a_task_that_ran_twice_once_and_ignores_strangers():
    s = TrainingState()
    events = _run()
    s.update(events)
    before = (len(s.partitioned), len(s.fitted), len(s.committed))
    s.feed(events[3])  # the fit of (0, 0) again, e.g. after a worker died
    s.feed(ev.make_event(ev.FITTED, run_id="other", block=3, cluster=1))
    s.feed({"kind": "from-the-future", "block": 9})
    s.feed("not a dict")
    assert (len(s.partitioned), len(s.fitted), len(s.committed)) == before


def test_state_new_run_starts_afresh_and_run_end_finishes():
    s = TrainingState()
    s.update(_run("r1"))
    s.update(_run("r2", n_blocks=2, k=1, t0=2000.0))
    assert s.run_id == "r2" and s.total_fits == 2 and s.accuracy == {0: 0.75}
    s.feed(ev.make_event(ev.RUN_END, run_id="r2", t=2010.0))
    assert (s.status(), s.fraction(), s.eta(now=3000.0)) == ("finished", 1.0, 0.0)


def test_state_joined_mid_run_adopts_it_and_waits_without_events():
    assert TrainingState().status() == "waiting"
    assert TrainingState().eta(now=1.0) is None
    s = TrainingState()
    s.update(_run()[1:])  # run-start fell out of the scheduler's event log
    assert s.run_id == "r1" and s.n_blocks is None and s.fraction() is None
    assert s.status() == "running"


def test_make_event_checks_the_schema():
    with pytest.raises(ConfigError, match="unknown training event kind 'fited'"):
        ev.make_event("fited")
    with pytest.raises(ConfigError, match=r"unknown training event field\(s\) \['blok'\]"):
        ev.make_event(ev.FITTED, blok=1)
    assert ev.make_event(ev.FITTED, block=1)[ev.T] > 0


def test_format_duration():
    assert [format_duration(x) for x in (None, 4.4, 65, 3725)] == [
        "–", "4 s", "1 min 05 s", "1 h 02 min"]


def test_links_on_every_interface_use_the_scheduler_host():
    links = build_links("0.0.0.0", 8787, "desk.lan", ssh_connection="10.0.0.5 5 10.0.0.2 22")
    assert links.status == "http://desk.lan:8787/status"
    assert links.page == "http://desk.lan:8787/rpicluster"
    assert links.tunnel is None


def test_links_on_loopback_over_ssh_give_a_tunnel():
    links = build_links("127.0.0.1", 8787, "127.0.0.1", user="pi",
                        ssh_connection="192.168.1.9 51000 192.168.1.2 2222")
    assert links.page == "http://127.0.0.1:8787/rpicluster"
    assert links.tunnel == "ssh -L 8787:localhost:8787 -p 2222 pi@192.168.1.2"
    assert any(links.tunnel in line for line in links.lines())
    assert build_links("127.0.0.1", 8787, "127.0.0.1").tunnel is None


def test_links_keep_prefix_tls_and_ipv6():
    links = build_links("::1", 9000, "::1", prefix="/dask/", page="/dask/rpicluster", tls=True)
    assert links.status == "https://[::1]:9000/dask/status"
    assert links.page == "https://[::1]:9000/dask/rpicluster"
    assert "no /rpicluster page" in build_links("0.0.0.0", 1, "h", page=None).lines()[1]


@pytest.fixture(scope="module")
def local():
    """An in-process LocalCluster over TCP (dashboard on a free port); page not installed yet."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                      host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        yield cluster, client


def _wait(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_install_on_a_running_scheduler_serves_the_page(local):
    cluster, client = local
    base = f"http://127.0.0.1:{cluster.scheduler.http_server.port}"
    # Published before the page exists: the plugin must fold it when installed.
    client.log_event(ev.TOPIC, ev.make_event(ev.RUN_START, run_id="early", n_blocks=3,
                                             n_clusters=2))
    assert requests.get(base + "/rpicluster", timeout=10).status_code == 404
    assert client.run_on_scheduler(install) == "/rpicluster"
    assert client.run_on_scheduler(install) == "/rpicluster"  # idempotent
    scheduler = cluster.scheduler
    assert scheduler.plugins[PLUGIN].state.run_id == "early"
    client.log_event(ev.TOPIC, ev.make_event(ev.COMMITTED, run_id="early", block=1))
    _wait(lambda: scheduler.plugins[PLUGIN].state.committed == {1})
    for path in ("/status", "/rpicluster"):
        r = requests.get(base + path, timeout=10)
        assert r.status_code == 200, path
    assert 'href="rpicluster"' in requests.get(base + "/status", timeout=10).text


def test_workers_report_health_through_heartbeats(local):
    cluster, client = local
    client.run_on_scheduler(install)
    workers = cluster.scheduler.workers
    _wait(lambda: all(METRIC in ws.metrics for ws in workers.values()))
    here = snapshot()
    for ws in workers.values():
        health = ws.metrics[METRIC]
        assert (health["arch"], health["cores"], health["memory"]) == (
            here["arch"], here["cores"], here["memory"])
        assert (health["temperature"] is None) == (here["temperature"] is None)
        assert health["throttled"] == here["throttled"]


def test_dashboard_command_prints_the_page_url(local):
    cluster, client = local
    out = CliRunner().invoke(main, ["dashboard", "--scheduler", cluster.scheduler_address])
    assert out.exit_code == 0, out.output
    base = f"http://127.0.0.1:{cluster.scheduler.http_server.port}"
    assert f"training:  {base}/rpicluster" in out.output
    assert dashboard_links(cluster.scheduler_address).status == f"{base}/status"
    assert dashboard_links(client=client).page == f"{base}/rpicluster"


def test_dashboard_command_names_a_missing_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("RPICLUSTER_HOME", str(tmp_path))
    out = CliRunner().invoke(main, ["dashboard"])
    assert out.exit_code == 1
    assert "error: no cluster to show: pass --scheduler" in out.output


def test_scheduler_without_dashboard_still_collects_events():
    with LocalCluster(n_workers=1, processes=False, dashboard_address="127.0.0.1:0",
                      scheduler_kwargs={"dashboard": False,
                                        "preload": ["rpicluster.dashboard"]}) as cluster, \
            Client(cluster) as client:
        assert client.run_on_scheduler(install) is None
        client.log_event(ev.TOPIC, ev.make_event(ev.RUN_START, run_id="headless", n_blocks=1))
        _wait(lambda: cluster.scheduler.plugins[PLUGIN].state.run_id == "headless")


def test_preload_refuses_a_worker():
    worker = Worker.__new__(Worker)  # never started: only its type matters
    with pytest.raises(ConfigError, match="belongs on the scheduler, not on a Worker"):
        asyncio.run(dask_setup(worker))
