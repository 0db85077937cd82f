"""The clusters rpicluster starts are closed: TLS with certificate roles on the embedded cluster,
no client-sent code on the scheduler, worker certificates that are not clients, and certificates
that expire and rotate. Real schedulers, real TLS handshakes."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import ssl
import urllib.request

import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.security import Security

from rpicluster.deploy import local, tls
from rpicluster.deploy.guard import GUARD
from rpicluster.deploy.resolve import find_cluster
from rpicluster.errors import ConfigError
from rpicluster.testing import sum_in_a_task


def _refused_tls_handshake(address: str, ca: str, cert: tuple[str, str] | None) -> bool:
    """Whether a raw TLS connection (trusting ``ca``, presenting ``cert``) is refused."""
    host, port = address.split("://")[1].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    if cert:
        ctx.load_cert_chain(*cert)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw, \
                ctx.wrap_socket(raw) as s:
            # TLS 1.3: a refused client certificate surfaces on the first read.
            s.settimeout(5)
            s.sendall(b"\0" * 8)
            return s.recv(1) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def _listening() -> list[str]:
    """Local addresses of the IPv4 TCP sockets listening here, as /proc/net/tcp writes them
    (``0100007F:1F90`` is 127.0.0.1:8080, ``00000000:...`` every interface)."""
    rows = [line.split() for line in open("/proc/net/tcp").read().splitlines()[1:]]
    return [r[1] for r in rows if r[3] == "0A"]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """``up --local 2`` (defaults: dashboard address too) in its own state directory, module-wide;
    yields its record. Two single-thread workers: joblib runs a one-thread dask backend on the
    client, and a scattered array moves between workers."""
    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("RPICLUSTER_HOME")
    os.environ["RPICLUSTER_HOME"] = str(home)
    try:
        info = local.start_local(2, memory_limit="1GiB")
        yield info
    finally:
        local.stop_local()
        if old is None:
            del os.environ["RPICLUSTER_HOME"]
        else:
            os.environ["RPICLUSTER_HOME"] = old


def test_embedded_cluster_is_tls_on_loopback_and_refuses_strangers(embedded):
    address = embedded["scheduler_address"]
    assert address.startswith("tls://127.0.0.1:")
    # The dashboard listens on loopback only (it was every interface, :8787).
    assert embedded["dashboard_link"].startswith("http://127.0.0.1:")
    port = int(embedded["dashboard_link"].split(":")[2].split("/")[0])
    assert f"0100007F:{port:04X}" in _listening() and f"00000000:{port:04X}" not in _listening()
    d = local.tls_dir()
    assert (d / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    # Plain TCP: the scheduler speaks TLS only.
    with pytest.raises(OSError):
        Client(address.replace("tls://", "tcp://"), timeout=3)
    # TLS trusting the CA but without a certificate, or with one of another CA: refused.
    assert _refused_tls_handshake(address, str(d / "ca.pem"), None)
    other = tls.CertificateAuthority(d.parent / "other-ca").issue("client")
    assert _refused_tls_handshake(address, str(d / "ca.pem"), (str(other.cert), str(other.key)))
    assert not _refused_tls_handshake(address, str(d / "ca.pem"),
                                      (str(d / "client.pem"), str(d / "client-key.pem")))
    # The recorded certificate: the resolver connects, and work runs.
    ref = find_cluster()
    assert (ref.kind, ref.address) == ("local", address)
    with ref.client(timeout=20) as client:
        assert client.submit(sum, [1, 2]).result(timeout=30) == 3


def test_scheduler_runs_no_client_code_but_serves_the_page(embedded):
    from rpicluster.dashboard.links import dashboard_links

    with find_cluster().client(timeout=20) as client:
        with pytest.raises(ValueError, match="'run_function' handler has been explicitly "
                                             "disallowed"):
            client.run_on_scheduler(os.getpid)
        from distributed import SchedulerPlugin

        with pytest.raises(ValueError, match="register_scheduler_plugin"):
            client.register_plugin(SchedulerPlugin(), name="x")
        # The page is installed by preload; `rpicluster dashboard` finds it without sending code.
        links = dashboard_links(client=client)
    assert links.page.startswith("http://127.0.0.1:") and links.page.endswith("/rpicluster")
    with urllib.request.urlopen(links.page, timeout=30) as page:
        assert page.status == 200


def test_a_worker_certificate_does_not_control_the_cluster(embedded):
    """Finding 3: a client built from a worker's certificate ran run_on_scheduler. It may open a
    client (tasks on workers do, e.g. joblib's dask backend) but not run code on the scheduler
    or on every worker, install plugins, or stop the cluster."""
    from distributed import WorkerPlugin

    worker = local.local_security("worker")
    with Client(embedded["scheduler_address"], security=worker, timeout=20) as c:
        with pytest.raises(ValueError, match="'run_function' handler has been explicitly"):
            c.run_on_scheduler(os.getpid)
        with pytest.raises(PermissionError, match="'broadcast' needs a client certificate"):
            c.run(os.getpid)
        with pytest.raises(PermissionError, match="'register_worker_plugin' needs a client"):
            c.register_plugin(WorkerPlugin(), name="x")
        with pytest.raises(PermissionError, match="'restart' needs a client certificate"):
            c.restart()
        assert c.submit(sum, [1, 2]).result(timeout=30) == 3
    # The client's certificate (the desktop user) still may.
    with find_cluster().client(timeout=20) as c:
        assert len(c.run(os.getpid)) == 2


def test_tasks_open_clients_over_tls_so_joblib_fits_a_forest(embedded):
    """``bench scaling --job random-forest`` end to end on the guarded TLS cluster: every joblib
    batch opens a client on its worker (joblib's ``Batch`` enters the dask backend, which calls
    ``get_client``, with the worker's certificate), and tasks that submit tasks work."""
    import joblib
    from distributed import get_task_stream
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier

    X, y = make_classification(400, 8, n_informative=4, random_state=0)
    params = dict(n_estimators=6, max_depth=5, random_state=0)
    with find_cluster().client(timeout=20) as client:
        assert client.submit(sum_in_a_task, [1, 2, 3], pure=False).result(timeout=60) == 6
        forest = RandomForestClassifier(**params, n_jobs=2)
        with get_task_stream(client) as ts, joblib.parallel_config(backend="dask",
                                                                   client=client):
            forest.fit(X, y)
    # The trees were built on both workers (not on this machine: joblib's sequential shortcut).
    batches = [r for r in ts.data if "_parallel_build_trees" in str(r["key"])]
    assert len({r["worker"] for r in batches}) == 2, ts.data
    # Tree for tree the forest scikit-learn fits here.
    local = RandomForestClassifier(**params, n_jobs=1).fit(X, y)
    for a, b in zip(forest.estimators_, local.estimators_, strict=True):
        np.testing.assert_array_equal(a.tree_.feature, b.tree_.feature)
        np.testing.assert_array_equal(a.tree_.threshold, b.tree_.threshold)


def test_certificates_last_a_year_and_near_expiry_rotates(tmp_path):
    ca = tls.CertificateAuthority(tmp_path / "tls")
    ca.issue("scheduler")
    fresh = ca.issue("pi01")
    cert = tls.x509.load_pem_x509_certificate(fresh.cert.read_bytes())
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=364) < life < datetime.timedelta(days=366)
    assert ca.needs_rotation({"scheduler", "pi01"}) is None
    # A certificate issued 340 days ago has 25 days left: rotate.
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=340)
    ca.issue("pi02", now=old)
    assert "pi02" in ca.needs_rotation({"scheduler", "pi01", "pi02"})
    # A host that is no longer in the inventory: rotate.
    assert "'pi01' has a certificate but is no longer in the inventory" in ca.needs_rotation(
        {"scheduler", "pi02"})
    before = ca.cert_path.read_bytes()
    ca.rotate()
    assert ca.cert_path.read_bytes() != before and ca.issued() == {}
    assert ca.needs_rotation({"scheduler"}) is None


