"""Real SSH test hosts on this machine: one sshd per Linux network namespace.

:class:`NamespaceHosts` builds a private bridge (its own /24 under 10.77.0.0/16, chosen so it
does not clash with an existing address) and ``n`` namespaces joined to it by veth pairs, each
running its own sshd (own host key and pid file, key-only login, ``StrictModes no`` because the
files live under /tmp). Nothing leaves the test subnet: the namespaces have no default route.
One host can be CPU-capped through the cgroup v1 cpu controller to act like a slow Pi; every
process started over SSH on it inherits the cap.

Needs root, ``ip`` (iproute2) and ``/usr/sbin/sshd`` (openssh-server); :func:`unavailable`
says why not when they are missing. The hosts share this machine's filesystem, so each worker
needs its own directory, and ``hostname`` is the same everywhere (give workers names).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from distributed import WorkerPlugin

SSHD = "/usr/sbin/sshd"
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
_INSTANCES = itertools.count()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float = 60.0, *, what: str,
               process: subprocess.Popen | None = None, ignore=(), interval: float = 0.05):
    """Call ``condition()`` until it returns something true, and return that.

    The one way tests wait: on the event itself (a file written, a worker seen, a line
    printed), never on a fixed sleep. ``timeout`` guards against hanging; it is not a timing
    assertion.

    Parameters
    ----------
    condition : callable
        Called without arguments; a true result ends the wait.
    timeout : float
        Seconds before giving up.
    what : str
        What is waited for, as the failure names it ("a committed block").
    process : subprocess.Popen, optional
        The process that should bring the event: its exit ends the wait at once, and the
        failure quotes its output when that is piped.
    ignore : exception class or tuple of them
        Exceptions of ``condition`` that mean "not yet" (a file caught mid-write, a port that
        does not answer yet); the last one is quoted on timeout.
    interval : float
        Seconds between calls.

    Raises
    ------
    AssertionError
        ``waited 30 s for WHAT`` or ``the process exited (status N) before WHAT``.
    """
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = condition()
        except ignore as e:
            value, last = None, e
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process exited (status {process.returncode}) before "
                                 f"{what}{_output_of(process)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}"
                                 + (f" (last: {last!r})" if last is not None else ""))
        time.sleep(interval)


def _output_of(process: subprocess.Popen) -> str:
    """An exited process's piped output, as ``: TEXT`` (empty when nothing is piped)."""
    if process.stdout is None and process.stderr is None:
        return ""
    text = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part
                   for part in process.communicate() if part)
    return f": {text}"


