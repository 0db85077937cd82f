"""The rpicluster dashboard page: event folding, links, installation on real schedulers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time

import pytest
import requests
from click.testing import CliRunner
from distributed import Client, LocalCluster, Worker

from rpicluster.cli import main
from rpicluster import events as ev
from rpicluster.dashboard import dask_setup, install
from rpicluster.dashboard.health import METRIC, snapshot
from rpicluster.dashboard.links import build_links, dashboard_links
from rpicluster.dashboard.server import PLUGIN
from rpicluster.dashboard.state import FeaturesState, RoundsState, TrainingState
from rpicluster.progress import format_duration
from rpicluster.deploy.cluster import down, up
from rpicluster.deploy.resolve import find_cluster
from rpicluster.errors import ConfigError
from rpicluster.inventory import load_inventory
from rpicluster.testing import wait_until


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


def test_state_counts_every_cluster_of_a_fit_task():
    # One event per fit task: clusters 1-3 of block 0 in one task, then cluster 0 alone.
    s = TrainingState()
    s.update([ev.make_event(ev.RUN_START, run_id="r", n_blocks=2, n_clusters=4, t=1.0),
              ev.make_event(ev.FITTED, run_id="r", block=0, cluster=1, clusters=3, rows=30,
                            worker="tcp://a:1", seconds=1.5, t=2.0),
              ev.make_event(ev.FITTED, run_id="r", block=0, cluster=0, rows=10,
                            worker="tcp://a:1", seconds=0.5, t=3.0)])
    assert sorted(s.fitted) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert s.workers["tcp://a:1"].fit_rate == pytest.approx(40 / 2.0)


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
    # The ETA counts blocks committed, as the terminal does: 1 block in 4 s, 3 to go.
    assert s.eta(now=1004.0) == pytest.approx(4.0 * 3 / 1)
    assert s.stages() == [(2, 4), (3, 8), (1, 4)]
    assert s.rows_per_second(now=1004.0) == pytest.approx(100 / 4.0)  # block 0 committed
    assert s.status() == "running"


def _tasks(n_blocks, k, blocks, t0, run_id="r"):
    """Events of ``blocks`` trained one task per second from ``t0``: partition, k fits, commit."""
    out, t = [], t0
    for b in blocks:
        out.append(ev.make_event(ev.PARTITIONED, run_id=run_id, block=b, rows=10, worker="w",
                                 seconds=1.0, t=t))
        for j in range(k):
            t += 1
            out.append(ev.make_event(ev.FITTED, run_id=run_id, block=b, cluster=j, rows=5,
                                     worker="w", seconds=1.0, t=t))
        out.append(ev.make_event(ev.COMMITTED, run_id=run_id, block=b, t=t))
        t += 1
    return out


def test_state_eta_is_not_misled_by_a_slow_start():
    s = TrainingState()
    s.feed(ev.make_event(ev.RUN_START, run_id="r", n_blocks=20, n_clusters=4, t=0.0))
    # The workers' start-up delays the first result by 60 s; then one task a second.
    events = _tasks(20, 4, range(20), t0=60.0)
    s.update(events[:84])  # 14 blocks: 70 of the 100 tasks
    now = s.last_t
    assert s.fraction() == pytest.approx(0.7)
    assert s.eta(now) == pytest.approx(6 * 5.0)  # 6 blocks left, 5 s each
    assert s.eta(now) < now * 6 / 14  # what the average since run-start would say


def test_state_resumed_run_counts_resumed_blocks_and_times_only_new_work():
    n_blocks, k, resumed = 10, 2, 6
    s = TrainingState()
    s.feed(ev.make_event(ev.RUN_START, run_id="r", n_blocks=n_blocks, n_clusters=k,
                         resumed=resumed, t=0.0))
    assert s.stages() == [(6, 10), (12, 20), (6, 10)]
    assert s.fraction() == pytest.approx(0.6)
    assert s.eta(now=5.0) is None  # no work of this run yet: no rate
    events = _tasks(n_blocks, k, range(resumed, n_blocks), t0=1.0)
    s.update(events[:4])  # block 6: partition and two fits, one a second, then its commit
    tasks_left = (n_blocks - resumed - 1) * (1 + k)
    assert s.fraction() == pytest.approx(1 - tasks_left / (n_blocks * (1 + k)))
    assert s.eta(now=s.last_t) == pytest.approx(3 * 3.0)  # 3 blocks left at 1 per 3 s
    s.update(events[4:])
    s.feed(ev.make_event(ev.RUN_END, run_id="r", t=s.last_t))
    assert s.stages() == [(10, 10), (20, 20), (10, 10)]
    assert (s.status(), s.fraction(), s.eta(now=1e9)) == ("done", 1.0, 0.0)


def test_page_eta_agrees_with_the_terminal(monkeypatch):
    """The page folds the run's events; the terminal's Progress is driven as TrainingRun drives
    it (resumed blocks skipped, one block per commit, a note per task): same ETA throughout."""
    import rpicluster.progress as progress_mod

    clock = [0.0]
    monkeypatch.setattr(progress_mod.time, "time", lambda: clock[0])
    events = [ev.make_event(ev.RUN_START, run_id="r", n_blocks=10, n_clusters=3, resumed=2,
                            t=0.0)] + _tasks(10, 3, range(2, 10), t0=7.0)
    s, terminal = TrainingState(), progress_mod.Progress("train", total=10, enabled=False)
    etas = []
    with terminal:
        terminal.skip(2)
        for e in events:
            clock[0] = e[ev.T]
            s.feed(e)
            if e[ev.KIND] == ev.COMMITTED:
                terminal.advance()
            elif e[ev.KIND] != ev.RUN_START:
                terminal.advance(0)
            clock[0] += 0.5  # both asked half a second later
            etas.append((s.eta(now=clock[0]), terminal.eta()))
    page, term = zip(*etas)
    assert page == pytest.approx(term) and sum(e is not None for e in page) > 10


def test_state_run_that_ended_early_shows_what_it_did():
    """A failed run stops short and says so in the run history's words: the outcome its
    ``run-end`` tells, or ``stopped`` for an older client's run-end without one."""
    for end, status in (({}, "stopped"),
                        (ev.ending(ValueError("block 2 is corrupted\nmore")), "failed")):
        s = TrainingState()
        s.feed(ev.make_event(ev.RUN_START, run_id="r", n_blocks=4, n_clusters=2, t=0.0))
        s.update(_tasks(4, 2, [0, 1], t0=1.0))
        s.feed(ev.make_event(ev.RUN_END, run_id="r", t=s.last_t, **end))
        assert s.status() == status
        assert s.fraction() == pytest.approx(0.5)
        assert s.eta(now=100.0) is None
    assert s.reason == "block 2 is corrupted"


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
    s.update(_tasks(2, 1, [1], t0=2005.0, run_id="r2"))
    s.feed(ev.make_event(ev.RUN_END, run_id="r2", t=2010.0))
    assert (s.status(), s.fraction(), s.eta(now=3000.0)) == ("done", 1.0, 0.0)