def test_local_certificates_are_renewed_when_close_to_expiry(home):
    ca = tls.CertificateAuthority(local.tls_dir())
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=350)
    for name in local.LOCAL_CERTS:
        ca.issue(name, now=old)
    before = (local.tls_dir() / "client.pem").read_bytes()
    local.local_certificates()
    after = tls.CertificateAuthority(local.tls_dir())
    assert (local.tls_dir() / "client.pem").read_bytes() != before
    assert after.needs_rotation(local.LOCAL_CERTS) is None


def _security(files: tls.CertFiles, *roles: str) -> Security:
    return Security(tls_ca_file=str(files.ca), require_encryption=True,
                    **{f"tls_{role}_{part}": str(getattr(files, part))
                       for role in roles for part in ("cert", "key")})


def test_after_rotation_a_removed_hosts_certificate_connects_nowhere(tmp_path):
    ca = tls.CertificateAuthority(tmp_path / "tls")
    removed = ca.issue("pi03")
    kept = tmp_path / "pi03"      # what the removed host still holds
    kept.mkdir()
    for f in (removed.ca, removed.cert, removed.key):
        (kept / f.name).write_bytes(f.read_bytes())
    stolen = tls.CertFiles(kept / "ca.pem", kept / "pi03.pem", kept / "pi03-key.pem")
    assert ca.needs_rotation({"scheduler", "client"})
    ca.rotate()
    sched, client = ca.issue("scheduler"), ca.issue("client")
    with LocalCluster(n_workers=0, processes=False, protocol="tls", host="127.0.0.1",
                      dashboard_address="127.0.0.1:0",
                      security=_security(sched, "scheduler", "client"),
                      scheduler_kwargs={"preload": [GUARD]}) as cluster:
        address = cluster.scheduler_address
        with Client(address, security=_security(client, "client"), timeout=10) as c:
            assert c.scheduler_info()["type"] == "Scheduler"
        assert _refused_tls_handshake(address, str(sched.ca), (str(stolen.cert), str(stolen.key)))
        assert not _refused_tls_handshake(address, str(sched.ca), (str(client.cert),
                                                                   str(client.key)))


