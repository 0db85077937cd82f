"""``up --provision``: give hosts without internet this machine's exact package versions.

On the desktop, a wheelhouse is built per host platform (architecture, Python, glibc): the
pinned dependency closure of rpicluster is fetched with ``pip download --only-binary=:all:
--platform ...`` for that platform, and rpicluster's own wheel comes from this install (built from
its source tree, or repacked from the installed files of a wheel install). It is pushed over
SSH (``cat`` on a command's stdin: no SFTP needed), and the venv named by the node's ``python``
(``<venv>/bin/python``) is created with the host's ``python3`` and filled from the wheelhouse
only (``--no-index``; every pinned wheel is installed with ``--no-deps``, so exactly these
versions and nothing else). A marker in the venv records each installed wheel's digest: only
the wheels that are new or changed are pushed and installed (``up --provision`` twice installs
once; after an edit of rpicluster's code, only its own wheel is installed again).

Before anything is pushed, each host is checked with its system Python alone (32-bit userland,
Python under the floor, a wheel missing for its platform, too little disk): one line per host.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from importlib import metadata
from pathlib import Path

from rpicluster import __version__, config
from rpicluster.deploy.hostfacts import BASE_PYTHON, platform_problems, probe_host
from rpicluster.deploy.ssh import Connection, GroupResult, fan_out, shell_path
from rpicluster.errors import BootstrapError, ConfigError, HostsFailedError
from rpicluster.inventory import ClusterSpec, NodeSpec, load_inventory


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


def _source_tree(dist: metadata.Distribution) -> Path | None:
    """The source tree rpicluster runs from (editable or in-place), or None for a wheel install."""
    import rpicluster

    try:
        url = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        url = {}
    if url.get("dir_info", {}).get("editable"):
        return Path(url["url"].removeprefix("file://"))
    source = Path(rpicluster.__file__).resolve().parents[1]
    if (source / "pyproject.toml").exists() and not (source / f"{dist.name}-{dist.version}"
                                                     ".dist-info").exists():
        return source
    return None


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def repack_installed(dist: metadata.Distribution, out: Path) -> Path:
    """Rebuild the wheel of an installed (non-editable) distribution from its files.

    Every file its RECORD lists inside site-packages goes back in (compiled ``.pyc`` and the
    installer's own records excepted; console scripts are made again from entry_points.txt by
    the installer), with a new RECORD.
    """
    skip = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    info = f"{dist.name}-{dist.version}.dist-info"
    tag = next((line.split(":", 1)[1].strip() for line in
                (dist.read_text("WHEEL") or "").splitlines() if line.startswith("Tag:")),
               "py3-none-any")
    wheel = out / f"{dist.name}-{dist.version}-{tag}.whl"
    tmp = wheel.with_name(wheel.name + ".partial")
    rows = []
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in dist.files or ():
            name = str(f)
            if (name.startswith("..") or "__pycache__" in f.parts or name.endswith(".pyc")
                    or (f.parts[0] == info and f.name in skip)):
                continue
            data = Path(dist.locate_file(f)).read_bytes()
            zf.writestr(name, data)
            rows.append(f"{name},{_record_hash(data)},{len(data)}")
        rows.append(f"{info}/RECORD,,")
        zf.writestr(f"{info}/RECORD", "\n".join(rows) + "\n")
    tmp.rename(wheel)
    return wheel


def _project_wheel(out: Path) -> Path:
    """rpicluster's own wheel (it is not on an index), from whatever this install is: built from
    its source tree (editable or in-place), else repacked from the installed files."""
    dist = metadata.distribution("rpicluster")
    source = _source_tree(dist)
    if source is None:
        return repack_installed(dist, out)
    _pip(["wheel", "--no-deps", "-w", str(out), str(source)])
    (wheel,) = out.glob(f"rpicluster-{__version__}-*.whl")
    return wheel


def _pip(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BootstrapError(f"pip {' '.join(args[:1])} failed: {proc.stderr.strip()[-2000:]}")


def platform_key(facts: dict) -> str:
    """The wheelhouse a host with these facts needs: ``aarch64-cp311-glibc2.36``."""
    return f"{facts['arch']}-{facts['python_tag']}-glibc{facts['glibc']}"


def build_wheelhouse(facts: dict, out: Path, requirements: list[str]) -> Path:
    """Download ``requirements`` as wheels for the platform in ``facts`` into ``out``.

    ``facts`` is a host's :func:`rpicluster.deploy.health.probe` result; ``rpicluster`` in
    ``requirements`` is this install's own wheel, made again each time (the code may have
    changed under the same version). Wheels already in ``out`` are used, so a wheel the index
    lacks can be put there by hand.

    Raises
    ------
    BootstrapError
        No wheel of a requirement for this platform (one line naming it), or pip failed.
    """
    out.mkdir(parents=True, exist_ok=True)
    others = [r for r in requirements if _canonical(r.split("==")[0]) != "rpicluster"]
    if len(others) < len(requirements):
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _project_wheel(Path(tmp))
            for old in out.glob("rpicluster-*.whl"):
                old.unlink()
            shutil.move(wheel, out / wheel.name)
    if others:
        version = facts["python"].rsplit(".", 1)[0]
        tags = platform_tags(facts["arch"], facts["glibc"])
        args = ["download", "--only-binary=:all:", "--no-deps", "-d", str(out),
                "--find-links", str(out), "--python-version", version, "--implementation", "cp",
                "--abi", facts["python_tag"], "--abi", "abi3", "--abi", "none"]
        for tag in tags:
            args += ["--platform", tag]
        try:
            _pip(args + others)
        except BootstrapError as exc:
            missing = re.search(r"No matching distribution found for (\S+)", str(exc))
            if missing is None:
                raise
            req = missing.group(1)
            raise BootstrapError(
                f"no wheel of {req} for {facts['arch']} / {facts['python_tag']} / glibc "
                f"{facts['glibc']} (pip found none for {tags[0]} or older); on this machine "
                f"install a {req.split('==')[0]} version that has one, or put its wheel in "
                f"{out}") from None
    return out


def wheel_digest(wheel: Path) -> str:
    """A digest of a wheel's name and contents (its RECORD, which hashes every file): the same
    for a wheel rebuilt from unchanged files, whatever the zip's timestamps."""
    with zipfile.ZipFile(wheel) as zf:
        record = next((n for n in zf.namelist() if n.endswith(".dist-info/RECORD")), None)
        data = zf.read(record) if record else wheel.read_bytes()
    return hashlib.sha256(wheel.name.encode() + b"\0" + data).hexdigest()