def test_state_joined_mid_run_adopts_it_and_waits_without_events():
    assert TrainingState().status() == "waiting"
    assert TrainingState().eta(now=1.0) is None
    s = TrainingState()
    s.update(_run()[1:])  # run-start fell out of the scheduler's event log
    assert s.run_id == "r1" and s.n_blocks is None and s.fraction() is None
    assert s.status() == "running"


def test_state_shows_what_a_run_waits_on_until_it_clears_or_ends():
    s = TrainingState()
    s.update(_run()[:3])
    s.feed(ev.make_event(ev.STALLED, run_id="r1", worker="pi2 (tcp://10.0.0.2:1)",
                         note="worker pi2 (tcp://10.0.0.2:1) has not reported for 20 s"))
    assert s.alert == "worker pi2 (tcp://10.0.0.2:1) has not reported for 20 s"
    from rpicluster.dashboard.page import _summary_html

    assert "has not reported for 20 s" in _summary_html(s, now=time.time())
    s.feed(ev.make_event(ev.STALLED, run_id="r1", worker=None, note=None))
    assert s.alert is None
    s.feed(ev.make_event(ev.STALLED, run_id="r1", worker="pi2", note="1 worker(s) paused"))
    s.feed(ev.make_event(ev.RUN_END, run_id="r1"))
    assert s.alert is None


