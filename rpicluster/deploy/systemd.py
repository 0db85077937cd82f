"""systemd units for an inventory: ``rpicluster deploy systemd -c cluster.toml -o DIR``.

``up`` starts processes over SSH and ``down`` stops them; units instead let each host's systemd
start its worker at boot and restart it whenever it exits (a worker whose scheduler went away
closes for good, so ``Restart=always`` with backoff brings it back, as the supervisor of
:mod:`rpicluster.deploy.supervise` does for ``up``). A unit runs exactly
the command ``up`` runs on that host: the argv comes from :func:`rpicluster.deploy.remote.command`
fed the same start spec, with the inventory's interpreter in place of ``sys.executable`` and the
same work directory and TLS file layout (``<workdir>/tls/{ca,node,node-key}.pem``).

The templates (``templates/*.service.in``, package data so a wheel install renders too) are
filled with :class:`string.Template`; every value is quoted for systemd (``"..."`` with ``\\``
escapes, ``%`` and ``$`` doubled) and values no quoting can carry (control characters, newlines)
are refused with an error naming the host and the field.

Paths on a host are resolved without connecting to it: ``~`` is ``/home/<user>`` (``/root`` for
root), the Raspberry Pi OS and Debian layout. Manage a cluster either with ``up``/``down`` or
with these units, not both at once: ``up`` would record processes systemd owns.
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from rpicluster import config
from rpicluster.deploy import remote
from rpicluster.deploy.hosts import is_local_host
from rpicluster.deploy.state import cluster_dir, cluster_id
from rpicluster.deploy.tls import CertFiles, CertificateAuthority
from rpicluster.errors import ConfigError
from rpicluster.inventory import ClusterSpec, NodeSpec, load_inventory

SCHEDULER_UNIT = "rpicluster-scheduler.service"
WORKER_UNIT = "rpicluster-worker.service"
#: systemd's memory cap sits above Dask's own ``--memory-limit`` by this much: the nanny process
#: and interpreter overhead, so Dask's spill/pause/restart acts first and the kernel's OOM killer
#: only catches a runaway.
MEMORY_MARGIN = 256 * 2**20
#: File names of a node's TLS material in ``<workdir>/tls`` (the layout ``up`` pushes).
TLS_FILES = remote.TLS_FILES

_PLAIN = re.compile(r"^[A-Za-z0-9_./:=@+,-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check(value: str, where: str) -> str:
    """Refuse what no systemd quoting can carry (a newline would start a new setting)."""
    if _CONTROL.search(value):
        raise ConfigError(f"{where}: {value!r} contains a control character or newline, which "
                          "would break the systemd unit")
    return value


def quote_arg(value: str, where: str) -> str:
    """Quote one command-line argument for ``ExecStart=``.

    Specifiers (``%``) and variable references (``$``) are doubled so systemd passes them
    through literally; anything beyond a plain word is double-quoted with ``\\`` escapes.

    Examples
    --------
    >>> quote_arg("rpi4=4 gpu=1", "resources")
    '"rpi4=4 gpu=1"'
    """
    _check(value, where)
    literal = value.replace("%", "%%").replace("$", "$$")
    if _PLAIN.match(value):
        return literal
    return '"' + literal.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _setting(value: str, where: str) -> str:
    """A value for a one-value setting (``User=``, ``WorkingDirectory=``): specifiers escaped."""
    return _check(value, where).replace("%", "%%")


def _environment(env: dict[str, str], where: str) -> str:
    lines = []
    for name, value in env.items():
        item = f"{name}={_check(value, f'{where}.env.{name}')}".replace("%", "%%")
        lines.append('Environment="' + item.replace("\\", "\\\\").replace('"', '\\"') + '"\n')
    return "".join(lines)


def host_home(user: str) -> str:
    """The home directory of ``user`` on a Raspberry Pi OS / Debian host."""
    return "/root" if user == "root" else f"/home/{user}"


def host_path(path: str, home: str) -> str:
    """Resolve an inventory path the way a login shell on the host would see it.

    ``~`` and ``~/x`` use ``home``; ``~other/x`` uses ``/home/other``; a relative path is relative
    to ``home`` (where an SSH session starts); an absolute path is kept.
    """
    if path == "~" or path.startswith("~/"):
        return home + path[1:]
    if path.startswith("~"):
        user, _, rest = path[1:].partition("/")
        return host_home(user) + (f"/{rest}" if rest else "")
    return path if path.startswith("/") else f"{home}/{path}"


def _interpreter(python: str, home: str) -> str:
    # A bare name ("python3") is left for systemd's own executable search path.
    return python if "/" not in python and not python.startswith("~") else host_path(python, home)


@dataclass(frozen=True)
class Unit:
    """One rendered unit: where it goes, who runs it, and the TLS files it expects there.

    ``tls_dir`` is the directory on ``host`` the unit reads certificates from (None without
    TLS); ``cert_name`` is the name the cluster's CA issues them under.
    """

    host: str
    role: str
    filename: str
    text: str
    node: NodeSpec
    local: bool
    tls_dir: str | None
    cert_name: str

    @property
    def exec_start(self) -> str:
        """The ``ExecStart=`` value as written in the unit."""
        return next(line.split("=", 1)[1] for line in self.text.splitlines()
                    if line.startswith("ExecStart="))


def _template(name: str) -> Template:
    return Template(resources.files("rpicluster.deploy").joinpath("templates", name).read_text())


def _render(template: str, spec: dict, node: NodeSpec, python: str, *,
            inventory: Path, where: str, **extra: str) -> str:
    def line(argv: list[str]) -> str:
        return " ".join(quote_arg(a, f"{where}: argument {a!r}") for a in argv)

    workdir = _setting(spec["local_directory"], f"{where}.local_directory")
    # Dask's scratch space goes in the private work directory, never a shared $TMPDIR.
    env = {**dict(node.env), "DASK_TEMPORARY_DIRECTORY": workdir}
    env.update(config.dask_environ(env))
    return _template(template).substitute(
        host=node.host, inventory=_check(str(inventory), "inventory path"),
        user=_setting(node.user, f"{where}.user"), workdir=workdir,
        check_workdir=line([python, "-m", "rpicluster.deploy.workdir", workdir]),
        environment=_environment(env, where), exec_start=line([python, *remote.command(spec)[1:]]),
        **extra)


def scheduler_unit(spec: ClusterSpec, *, insecure: bool = False) -> Unit:
    """The scheduler's unit: ``dask scheduler`` as ``up`` starts it, with the dashboard preload.

    On this machine (the usual desktop) it runs as ``up`` runs it: as the current user, with this
    interpreter, in the cluster's state directory, reading its certificate from the CA directory.
    """
    import sys

    sched = spec.scheduler
    node = sched.node
    local = is_local_host(sched.host)
    if local:
        node = NodeSpec(**{**node.__dict__, "user": getpass.getuser()})
        python = sys.executable
        workdir = str(cluster_dir(cluster_id(spec.path)) / "scheduler")
        tls_dir = None if insecure else str(cluster_dir(cluster_id(spec.path)) / "tls")
        tls = tls_dir and {"ca": f"{tls_dir}/ca.pem", "cert": f"{tls_dir}/scheduler.pem",
                           "key": f"{tls_dir}/scheduler-key.pem"}
    else:
        home = host_home(node.user)
        python = _interpreter(node.python, home)
        workdir = host_path(f"{node.local_directory.rstrip('/')}/scheduler", home)
        tls_dir = None if insecure else f"{workdir}/tls"
        tls = remote.tls_paths(tls_dir)
    start = remote.start_spec("scheduler", sched, local_directory=workdir, tls=tls)
    text = _render(SCHEDULER_UNIT + ".in", start, node, python, inventory=spec.path,
                   where="scheduler", address=_address(spec, insecure))
    return Unit(sched.host, "scheduler", SCHEDULER_UNIT, text, node, local, tls_dir, "scheduler")


def _address(spec: ClusterSpec, insecure: bool) -> str:
    return f"{'tcp' if insecure else 'tls'}://{spec.scheduler.host}:{spec.scheduler.scheduler_port}"


def worker_unit(spec: ClusterSpec, node: NodeSpec, *, insecure: bool = False) -> Unit:
    """The unit of one worker: the nanny-backed ``dask worker`` ``up`` starts on ``node``."""
    home = host_home(node.user)
    workdir = host_path(node.workdir, home)
    tls_dir = None if insecure else f"{workdir}/tls"
    address = _address(spec, insecure)
    start = remote.start_spec("worker", node, local_directory=workdir,
                              tls=remote.tls_paths(tls_dir), scheduler=address)
    memory_max = f"MemoryMax={node.memory + MEMORY_MARGIN}\n" if node.memory else ""
    text = _render(WORKER_UNIT + ".in", start, node, _interpreter(node.python, home),
                   inventory=spec.path, where=f"worker {node.host}", scheduler=address,
                   memory_max=memory_max)
    return Unit(node.host, "worker", WORKER_UNIT, text, node, False, tls_dir, node.name)


def render_units(inventory: str | os.PathLike | ClusterSpec, *,
                 insecure: bool = False) -> tuple[Unit, ...]:
    """Render the scheduler's unit and one unit per worker, in inventory order.

    Parameters
    ----------
    inventory : path or ClusterSpec
        The TOML inventory (or one already loaded).
    insecure : bool
        Plain TCP (as ``up --insecure``); by default the units use the cluster's TLS files.

    Raises
    ------
    ConfigError
        A value would break a unit; the message names the host and the field.
    """
    spec = inventory if isinstance(inventory, ClusterSpec) else load_inventory(inventory)
    return (scheduler_unit(spec, insecure=insecure),
            *(worker_unit(spec, w, insecure=insecure) for w in spec.workers))


@dataclass(frozen=True)
class SystemdKit:
    """What :func:`write_units` wrote: the units, the install script and the client settings."""

    out_dir: Path
    units: tuple[Unit, ...]
    install_script: Path
    client_env: Path | None


def _ssh(node: NodeSpec) -> list[str]:
    return ["-i", str(node.key), "-o", f"UserKnownHostsFile={node.known_hosts}"]


def _target(node: NodeSpec, path: str | None = None) -> str:
    host = f"[{node.host}]" if ":" in node.host and path is not None else node.host
    return f"{node.user}@{host}" + (f":{path}" if path is not None else "")


def _install_lines(unit: Unit, unit_file: Path, cert_dir: Path | None) -> list[str]:
    """Shell lines that put one unit (and its certificates) in place and start it."""
    enable = (f"sudo install -m 0644 {{src}} /etc/systemd/system/{unit.filename} && "
              f"sudo systemctl daemon-reload && sudo systemctl enable --now {unit.filename}"
              "{cleanup}")
    if unit.local:
        # The scheduler on this machine reads its certificate from the CA directory directly.
        return [f"# {unit.host}: {unit.role} (this machine)",
                enable.format(src=shlex.quote(str(unit_file)), cleanup="")]
    n = unit.node
    ssh = ["ssh", "-p", str(n.port), *_ssh(n)]
    scp = ["scp", "-P", str(n.port), *_ssh(n)]
    # Staged in the login directory, not a world-writable /tmp.
    staged = unit.filename
    lines = [f"# {unit.host}: {unit.role}"]
    if cert_dir is not None:
        lines.append(shlex.join([*ssh, _target(n), f"mkdir -p -m 0700 {shlex.quote(unit.tls_dir)}"]))
        lines.append(shlex.join([*scp, "-p", *(str(cert_dir / f) for f in TLS_FILES.values()),
                                 _target(n, unit.tls_dir + "/")]))
    lines.append(shlex.join([*scp, str(unit_file), _target(n, staged)]))
    lines.append(shlex.join([*ssh, "-t", _target(n),
                             enable.format(src=staged, cleanup=f" && rm {staged}")]))
    return lines


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _copy_certs(certs: CertFiles, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for kind, name in TLS_FILES.items():
        _write_private(directory / name, getattr(certs, kind).read_bytes())


def write_units(inventory: str | os.PathLike | ClusterSpec, out_dir: str | os.PathLike, *,
                insecure: bool = False) -> SystemdKit:
    """Render every unit into ``out_dir``, with certificates and an install script.

    Layout: ``<out_dir>/<host>/rpicluster-{scheduler,worker}.service``, the host's TLS files
    next to each unit (``<host>/<role>-tls/``, mode 0600, issued by the same CA ``up`` uses),
    ``install.sh`` (scp/ssh lines to review and run; nothing is executed here) and
    ``client.env`` (Dask TLS settings for ``rpicluster ... --scheduler tls://...``).

    Parameters
    ----------
    inventory : path or ClusterSpec
        The TOML inventory.
    out_dir : path
        Output folder (created; files in it are replaced).
    insecure : bool
        Plain TCP units, no certificates.

    Returns
    -------
    SystemdKit
    """
    spec = inventory if isinstance(inventory, ClusterSpec) else load_inventory(inventory)
    units = render_units(spec, insecure=insecure)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ca = None if insecure else CertificateAuthority(cluster_dir(cluster_id(spec.path)) / "tls")
    if ca is not None:
        # The same rotation as `up`: a certificate near expiry or of a host that left.
        why = ca.rotate_if_needed({"scheduler", "client", *(u.cert_name for u in units)})
        if why is not None:
            warnings.warn(f"{spec.path}: new certificates ({why}); install every unit again "
                          "(install.sh): units installed before are refused from now on",
                          UserWarning, stacklevel=2)
    lines = ["#!/bin/sh", f"# Install the rpicluster units of {spec.path}: review, then run "
             "`sh install.sh` (sudo asks for each host's password).", "set -eu", ""]
    for unit in units:
        host_dir = out / unit.host
        host_dir.mkdir(parents=True, exist_ok=True)
        unit_file = host_dir / unit.filename
        unit_file.write_text(unit.text)
        cert_dir = None
        if ca is not None and not unit.local:
            cert_dir = host_dir / f"{unit.role}-tls"
            _copy_certs(ca.issue(unit.cert_name), cert_dir)
        elif ca is not None:
            ca.issue(unit.cert_name)
        lines += [*_install_lines(unit, unit_file.resolve(), cert_dir and cert_dir.resolve()), ""]
    script = out / "install.sh"
    script.write_text("\n".join(lines))
    client_env = None
    if ca is not None:
        client = ca.issue("client")
        client_env = out / "client.env"
        client_env.write_text(
            "# Dask TLS settings for commands run against these units: `. client.env`, then\n"
            f"# rpicluster train DATA -o MODEL --scheduler tls://{spec.scheduler.host}:"
            f"{spec.scheduler.scheduler_port}\n"
            f"export DASK_DISTRIBUTED__COMM__TLS__CA_FILE={shlex.quote(str(client.ca))}\n"
            f"export DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT={shlex.quote(str(client.cert))}\n"
            f"export DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY={shlex.quote(str(client.key))}\n"
            "export DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True\n")
    return SystemdKit(out, units, script, client_env)


__all__ = ["render_units", "write_units", "scheduler_unit", "worker_unit", "quote_arg",
           "host_path", "host_home", "Unit", "SystemdKit", "SCHEDULER_UNIT", "WORKER_UNIT"]
