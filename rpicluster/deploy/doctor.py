"""Preflight checks of every host of an inventory, in parallel: ``rpicluster doctor``.

Each host gets :mod:`rpicluster.deploy.health` sent to its interpreter over SSH (so the checks
work before rpicluster is installed there) and its facts are compared with this machine's:
package versions must match exactly (tasks and models are pickled between them). A host with no
venv yet is probed with its system ``python3``: its platform, memory, disk and health are
reported with the wheels ``up --provision`` would install there.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rpicluster import config
from rpicluster.deploy import health
from rpicluster.deploy.hostfacts import (BASE_PYTHON, InterpreterMissing, platform_problems,
                                         probe_host, userland_arch)
from rpicluster.deploy.hosts import is_local_host
from rpicluster.deploy.ssh import Connection, fan_out
from rpicluster.errors import SSHError
from rpicluster.inventory import ClusterSpec, NodeSpec, load_inventory

#: Less free disk than this in the worker directory's filesystem is a warning.
MIN_DISK = 1 << 30


@dataclass(frozen=True)
class HostCheck:
    """``doctor``'s findings on one host: the facts, and the problems (errors, then warnings)."""

    host: str
    facts: dict = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


def local_versions() -> dict[str, str | None]:
    """Versions of the packages that must match, on this machine."""
    return health.probe()["versions"]


def compare(facts: dict, desktop: dict, node: NodeSpec) -> tuple[list[str], list[str]]:
    """Errors and warnings of one host's facts against this machine's."""
    errors, warnings = platform_problems(facts), []
    if facts["python"].rsplit(".", 1)[0] != desktop["python"].rsplit(".", 1)[0]:
        errors.append(f"python {facts['python']} here, {desktop['python']} on the desktop")
    for name, want in desktop["versions"].items():
        have = facts["versions"].get(name)
        if have != want:
            errors.append(f"{name} {have or 'missing'} here, {want or 'missing'} on the desktop")
    if facts["scheduler_error"]:
        errors.append(f"scheduler port unreachable from the host: {facts['scheduler_error']}")
    if node.memory and facts["mem_available"] and node.memory > facts["mem_available"]:
        warnings.append(f"memory limit {node.memory >> 20} MiB > {facts['mem_available'] >> 20} "
                        "MiB available")
    if facts["disk_free"] is not None and facts["disk_free"] < MIN_DISK:
        warnings.append(f"only {facts['disk_free'] >> 20} MiB free disk")
    current = [f for f in facts["throttled"] or () if not f.endswith("occurred")]
    if current:
        warnings.append("Pi health: " + ", ".join(current))
    return errors, warnings


@contextmanager
def _scheduler_port_open(spec: ClusterSpec):
    """Listen on the scheduler's address while checking, if it is this machine and free.

    The scheduler is usually not running yet; what matters is whether hosts can reach its port.
    """
    sock = None
    if is_local_host(spec.scheduler.host):
        sock = socket.socket()
        try:
            sock.bind((spec.scheduler.host, spec.scheduler.scheduler_port))
            sock.listen(64)
        except OSError:   # already in use: the scheduler is up and answers itself
            sock.close()
            sock = None
    try:
        yield
    finally:
        if sock is not None:
            sock.close()


def doctor(inventory: str | Path | ClusterSpec, *, accept_new_hosts: bool = False,
           ssh_timeout: float | None = None) -> list[HostCheck]:
    """Check every worker host of an inventory, in parallel; one result per host, in order
    (:func:`check_scheduler` checks the scheduler's).

    Parameters
    ----------
    inventory : path or ClusterSpec
        The TOML inventory.
    accept_new_hosts : bool
        Trust and record unknown host keys.
    ssh_timeout : float, optional
        Seconds for connecting to one host (default ``config.SSH_TIMEOUT``).

    Returns
    -------
    list of HostCheck
        ``ok`` is false for a host with any error (unreachable, version mismatch, ...).
    """
    spec = inventory if isinstance(inventory, ClusterSpec) else load_inventory(inventory)
    ssh_timeout = config.SSH_TIMEOUT if ssh_timeout is None else ssh_timeout
    desktop = health.probe()
    sched = spec.scheduler

    def check(node: NodeSpec) -> HostCheck:
        args = {"scheduler_host": sched.host, "scheduler_port": sched.scheduler_port,
                "directory": node.local_directory}
        with Connection(node, accept_new_hosts=accept_new_hosts, timeout=ssh_timeout) as conn:
            try:
                facts = probe_host(conn, args)
            except InterpreterMissing as missing:
                try:   # not provisioned yet: what the system Python can tell
                    facts = probe_host(conn, args, interpreter=BASE_PYTHON)
                except SSHError:
                    return HostCheck(node.host, {"reachable": True}, (str(missing),))
                return _unprovisioned(node, facts, spec)
            except SSHError as exc:
                return HostCheck(node.host, {"reachable": True}, (str(exc),))
        errors, warnings = compare(facts, desktop, node)
        return HostCheck(node.host, {"reachable": True, **facts}, tuple(errors), tuple(warnings))

    with _scheduler_port_open(spec):
        results = fan_out(spec.workers, check)
    return [r.value if r.ok else HostCheck(h, {"reachable": False}, (r.error,))
            for h, r in results.items()]