def test_features_state_counts_blocks_once_and_images_per_worker():
    f = FeaturesState()
    f.feed(ev.make_event(ev.RUN_START, run_id="old", n_blocks=9))
    f.feed(ev.make_event(ev.RUN_START, run_id="r", n_blocks=4, resumed=1))
    for block, worker, rows, secs in ((1, "a", 100, 2.0), (2, "b", 100, 4.0), (1, "a", 100, 2.0),
                                      (3, "a", 50, 1.0)):
        f.feed(ev.make_event(ev.EXTRACTED, run_id="r", block=block, rows=rows, worker=worker,
                             seconds=secs))
    f.feed(ev.make_event(ev.EXTRACTED, run_id="old", block=0, rows=999, worker="c", seconds=1))
    assert f.done == {1, 2, 3} and f.resumed == 1 and not f.finished
    assert f.images_per_second() == {"a": 50.0, "b": 25.0}
    assert f.status() == "running"
    f.feed(ev.make_event(ev.RUN_END, run_id="r", **ev.ending(KeyboardInterrupt())))
    assert f.finished and (f.status(), f.reason) == ("stopped", "KeyboardInterrupt")


def test_rounds_state_keeps_each_round_once_with_who_was_left_out():
    r = RoundsState()
    assert r.status() == "waiting"
    e = ev.make_event
    r.feed(e(ev.RUN_START, run_id="old", mode="averaging", model="mlp", n_rounds=9))
    r.feed(e(ev.ROUND, run_id="old", round=1, participants=["x"], rows=1, bytes_down=1,
             bytes_up=1, seconds=1.0))
    r.feed(e(ev.RUN_START, run_id="f", mode="federated", model="sgd", n_rounds=3, resumed=1))
    round1 = dict(participants=["pi1", "pi2"], left_out={}, rows=1200, bytes_down=2000,
                  bytes_up=3000, seconds=1.5, loss=0.5, accuracy=0.8)
    for _ in range(2):  # a resumed round is published again at the start
        r.feed(e(ev.ROUND, run_id="f", round=1, **round1))
    r.feed(e(ev.ROUND, run_id="f", round=2, participants=["pi1"],
             left_out={"pi2": "missed the 5 s round deadline", "pi3": "store has 32 features"},
             rows=600, bytes_down=1000, bytes_up=1500, seconds=5.0, loss=None, accuracy=None))
    r.feed(e(ev.ROUND, run_id="old", round=3, participants=["x"], rows=1, bytes_down=1,
             bytes_up=1, seconds=1.0))
    assert r.status() == "running" and r.mode == "federated" and r.resumed == 1
    t = r.table()
    assert t["round"] == [1, 2] and t["participants"] == ["pi1, pi2", "pi1"]
    assert t["left_out"] == ["", "pi2: missed the 5 s round deadline; pi3: store has 32 features"]
    assert t["moved"] == [5000, 2500] and t["rows"] == [1200, 600]
    assert t["accuracy"][0] == 0.8 and t["accuracy"][1] != t["accuracy"][1]  # NaN: not scored
    r.feed(e(ev.RUN_END, run_id="f", **ev.ending(None)))
    assert r.status() == "done"


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
    wait_until(lambda: scheduler.plugins[PLUGIN].state.committed == {1}, 20,
               what="the page's state to fold block 1's commit")
    for path in ("/status", "/rpicluster"):
        r = requests.get(base + path, timeout=10)
        assert r.status_code == 200, path
    assert 'href="rpicluster"' in requests.get(base + "/status", timeout=10).text
    # A feature-extraction run shows on the page's summary: blocks and images/s per worker.
    from rpicluster.dashboard.page import TrainingPage

    client.log_event(ev.FEATURES_TOPIC, ev.make_event(ev.RUN_START, run_id="fx", n_blocks=2))
    client.log_event(ev.FEATURES_TOPIC, ev.make_event(ev.EXTRACTED, run_id="fx", block=0,
                                                      rows=64, worker="pi01", seconds=2.0))
    monitor = scheduler.plugins[PLUGIN]
    wait_until(lambda: monitor.features.done == {0}, 20,
               what="the page's state to fold the extracted block 0")
    page = TrainingPage(scheduler, monitor.state, monitor.features)
    page.update()
    assert "feature extraction run <b>fx</b>" in page.summary.text
    assert "1 / 2 blocks" in page.summary.text and "pi01 32.0" in page.summary.text