def test_up_local_opens_the_dashboard_only_when_asked(home, free_port):
    from click.testing import CliRunner

    from rpicluster.cli import main

    port = free_port()
    res = CliRunner().invoke(main, ["up", "--local", "1", "--memory-limit", "1GiB",
                                    "--dashboard-address", f"0.0.0.0:{port}"])
    try:
        assert res.exit_code == 0, res.output
        assert f"00000000:{port:04X}" in _listening()
        assert (f"warning: the dashboard listens on 0.0.0.0:{port}, not this machine's "
                "loopback only") in res.output, res.output
    finally:
        local.stop_local()
    res = CliRunner().invoke(main, ["up", "-c", "cluster.toml", "--dashboard-address", ":1"])
    assert res.exit_code == 2 and "--dashboard-address is for --local" in res.output
    res = CliRunner().invoke(main, ["up", "--local", "1", "--open-dashboard"])
    assert res.exit_code == 2 and "--open-dashboard is for an inventory" in res.output


@pytest.fixture
def other_user():
    """A second local user, made for this test with useradd and removed after; yields
    ``run(argv)``, which runs a command as that user (the other user of a shared machine)."""
    import pwd
    import subprocess

    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("creating a second local user needs root and useradd")
    name = f"rpiother{os.getpid() % 100000}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        uid = pwd.getpwnam(name).pw_uid

        def run(argv):
            return subprocess.run(argv, user=uid, group=pwd.getpwnam(name).pw_gid,
                                  check=True, capture_output=True, text=True)

        run.uid = uid
        yield run
    finally:
        subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture
