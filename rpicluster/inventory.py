"""The cluster inventory: a TOML file read into frozen dataclasses.

Example (``rpicluster init`` writes a commented one)::

    [scheduler]
    host = "192.168.1.10"        # this machine: started locally; another host: over SSH
    [defaults]
    user = "pi"
    key = "~/.ssh/id_ed25519"
    [[workers]]
    hosts = "pi[01-04].lan"
    nthreads = 4
    memory = "3GiB"
    tags = ["rpi4"]

Every value is checked here, before any connection is made: unknown keys, duplicate hosts, bad
ports, and shell metacharacters in host names and paths are refused with an error naming the file
and the key. Keys of ``[defaults]`` may be repeated in ``[scheduler]`` and in any ``[[workers]]``
group; the most specific value wins.
"""

from __future__ import annotations

import getpass
import itertools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from rpicluster import config
from rpicluster.errors import InventoryError

#: Keys allowed in ``[defaults]`` and repeatable in ``[scheduler]`` / ``[[workers]]``.
CONNECTION_KEYS = ("user", "port", "key", "known_hosts", "python", "local_directory", "env")
SCHEDULER_KEYS = ("host", "scheduler_port", "dashboard_port") + CONNECTION_KEYS
WORKER_KEYS = ("host", "hosts", "nthreads", "memory", "tags", "data") + CONNECTION_KEYS
TOP_KEYS = ("scheduler", "defaults", "workers")

# Patterns end in \Z, not $ ($ also matches before a trailing newline).
# Host names and IPv4/IPv6 literals only: anything a shell could interpret is refused.
_HOST_RE = re.compile(r"\A[A-Za-z0-9]([A-Za-z0-9._:-]*[A-Za-z0-9])?\Z")
# Paths are quoted before use anyway; refusing metacharacters catches injection attempts early,
# and a leading "-" would read as an option to ssh, python or mkdir.
_PATH_RE = re.compile(r"\A[A-Za-z0-9_./~+@%:,=][A-Za-z0-9_./~+@%:,=-]*\Z")
_NAME_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
# POSIX portable user names: no leading "-" (ssh would read it as an option).
_USER_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_.-]*\Z")
_TAG_RE = re.compile(r"\A[A-Za-z0-9_.-]+\Z")
_RANGE_RE = re.compile(r"\[(\d+)-(\d+)\]")


@dataclass(frozen=True)
class NodeSpec:
    """How to reach one host over SSH and what to run there.

    ``key`` and ``known_hosts`` are paths on this machine (resolved); ``python`` and
    ``local_directory`` are paths on the host (``~`` is expanded there).
    """

    host: str
    user: str
    port: int
    key: Path
    known_hosts: Path
    python: str
    local_directory: str
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    nthreads: int = 1
    memory: int | None = None
    tags: tuple[str, ...] = ()
    #: A store on this host's own disk (path or URL as the host sees it), for ``federate``.
    data: str | None = None

    @property
    def name(self) -> str:
        """The Dask worker name (the host as written in the inventory)."""
        return self.host

    @property
    def resources(self) -> dict[str, int]:
        """Dask resources from the tags: every thread may run one task needing a tag."""
        return {t: self.nthreads for t in self.tags}

    @property
    def workdir(self) -> str:
        """This worker's own directory on the host (hosts may share a filesystem)."""
        return f"{self.local_directory.rstrip('/')}/{self.name}"


@dataclass(frozen=True)
class SchedulerSpec:
    """Where the Dask scheduler runs; ``node`` holds the SSH settings if it is not this machine."""

    host: str
    scheduler_port: int
    dashboard_port: int
    node: NodeSpec


@dataclass(frozen=True)
class ClusterSpec:
    """A whole inventory: the scheduler and every worker, in file order."""

    path: Path
    scheduler: SchedulerSpec
    workers: tuple[NodeSpec, ...]

    def worker(self, host: str) -> NodeSpec:
        """The worker on ``host``; :class:`InventoryError` naming the known hosts otherwise."""
        for w in self.workers:
            if w.host == host:
                return w
        raise InventoryError(f"{self.path}: no worker on host {host!r} "
                             f"(hosts: {', '.join(w.host for w in self.workers)})")


