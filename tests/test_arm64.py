"""The Pi shelf on 64-bit ARM: emulated Raspberry Pi 4 hosts (rpicluster.testing_arm64).

pi1 is an arm64 Debian bookworm root under qemu-user with a Cortex-A72 CPU (a Pi 4's core), its
own sshd in a network namespace with no route out, logging in as ``pi``; pi2 is an x86 namespace
host. The arm64 host is provisioned ONCE per session by ``rpicluster up --provision`` (a real
offline aarch64 wheelhouse; ~6 min of pip under emulation) and reused by every test here.

Cost (loaded 2-core machine): from scratch (debootstrap of the root, provisioning) about
20 min; with the root and the provisioned venv cached (``$RPICLUSTER_ARM64_CACHE``, default
/var/cache/rpicluster-arm64), a few minutes. ``RPICLUSTER_ARM64_FRESH=1`` provisions a bare host
even when a venv is cached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from rpicluster import IncrementalKSGDClassifier, ingest, open_dataset
from rpicluster.deploy import cluster
from rpicluster.deploy.doctor import doctor, table_rows
from rpicluster.deploy.provision import MARKER, provision
from rpicluster.deploy.ssh import Connection
from rpicluster.errors import HostsFailedError
from rpicluster.inventory import load_inventory
from rpicluster.testing import all_rows, cpu_cgroup_unavailable
from rpicluster.testing_arm64 import PYTHON, VENV, WORKDIR, Arm64Hosts, unavailable

pytestmark = [pytest.mark.arm64, pytest.mark.netns,
              pytest.mark.skipif(unavailable() is not None, reason=unavailable() or ""),
              # The first test builds the root and provisions (fixtures count in the timeout).
              pytest.mark.timeout(2400)]

#: Emulated pip and workers are ~30x slower than x86: generous waits, never timing asserts.
SLOW_ENV = {"RPICLUSTER_PROVISION_TIMEOUT": "2400", "RPICLUSTER_JOIN_TIMEOUT": "300",
            "RPICLUSTER_COMMAND_TIMEOUT": "600", "RPICLUSTER_CONNECT_TIMEOUT": "120"}


@pytest.fixture(scope="module", autouse=True)
def slow_hosts():
    """The timeouts above, for the library calls of this module."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in SLOW_ENV.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="session")
def shelf(tmp_path_factory):
    """pi1: an emulated arm64 Pi 4 (user pi); pi2: an x86 namespace host. Torn down at the end of
    the session: processes killed, every mount of the arm64 root undone."""
    with Arm64Hosts(tmp_path_factory.mktemp("arm64"), 2, arm64=("pi1",), cpu_capped="pi2",
                    cpu_quota=1.0) as hosts:
        # pi2 (its sshd, hence its workers) sits in a CPU cgroup, uncapped but for the mixed
        # run (x86_capped).
        if hosts.cgroup is not None:
            (hosts.cgroup / "cpu.cfs_quota_us").write_text("-1")
        yield hosts


@contextmanager
def x86_capped(shelf, quota: float):
    """pi2's processes, its workers included, limited to ``quota`` of one core meanwhile."""
    if shelf.cgroup is None:
        pytest.skip(cpu_cgroup_unavailable() or "no CPU cgroup for pi2")
    period = int((shelf.cgroup / "cpu.cfs_period_us").read_text())
    (shelf.cgroup / "cpu.cfs_quota_us").write_text(str(int(period * quota)))
    try:
        yield
    finally:
        (shelf.cgroup / "cpu.cfs_quota_us").write_text("-1")


@pytest.fixture(scope="session")
def home(tmp_path_factory, shelf):
    """This module's rpicluster home (state, certificates, wheelhouse) and a folder shared with
    the arm64 root at the same path (data stores, worker directories), writable by pi."""
    base = tmp_path_factory.mktemp("arm64-home")
    shared = base / "shared"
    shared.mkdir()
    os.chmod(base, 0o755)
    os.chmod(shared, 0o1777)
    shelf.share(shared)
    return base