def test_workers_report_health_through_heartbeats(local):
    cluster, client = local
    client.run_on_scheduler(install)
    workers = cluster.scheduler.workers
    wait_until(lambda: all(METRIC in ws.metrics for ws in workers.values()), 20,
               what="a health heartbeat from every worker")
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


def test_recorded_clusters_ssh_first_tls_with_the_recorded_certificate(home, local, tmp_path,
                                                                      free_port):
    cluster, _ = local
    # The embedded cluster's record, as `up --local` writes it, naming the running test cluster.
    (home / "local.json").write_text(json.dumps(
        {"pid": os.getpid(), "scheduler_address": cluster.scheduler_address}))
    recorded = find_cluster()
    assert (recorded.kind, recorded.address) == ("local", cluster.scheduler_address)
    local_base = f"http://127.0.0.1:{cluster.scheduler.http_server.port}"
    assert dashboard_links().page == f"{local_base}/rpicluster"

    # An SSH cluster brought up from an inventory: its scheduler runs here (no SSH needed), with
    # TLS; the inventory's worker is left out so that no host has to be reached.
    dashboard_port = free_port()
    inventory = tmp_path / "cluster.toml"
    inventory.write_text(
        f'[scheduler]\nhost = "127.0.0.1"\nscheduler_port = {free_port()}\n'
        f'dashboard_port = {dashboard_port}\n'
        f'[defaults]\nkey = "{tmp_path}/key"\nknown_hosts = "{tmp_path}/known_hosts"\n'
        '[[workers]]\nhost = "192.0.2.1"\n')
    up(dataclasses.replace(load_inventory(inventory), workers=()))
    try:
        recorded = find_cluster()
        assert recorded.kind == "ssh" and recorded.address.startswith("tls://127.0.0.1:")
        links = dashboard_links()
        assert links.page == f"http://127.0.0.1:{dashboard_port}/rpicluster"
        assert requests.get(links.page, timeout=10).status_code == 200
        # Named explicitly, the recorded cluster is still reached with its certificate.
        out = CliRunner().invoke(main, ["dashboard", "--scheduler", recorded.address])
        assert out.exit_code == 0, out.output
        assert f"training:  {links.page}" in out.output
    finally:
        down()


def test_dashboard_command_names_a_missing_cluster(home):
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
        wait_until(lambda: cluster.scheduler.plugins[PLUGIN].state.run_id == "headless", 20,
                   what="the headless scheduler to fold the run's start")


def test_preload_refuses_a_worker():
    worker = Worker.__new__(Worker)  # never started: only its type matters
    with pytest.raises(ConfigError, match="belongs on the scheduler, not on a Worker"):
        asyncio.run(dask_setup(worker))