def expand_hosts(pattern: str) -> list[str]:
    """Expand numeric ranges such as ``pi[01-04].lan`` or ``10.0.0.[11-14]``.

    Several ranges multiply out; zero padding of the start value is kept.

    Examples
    --------
    >>> expand_hosts("pi[01-03]")
    ['pi01', 'pi02', 'pi03']
    """
    parts = _RANGE_RE.split(pattern)
    pieces: list[list[str]] = []
    for i in range(0, len(parts) - 1, 3):
        lo, hi = parts[i + 1], parts[i + 2]
        if int(hi) < int(lo):
            raise ValueError(f"range [{lo}-{hi}] in {pattern!r} counts down")
        width = len(lo) if lo.startswith("0") else 0
        pieces.append([parts[i]])
        pieces.append([str(n).zfill(width) for n in range(int(lo), int(hi) + 1)])
    pieces.append([parts[-1]])
    return ["".join(p) for p in itertools.product(*pieces)]


def load_inventory(path: str | Path) -> ClusterSpec:
    """Read and validate a TOML inventory.

    Parameters
    ----------
    path : str or Path
        The inventory file.

    Returns
    -------
    ClusterSpec
        Frozen description of the scheduler and every worker.

    Raises
    ------
    InventoryError
        The file is missing, not TOML, or a value is invalid; the message names file and key.
    """
    path = Path(path).expanduser().resolve()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InventoryError(f"{path}: inventory file not found (rpicluster init writes one)") from None
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError(f"{path}: not valid TOML: {exc}") from None
    return _Parser(path).cluster(data)