def check_scheduler(inventory: str | Path | ClusterSpec, *, accept_new_hosts: bool = False,
                    ssh_timeout: float | None = None) -> HostCheck:
    """The scheduler's host, as ``HOST (scheduler)`` (``doctor`` lists it first): this
    machine's facts when the scheduler runs here, else the checks :func:`doctor` makes of a
    worker, over SSH."""
    spec = inventory if isinstance(inventory, ClusterSpec) else load_inventory(inventory)
    sched = spec.scheduler
    name = f"{sched.host} (scheduler)"
    if is_local_host(sched.host):
        return HostCheck(name, {"reachable": True, **health.probe(), "scheduler_error": None})
    local = dataclasses.replace(spec, workers=(sched.node,))
    [found] = doctor(local, accept_new_hosts=accept_new_hosts, ssh_timeout=ssh_timeout)
    return dataclasses.replace(found, host=name)


def _unprovisioned(node: NodeSpec, facts: dict, spec: ClusterSpec) -> HostCheck:
    """The check of a host with no venv yet: its system Python's facts, its platform problems,
    and the wheels ``up --provision`` would install (``facts["provision"]``)."""
    from rpicluster.deploy.provision import pinned_requirements, platform_key, platform_tags

    problems = platform_problems(facts)
    plan = None
    if not problems:
        plan = {"platform": platform_key(facts),
                "tag": platform_tags(facts["arch"], facts["glibc"])[0],
                "wheels": pinned_requirements()}
        problems = [f"no venv at {node.python} yet: rpicluster up -c {spec.path} --provision "
                    f"installs {len(plan['wheels'])} wheels for {plan['tag']} "
                    f"{facts['python_tag']} there (no internet needed on the host)"]
    facts = {"reachable": True, **facts, "versions": {}, "provision": plan,
             "system_python": True}
    return HostCheck(node.host, facts, tuple(problems))


def table_rows(checks: list[HostCheck]) -> tuple[list[str], list[list[object]]]:
    """Columns and rows of the doctor table."""
    from dask.utils import format_bytes

    def size(v):
        return format_bytes(v) if v is not None else "?"

    columns = ["host", "ok", "arch", "os / glibc", "python", "packages", "mem avail", "disk free",
               "scheduler", "temp", "throttled", "problems"]
    rows = []
    for c in checks:
        f = c.facts
        if "arch" not in f:
            rows.append([c.host, "FAIL", *[""] * 9, "; ".join(c.errors)])
            continue
        mismatched = [e.split()[0] for e in c.errors if "on the desktop" in e]
        if f.get("system_python"):
            plan = f.get("provision")
            packages = (f"not installed; --provision: {len(plan['wheels'])} wheels"
                        if plan else "not installed")
        else:
            packages = "match" if not mismatched else "MISMATCH: " + ", ".join(mismatched)
        rows.append([
            c.host, "ok" if c.ok else "FAIL", userland_arch(f),
            f"{f['os']} / glibc {f['glibc']}", f["python"], packages,
            size(f["mem_available"]), size(f["disk_free"]),
            "reachable" if not f["scheduler_error"] else "UNREACHABLE",
            f"{f['temperature']:.1f} C" if f["temperature"] is not None else "n/a",
            ("n/a" if f["throttled"] is None else ", ".join(f["throttled"]) or "none"),
            "; ".join([*c.errors, *c.warnings])])
    return columns, rows
