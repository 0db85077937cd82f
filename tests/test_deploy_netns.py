"""Cluster bring-up against real sshd hosts in network namespaces (rpicluster.testing).

Three hosts, pi3 CPU-capped like a Pi. The scheduler runs on this machine on the test bridge;
workers start over SSH with the venv's interpreter (the filesystem is shared).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np
import pytest

import rpicluster
from rpicluster import IncrementalKSGDClassifier, connect, ingest, open_dataset
from rpicluster.deploy import cluster
from rpicluster.deploy.doctor import doctor, table_rows
from rpicluster.deploy.state import cluster_id
from rpicluster.deploy.tls import CertificateAuthority
from rpicluster.errors import HostsFailedError
from rpicluster.testing import (NamespaceHosts, cpu_cgroup_unavailable, unavailable,
                                wait_until)
from rpicluster.train.api import ClusterChoice, score_model, train_model
from rpicluster.train.modelfile import load_model

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")]


@pytest.fixture(scope="session")
def hosts(tmp_path_factory):
    """Three sshd hosts pi1..pi3 in network namespaces on a private bridge; pi3 CPU-capped.

    Torn down (processes killed, namespaces, bridge and cgroup deleted) at the end of the
    session, also when a test fails.
    """
    with NamespaceHosts(tmp_path_factory.mktemp("netns"), 3, cpu_capped="pi3",
                        cpu_quota=0.5) as h:
        yield h


@pytest.fixture
def inventory(tmp_path, hosts, home):
    """Factory: write an inventory of the namespace hosts; the cluster is taken down after."""
    written = []

    def make(known_hosts=None, names=("pi1", "pi2", "pi3"), python=sys.executable) -> str:
        path = hosts.write_inventory(tmp_path / "cluster.toml", names=names, nthreads=2,
                                     memory="1GiB", known_hosts=known_hosts, python=python,
                                     local_directory=tmp_path / "workers")
        written.append(path)
        return path

    yield make
    for path in written:
        if (home / "clusters" / cluster_id(path) / "state.json").exists():
            cluster.down(path)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _dask_processes(hosts) -> list[int]:
    found = []
    for name in hosts.hosts:
        for pid in hosts.pids(name):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            if (b"distributed" in cmd or b"rpicluster.deploy" in cmd) and _alive(pid):
                found.append(pid)
    return found


def _fingerprint(pub_line: str) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", "/dev/stdin"], input=pub_line, text=True,
                         capture_output=True, check=True).stdout
    return out.split()[1]


def test_doctor_unknown_hosts_refused_then_trusted_on_first_use(hosts, inventory, tmp_path):
    known = tmp_path / "empty_known_hosts"
    path = inventory(known_hosts=known)
    checks = doctor(path, ssh_timeout=5)
    assert [c.ok for c in checks] == [False] * 3
    for c, h in zip(checks, hosts.hosts.values()):
        assert "unknown host key" in c.errors[0]
        assert _fingerprint(h.host_public_key) in c.errors[0]
    assert not known.exists()

    checks = doctor(path, accept_new_hosts=True, ssh_timeout=5)
    assert [c.host for c in checks] == [h.address for h in hosts.hosts.values()]
    assert all(c.ok for c in checks), [c.errors for c in checks]
    assert len(known.read_text().splitlines()) == 3

    # Recorded: the default (refusing) policy now connects.
    checks = doctor(path, ssh_timeout=5)
    assert all(c.ok for c in checks)
    facts = checks[0].facts
    assert facts["arch"] == os.uname().machine
    assert facts["scheduler_error"] is None
    # Not a Pi: no thermal zones here and no vcgencmd -> n/a, through the real file-reading path.
    assert facts["throttled"] is None
    columns, rows = table_rows(checks)
    assert rows[0][columns.index("packages")] == "match"
    assert rows[0][columns.index("throttled")] == "n/a"


def test_doctor_reports_unreachable_scheduler_port(hosts, inventory):
    path = inventory()
    text = path.read_text().replace(f'host = "{hosts.gateway}"', 'host = "10.77.254.254"', 1)
    path.write_text(text)
    checks = doctor(path, ssh_timeout=5)
    assert not any(c.ok for c in checks)
    assert all("scheduler port unreachable" in c.errors[0] for c in checks)


def test_up_train_status_down(hosts, inventory, home):
    """The main path: up, a real training job on the hosts, status, down with nothing left."""
    path = inventory()
    report = cluster.up(path)
    assert [r.state for r in report.rows] == ["started"] * 4
    assert report.address.startswith("tls://")
    state_pids = {r.host: r.pid for r in report.rows}

    with connect(timeout=10) as client:
        workers = client.scheduler_info()["workers"]
        assert sorted(w["name"] for w in workers.values()) == sorted(
            h.address for h in hosts.hosts.values())
        # Dask's clocks of every cluster rpicluster starts (config.DASK_DEFAULTS).
        assert set(client.run(dask.config.get, "distributed.worker.profile.interval").values()
                   ) == {"100ms"}
        rng = np.random.default_rng(0)
        a = rng.random((300, 300))
        futures = [client.submit(np.linalg.matrix_power, a / 30, k, pure=False,
                                 workers=[w], allow_other_workers=False)
                   for k, w in enumerate(workers, start=1)]
        for k, fut in enumerate(futures, start=1):
            np.testing.assert_allclose(fut.result(), np.linalg.matrix_power(a / 30, k))
        # Tags are per-host Dask resources: only the slow "Pi" has 'slowpi'.
        if hosts.capped:
            fut = client.submit(os.getpid, resources={"slowpi": 1}, pure=False)
            fut.result()
            (where,) = client.who_has(fut)[fut.key]
            assert workers[where]["name"] == hosts.hosts[hosts.capped].address

    # A real training job through the inventory: workers on the hosts read the store's blocks
    # themselves (shared filesystem), and the model equals the in-process fit.
    data = home.parent / "netns-train.zarr"
    ingest("synthetic:rows=4000,features=32,classes=8,seed=1", data, block_rows=1000)
    params = {"n_clusters": 4, "max_iter": 5, "random_state": 0}
    summary = train_model(str(data), home.parent / "model.skops", params,
                          cluster=ClusterChoice(inventory=path), show_progress=False)
    assert len(summary.result.tasks_per_worker) >= 2, summary.result.tasks_per_worker
    ds = open_dataset(data)
    X = np.concatenate([ds.block(b)[0] for b in range(ds.n_blocks)])
    y = np.asarray(ds.classes)[np.concatenate([ds.block(b)[1] for b in range(ds.n_blocks)])]
    reference = IncrementalKSGDClassifier(block_rows=1000, **params).fit(X, y)
    np.testing.assert_array_equal(load_model(summary.model_path).predict(X),
                                  reference.predict(X))
    # --scheduler with the recorded TLS address connects with the recorded certificate.
    accuracy = score_model(summary.model_path, str(data),
                           cluster=ClusterChoice(scheduler=report.address), show_progress=False)
    assert accuracy == pytest.approx(reference.score(X, y))

    rows = rpicluster.status()      # the recorded SSH cluster, as for the local one
    assert [(r.role, r.state) for r in rows] == [("scheduler", "running")] + [
        ("worker", "running")] * 3
    assert all(r.threads == 2 and r.temperature is None for r in rows[1:])
    from click.testing import CliRunner

    from rpicluster.cli import main

    out = CliRunner().invoke(main, ["status"]).output          # those rows, as a table
    assert "cluster: the SSH cluster of " in out, out
    assert [line.split()[:3] for line in out.splitlines() if " running " in line] == [
        [r.host, r.role, "running"] for r in rows], out

    log = cluster.logs(hosts.hosts["pi1"].address)
    assert "rpicluster start" in log

    # A plain-TCP client, and a TLS client of another CA, are refused by the TLS scheduler.
    from distributed import Client

    plain = report.address.replace("tls://", "tcp://")
    with pytest.raises((OSError, TimeoutError)):
        Client(plain, timeout=3)
    stranger = CertificateAuthority(home.parent / "other-ca").issue("client").security()
    with pytest.raises((OSError, TimeoutError)):
        Client(report.address, security=stranger, timeout=3)

    down = cluster.down()
    assert [r.state for r in down.rows] == ["stopped"] * 4
    for pid in state_pids.values():
        assert not _alive(pid)
    assert _dask_processes(hosts) == []
    assert not (home / "clusters" / cluster_id(path) / "state.json").exists()


def test_second_up_restarts_only_the_killed_worker(hosts, inventory):
    path = inventory()
    first = {r.host: r.pid for r in cluster.up(path).rows}
    again = cluster.up(path)
    assert [r.state for r in again.rows] == ["running"] * 4
    assert {r.host: r.pid for r in again.rows} == first

    victim = hosts.hosts["pi2"].address
    os.killpg(first[victim], signal.SIGKILL)      # nanny and worker: gone for good
    with connect(timeout=10) as client:
        wait_until(lambda: victim not in {w["name"] for w in
                                          client.scheduler_info()["workers"].values()},
                   30, what=f"the scheduler to drop the killed worker {victim}")
    third = cluster.up(path)
    states = {r.host: r.state for r in third.rows}
    assert states.pop(victim) == "started"
    assert set(states.values()) == {"running"}
    pids = {r.host: r.pid for r in third.rows}
    assert pids[victim] != first[victim]
    assert {h: p for h, p in pids.items() if h != victim} == {
        h: p for h, p in first.items() if h != victim}


def test_up_rotates_certificates_when_a_host_leaves_or_one_nears_expiry(hosts, inventory, home):
    """Finding 3: a removed host's certificate stops working; a certificate close to expiry is
    renewed. Both by a CA rotation in `up` that restarts the scheduler and the workers."""
    import datetime

    from distributed import Client
    from distributed.security import Security

    path = inventory(names=("pi1", "pi2"))
    first = {r.host: r.pid for r in cluster.up(path).rows}
    tls_dir = home / "clusters" / cluster_id(path) / "tls"
    gone = hosts.hosts["pi2"].address
    kept = home.parent / "pi2-copy"      # what the removed Pi still holds
    kept.mkdir()
    for name in ("ca.pem", f"{gone}.pem", f"{gone}-key.pem"):
        (kept / name).write_bytes((tls_dir / name).read_bytes())
    stolen = Security(tls_ca_file=str(kept / "ca.pem"), tls_client_cert=str(kept / f"{gone}.pem"),
                      tls_client_key=str(kept / f"{gone}-key.pem"), require_encryption=True)

    path = inventory(names=("pi1",))
    with pytest.warns(UserWarning, match=f"new certificates \\('{gone}' has a certificate but is "
                                         "no longer in the inventory"):
        report = cluster.up(path)
    states = {r.host: (r.state, r.pid) for r in report.rows}
    assert states[gone][0] == "stopped"
    kept_pi = hosts.hosts["pi1"].address
    assert states[kept_pi][0] == "started" and states[kept_pi][1] != first[kept_pi]
    assert not (tls_dir / f"{gone}.pem").exists()
    with pytest.raises((OSError, TimeoutError)):
        Client(report.address, security=stolen, timeout=3)
    with connect(timeout=10) as client:
        assert [w["name"] for w in client.scheduler_info()["workers"].values()] == [kept_pi]

    # The client certificate has 20 days left: the next `up` renews everything.
    (tls_dir / "client.pem").unlink()
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=345)
    CertificateAuthority(tls_dir).issue("client", now=old)
    with pytest.warns(UserWarning, match="the certificate of 'client' expires on"):
        report = cluster.up(path)
    assert [r.state for r in report.rows] == ["started", "started"]
    assert CertificateAuthority(tls_dir).needs_rotation({"scheduler", "client", kept_pi}) is None
    with connect(timeout=10) as client:
        assert client.submit(sum, [1, 2]).result(timeout=30) == 3


def test_changed_host_key_refused_while_other_hosts_come_up(hosts, inventory, tmp_path):
    impostor = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)],
                   check=True)
    known = tmp_path / "known_hosts"
    pi2 = hosts.hosts["pi2"]
    known.write_text(hosts.known_hosts.read_text().replace(
        pi2.host_public_key, (tmp_path / "impostor.pub").read_text().strip()))
    path = inventory(known_hosts=known)
    with pytest.raises(HostsFailedError) as info:
        cluster.up(path)
    rows = {r.host: r for r in info.value.report.rows}
    assert rows[pi2.address].state == "failed"
    assert "CHANGED" in rows[pi2.address].detail
    assert _fingerprint(pi2.host_public_key) in rows[pi2.address].detail
    assert {rows[h.address].state for h in hosts.hosts.values() if h is not pi2} == {"started"}
    assert [r.state for r in cluster.down(path).rows] == ["stopped"] * 3


def test_unreachable_host_reported_within_the_timeout(hosts, inventory):
    path = inventory()
    pi3 = hosts.hosts["pi3"]
    hosts.set_link("pi3", up=False)
    try:
        with pytest.raises(HostsFailedError) as info:
            cluster.up(path, ssh_timeout=3)
    finally:
        hosts.set_link("pi3", up=True)
    rows = {r.host: r for r in info.value.report.rows}
    assert rows[pi3.address].state == "failed"
    assert "timed out" in rows[pi3.address].detail
    assert {rows[h.address].state for h in hosts.hosts.values() if h is not pi3} == {"started"}
    # status lists the failed host with the reason, next to the running ones.
    status = {r.host: r for r in cluster.status(path)}
    assert status[pi3.address].state == "failed"
    assert status[pi3.address].detail.startswith("up failed at ")
    assert "timed out" in status[pi3.address].detail
    assert {status[h.address].state for h in hosts.hosts.values() if h is not pi3} == {"running"}
    # Back on the network: the next up starts just that host.
    again = {r.host: r.state for r in cluster.up(path).rows}
    assert again[pi3.address] == "started"
    assert list(again.values()).count("running") == 3


def test_cpu_capped_host_is_in_its_cgroup(hosts):
    if cpu_cgroup_unavailable():
        pytest.skip(cpu_cgroup_unavailable())
    pids = hosts.pids(hosts.capped)
    assert pids
    procs = set((hosts.cgroup / "cgroup.procs").read_text().split())
    assert {str(p) for p in pids} <= procs


def _provisioned(hosts, inventory, tmp_path, requirements):
    from rpicluster.deploy.provision import provision

    venv = tmp_path / "venv"
    path = inventory(names=("pi1",), python=f"{venv}/bin/python")
    result = provision(path, requirements=requirements, wheelhouse=tmp_path / "wheelhouse")
    return path, venv, result[hosts.hosts["pi1"].address].value["versions"]


def test_provision_refuses_the_venv_running_rpicluster_here(hosts, inventory, tmp_path):
    """A worker on this machine whose python is this very venv: --provision would reinstall
    every package of it (an editable rpicluster becoming a copy). One line; nothing built or
    pushed, the venv untouched."""
    from importlib import metadata

    from rpicluster.deploy.provision import provision

    path = inventory(names=("pi1",))
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    before = cfg.stat().st_mtime_ns
    with pytest.raises(HostsFailedError) as err:
        provision(path, requirements=[f"pip=={metadata.version('pip')}"],
                  wheelhouse=tmp_path / "wheelhouse")
    (line,) = str(err.value).splitlines()[1:]
    assert line.startswith(f"{hosts.hosts['pi1'].address}: python = {sys.executable!r} is the "
                           f"venv running rpicluster on this machine ({sys.prefix})")
    assert "run up without --provision" in line
    assert not (tmp_path / "wheelhouse").exists() and not (tmp_path / "workers").exists()
    assert cfg.stat().st_mtime_ns == before


def test_provision_creates_the_venv_offline_from_a_pushed_wheelhouse(hosts, inventory, tmp_path):
    """Fast version: the project's own wheel and pip, installed with no index on the host."""
    from importlib import metadata

    pins = [f"rpicluster=={metadata.version('rpicluster')}", f"pip=={metadata.version('pip')}"]
    path, venv, versions = _provisioned(hosts, inventory, tmp_path, pins)
    assert versions["rpicluster"] == metadata.version("rpicluster")
    assert (tmp_path / "workers" / "wheelhouse").is_dir()      # pushed over SSH
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "rpicluster.deploy.remote",
                          "--spec", '{"action": "stop", "pid": 1, "name": "nobody"}'],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["was_running"] is False