def test_preload_name_in_events_is_the_dashboard_module():
    """deploy names the page by this string (it never imports the dashboard): it must stay true."""
    import importlib

    assert hasattr(importlib.import_module(ev.PRELOAD), "dask_setup")
    assert ev.HEALTH_METRIC == METRIC


# --- one progress truth: the terminal's line and the page's summary from one run ----------------

class _Terminal:
    """A stream standing in for a terminal that, each time a progress line is printed, reads the
    page's summary at that same moment (from the scheduler's folded state)."""

    def __init__(self, state: TrainingState) -> None:
        self.state = state
        self.progress = None
        self.seen: list[tuple[str, str, float | None, float | None]] = []

    def write(self, text: str) -> None:
        from rpicluster.dashboard.page import _summary_html

        if not text.startswith("train:") or "done]" in text:
            return
        p = self.progress
        # The page hears of a commit through the scheduler (a message away): wait for it.
        wait_until(lambda: self.state.blocks_done() == p.completed, 10,
                   what=f"the page to count {p.completed} blocks done")
        now = time.time()
        self.seen.append((p.line(now), _summary_html(self.state, now), p.eta(now),
                          self.state.eta(now)))

    def flush(self) -> None:
        pass


def test_terminal_and_page_tell_the_same_blocks_done_and_eta(tmp_path):
    """Issue 26 item 7: the terminal sat at 2/5 while the page showed 4/5. One run, a plain
    progress line every block: at each line the page (its summary, from the scheduler's state)
    shows the same blocks done and the same ETA, computed from the same marks."""
    import re

    import numpy as np

    from rpicluster import ingest
    from rpicluster.data.sources import ArraySource
    from rpicluster.models.incremental import IncrementalKSGDClassifier
    from rpicluster.progress import Progress
    from rpicluster.train.job import train

    rng = np.random.default_rng(0)
    X = rng.normal(size=(6_000, 16)).astype("float32")
    y = (X[:, 0] > 0).astype(int)
    store = ingest(ArraySource("truth", X, y), tmp_path / "t.zarr", block_rows=500)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                      host="127.0.0.1", dashboard_address=None,
                      scheduler_kwargs={"preload": [ev.PRELOAD]}) as cluster, \
            Client(cluster) as client:
        state = cluster.scheduler.plugins[PLUGIN].state
        terminal = _Terminal(state)
        progress = Progress("train", total=store.n_blocks, unit="blocks", stream=terminal,
                            interval=0)
        terminal.progress = progress  # train publishes its moves: nothing else to wire
        with progress:
            train(IncrementalKSGDClassifier(block_rows=500, n_clusters=2, max_iter=3,
                                            random_state=0), store, client, progress=progress)
    lines = [s for s in terminal.seen if re.search(r": \d+/", s[0])]
    assert len(lines) >= store.n_blocks - 1
    with_eta = 0
    for line, page, term_eta, page_eta in lines:
        done, total = re.search(r": (\d+)/(\d+) blocks", line).groups()
        assert f"<b>{done} / {total}</b> blocks done" in page, (line, page)
        assert term_eta == page_eta, (line, page)
        eta = re.search(r"eta ([^\]]+)\]", line)
        if eta and int(done) < int(total):
            with_eta += 1
            assert f"ETA <b>{eta.group(1)}</b>" in page, (line, page)
    assert with_eta >= store.n_blocks // 2


def test_a_line_held_back_by_the_interval_is_printed_when_it_ends():
    """Plain lines: a count that moved inside the interval is printed when the interval ends,
    not at the next advance (the terminal sat at 2/5 for a minute while the page showed 4/5)."""
    import io

    from rpicluster.progress import Progress

    buf = io.StringIO()
    with Progress("train", total=5, unit="blocks", stream=buf, interval=0.5) as p:
        p.advance()
        p.advance()  # inside the interval: held back
        assert buf.getvalue().count("\n") == 1
        wait_until(lambda: "train: 2/5" in buf.getvalue(), 3,
                   what="the held-back line at the interval's end")
        # Nothing to wait on: a second print of the same count would be an event that must
        # not happen, so let another interval (0.5 s) pass before looking.
        time.sleep(0.7)
        assert buf.getvalue().count("\n") == 2  # printed once, not again