class _Parser:
    """Validation with error messages that name the file and the key path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, msg: str) -> InventoryError:
        return InventoryError(f"{self.path}: {where}: {msg}")

    def table(self, value: Any, where: str, allowed: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a table, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                raise self.fail(f"{where}.{key}" if where else key,
                                f"unknown key (known keys: {', '.join(allowed)})")
        return value

    def cluster(self, data: dict) -> ClusterSpec:
        self.table(data, "", TOP_KEYS)
        defaults = self.table(data.get("defaults", {}), "defaults", CONNECTION_KEYS)
        if "scheduler" not in data:
            raise self.fail("scheduler", "missing table (needs at least host = ...)")
        sched = self.table(data["scheduler"], "scheduler", SCHEDULER_KEYS)
        groups = data.get("workers", [])
        if not isinstance(groups, list) or not groups:
            raise self.fail("workers", "expected at least one [[workers]] group")
        workers: list[NodeSpec] = []
        seen: dict[str, str] = {}
        for i, group in enumerate(groups):
            where = f"workers[{i}]"
            group = self.table(group, where, WORKER_KEYS)
            for host in self.hosts(group, where):
                if host in seen:
                    raise self.fail(where, f"duplicate host {host!r} (also in {seen[host]})")
                seen[host] = where
                workers.append(self.node(host, {**defaults, **group}, where))
        if "host" not in sched:
            raise self.fail("scheduler.host", "missing (the address workers connect to)")
        host = self.host(sched["host"], "scheduler.host")
        scheduler = SchedulerSpec(
            host=host,
            scheduler_port=self.port(sched.get("scheduler_port", config.SCHEDULER_PORT),
                                     "scheduler.scheduler_port"),
            dashboard_port=self.port(sched.get("dashboard_port", config.DASHBOARD_PORT),
                                     "scheduler.dashboard_port"),
            node=self.node(host, {**defaults, **sched}, "scheduler"),
        )
        return ClusterSpec(path=self.path, scheduler=scheduler, workers=tuple(workers))

    def hosts(self, group: dict, where: str) -> list[str]:
        if ("host" in group) == ("hosts" in group):
            raise self.fail(where, "give exactly one of host = \"name\" or hosts = \"pi[01-04]\"")
        key = "host" if "host" in group else "hosts"
        value = group[key]
        if not isinstance(value, str):
            raise self.fail(f"{where}.{key}", f"expected a string, got {value!r}")
        try:
            names = expand_hosts(value)
        except ValueError as exc:
            raise self.fail(f"{where}.{key}", str(exc)) from None
        return [self.host(h, f"{where}.{key}") for h in names]

    def host(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not _HOST_RE.match(value):
            raise self.fail(where, f"{value!r} is not a host name or IP address "
                                   "(letters, digits, '.', '-', ':' only)")
        return value

    def port(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self.fail(where, f"{value!r} is not a port number (1-65535)")
        return value

    def str_path(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not _PATH_RE.match(value):
            raise self.fail(where, f"{value!r} is not an allowed path (no spaces or shell "
                                   "metacharacters such as ; & | $ ` ' \" < > *)")
        return value

    def local_path(self, value: Any, where: str) -> Path:
        p = Path(self.str_path(value, where)).expanduser()
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    def node(self, host: str, merged: dict, where: str) -> NodeSpec:
        user = merged.get("user", getpass.getuser())
        if not isinstance(user, str) or not _USER_RE.match(user):
            raise self.fail(f"{where}.user", f"{user!r} is not a user name")
        env = merged.get("env", {})
        if not isinstance(env, dict):
            raise self.fail(f"{where}.env", f"expected a table of NAME = \"value\", got {env!r}")
        for k, v in env.items():
            if not _NAME_RE.match(k) or not isinstance(v, str):
                raise self.fail(f"{where}.env.{k}", "expected NAME = \"string value\"")
        nthreads = merged.get("nthreads", 1)
        if isinstance(nthreads, bool) or not isinstance(nthreads, int) or nthreads < 1:
            raise self.fail(f"{where}.nthreads", f"{nthreads!r} is not a positive integer")
        tags = merged.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) and _TAG_RE.match(t)
                                                 for t in tags):
            raise self.fail(f"{where}.tags", f"{tags!r} is not a list of simple names")
        return NodeSpec(
            host=host,
            user=user,
            port=self.port(merged.get("port", 22), f"{where}.port"),
            key=self.local_path(merged.get("key", config.SSH_KEY), f"{where}.key"),
            known_hosts=self.local_path(merged.get("known_hosts", config.KNOWN_HOSTS),
                                        f"{where}.known_hosts"),
            python=self.str_path(merged.get("python", config.REMOTE_PYTHON), f"{where}.python"),
            local_directory=self.str_path(merged.get("local_directory", config.REMOTE_DIRECTORY),
                                          f"{where}.local_directory"),
            env=MappingProxyType(dict(env)),
            nthreads=nthreads,
            memory=self.memory(merged.get("memory"), f"{where}.memory"),
            tags=tuple(tags),
            data=(self.str_path(merged["data"], f"{where}.data") if "data" in merged else None),
        )

    def memory(self, value: Any, where: str) -> int | None:
        if value is None:
            return None
        from dask.utils import parse_bytes

        try:
            n = parse_bytes(value) if isinstance(value, str) else value
        except ValueError:
            n = None
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise self.fail(where, f"{value!r} is not a memory size such as \"3GiB\"")
        return n


EXAMPLE = '''\
# rpicluster inventory: the scheduler and the worker hosts of one cluster.
# Values in [defaults] apply to every host; any of them may be repeated in [scheduler] or in a
# [[workers]] group to override it there: user, port, key, known_hosts, python, local_directory, env.

[scheduler]
host = "192.168.1.10"          # this machine: started locally; another host: started over SSH
# scheduler_port = 8786
# dashboard_port = 8787

[defaults]
user = "pi"
key = "~/.ssh/id_ed25519"               # key authentication only (no passwords, no agent)
known_hosts = "~/.ssh/known_hosts"      # unknown hosts are refused unless --accept-new-hosts
python = "~/.venvs/rpicluster/bin/python"   # up --provision creates this venv
# local_directory = "~/.rpicluster/workers"   # each worker uses <local_directory>/<host>
# env = { OMP_NUM_THREADS = "1" }

[[workers]]
hosts = "pi[01-04].lan"        # ranges expand anywhere, zero padding kept: "10.0.0.[11-14]"
nthreads = 4
memory = "3GiB"
tags = ["rpi4"]                # Dask resources: tasks may ask for resources={"rpi4": 1}
# data = "~/data/local.zarr"   # this host's own store, for rpicluster federate

# [[workers]]
# host = "laptop.lan"
# user = "me"
# python = "/home/me/.venvs/rpicluster/bin/python"
# nthreads = 7
# memory = "12GiB"
'''


def write_example(path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a commented example inventory to ``path`` and return it.

    Raises
    ------
    InventoryError
        ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InventoryError(f"{path}: already exists (use --force to overwrite)")
    path.write_text(EXAMPLE)
    return path