def unavailable() -> str | None:
    """Why namespace hosts cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed (apt-get install iproute2)"
    if not os.path.exists(SSHD):
        return f"{SSHD} is missing (apt-get install openssh-server)"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen is missing (apt-get install openssh-client)"
    return None


def cpu_cgroup_unavailable() -> str | None:
    """Why the cgroup v1 cpu controller cannot cap a host here, or None."""
    if not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
        return f"cgroup v1 cpu controller not mounted at {CGROUP_CPU}"
    return None


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", netns, "ip", *args] if netns else ["ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f",
                    str(path)], check=True, capture_output=True)
    return Path(f"{path}.pub").read_text().strip()


def _free_subnet() -> int:
    """Third octet of a 10.77.X.0/24 that no interface here uses."""
    used = _ip("-4", "-o", "addr", "show").stdout
    for x in [(os.getpid() % 200) + 20, *range(20, 250)]:
        if f" 10.77.{x}." not in used:
            return x
    raise RuntimeError("no free 10.77.X.0/24 test subnet")


def sshd_config(host: "TestHost", hdir: Path | str, authorized: Path | str, *, sftp: bool = True,
                extra=()) -> str:
    """A key-only sshd config for ``host`` with its files in ``hdir`` (paths as sshd sees them)."""
    return "\n".join([
        f"ListenAddress {host.address}", "Port 22", f"HostKey {hdir}/ssh_host_ed25519_key",
        f"PidFile {hdir}/sshd.pid", f"AuthorizedKeysFile {authorized}",
        "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", *extra,
        "StrictModes no", "UsePAM no", "AllowAgentForwarding no", "X11Forwarding no",
        *(["Subsystem sftp internal-sftp"] if sftp else []),
        "LogLevel ERROR", "MaxStartups 50", ""])


@dataclass
class TestHost:
    """One namespace host."""

    name: str
    netns: str
    address: str
    veth: str
    host_key: Path
    host_public_key: str
    sshd: subprocess.Popen | None = None


class NamespaceHosts:
    """Build ``n`` sshd hosts in network namespaces under ``directory``; tear down on close.

    Parameters
    ----------
    directory : Path
        Where keys, sshd configs, pid files and logs go.
    n : int
        Number of hosts (pi1 .. piN).
    cpu_capped : str, optional
        Name of a host to cap at ``cpu_quota`` of one CPU (cgroup v1), or None.
    cpu_quota : float
        Fraction of one CPU the capped host may use.
    without_sftp : iterable of str
        Names of hosts whose sshd has no SFTP subsystem (like a minimal or hardened sshd).

    Attributes
    ----------
    hosts : dict[str, TestHost]
        By name (pi1 ...).
    client_key : Path
        Private key accepted by every host (for user root).
    known_hosts : Path
        A known_hosts file with every host's real key.
    gateway : str
        This machine's address on the test bridge (where a scheduler listens).
    """

    def __init__(self, directory: str | Path, n: int = 3, *, cpu_capped: str | None = None,
                 cpu_quota: float = 0.5, without_sftp=()) -> None:
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # Unique per instance (two sets of hosts can live in one test session); short enough
        # for Linux's 15-character interface names ("v" + tag + "p9i").
        self.tag = f"rc{os.getpid() % 10000}{next(_INSTANCES) % 26 + 10:x}"[:8]
        self.bridge = f"br-{self.tag}"
        self.hosts: dict[str, TestHost] = {}
        self.cgroup: Path | None = None
        self.capped = cpu_capped
        try:
            self._build(n, cpu_capped, cpu_quota, set(without_sftp))
        except BaseException:
            self.close()
            raise

    def _build(self, n: int, cpu_capped: str | None, cpu_quota: float,
               without_sftp: set[str]) -> None:
        x = _free_subnet()
        self.gateway = f"10.77.{x}.1"
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.client_key = self.directory / "id_ed25519"
        authorized = self.directory / "authorized_keys"
        authorized.write_text(_keygen(self.client_key) + "\n")
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(1, n + 1):
            name = f"pi{i}"
            hdir = self._host_dir(name)
            hdir.mkdir(parents=True, exist_ok=True)
            host = TestHost(name=name, netns=f"{self.tag}-{name}", address=f"10.77.{x}.{10 + i}",
                            veth=f"v{self.tag}p{i}", host_key=hdir / "ssh_host_ed25519_key",
                            host_public_key="")
            self.hosts[name] = host
            host.host_public_key = _keygen(host.host_key)
            subprocess.run(["ip", "netns", "add", host.netns], check=True, capture_output=True)
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", f"{host.veth}i")
            _ip("link", "set", f"{host.veth}i", "netns", host.netns)
            _ip("link", "set", host.veth, "master", self.bridge)
            _ip("link", "set", host.veth, "up")
            _ip("link", "set", "lo", "up", netns=host.netns)
            _ip("addr", "add", f"{host.address}/24", "dev", f"{host.veth}i", netns=host.netns)
            _ip("link", "set", f"{host.veth}i", "up", netns=host.netns)
            host.sshd = self._start_sshd(host, hdir, authorized, sftp=name not in without_sftp)
            if name == cpu_capped:
                self._cap(host, cpu_quota)
        self.known_hosts = self.directory / "known_hosts"
        self.known_hosts.write_text("".join(f"{h.address} {h.host_public_key}\n"
                                            for h in self.hosts.values()))
        for host in self.hosts.values():
            self._wait_port(host)

    def _host_dir(self, name: str) -> Path:
        """Where host ``name``'s keys, sshd config, pid file and log go."""
        return self.directory / name

    def _inventory_lines(self, name: str) -> str:
        """Extra TOML lines of host ``name``'s ``[[workers]]`` group (a subclass's own user,
        python or directories)."""
        return ""

    def _start_sshd(self, host: TestHost, hdir: Path, authorized: Path, *,
                    sftp: bool) -> subprocess.Popen:
        """Write host's sshd config and start its sshd in its namespace (a subclass may run it
        elsewhere, e.g. in a foreign-architecture root)."""
        config = hdir / "sshd_config"
        config.write_text(sshd_config(host, hdir, authorized, sftp=sftp,
                                      extra=["PermitRootLogin prohibit-password"]))
        return subprocess.Popen(
            ["ip", "netns", "exec", host.netns, SSHD, "-D", "-f", str(config),
             "-E", str(hdir / "sshd.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _cap(self, host: TestHost, quota: float) -> None:
        if cpu_cgroup_unavailable():
            self.capped = None
            return
        self.cgroup = CGROUP_CPU / f"rpicluster-{self.tag}"
        self.cgroup.mkdir(exist_ok=True)
        period = int((self.cgroup / "cpu.cfs_period_us").read_text())
        (self.cgroup / "cpu.cfs_quota_us").write_text(str(int(period * quota)))
        # ``ip netns exec`` execs sshd in place, so this pid is sshd's; its children inherit.
        (self.cgroup / "cgroup.procs").write_text(str(host.sshd.pid))

    def _wait_port(self, host: TestHost, timeout: float = 20.0) -> None:
        try:
            wait_until(lambda: socket.create_connection((host.address, 22), timeout=1).close()
                       or True, timeout, what=f"sshd of {host.name} on port 22",
                       process=host.sshd, ignore=OSError, interval=0.1)
        except AssertionError as e:
            log = host.host_key.parent / "sshd.log"
            raise RuntimeError(f"{e}: {log.read_text() if log.exists() else ''}") from None

    def write_inventory(self, path: str | Path, *, local_directory: str | Path,
                        names=None, nthreads: int = 1, memory: str = "2GiB",
                        tags=lambda name, capped: ["slowpi"] if capped else [],
                        known_hosts: str | Path | None = None, python: str = sys.executable,
                        data=None, env: dict[str, str] | None = None) -> Path:
        """Write an inventory of these hosts (all, or ``names``) for the scheduler on the bridge.

        ``tags(name, capped)`` gives each host's tags; the CPU-capped host is the slow "Pi".
        Workers run ``python`` (by default this interpreter: the filesystem is shared) with one
        BLAS thread per task. ``data(name)``, when given, is each host's own store path; ``env``
        adds environment variables for the scheduler and every worker (e.g. Dask timeouts).
        """
        env_items = ", ".join(f'{k} = "{v}"' for k, v in {"OMP_NUM_THREADS": "1",
                                                             **(env or {})}.items())
        groups = "".join(
            f'[[workers]]\nhost = "{self.hosts[n].address}"\nnthreads = {nthreads}\n'
            f'memory = "{memory}"\ntags = {list(tags(n, n == self.capped))!r}\n'.replace("'", '"')
            + (f'data = "{data(n)}"\n' if data else "") + self._inventory_lines(n)
            for n in (names or self.hosts))
        path = Path(path)
        path.write_text(f"""[scheduler]
host = "{self.gateway}"
scheduler_port = {free_port(self.gateway)}
dashboard_port = {free_port(self.gateway)}
[defaults]
user = "root"
key = "{self.client_key}"
known_hosts = "{known_hosts or self.known_hosts}"
python = "{python}"
local_directory = "{local_directory}"
env = {{ {env_items} }}
""" + groups)
        return path

    def set_link(self, name: str, up: bool) -> None:
        """Plug or unplug host ``name``'s cable (its veth end on the bridge)."""
        _ip("link", "set", self.hosts[name].veth, "up" if up else "down")

    def pids(self, name: str) -> list[int]:
        """Processes running in host ``name``'s namespace (sshd and what it started)."""
        out = subprocess.run(["ip", "netns", "pids", self.hosts[name].netns],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def close(self) -> None:
        """Stop every process in the namespaces, then delete namespaces, bridge and cgroup."""
        for host in self.hosts.values():
            for pid in self.pids(host.name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if host.sshd is not None:
                host.sshd.kill()
                host.sshd.wait(timeout=10)
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
            _ip("link", "del", host.veth, check=False)
        _ip("link", "del", self.bridge, check=False)
        if self.cgroup is not None and self.cgroup.exists():
            # Killed processes leave the cgroup as they are reaped; one that outlives the wait
            # only keeps the cgroup's directory, so neither failure stops the close.
            with contextlib.suppress(AssertionError, OSError):
                wait_until(lambda: not (self.cgroup / "cgroup.procs").read_text().strip(), 10,
                           what=f"{self.cgroup} to empty", interval=0.1)
                self.cgroup.rmdir()

    def __enter__(self) -> "NamespaceHosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SlowTasks(WorkerPlugin):
    """A Dask worker plugin that delays tasks whose key contains ``prefix``, or matches the
    regular expression ``pattern`` (on the worker named ``only``, if given): tests use it to make
    a run last long enough for a kill to land mid-run, or to make one worker slow. Register it
    with ``client.register_plugin(SlowTasks(...))``."""

    def __init__(self, prefix: str = "", seconds: float = 1.0, only: str | None = None,
                 pattern: str | None = None):
        self.prefix, self.seconds, self.only, self.pattern = prefix, seconds, only, pattern
        self.worker = None

    def setup(self, worker):
        self.worker = worker

    def transition(self, key, start, finish, **kwargs):
        import re

        key = str(key)
        if finish == "executing" and self.prefix in key and (
                self.pattern is None or re.search(self.pattern, key)) and (
                self.only is None or self.worker.name == self.only):
            time.sleep(self.seconds)


def sum_in_a_task(values) -> int:
    """A task that opens a client on its worker (``distributed.worker_client``, which calls
    ``get_client``) and sums ``values`` in a task of its own: what joblib's dask backend does in
    every batch. Tests submit it; it lives here because workers cannot import test modules."""
    from distributed import worker_client

    with worker_client() as client:
        return client.submit(sum, values, pure=False).result()


def all_rows(dataset):
    """Every row of an opened store and its labels (class values, not codes), in block order."""
    import numpy as np

    X, y = zip(*(dataset.block(b) for b in range(dataset.n_blocks)))
    return np.concatenate(X), np.asarray(dataset.classes)[np.concatenate(y)]


def same_model(a, b, X) -> None:
    """Assert two block ensembles are the same model: as many blocks, the same predictions on
    ``X`` and bit-identical centroids."""
    import numpy as np

    assert len(a.estimators_) == len(b.estimators_)
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    for ea, eb in zip(a.estimators_, b.estimators_):
        np.testing.assert_array_equal(ea.cluster_centers_, eb.cluster_centers_)


def reference_fit(store, block_rows: int, **params):
    """The in-process fit of ``store`` (the uninterrupted run a recovered run must equal), and
    the rows it was fitted on."""
    from rpicluster import IncrementalKSGDClassifier, open_dataset

    X, y = all_rows(open_dataset(store))
    return IncrementalKSGDClassifier(block_rows=block_rows, **params).fit(X, y), X


class DieOn(WorkerPlugin):
    """A Dask worker plugin that kills its worker process (``os._exit``) as a task whose key
    matches ``key_re`` ends, before its result is reported: a poison block. The nanny restarts
    the worker.

    Not as the task starts: the worker may not have reported the task it has just finished
    (its messages go out every few milliseconds), and Dask then blames that task for the death
    too, so the run could rightly name another block."""

    def __init__(self, key_re: str):
        self.key_re = key_re

    def transition(self, key, start, finish, **kwargs):
        import re

        if start == "executing" and re.match(self.key_re, str(key)):
            os._exit(13)


def cli_argv(*args: str) -> list[str]:
    """The command line of ``rpicluster ARGS`` in a child process that Ctrl-C (SIGINT) always
    interrupts. A shell without job control (``cmd &`` in a script, ``nohup``) starts its
    background commands with SIGINT ignored; their children inherit that, and Python then
    installs no KeyboardInterrupt handler, so a test that sends SIGINT saw the command run to
    the end (exit 0) when its CI was started that way."""
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "sys.argv[0] = 'rpicluster'; from rpicluster.cli import main; main()")
    return [sys.executable, "-c", code, *args]


def features_after_a_block(args: list[str], out: str | os.PathLike,
                           timeout: float = 120.0) -> subprocess.Popen:
    """Start ``rpicluster features ARGS`` (output store ``out``) and return its process once the
    store records a finished block: the moment a fault test interrupts the run."""
    import json

    out = Path(out)
    proc = subprocess.Popen(cli_argv("features", *args),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Not written yet, or caught mid-write: OSError, ValueError, KeyError.
    wait_until(lambda: json.loads((out / "zarr.json").read_text())["attributes"]["blocks_done"],
               timeout, what=f"a finished block recorded in {out}", process=proc,
               ignore=(OSError, ValueError, KeyError), interval=0.02)
    return proc