#: The installed venv takes about this many times its wheels' (compressed) size.
VENV_EXPANSION = 3
#: In the venv: ``{wheel file name: wheel_digest}`` of every wheel installed there.
MARKER = "rpicluster-wheels.json"


def _venv_of(node: NodeSpec) -> str:
    python = node.python.rstrip("/")
    if not re.search(r"/bin/python[0-9.]*$", python):
        raise ConfigError(f"{node.host}: python = {node.python!r} is not <venv>/bin/python; "
                          "--provision creates that venv")
    return python.rsplit("/bin/", 1)[0]


def one_line(message: str) -> str:
    """A host's error as one line: its first line, and the last line naming an error if the
    message goes on (pip's and a remote command's output)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return message.strip()
    last = [line for line in lines[1:] if "Error" in line or "error" in line]
    return f"{lines[0]} ... {last[-1] if last else lines[-1]}"[:600]


def provision(inventory: str | Path | ClusterSpec, *, accept_new_hosts: bool = False,
              ssh_timeout: float | None = None, requirements: list[str] | None = None,
              wheelhouse: Path | None = None) -> GroupResult:
    """Create every worker host's venv with this machine's exact package versions, offline.

    Each host is first checked with its system ``python3`` (:func:`platform_problems`: 32-bit
    userland, Python under rpicluster's floor), then its platform's wheelhouse is built here (a
    wheel missing for it is named), its disk checked for the wheelhouse and the venv, and only
    then anything is pushed. A venv already filled from the same wheelhouse is left alone.

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
        Per host: ``{"versions": {name: version}, "installed": [wheel file names], "wheels":
        int, "platform": key}``; ``installed`` is empty where the venv was already up to date.

    Raises
    ------
    HostsFailedError
        A host could not be provisioned (one line each); the others are.
    """
    spec = inventory if isinstance(inventory, ClusterSpec) else load_inventory(inventory)
    ssh_timeout = config.SSH_TIMEOUT if ssh_timeout is None else ssh_timeout
    requirements = pinned_requirements() if requirements is None else requirements
    wheelhouse = Path(wheelhouse or config.state_dir() / "wheelhouse")
    build_lock = threading.Lock()  # one pip at a time; hosts of one platform share the result

    def one(node: NodeSpec) -> dict:
        venv = _venv_of(node)
        with Connection(node, accept_new_hosts=accept_new_hosts, timeout=ssh_timeout) as conn:
            facts = probe_host(conn, {"directory": node.local_directory},
                               interpreter=BASE_PYTHON)
            problems = platform_problems(facts)
            if problems:
                raise BootstrapError(f"{node.host}: {problems[0]}")
            _refuse_non_venv(conn, node, venv)
            _refuse_own_venv(conn, node, venv)
            key = platform_key(facts)
            with build_lock:
                try:
                    local = build_wheelhouse(facts, wheelhouse / key, requirements)
                except BootstrapError as exc:
                    raise BootstrapError(f"{node.host}: {one_line(str(exc))}") from None
            wheels = sorted(local.glob("*.whl"))
            want = {w.name: wheel_digest(w) for w in wheels}
            venv_sh = shell_path(venv)
            have = _installed_wheels(conn, venv_sh)
            changed = [w for w in wheels if have.get(w.name) != want[w.name]]
            if changed:
                _check_disk(node, facts, changed)
                _install(conn, node, venv_sh, changed, fresh=not have)
                conn.put_bytes(json.dumps(want, indent=0).encode(),
                               f"{conn.resolve(venv)}/{MARKER}", mode=0o644)
            res = conn.python(["-c", _LIST_DISTRIBUTIONS])
        return {"versions": json.loads(res.stdout), "installed": [w.name for w in changed],
                "wheels": len(wheels), "platform": key}

    results = fan_out(spec.workers, one)
    if not results.ok:
        raise HostsFailedError(f"{spec.path}: provisioning failed on some hosts (nothing was "
                               "started):\n" + "\n".join(
                                   f"{h}: {one_line(r.error).removeprefix(f'{h}: ')}"
                                   for h, r in results.failed.items()), results)
    return results


def _check_disk(node: NodeSpec, facts: dict, wheels: list[Path]) -> None:
    """Refuse, in one line, a host whose disk cannot hold the wheelhouse and the venv."""
    size = sum(w.stat().st_size for w in wheels)
    need = size * (1 + VENV_EXPANSION)
    free = facts.get("disk_free")
    if free is not None and free < need:
        raise BootstrapError(
            f"{node.host}: {free >> 20} MiB free at {node.local_directory}, but the wheelhouse "
            f"needs {size >> 20} MiB and the venv about {(size * VENV_EXPANSION) >> 20} MiB "
            f"more; free {(need - free) >> 20} MiB there, or point local_directory and python "
            "at a bigger disk")


_LIST_DISTRIBUTIONS = ("import json, importlib.metadata as m; print(json.dumps("
                       "{d.metadata['Name']: d.version for d in m.distributions()}))")


def _refuse_non_venv(conn: Connection, node: NodeSpec, venv: str) -> None:
    """Refuse, in one line, a venv path that exists and is not a venv (``python =
    /usr/bin/python3`` names ``/usr``: creating a venv there and installing into it would
    overwrite the system's Python packages)."""
    path = shell_path(venv)
    if conn.run(f"test ! -e {path} || test -f {path}/pyvenv.cfg", check=False).exit_status:
        raise ConfigError(f"{node.host}: python = {node.python!r} is in {venv}, which exists and "
                          "is not a venv (no pyvenv.cfg); --provision creates or updates only a "
                          "venv: set python = ~/.venvs/rpicluster/bin/python (or another new "
                          "path)")


def _refuse_own_venv(conn: Connection, node: NodeSpec, venv: str) -> None:
    """Refuse, in one line, the venv running rpicluster here (a worker on this machine itself,
    whose ``python`` is this one): --provision would reinstall every package of it from the
    wheelhouse, an editable install of rpicluster becoming a frozen copy. Known by the host's
    machine id and the device and inode of the venv's ``pyvenv.cfg``."""
    try:
        here = (Path(sys.prefix) / "pyvenv.cfg").stat()
        machine = Path("/etc/machine-id").read_text().strip()
    except OSError:
        return  # not a venv, or no machine id: nothing to compare
    res = conn.run(f"cat /etc/machine-id && stat -c %d:%i {shell_path(venv)}/pyvenv.cfg",
                   check=False)
    if res.exit_status == 0 and res.stdout.split() == [machine, f"{here.st_dev}:{here.st_ino}"]:
        raise ConfigError(f"{node.host}: python = {node.python!r} is the venv running rpicluster "
                          f"on this machine ({sys.prefix}); --provision would reinstall it from "
                          "the wheelhouse: provision another venv for this worker (python = "
                          "~/.venvs/rpicluster/bin/python), or run up without --provision")


def _installed_wheels(conn: Connection, venv_sh: str) -> dict[str, str]:
    """The venv's marker (wheel name -> digest), less the wheels whose distribution is not
    installed there at that version (removed by hand since); empty without a venv or marker."""
    res = conn.run(f"cat {venv_sh}/{MARKER}", check=False)
    try:
        have = json.loads(res.stdout) if res.exit_status == 0 else {}
        if not isinstance(have, dict) or not have:
            return {}
        listed = conn.run(f"{venv_sh}/bin/python -c {shlex.quote(_LIST_DISTRIBUTIONS)}",
                          check=False)
        dists = {_canonical(n): v for n, v in
                 json.loads(listed.stdout.strip().splitlines()[-1]).items()}
    except (ValueError, IndexError):
        return {}
    return {w: d for w, d in have.items()
            if dists.get(_canonical(w.split("-")[0])) == w.split("-")[1]}


def _install(conn: Connection, node: NodeSpec, venv_sh: str, wheels: list[Path], *,
             fresh: bool) -> None:
    """Push ``wheels`` and install them into the venv (created first when ``fresh``) from the
    wheelhouse alone (no index, no dependencies)."""
    # A half-done install must not read as done: the marker is written again at the end.
    conn.run(f"rm -f {venv_sh}/{MARKER}")
    remote = conn.resolve(f"{node.local_directory}/wheelhouse")
    conn.makedirs(remote)
    for w in wheels:
        conn.put_file(w, f"{remote}/{w.name}")
    pip_wheel = next((w for w in wheels if w.name.startswith("pip-")), None)
    if fresh:
        if pip_wheel is None:
            raise BootstrapError(f"{node.host}: the wheelhouse has no pip wheel")
        conn.run(f"{BASE_PYTHON} -m venv --without-pip {venv_sh}")
    names = " ".join(shell_path(f"{remote}/{w.name}") for w in wheels)
    # pip runs from its own wheel when it is (re)installed, so the host needs no ensurepip.
    pip = (f"{venv_sh}/bin/python {shell_path(f'{remote}/{pip_wheel.name}')}/pip" if pip_wheel
           else f"{venv_sh}/bin/python -m pip")
    conn.run(f"{pip} install --disable-pip-version-check --no-index --no-deps "
             f"--force-reinstall -q {names}", timeout=config.PROVISION_TIMEOUT,
             what="pip install (wheelhouse)")
