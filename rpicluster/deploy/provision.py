"""``up --provision``: give hosts without internet this machine's exact package versions.

On the desktop, a wheelhouse is built per host platform (architecture, Python, glibc): the
pinned dependency closure of rpicluster is fetched with ``pip download --only-binary=:all:
--platform ...`` for that platform, and rpicluster itself is built as a wheel. It is pushed over
SSH (``cat`` on a command's stdin: no SFTP needed), and the venv named by the node's ``python``
(``<venv>/bin/python``) is created with the host's ``python3`` and filled from the wheelhouse
only (``--no-index``; every pinned wheel is installed with ``--no-deps``, so exactly these
versions and nothing else).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

from rpicluster import __version__, config
from rpicluster.deploy.doctor import probe_host
from rpicluster.deploy.ssh import Connection, GroupResult, fan_out, shell_path
from rpicluster.errors import BootstrapError, ConfigError, HostsFailedError
from rpicluster.inventory import ClusterSpec, NodeSpec, load_inventory

#: Interpreter on a host that creates the venv (found on the remote PATH).
BASE_PYTHON = "python3"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_requirements(root: str = "rpicluster") -> list[str]:
    """``name==version`` for every installed distribution ``root`` needs (no extras), plus pip.

    Raises
    ------
    ConfigError
        A required distribution is not installed here.
    """
    from packaging.requirements import Requirement

    pins: dict[str, str] = {}
    done: set[tuple[str, str]] = set()
    todo = [(root, ""), ("pip", "")]
    while todo:
        name, extra = todo.pop()
        name = _canonical(name)
        if (name, extra) in done:
            continue
        done.add((name, extra))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise ConfigError(f"{name} is required by {root} but not installed here") from None
        pins[name] = dist.version
        for line in dist.requires or ():
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, e) for e in ("", *req.extras)]
    return [f"{n}=={v}" for n, v in sorted(pins.items())]


def platform_tags(arch: str, glibc: str | None) -> list[str]:
    """pip ``--platform`` tags a host with ``arch`` and ``glibc`` can install, newest first."""
    tags = []
    if glibc:
        major, minor = (int(x) for x in glibc.split(".")[:2])
        tags += [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 16, -1)]
        tags += [f"manylinux2014_{arch}"]
        if arch in ("x86_64", "i686"):
            tags += [f"manylinux2010_{arch}", f"manylinux1_{arch}"]
    return tags + [f"linux_{arch}"]


def _project_wheel(out: Path) -> Path:
    """Build rpicluster's own wheel from its source tree (it is not on an index)."""
    import rpicluster

    source = Path(rpicluster.__file__).resolve().parents[1]
    if not (source / "pyproject.toml").exists():
        raise ConfigError(f"--provision needs rpicluster installed from a source tree; "
                          f"{source} has no pyproject.toml")
    _pip(["wheel", "--no-deps", "-w", str(out), str(source)])
    (wheel,) = out.glob(f"rpicluster-{__version__}-*.whl")
    return wheel


def _pip(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BootstrapError(f"pip {' '.join(args[:1])} failed: {proc.stderr.strip()[-2000:]}")


def build_wheelhouse(facts: dict, out: Path, requirements: list[str]) -> Path:
    """Download ``requirements`` as wheels for the platform in ``facts`` into ``out``.

    ``facts`` is a host's :func:`rpicluster.deploy.health.probe` result; ``rpicluster`` in
    ``requirements`` is built from source instead of downloaded.
    """
    out.mkdir(parents=True, exist_ok=True)
    others = [r for r in requirements if _canonical(r.split("==")[0]) != "rpicluster"]
    if len(others) < len(requirements) and not list(out.glob(f"rpicluster-{__version__}-*.whl")):
        _project_wheel(out)
    if others:
        version = facts["python"].rsplit(".", 1)[0]
        args = ["download", "--only-binary=:all:", "--no-deps", "-d", str(out),
                "--python-version", version, "--implementation", "cp",
                "--abi", facts["python_tag"], "--abi", "abi3", "--abi", "none"]
        for tag in platform_tags(facts["arch"], facts["glibc"]):
            args += ["--platform", tag]
        _pip(args + others)
    return out


def _venv_of(node: NodeSpec) -> str:
    python = node.python.rstrip("/")
    if not re.search(r"/bin/python[0-9.]*$", python):
        raise ConfigError(f"{node.host}: python = {node.python!r} is not <venv>/bin/python; "
                          "--provision creates that venv")
    return python.rsplit("/bin/", 1)[0]


def provision(inventory: str | Path | ClusterSpec, *, accept_new_hosts: bool = False,
              ssh_timeout: float | None = None, requirements: list[str] | None = None,
              wheelhouse: Path | None = None) -> GroupResult:
    """Create every worker host's venv with this machine's exact package versions, offline.

    Parameters
    ----------
    inventory : path or ClusterSpec
        The TOML inventory; each node's ``python`` names the venv to create.
    requirements : list of str, optional
        Pinned requirements to install (default: :func:`pinned_requirements`).
    wheelhouse : Path, optional
        Where wheelhouses are built (default ``<state dir>/wheelhouse``), one per platform.

    Returns
    -------
    GroupResult
        Per host: the versions now installed.

    Raises
    ------
    HostsFailedError
        A host could not be provisioned; the others are.
    """
    spec = inventory if isinstance(inventory, ClusterSpec) else load_inventory(inventory)
    ssh_timeout = config.SSH_TIMEOUT if ssh_timeout is None else ssh_timeout
    requirements = pinned_requirements() if requirements is None else requirements
    wheelhouse = Path(wheelhouse or config.state_dir() / "wheelhouse")
    build_lock = threading.Lock()  # one pip at a time; hosts of one platform share the result

    def one(node: NodeSpec) -> dict:
        venv = _venv_of(node)
        with Connection(node, accept_new_hosts=accept_new_hosts, timeout=ssh_timeout) as conn:
            facts = probe_host(conn, {}, interpreter=BASE_PYTHON)
            key = f"{facts['arch']}-{facts['python_tag']}-glibc{facts['glibc']}"
            with build_lock:
                local = build_wheelhouse(facts, wheelhouse / key, requirements)
            wheels = sorted(local.glob("*.whl"))
            remote = conn.resolve(f"{node.local_directory}/wheelhouse")
            conn.makedirs(remote)
            for w in wheels:
                conn.put_file(w, f"{remote}/{w.name}")
            pip_wheel = next((w.name for w in wheels if w.name.startswith("pip-")), None)
            if pip_wheel is None:
                raise BootstrapError(f"{node.host}: the wheelhouse has no pip wheel")
            venv_sh = shell_path(venv)
            conn.run(f"{BASE_PYTHON} -m venv --without-pip {venv_sh}")
            names = " ".join(shell_path(f"{remote}/{w.name}") for w in wheels)
            # pip runs from its own wheel, so the host needs no ensurepip (python3-venv).
            conn.run(f"{venv_sh}/bin/python {shell_path(f'{remote}/{pip_wheel}')}/pip install "
                     f"--disable-pip-version-check --no-index --no-deps --force-reinstall "
                     f"-q {names}", timeout=config.PROVISION_TIMEOUT)
            res = conn.python(["-c", "import json, importlib.metadata as m; print(json.dumps("
                               "{d.metadata['Name']: d.version for d in m.distributions()}))"])
        return json.loads(res.stdout)

    results = fan_out(spec.workers, one)
    if not results.ok:
        raise HostsFailedError(f"{spec.path}: provisioning failed on some hosts:\n" + "\n".join(
            f"{h}: {r.error}" for h, r in results.failed.items()), results)
    return results