@pytest.mark.bench
def test_provision_full_closure_then_up(hosts, inventory, tmp_path):
    """Slow (downloads and installs the whole pinned closure, ~60 packages): bench only."""
    from rpicluster.deploy.doctor import doctor as run_doctor

    path, venv, versions = _provisioned(hosts, inventory, tmp_path, None)
    assert all(c.ok for c in run_doctor(path)), "versions differ after provisioning"
    assert [r.state for r in cluster.up(path).rows] == ["started", "started"]


def _seen_names(state) -> set[str]:
    from distributed import Client

    try:
        with Client(state.address, security=state.security(), timeout=5,
                    set_as_default=False) as client:
            return {str(w["name"]) for w in client.scheduler_info()["workers"].values()}
    except (OSError, TimeoutError):
        return set()


def _supervisor(state, name) -> dict:
    path = os.path.join(os.path.dirname(state.workers[name]["log"]), "supervisor.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def test_workers_rejoin_a_restarted_scheduler_by_themselves_until_down(hosts, inventory, home):
    """Scheduler killed and started again at the same address: the workers `up` started come
    back without another `up` (one held stopped meanwhile shows as rejoining); `down` ends them
    for good. `status` also lists an inventory host never started, with the reason."""
    from rpicluster.deploy import remote
    from rpicluster.deploy.state import cluster_dir, load_state
    from rpicluster.inventory import load_inventory

    path = inventory(names=("pi1", "pi2"))
    cluster.up(path)
    spec = load_inventory(path)
    pi1, pi2, pi3 = (hosts.hosts[n].address for n in ("pi1", "pi2", "pi3"))
    inventory(names=("pi1", "pi2", "pi3"))       # pi3 joins the inventory; no up since
    rows = {r.host: r for r in cluster.status(path)}
    assert (rows[pi3].state, rows[pi3].detail) == ("missing", "never connected (run rpicluster up)")

    state = load_state(path)
    os.killpg(state.scheduler["pid"], signal.SIGKILL)
    wait_until(lambda: not _alive(state.scheduler["pid"]), 10, what="the killed scheduler gone")
    # Each worker's nanny closes for good; its supervisor starts a new one, which waits.
    for name in (pi1, pi2):
        wait_until(lambda: _supervisor(state, name).get("restarts", 0) >= 1, 60,
                   what=f"{name}'s supervisor restarting its worker")
    assert [r.state for r in cluster.status(path)] == ["not answering"] + ["unknown"] * 3
    # Hold pi2's new nanny and worker stopped (not its supervisor): it cannot join yet.
    group = state.workers[pi2]["pid"]
    wait_until(lambda: len(remote._group(group)) >= 2, 30, what="pi2's new nanny")
    held: set[int] = set()
    while new := set(remote._group(group)) - held - {group}:   # until nothing new appears
        for pid in new:
            os.kill(pid, signal.SIGSTOP)
        held |= new
        # No event says "no more children": a child forked just before its parent stopped
        # shows in the group a moment later, so look again after a pause.
        time.sleep(0.5)
    try:
        workdir = str(cluster_dir(state.cid) / "scheduler")
        tls = cluster._push_certs(None, state.certs("scheduler"), workdir, local=True)
        started = remote.start(remote.start_spec("scheduler", spec.scheduler,
                                                 local_directory=workdir, tls=tls))
        state.scheduler["pid"] = started["pid"]
        state.save()                          # so that down stops the new scheduler
        wait_until(lambda: pi1 in _seen_names(state), 60, what="pi1 rejoining", interval=0.25)
        rows = {r.host: r for r in cluster.status(path)}
        assert rows[pi1].state == "running"
        assert rows[pi2].state == "rejoining", rows[pi2]
        assert "restarted 1 times" in rows[pi2].detail
        assert rows[pi3].state == "missing"
    finally:
        for pid in held:
            os.kill(pid, signal.SIGCONT)
    wait_until(lambda: pi2 in _seen_names(state), 60, what="pi2 rejoining", interval=0.25)

    pids = [state.workers[n]["pid"] for n in (pi1, pi2)]
    supervisors = [p for p in _dask_processes(hosts)
                   if b"rpicluster.deploy.supervise" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(supervisors) >= 2, "the check below must see the running supervisors"
    assert [r.state for r in cluster.down(path).rows] == ["stopped"] * 3
    assert not any(_alive(p) for p in pids)
    # Nothing restarts after down: the supervisors (`python -m rpicluster.deploy.supervise`, the
    # only thing that starts a worker again) are gone with the workers, so no wait can add proof.
    assert _dask_processes(hosts) == []


def test_up_needs_no_sftp_subsystem(tmp_path, home):
    """A host whose sshd has no SFTP subsystem: up pushes the certificates through exec."""
    with NamespaceHosts(tmp_path / "netns", 1, without_sftp=("pi1",)) as h:
        assert "Subsystem" not in (tmp_path / "netns" / "pi1" / "sshd_config").read_text()
        path = h.write_inventory(tmp_path / "cluster.toml", local_directory=tmp_path / "workers")
        try:
            report = cluster.up(path)
            assert [r.state for r in report.rows] == ["started", "started"]
            tls = tmp_path / "workers" / h.hosts["pi1"].address / "tls"
            assert sorted(p.name for p in tls.iterdir()) == ["ca.pem", "node-key.pem", "node.pem"]
            assert oct((tls / "node-key.pem").stat().st_mode & 0o777) == "0o600"
        finally:
            cluster.down(path)
        assert _dask_processes(h) == []


def test_up_that_starts_no_worker_leaves_no_scheduler(hosts, inventory, home):
    path = inventory(names=("pi1",), python="/nonexistent/bin/python")
    with pytest.raises(HostsFailedError) as info:
        cluster.up(path)
    assert "scheduler was stopped again" in str(info.value)
    # The host's reason in one line, where its whole output is, and no command line or JSON.
    pi1 = hosts.hosts["pi1"].address
    line = next(r.detail for r in info.value.report.rows if r.host == pi1)
    assert line.startswith(f"{pi1}: rpicluster.deploy.remote start failed (exit status 127): ")
    assert "/nonexistent/bin/python: " in line      # the shell's words for a missing file
    assert line.endswith(f"; full output: rpicluster logs {pi1}")
    assert "\n" not in line and "{" not in line and "--spec" not in line
    assert "/nonexistent/bin/python: " in cluster.logs(pi1, path)
    sched = info.value.report.rows[0]
    assert sched.role == "scheduler"
    assert not _alive(sched.pid)
    assert not (home / "clusters" / cluster_id(path) / "state.json").exists()


def test_worker_rejoins_after_a_link_cut_longer_than_the_timeouts(hosts, tmp_path, home):
    """pi1's cable out until Dask gives the worker up (TCP timeout 12 s here, the least Dask
    takes; 30 s by default): its supervisor starts it again and it joins when the cable is back,
    without `up`."""
    from rpicluster.deploy.state import load_state

    path = hosts.write_inventory(tmp_path / "cut.toml", names=("pi1",), memory="1GiB",
                                 local_directory=tmp_path / "workers",
                                 env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "12s"})
    pi1 = hosts.hosts["pi1"].address
    try:
        cluster.up(path)
        state = load_state(path)
        hosts.set_link("pi1", up=False)
        try:
            wait_until(lambda: _supervisor(state, pi1).get("restarts", 0) >= 1, 120,
                       what="the cut-off worker exiting and restarting")
            wait_until(lambda: pi1 not in _seen_names(state), 60,
                       what="the scheduler dropping pi1", interval=0.25)
        finally:
            hosts.set_link("pi1", up=True)
        wait_until(lambda: pi1 in _seen_names(state), 60, what="pi1 rejoining", interval=0.25)
        assert {r.host: r.state for r in cluster.status(path)}[pi1] == "running"
    finally:
        cluster.down(path)
    assert _dask_processes(hosts) == []