@pytest.fixture(scope="module", autouse=True)
def _module_home(home):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RPICLUSTER_HOME", str(home / "rpicluster"))
        yield


def _inventory(shelf, home, names, name="cluster.toml", **kw) -> Path:
    return shelf.write_inventory(home / name, names=names, nthreads=1, memory="2GiB",
                                 local_directory=home / "shared" / "x86-workers", **kw)


def _cli(*args, env=None, cwd=None, python=sys.executable, timeout=2400, umask=None):
    return subprocess.run([python, "-m", "rpicluster.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or "/",
                          env={**os.environ, **SLOW_ENV, **(env or {})},
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


@pytest.fixture(scope="session")
def provisioned(shelf, home):
    """``rpicluster up -c arm64.toml --provision`` on pi1, once: (inventory, CLI result,
    seconds). The provisioned venv is kept in the cache for the next session."""
    path = _inventory(shelf, home, ["pi1"], "arm64.toml")
    env = {"RPICLUSTER_HOME": str(home / "rpicluster")}
    start = time.monotonic()
    res = _cli("up", "-c", str(path), "--provision", env=env)
    seconds = time.monotonic() - start
    print(f"\narm64 up --provision: {seconds:.0f} s (venv restored from the cache: "
          f"{shelf.restored})", file=sys.stderr)
    if res.returncode == 0:
        shelf.save_venv()
    yield path, res, seconds
    if (home / "rpicluster" / "clusters").exists():
        _cli("down", "-c", str(path), env=env, timeout=300)


def _arm_name(shelf) -> str:
    return shelf.hosts["pi1"].address


# --------------------------------------------------------------------------- doctor, bare host


def test_doctor_on_a_bare_arm64_host_reports_the_system_pythons_facts(shelf, home):
    """Before any venv: architecture, OS, glibc, Python, memory, disk, health and the wheels
    --provision would install, learned with the host's own python3 (health throttling from a
    fake vcgencmd, the only stand-in: there is no Pi firmware here)."""
    path = _inventory(shelf, home, ["pi1"], "bare.toml")
    text = path.read_text().replace(PYTHON, "/home/pi/.venvs/never-made/bin/python")
    path.write_text(text)
    vcgencmd = shelf.root / "usr/bin/vcgencmd"
    vcgencmd.write_text("#!/bin/sh\necho throttled=0x50005\n")
    vcgencmd.chmod(0o755)
    try:
        (check,) = doctor(path, ssh_timeout=30)
        res = _cli("doctor", "-c", str(path))
    finally:
        vcgencmd.unlink()
    f = check.facts
    assert (f["arch"], f["bits"], f["glibc"], f["python"][:5]) == ("aarch64", 64, "2.36", "3.11.")
    assert "bookworm" in f["os"]
    assert f["mem_total"] > 0 and f["disk_free"] > 0
    assert f["throttled"] == ["under-voltage", "throttled", "under-voltage occurred",
                              "throttling occurred"]
    assert f["provision"]["tag"] == "manylinux_2_36_aarch64"
    assert f"numpy=={np.__version__}" in f["provision"]["wheels"]
    assert not check.ok and len(check.errors) == 1
    assert "no venv at /home/pi/.venvs/never-made/bin/python" in check.errors[0]
    assert f"rpicluster up -c {path} --provision" in check.errors[0]
    columns, (row,) = table_rows([check])
    cells = dict(zip(columns, row))
    assert cells["arch"] == "aarch64" and cells["os / glibc"].endswith("glibc 2.36")
    assert cells["packages"].startswith("not installed; --provision: ")
    assert "under-voltage" in cells["throttled"]
    assert res.returncode == 1 and "Traceback" not in res.stdout + res.stderr
    assert "aarch64" in res.stdout and "--provision" in res.stdout


def test_missing_wheel_for_the_platform_is_named_before_anything_is_pushed(shelf, home, tmp_path):
    """mkl publishes x86 wheels only: provisioning pi1 with it pinned names the wheel and the
    platform in one line, and nothing reaches the host."""
    path = _inventory(shelf, home, ["pi1"], "nowheel.toml")
    text = path.read_text().replace(PYTHON, "/home/pi/.venvs/nowheel/bin/python")
    path.write_text(text.replace(WORKDIR, "/home/pi/nowheel"))
    pins = [f"pip=={metadata.version('pip')}", "mkl==2024.0.0"]
    with pytest.raises(HostsFailedError) as err:
        provision(path, requirements=pins, wheelhouse=tmp_path / "wh")
    (line,) = str(err.value).splitlines()[1:]
    assert line.startswith(f"{_arm_name(shelf)}: no wheel of mkl==2024.0.0 for aarch64 / cp311 /"
                           " glibc 2.36")
    assert not (shelf.root / "home/pi/nowheel").exists()


# --------------------------------------------------------------------------- provisioning


def test_up_provision_on_a_bare_arm64_host(shelf, home, provisioned):
    """up --provision from the desktop: an aarch64 wheelhouse of this machine's exact versions,
    installed offline (the host has no route out), then the worker joins; no version noise."""
    path, res, seconds = provisioned
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "VersionMismatch" not in res.stderr
    assert "started" in res.stdout
    routes = subprocess.run(["ip", "netns", "exec", shelf.hosts["pi1"].netns, "ip", "route"],
                            capture_output=True, text=True, check=True).stdout
    assert "default" not in routes
    venv = shelf.root / VENV.lstrip("/")
    assert (venv / MARKER).exists()
    installed = subprocess.run(
        ["ip", "netns", "exec", shelf.hosts["pi1"].netns, "chroot", str(shelf.root), PYTHON, "-c",
         "import json, platform, numpy, sklearn, rpicluster; print(json.dumps([platform.machine(),"
         " numpy.__version__, sklearn.__version__, rpicluster.__version__]))"],
        capture_output=True, text=True, check=True, env={**os.environ, "QEMU_CPU": "cortex-a72"})
    import sklearn

    import rpicluster
    assert json.loads(installed.stdout) == ["aarch64", np.__version__, sklearn.__version__,
                                            rpicluster.__version__]
    if not shelf.restored:
        pushed = list((shelf.root / WORKDIR.lstrip("/") / "wheelhouse").glob("numpy-*.whl"))
        assert len(pushed) == 1 and "aarch64" in pushed[0].name
    # A client of the provisioned Pi hears no VersionMismatchWarning (Python 3.11.2 there, and
    # pandas here only: noise), and doctor finds every package matching.
    from distributed import Client
    from distributed.versions import VersionMismatchWarning

    state = json.loads(next((home / "rpicluster" / "clusters").glob("*/state.json")).read_text())
    from rpicluster.deploy.state import load_state

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Client(state["address"], security=load_state(path).security(), timeout=60):
            pass
    assert not [w for w in caught if issubclass(w.category, VersionMismatchWarning)]
    (check,) = doctor(path, ssh_timeout=30)
    assert check.ok, check.errors
    # A second up --provision installs only the wheels that changed since the first (none, or
    # rpicluster's own after an edit of its code): the venv's marker says which.
    before = json.loads((venv / MARKER).read_text())
    again = provision(path, wheelhouse=home / "rpicluster" / "wheelhouse")
    after = json.loads((venv / MARKER).read_text())
    installed = again[_arm_name(shelf)].value["installed"]
    assert set(installed) == {w for w, digest in after.items() if before.get(w) != digest}
    assert len(installed) < len(after) / 2


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="session")
def digits(home):
    """sklearn's digits as a store of 18 blocks of 100 rows, on the shared folder."""
    store = home / "shared" / "digits.zarr"
    ingest("sklearn:digits", store, block_rows=100)
    return store


PARAMS = {"n_clusters": 2, "max_iter": 5, "random_state": 0}


def _check_like_x86(model_path, store):
    from rpicluster.train.modelfile import load_model

    X, y = all_rows(open_dataset(store))
    model = load_model(model_path)
    reference = IncrementalKSGDClassifier(block_rows=100, **PARAMS).fit(X, y)
    np.testing.assert_array_equal(model.predict(X), reference.predict(X))
    assert len(model.estimators_) == len(reference.estimators_)
    for a, b in zip(model.estimators_, reference.estimators_):
        np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
        # float32 SGD: bitwise only under the same OpenBLAS kernel (cortexa57 there, an x86
        # kernel here).
        np.testing.assert_allclose(a.local_coef_, b.local_coef_, rtol=1e-4, atol=1e-5)
    return model, X, y


def test_train_and_score_on_arm64_alone(shelf, home, provisioned, digits):
    from rpicluster.train.api import ClusterChoice, score_model, train_model

    path, res, _ = provisioned
    assert res.returncode == 0, res.stdout + res.stderr
    summary = train_model(str(digits), home / "shared" / "arm.skops", PARAMS,
                          cluster=ClusterChoice(inventory=path), show_progress=False)
    assert set(summary.result.tasks_per_worker) == {_arm_name(shelf)}
    model, X, y = _check_like_x86(summary.model_path, digits)
    accuracy = score_model(summary.model_path, str(digits), cluster=ClusterChoice(inventory=path),
                           show_progress=False)
    assert accuracy == pytest.approx(model.score(X, y))


#: pi2's share of one core in the mixed run: about the emulated Cortex-A72's pace here (~1 s a
#: digits block, loaded). Uncapped, x86 trains a block in ~40 ms and all 18 before the emulated
#: worker returns its first, which is the faster plan and the one the placement makes (the
#: Cortex-A72's blocks are then run again on x86, and its results dropped). Measured at 10 %
#: (loaded): 5-6 of 38 tasks on arm64; at 3 %: 15-20.
X86_QUOTA = 0.04


def test_mixed_arm64_and_x86_cluster_trains_on_both(shelf, home, provisioned, digits):
    """18 blocks on an arm64 and an x86 worker of comparable speed (x86 capped): both train
    blocks, and the model equals the x86 one (predictions and centroids identical)."""
    from rpicluster import connect
    from rpicluster.train import tasks
    from rpicluster.train.api import ClusterChoice, train_model

    assert provisioned[1].returncode == 0
    cluster.down(provisioned[0])
    path = _inventory(shelf, home, ["pi1", "pi2"], "mixed.toml")
    arm, x86 = _arm_name(shelf), shelf.hosts["pi2"].address
    try:
        report = cluster.up(path)
        assert [r.state for r in report.rows] == ["started"] * 3
        # Both workers load the training stack and open the store first, at full speed: at a
        # few percent of a core, x86's imports alone would take a minute (while the emulated
        # worker trained every block), and the emulated worker's ~30x slower ones would keep
        # it from any block.
        with connect(inventory=path, timeout=120) as client:
            dataset = open_dataset(digits)
            for w in client.scheduler_info()["workers"]:
                client.submit(tasks.warm_up, pure=False, workers=[w]).result(timeout=600)
                client.submit(dataset.block, 0, pure=False, workers=[w]).result(timeout=600)
        with x86_capped(shelf, X86_QUOTA):
            summary = train_model(str(digits), home / "shared" / "mixed.skops", PARAMS,
                                  cluster=ClusterChoice(inventory=path), show_progress=False)
    finally:
        cluster.down(path)
        cluster.up(provisioned[0])
    counts = summary.result.tasks_per_worker
    print(f"\nmixed arm64 + x86 (x86 at {X86_QUOTA:.0%} of a core): tasks {dict(counts)}",
          file=sys.stderr)
    assert set(counts) == {arm, x86} and counts[arm] > 0 and counts[x86] > 0, counts
    _check_like_x86(summary.model_path, digits)


def test_features_on_the_emulated_cortex_a72(shelf, home, provisioned):
    """rpicluster features (EfficientNet-Lite0 on ONNX Runtime) on the arm64 worker: an
    onnxruntime wheel using instructions a Pi 4 lacks dies here; the features equal x86's."""
    from skimage.data import lfw_subset

    from rpicluster.features.images import write_image_store
    from rpicluster.features.model import Extractor, load_network

    path, res, _ = provisioned
    assert res.returncode == 0
    faces = (lfw_subset()[:32] * 255).round().astype(np.uint8)
    labels = np.array(["a", "b"] * 16)
    images = write_image_store(home / "shared" / "faces.zarr", faces, labels, block_rows=16)
    out = home / "shared" / "faces-features.zarr"
    res = _cli("features", images.url, "-o", str(out), "--model", "efficientnet-lite0",
               "--input-size", "64", "--batch-size", "8", "-c", str(path),
               env={"RPICLUSTER_HOME": str(home / "rpicluster")},
               # The desktop (root here) makes the output store's folders and the workers (user
               # pi) write its chunks: as on a shared disk, those folders must be theirs to write.
               umask=0)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "extracted 2 blocks" in res.stdout
    X = np.asarray(open_dataset(out).X.compute())
    reference = Extractor(load_network("efficientnet-lite0"), input_size=64).transform(faces)
    np.testing.assert_allclose(X, reference, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- bad input


def test_every_host_failing_provisioning_is_one_line_each(shelf, home, tmp_path):
    """pi1's disk too small for the wheelhouse (a 4 MiB tmpfs), pi2's python not in a venv: up
    --provision says so per host in one line, starts nothing and pushes nothing (when every host
    failed it used to end in AttributeError). (The tmpfs, mounted after pi2's sshd started, does
    not reach pi2's mount namespace; the arm64 root is a shared mount, so it reaches pi1.)"""
    small = home / "shared" / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=1777", "tmpfs", str(small)],
                   check=True)
    inside = shelf.root / str(small).lstrip("/")
    subprocess.run(["mount", "--bind", str(small), str(inside)], check=True)
    try:
        path = _inventory(shelf, home, ["pi1", "pi2"], "small.toml")
        text = path.read_text().replace(WORKDIR, str(small / "pi")).replace(
            str(home / "shared" / "x86-workers"), str(small / "x86"))
        path.write_text(text.replace(PYTHON, str(small / "venv/bin/python")).replace(
            f'python = "{sys.executable}"', 'python = "/usr/bin/python3"'))
        # The session's home: its wheelhouses are there already (nothing is started).
        res = _cli("up", "-c", str(path), "--provision",
                   env={"RPICLUSTER_HOME": str(home / "rpicluster")})
        assert res.returncode == 1, res.stdout + res.stderr
        assert "Traceback" not in res.stderr and "AttributeError" not in res.stderr
        pi1, pi2 = (shelf.hosts[h].address for h in ("pi1", "pi2"))
        lines = res.stderr.splitlines()
        (disk,) = [line for line in lines if line.startswith(f"{pi1}: ")]
        assert f"4 MiB free at {small}/pi, but the wheelhouse needs" in disk
        assert "bigger disk" in disk
        # /usr/bin/python3 names /usr as the venv: refused before anything is written there.
        (venv,) = [line for line in lines if line.startswith(f"{pi2}: ")]
        assert "python = '/usr/bin/python3' is in /usr, which exists and is not a venv" in venv
        assert not os.path.exists("/usr/pyvenv.cfg")
        assert "failed" in res.stdout        # the table: one failed row per host
        assert os.listdir(small) == []       # nothing pushed, no venv made
    finally:
        subprocess.run(["umount", str(inside)], check=True)
        subprocess.run(["umount", str(small)], check=True)


def test_provision_from_a_wheel_install(shelf, home, tmp_path):
    """rpicluster installed from its built wheel (not editable, no source tree): provisioning
    repacks the installed files into a wheel and the x86 host's venv runs it."""
    root = Path(__file__).resolve().parents[1]
    # Built from a copy of the working tree (a build writes build/ and egg-info in its source).
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=root, capture_output=True, check=True).stdout.decode().split("\0")
    source = tmp_path / "source"
    for name in filter(None, files):
        if (root / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, source / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist),
                    str(source)], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("rpicluster-*.whl")
    venv = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    # The dependencies from this venv (a path, not a site dir: its editable finder stays out).
    deps = next(p for p in sys.path if p.endswith("site-packages") and "rpicluster" not in p)
    (site / "deps.pth").write_text(deps + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install",
                    "--no-deps", "-q", str(wheel)], check=True, cwd=tmp_path)
    python = str(venv / "bin/python")
    where = subprocess.run([python, "-c", "import rpicluster; print(rpicluster.__file__)"],
                           capture_output=True, text=True, check=True, cwd="/").stdout
    assert where.startswith(str(site))
    path = _inventory(shelf, home, ["pi2"], "from-wheel.toml",
                      python=str(tmp_path / "target/bin/python"))
    pins = [f"rpicluster=={metadata.version('rpicluster')}", f"pip=={metadata.version('pip')}"]
    code = ("import json, sys; from rpicluster.deploy.provision import provision; "
            f"r = provision({str(path)!r}, requirements={pins!r}, "
            f"wheelhouse={str(tmp_path / 'wh')!r}); "
            "print(json.dumps({h: len(v.value['installed']) for h, v in r.items()}))")
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd="/",
                         env={**os.environ, "RPICLUSTER_HOME": str(tmp_path / "home")})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1]) == {shelf.hosts["pi2"].address: 2}
    target = tmp_path / "target/bin/python"
    out = subprocess.run([str(target), "-m", "rpicluster.deploy.remote", "--spec",
                          '{"action": "stop", "pid": 1, "name": "nobody"}'],
                         capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and json.loads(out.stdout)["was_running"] is False
    # The provisioned copy is this source's code, file for file.
    pushed = next((tmp_path / "target").glob("lib/python3*/site-packages/rpicluster"))
    for module in ("deploy/provision.py", "testing_arm64.py", "cli/__init__.py"):
        assert (pushed / module).read_bytes() == (source / "rpicluster" / module).read_bytes()
    shutil.rmtree(tmp_path / "target")


# --------------------------------------------------------------------------- the fixture itself


def _running_in(pid: int, root: Path) -> bool:
    """Whether process ``pid`` is alive (not a zombie) with ``root`` as its root directory."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X") and os.readlink(f"/proc/{pid}/root") == str(root)
    except OSError:
        return False


def test_hosts_close_unmounts_everything_and_leaves_nothing_running(tmp_path):
    """A second set of arm64 hosts beside the session's: a login runs on the Cortex-A72, and
    close() leaves no process, namespace or mount behind (the cached root untouched)."""
    from rpicluster.testing_arm64 import BOOKWORM, _mounts_under

    before = set(os.listdir(BOOKWORM.root / "home"))
    hosts = Arm64Hosts(tmp_path, 1, restore_venv=False)
    try:
        node = load_inventory(hosts.write_inventory(tmp_path / "one.toml",
                                                    local_directory=tmp_path)).workers[0]
        with Connection(node, timeout=30) as conn:
            out = conn.run("uname -m; id -un; echo $QEMU_CPU; "
                           "grep -m1 -o 'CPU part.*' /proc/cpuinfo || true").stdout.split()
        assert out[:3] == ["aarch64", "pi", "cortex-a72"]
        pids = hosts.pids("pi1")
        assert [p for p in pids if _running_in(p, hosts.root)]     # sshd, in the root
    finally:
        hosts.close()
    assert _mounts_under(hosts.root) == []
    assert not [p for p in pids if _running_in(p, hosts.root)]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert hosts.hosts["pi1"].netns not in netns
    assert set(os.listdir(BOOKWORM.root / "home")) == before     # "pi" went to the overlay