def shared_tmp(monkeypatch):
    """A fresh sticky world-writable folder (like /tmp) as ``$TMPDIR`` for this test only, so the
    machine's own /tmp/dask-scratch-space (other tests') is left alone."""
    import tempfile

    path = tempfile.mkdtemp(prefix="rpi-shared-tmp-", dir="/tmp")
    os.chmod(path, 0o1777)
    monkeypatch.setenv("TMPDIR", path)
    monkeypatch.setattr(tempfile, "tempdir", None)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_another_user_s_scratch_dir_is_never_used(home, other_user, shared_tmp):
    """Finding 1: another local user who made ``$TMPDIR/dask-scratch-space`` first (mode 777)
    owned what `up --local`'s workers spilled there, and a swapped spill file ran as the owner.
    The workers now work and spill in ``<home>/local-work`` (0700, ours); the planted folder
    stays empty."""
    planted = os.path.join(shared_tmp, "dask-scratch-space")
    other_user(["mkdir", "-m", "777", planted])
    os.chmod(planted, 0o777)   # whatever the umask
    info = local.start_local(1, memory_limit="1GiB")
    try:
        with find_cluster().client(timeout=20) as client:
            where = [w["local_directory"] for w in client.scheduler_info()["workers"].values()]
            assert client.submit(sum, [1, 2]).result(timeout=30) == 3
    finally:
        local.stop_local()
    assert info["already_running"] is False
    work = home / "local-work"
    assert all(w.startswith(str(work) + "/") for w in where), where
    st = work.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o700)
    assert os.listdir(planted) == []


def test_a_work_directory_another_user_owns_is_refused(other_user, shared_tmp, tmp_path):
    """Finding 1, SSH and systemd workers: the directory `up` (rpicluster.deploy.remote start)
    and a systemd unit's ExecStartPre use must be this user's and private; one another user made
    first is refused in one line, and nothing is started."""
    import subprocess
    import sys

    from rpicluster.deploy.workdir import private_directory

    theirs = os.path.join(shared_tmp, "workers")
    other_user(["mkdir", "-m", "755", theirs])
    spec = {"action": "start", "role": "worker", "name": "pi01", "scheduler": "tls://x:1",
            "nthreads": 1, "memory_limit": None, "local_directory": f"{theirs}/pi01",
            "resources": {}, "env": {}, "tls": None}
    other_user(["mkdir", "-m", "777", f"{theirs}/pi01"])
    res = subprocess.run([sys.executable, "-m", "rpicluster.deploy.remote", "--spec",
                          json.dumps(spec)], capture_output=True, text=True)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert f"work directory {theirs}/pi01 belongs to rpiother" in res.stderr
    assert os.listdir(f"{theirs}/pi01") == []        # no log, no scratch: nothing started
    res = subprocess.run([sys.executable, "-m", "rpicluster.deploy.workdir", f"{theirs}/pi01"],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "belongs to rpiother" in res.stderr
    # Our own folder that others can write to is refused too; a fresh one is made 0700.
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o777)
    os.chmod(ours, 0o777)
    with pytest.raises(ConfigError, match="writable by other users"):
        private_directory(ours)
    made = private_directory(tmp_path / "fresh" / "pi01")
    assert os.stat(made).st_mode & 0o777 == 0o700
    # A planted dask-scratch-space inside our own private directory is refused as well.
    os.chmod(ours, 0o700)
    other_user_dir = ours / "dask-scratch-space"
    other_user_dir.mkdir()
    os.chown(other_user_dir, other_user.uid, -1)
    with pytest.raises(ConfigError, match="spill directory .* belongs to rpiother"):
        private_directory(ours)