def test_timeline_rates_over_a_window_and_per_worker_readings():
    from rpicluster.dashboard.state import Timeline

    tl = Timeline()
    for i in range(8):  # 100 rows every 2 s, worker b without a thermal zone
        tl.sample(1000.0 + 2 * i, 100 * i, {"a": {"temperature": 50.0 + i, "memory": 10 * i,
                                                  "limit": 1000},
                                            "b": {"temperature": None, "memory": 5, "limit": 0}})
    ts, rates = tl.rows_per_second(window=4.0)
    assert ts[0] == 1002.0 and rates == [50.0] * 7
    temps = tl.per_worker("temperature")
    assert list(temps) == ["a"] and temps["a"][1][-1] == 57.0
    assert tl.per_worker("memory")["b"][1] == [5] * 8


def test_run_log_lists_runs_of_every_kind_newest_first():
    from rpicluster.dashboard.state import RunLog

    log, train_state, rounds = RunLog(), TrainingState(), RoundsState()
    for e in _run("r1", t0=1000.0):
        train_state.feed(e)
        log.note(ev.TOPIC, train_state, e)
    start = ev.make_event(ev.RUN_START, run_id="f1", mode="federated", model="sgd", n_rounds=3,
                          t=2000.0)
    rounds.feed(start)
    log.note(ev.ROUNDS_TOPIC, rounds, start)
    entries = log.newest_first()
    assert [(e["run"], e["kind"], e["what"]) for e in entries] == [
        ("f1", "federate", "sgd rounds"), ("r1", "train", "Inc-kSGD")]
    assert (entries[1]["done"], entries[1]["total"], entries[1]["accuracy"]) == (1, 4, 0.75)


def test_run_list_says_the_history_outcome_words_for_every_kind():
    """Inc-kSGD, round and feature runs all end in the run history's words (done, stopped,
    failed) in the page's run list, from their run-end events; the history's outcome and
    reason take over where it recorded the run."""
    from rpicluster.dashboard.page import run_rows
    from rpicluster.dashboard.state import RunLog

    log = RunLog()
    runs = ((TrainingState(), ev.TOPIC, [*_run("r1", t0=1000.0), ev.make_event(
                ev.RUN_END, run_id="r1", t=1100.0, **ev.ending(None))]),
            (RoundsState(), ev.ROUNDS_TOPIC, [
                ev.make_event(ev.RUN_START, run_id="f1", mode="federated", model="sgd",
                              n_rounds=3, t=2000.0),
                ev.make_event(ev.RUN_END, run_id="f1", t=2100.0, **ev.ending(None))]),
            (FeaturesState(), ev.FEATURES_TOPIC, [
                ev.make_event(ev.RUN_START, run_id="x1", n_blocks=4, t=3000.0),
                ev.make_event(ev.RUN_END, run_id="x1", t=3100.0,
                              **ev.ending(KeyboardInterrupt()))]))
    for state, topic, events in runs:
        for e in events:
            state.feed(e)
            log.note(topic, state, e)
    rows = run_rows(log, [], now=4000.0)
    assert rows["kind"] == ["features", "federate", "train"]
    assert rows["status"] == ["stopped: KeyboardInterrupt", "done", "done"]
    recorded = [{"id": 7, "kind": "federate", "started": 1999.5, "ended": 2100.0,
                 "outcome": "failed", "reason": "host pi3 left", "results": {}, "data": "d"}]
    rows = run_rows(log, recorded, now=4000.0)
    assert rows["run"][1] == "f1 (#7)" and rows["status"][1] == "failed: host pi3 left"
