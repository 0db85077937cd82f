"""SSH to the hosts of an inventory (paramiko), safely and in parallel.

- Host keys are checked against the node's ``known_hosts``: an unknown host is refused unless
  ``accept_new_hosts`` (trust on first use: the key is recorded), and a changed key is always
  refused, showing the fingerprint the host offered.
- Key authentication only: no agent, no key search, no passwords; connect, banner and
  authentication time out.
- :func:`fan_out` runs one function per host in parallel and reports every host (like fabric's
  ``GroupResult``): one bad host never hides or blocks the others.
"""

from __future__ import annotations

import base64
import collections
import errno
import hashlib
import logging
import os
import shlex
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Iterable, TypeVar

import paramiko

from rpicluster import config
from rpicluster.errors import HostKeyError, RPiClusterError, SSHError
from rpicluster.inventory import NodeSpec

T = TypeVar("T")

# paramiko's transport thread logs a failed handshake at ERROR with a 25-line traceback, which
# Python's last-resort handler prints to stderr; the failure reaches the caller as one SSHError
# naming the host, so those records go only where the user's own logging setup sends them.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

# known_hosts files are appended to from several connection threads.
_KNOWN_HOSTS_LOCK = threading.Lock()


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint of a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    """The name under which OpenSSH records ``host:port`` in known_hosts."""
    return host if port == 22 else f"[{host}]:{port}"


def shell_path(path: str) -> str:
    """Quote a remote path for the shell, keeping a leading ``~/`` expandable."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse unknown hosts, or record them (TOFU) when asked to."""

    def __init__(self, known_hosts: Path, accept_new: bool) -> None:
        self.known_hosts = known_hosts
        self.accept_new = accept_new

    def missing_host_key(self, client, hostname, key):
        if not self.accept_new:
            raise HostKeyError(
                f"{hostname}: unknown host key {key.get_name()} {fingerprint(key)} "
                f"(not in {self.known_hosts}); check it, then rerun with --accept-new-hosts "
                "to record it")
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        with _KNOWN_HOSTS_LOCK:
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            with open(self.known_hosts, "a") as f:
                f.write(line)
        client.get_host_keys().add(hostname, key.get_name(), key)


@dataclass(frozen=True)
class CommandResult:
    """What a remote command printed and how it exited."""

    stdout: str
    stderr: str
    exit_status: int


def _connect_failure(exc: BaseException, timeout: float) -> str:
    """What a failed SSH connect means, and what to check, for the usual causes."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return (f"timed out after {timeout:g} s; is the host powered on and on this network "
                "(a Pi still booting takes a minute)?")
    if isinstance(exc, socket.gaierror):
        return (f"the host name does not resolve ({exc.strerror or exc}); check its spelling in "
                "the inventory, or use its IP address")
    if isinstance(exc, ConnectionRefusedError) or (
            isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError)
            and all(isinstance(e, ConnectionRefusedError) for e in exc.errors.values())):
        return ("connection refused: no SSH server listens on that port; enable SSH on the "
                "host (raspi-config, or an empty 'ssh' file on a Pi's boot partition) or fix "
                "the port in the inventory")
    if isinstance(exc, paramiko.SSHException) and "banner" in str(exc):
        return (f"something answered but did not speak SSH ({exc}); check the host and port "
                "in the inventory")
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"{exc.strerror}; is the host on this network?"
    return str(exc) or type(exc).__name__


class Connection:
    """An open SSH connection to one node; use as a context manager.

    Parameters
    ----------
    node : NodeSpec
        Host, port, user, key and known_hosts.
    accept_new_hosts : bool
        Record unknown host keys instead of refusing them.
    timeout : float, optional
        Seconds for TCP connect, SSH banner and authentication (default ``config.SSH_TIMEOUT``).
    """

    def __init__(self, node: NodeSpec, *, accept_new_hosts: bool = False,
                 timeout: float | None = None) -> None:
        self.node = node
        self.host = node.host
        timeout = config.SSH_TIMEOUT if timeout is None else timeout
        client = paramiko.SSHClient()
        if node.known_hosts.exists():
            client.load_host_keys(str(node.known_hosts))
        client.set_missing_host_key_policy(_HostKeyPolicy(node.known_hosts, accept_new_hosts))
        try:
            client.connect(
                node.host, port=node.port, username=node.user, key_filename=str(node.key),
                allow_agent=False, look_for_keys=False, timeout=timeout,
                banner_timeout=timeout, auth_timeout=timeout, channel_timeout=timeout)
        except HostKeyError:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyError(
                f"{node.host}: host key CHANGED: offered {exc.key.get_name()} "
                f"{fingerprint(exc.key)}, {node.known_hosts} has {fingerprint(exc.expected_key)}; "
                "refusing to connect (if the host was reinstalled, remove its old line)") from None
        except paramiko.AuthenticationException as exc:
            client.close()
            raise SSHError(f"{node.host}: key authentication as {node.user!r} with {node.key} "
                           f"failed: {exc}; add the public key to the host's authorized keys "
                           f"(ssh-copy-id -i {node.key}.pub {node.user}@{node.host}), or set "
                           "user/key for it in the inventory") from None
        except (OSError, socket.timeout, paramiko.SSHException) as exc:
            client.close()
            raise SSHError(f"{node.host}:{node.port}: cannot connect: "
                           f"{_connect_failure(exc, timeout)}") from None
        self._client = client
        self._home: str | None = None

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self._client.close()

    def run(self, command: str, *, stdin: bytes | None = None,
            timeout: float | None = None, check: bool = True,
            what: str | None = None) -> CommandResult:
        """Run a shell command (already quoted) and wait for it.

        ``what`` names the command in error messages (default: its first 200 characters).

        Raises
        ------
        SSHError
            ``check`` and the command exited non-zero, or it ran past ``timeout`` (default
            ``config.COMMAND_TIMEOUT``).
        """
        timeout = config.COMMAND_TIMEOUT if timeout is None else timeout
        what = command[:200] if what is None else what
        try:
            chan_in, chan_out, chan_err = self._client.exec_command(command, timeout=timeout)
            if stdin is not None:
                chan_in.write(stdin)
            chan_in.channel.shutdown_write()
            out = chan_out.read().decode(errors="replace")
            err = chan_err.read().decode(errors="replace")
            status = chan_out.channel.recv_exit_status()
        except (socket.timeout, TimeoutError):
            raise SSHError(f"{self.host}: command timed out after {timeout:.0f} s: {what}"
                           ) from None
        except paramiko.SSHException as exc:
            raise SSHError(f"{self.host}: command failed: {exc}") from None
        if check and status != 0:
            tail = (err or out).strip()[-2000:]
            raise SSHError(f"{self.host}: exit status {status} from {what}: {tail}")
        return CommandResult(out, err, status)

    def python(self, args: Iterable[str], *, interpreter: str | None = None,
               **kw) -> CommandResult:
        """Run the node's Python (or ``interpreter``) with ``args``, each argument quoted."""
        cmd = " ".join([shell_path(interpreter or self.node.python), *map(shlex.quote, args)])
        return self.run(cmd, **kw)

    def home(self) -> str:
        """The remote user's home directory (asked once per connection)."""
        if self._home is None:
            self._home = self.run('printf %s "$HOME"').stdout
        return self._home

    def resolve(self, path: str) -> str:
        """A remote path with a leading ``~`` replaced by the home directory."""
        if path == "~" or path.startswith("~/"):
            return self.home() + path[1:]
        return path

    def makedirs(self, path: str, mode: int = 0o700) -> None:
        """Create a remote directory and its parents."""
        self.run(f"mkdir -p -m {mode:o} {shell_path(path)}")

    def put_bytes(self, data: bytes, path: str, *, mode: int = 0o600) -> None:
        """Write ``data`` to a remote file created with ``mode`` (no world-readable window).

        Through ``cat`` on the command's stdin, not SFTP: hosts whose sshd has no SFTP subsystem
        work too. The data goes to a private temporary file that is renamed into place.
        """
        path = self.resolve(path)
        tmp = shell_path(f"{path}.rpicluster-tmp")
        self.run(f"umask 077 && cat > {tmp} && chmod {mode:o} {tmp} && "
                 f"mv -f {tmp} {shell_path(path)}", stdin=data)

    def put_file(self, local: Path, path: str, *, mode: int = 0o644) -> None:
        """Copy a local file to the host."""
        self.put_bytes(Path(local).read_bytes(), path, mode=mode)

    def tail(self, path: str, lines: int = 40) -> str:
        """The last ``lines`` lines of a remote text file ('' if it does not exist)."""
        res = self.run(f"tail -n {int(lines)} {shell_path(path)}", check=False)
        return res.stdout if res.exit_status == 0 else ""