def test_a_worker_certificate_cannot_unregister_another_worker_or_read_logs(tmp_path):
    """Finding 4: a worker certificate disconnected any worker through ``unregister`` and read
    ``get_worker_logs``, ``dump_state``, wrote ``set_metadata``. With one certificate per worker
    (as `up` issues them: pi01, pi02), pi01's may unregister only pi01; the logs, the state and
    metadata writes need the client's; a worker still leaves the cluster cleanly by itself."""
    import asyncio

    from distributed import Worker

    ca = tls.CertificateAuthority(tmp_path / "tls")
    sched, client, pi01, pi02 = (ca.issue(n) for n in ("scheduler", "client", "pi01", "pi02"))

    async def scenario():
        from distributed import Scheduler

        async with Scheduler(host="127.0.0.1", protocol="tls", dashboard_address=":0",
                             security=_security(sched, "scheduler", "client"),
                             preload=[GUARD]) as s:
            async with Worker(s.address, name="pi01", nthreads=1,
                              security=_security(pi01, "worker", "client")) as w1, \
                    Worker(s.address, name="pi02", nthreads=1,
                           security=_security(pi02, "worker", "client")) as w2:
                async with Client(s.address, security=_security(pi01, "client"),
                                  asynchronous=True) as c:
                    with pytest.raises(PermissionError, match="'unregister' of another worker "
                                                              "needs a client certificate"):
                        await c.scheduler.unregister(address=w2.address, stimulus_id="x")
                    with pytest.raises(PermissionError, match="'retire_workers' of another"):
                        await c.retire_workers([w2.address])
                    for call, op in ((c.get_worker_logs(), "worker_logs"),
                                     (c.get_scheduler_logs(), "logs"),
                                     (c.scheduler.dump_state(), "dump_state"),
                                     (c.set_metadata("k", 1), "set_metadata"),
                                     (c.get_events(), "events")):
                        with pytest.raises(PermissionError, match=f"'{op}' needs a client"):
                            await call
                    assert set(s.workers) == {w1.address, w2.address}
                    # Tasks still run on the clients such a certificate opens.
                    assert await c.submit(sum, [1, 2]) == 3
                # The client's certificate may do all of it.
                async with Client(s.address, security=_security(client, "client"),
                                  asynchronous=True) as c:
                    assert set(await c.get_worker_logs()) == {w1.address, w2.address}
                    await c.set_metadata("k", 1)
                # pi01 closes: its nanny-less worker retires and unregisters itself.
                await w1.close_gracefully()
                assert list(s.workers) == [w2.address]

    asyncio.run(scenario())


def test_dashboards_listen_on_loopback_and_serve_no_logs(embedded, tmp_path):
    """Finding 5: /info/main/logs.html and /info/logs/<worker> showed logs (task keys,
    exceptions, paths) to every local user, and an SSH cluster's scheduler bound its dashboard
    on the LAN. The guarded scheduler refuses those pages (403, `rpicluster logs` named); the
    other pages still work. `up` starts an SSH scheduler's dashboard on its host's 127.0.0.1
    unless --open-dashboard, and `rpicluster dashboard` then prints the ssh -L tunnel."""
    import urllib.error

    from rpicluster.dashboard.links import build_links
    from rpicluster.deploy import remote
    from rpicluster.inventory import load_inventory

    base = embedded["dashboard_link"].rsplit("/", 1)[0]
    with find_cluster().client(timeout=20) as client:
        worker = next(iter(client.scheduler_info()["workers"]))
    for page in ("/info/main/logs.html", f"/info/logs/{urllib.request.quote(worker, '')}.html",
                 f"/info/call-stacks/{urllib.request.quote(worker, '')}.html"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + page, timeout=30)
        assert refused.value.code == 403 and b"rpicluster logs" in refused.value.read()
    with urllib.request.urlopen(base + "/info/main/workers.html", timeout=30) as ok:
        assert ok.status == 200
    spec = tmp_path / "cluster.toml"
    spec.write_text("[scheduler]\nhost = \"10.77.0.1\"\n[[workers]]\nhosts = \"pi01\"\n")
    sched = load_inventory(spec).scheduler
    closed = remote.command(remote.start_spec("scheduler", sched, local_directory="/w", tls=None))
    assert closed[closed.index("--dashboard-address") + 1] == "127.0.0.1:8787"
    opened = remote.command(remote.start_spec("scheduler", sched, local_directory="/w", tls=None,
                                              dashboard_host=sched.host))
    assert opened[opened.index("--dashboard-address") + 1] == "10.77.0.1:8787"
    links = build_links("127.0.0.1", 8787, "10.77.0.1", ssh_target="pi@10.77.0.1")
    assert links.lines()[-1] == ("from your own machine, first run:  "
                                 "ssh -L 8787:localhost:8787 pi@10.77.0.1")