@dataclass(frozen=True)
class HostResult(Generic[T]):
    """One host's outcome: ``value`` when it worked, ``error`` (a message) when not."""

    host: str
    value: T | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class GroupResult(dict):
    """``host -> HostResult`` for every host, in inventory order."""

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.values())

    @property
    def failed(self) -> dict[str, HostResult]:
        return {h: r for h, r in self.items() if not r.ok}


def fan_out(nodes: Iterable[NodeSpec], fn: Callable[[NodeSpec], T], *,
            max_workers: int = config.SSH_PARALLEL) -> GroupResult:
    """Call ``fn(node)`` for every node in parallel and collect every host's result.

    Errors of the rpicluster family become that host's ``error``; other exceptions are bugs
    and propagate after every host has finished.
    """
    nodes = list(nodes)
    results = GroupResult()
    if not nodes:
        return results
    with ThreadPoolExecutor(max_workers=min(max_workers, len(nodes))) as pool:
        futures = [(n, pool.submit(fn, n)) for n in nodes]
        for node, fut in futures:
            try:
                results[node.host] = HostResult(node.host, value=fut.result())
            except RPiClusterError as exc:
                results[node.host] = HostResult(node.host, error=str(exc))
    return results


class LocalConnection:
    """The parts of :class:`Connection` that ``up``/``down`` use, for this machine itself.

    The scheduler on the desktop is started through the same entry point as a remote worker,
    so one code path serves both.
    """

    def __init__(self, node: NodeSpec, python: str = sys.executable) -> None:
        self.node = node
        self.host = node.host
        self._python = python

    def __enter__(self) -> "LocalConnection":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def python(self, args: Iterable[str], *, timeout: float | None = None,
               check: bool = True, what: str | None = None) -> CommandResult:
        """Run this machine's interpreter with ``args`` (``what`` names it in errors)."""
        timeout = config.COMMAND_TIMEOUT if timeout is None else timeout
        try:
            proc = subprocess.run([self._python, *args], capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise SSHError(f"{self.host} (local): command timed out after {timeout:.0f} s"
                           + (f": {what}" if what else "")) from None
        if check and proc.returncode != 0:
            raise SSHError(f"{self.host} (local): exit status {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
        return CommandResult(proc.stdout, proc.stderr, proc.returncode)

    def resolve(self, path: str) -> str:
        return os.path.expanduser(path)

    def tail(self, path: str, lines: int = 40) -> str:
        """The last ``lines`` lines of a local text file ('' if it does not exist)."""
        try:
            with open(path, errors="replace") as f:
                return "".join(collections.deque(f, maxlen=lines))
        except OSError:
            return ""
