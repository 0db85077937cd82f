"""Emulated Raspberry Pi hosts (ARM under qemu-user) beside the x86 namespace hosts.

:class:`Arm64Hosts` is :class:`rpicluster.testing.NamespaceHosts` where the hosts named in
``arm64`` run a Debian root for ARM under qemu-user (binfmt_misc), by default :data:`BOOKWORM`
(arm64 bookworm: 64-bit Raspberry Pi OS Bookworm): their sshd, and everything started over SSH,
is aarch64 code with ``QEMU_CPU=cortex-a72`` (without it qemu emulates its "max" CPU, numpy sees
SVE/SME and OpenBLAS picks a kernel no Pi has; with it, a wheel that uses instructions a Pi 4
lacks dies with "illegal instruction" here, not on a Pi). The other images are the hosts users
have that rpicluster must refuse in one line: :data:`BULLSEYE` (Raspberry Pi OS Bullseye's
Python 3.9) and :data:`ARMHF` (32-bit Raspberry Pi OS).

Each root is built once by ``debootstrap`` and cached outside the repository in
``$RPICLUSTER_ARM64_CACHE/<image>-root`` (default ``/var/cache/rpicluster-arm64``), built
in ``<image>-root.partial`` and renamed when complete, so a killed build is never taken for a
root. Each :class:`Arm64Hosts` mounts an overlay on it (the cache stays as debootstrap left it;
the hosts' writes go to the instance's directory), with proc, sysfs, devpts and /dev/shm, adds
user ``pi`` and runs sshd there in the host's namespace (no route out: provisioning is
offline). The provisioned venv can be kept in the cache (:meth:`Arm64Hosts.save_venv`) and is
put back into the next instance's root, so a developer's rerun skips the ~6 min of pip under
emulation: ``up --provision`` then installs only the wheels that changed (rpicluster's own,
after an edit).

Every session on an emulated host gets the image's ``QEMU_CPU`` from ``~/.ssh/environment``
(``PermitUserEnvironment``): sshd's own ``SetEnv`` came with OpenSSH 8.7, after bullseye's 8.4.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from rpicluster.testing import NamespaceHosts, TestHost, sshd_config, unavailable as _netns



@dataclass(frozen=True)
class Image:
    """A Debian root for ARM that qemu-user runs: what debootstrap builds, and the CPU emulated.

    ``name`` names the cached root (``<name>-root``); ``machine`` is what ``uname -m`` says in
    it under qemu (the check that the build is complete); ``qemu`` the binfmt_misc entry (and
    ``<qemu>-static`` the interpreter) that runs its binaries.
    """

    name: str
    suite: str
    arch: str
    machine: str
    qemu: str
    qemu_cpu: str
    include: str
    variant: str | None = None

    @property
    def root(self) -> Path:
        """The cached root (complete when it exists)."""
        return cache_dir() / f"{self.name}-root"


#: 64-bit Raspberry Pi OS Bookworm: what a Pi OS host has before provisioning (python3-venv,
#: ca-certificates), plus sshd to reach it.
BOOKWORM = Image("bookworm", "bookworm", "arm64", "aarch64", "qemu-aarch64", "cortex-a72",
                 "python3,python3-venv,openssh-server,ca-certificates")
#: Raspberry Pi OS Bullseye (64-bit): Python 3.9.2, under rpicluster's floor. Only what the
#: refusal needs (minbase: no venv, no provisioning).
BULLSEYE = Image("bullseye", "bullseye", "arm64", "aarch64", "qemu-aarch64", "cortex-a72",
                 "python3,openssh-server", "minbase")
#: 32-bit Raspberry Pi OS (armhf) Bookworm. qemu-arm has no Cortex-A72 (its AArch32 side is
#: ARMv8's, which qemu offers only in qemu-aarch64): the Cortex-A7 is the ARMv7 core a Pi 2
#: has, and Debian's armhf is built for ARMv7.
ARMHF = Image("bookworm-armhf", "bookworm", "armhf", "armv7l", "qemu-arm", "cortex-a7",
              "python3,openssh-server", "minbase")

#: Every image the tests use (CI builds them all from scratch: .ci/run).
IMAGES = (BOOKWORM, BULLSEYE, ARMHF)
QEMU_CPU = BOOKWORM.qemu_cpu
USER = "pi"
#: Where ``up --provision`` puts the venv, and the workers' directory, on an arm64 host.
VENV = "/home/pi/.venvs/rpicluster"
PYTHON = f"{VENV}/bin/python"
WORKDIR = "/home/pi/rpicluster"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
#: Inside the root: the test hosts' sshd files.
_ETC = "etc/rpicluster-test"


def cache_dir() -> Path:
    """``$RPICLUSTER_ARM64_CACHE``, default ``/var/cache/rpicluster-arm64``."""
    return Path(os.environ.get("RPICLUSTER_ARM64_CACHE") or "/var/cache/rpicluster-arm64")


def enable_binfmt(image: Image = BOOKWORM) -> str | None:
    """Make the kernel run the image's binaries through qemu (mount binfmt_misc, register its
    qemu with flag F so it works in a chroot); why not, or None."""
    qemu = f"{image.qemu}-static"
    if shutil.which(qemu) is None:
        return f"{qemu} is missing (apt-get install qemu-user-static binfmt-support)"
    if not (BINFMT / "status").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
                       capture_output=True)
    entry = BINFMT / image.qemu
    if not entry.exists() and shutil.which("update-binfmts"):
        subprocess.run(["update-binfmts", "--enable", image.qemu], capture_output=True)
    try:
        text = entry.read_text()
    except OSError:
        return (f"binfmt_misc has no {image.qemu} entry ({entry}); run "
                f"update-binfmts --enable {image.qemu} (package binfmt-support)")
    flags = re.search(r"^flags: *(\S*)", text, re.M)
    if not text.startswith("enabled") or flags is None or "F" not in flags.group(1):
        return f"{entry} is not enabled with flag F (it must work inside a chroot): {text[:80]!r}"
    return None


def unavailable(image: Image = BOOKWORM) -> str | None:
    """Why hosts of ``image`` cannot be built here, or None when they can."""
    reason = _netns()
    if reason:
        return reason
    if os.uname().machine != "x86_64":
        return (f"the emulated hosts emulate {image.arch} on x86_64 (this is "
                f"{os.uname().machine})")
    if "overlay" not in Path("/proc/filesystems").read_text():
        subprocess.run(["modprobe", "overlay"], capture_output=True)
        if "overlay" not in Path("/proc/filesystems").read_text():
            return "the kernel has no overlay filesystem"
    reason = enable_binfmt(image)
    if reason:
        return reason
    if not image.root.exists() and shutil.which("debootstrap") is None:
        return f"no {image.name} root at {image.root} and debootstrap is missing to build it"
    return None


def debian_mirror() -> str:
    """The Debian mirror apt already uses here (deb822 or one-line sources), else deb.debian.org."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    try:
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                for uri in line.split()[1:]:
                    if uri.rstrip("/").endswith("/debian"):
                        return uri
    except OSError:
        pass
    try:
        for line in Path("/etc/apt/sources.list").read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["deb"] and parts[-3:-2] != [] and "/debian" in line:
                return next(p for p in parts if p.startswith("http"))
    except (OSError, StopIteration):
        pass
    return "http://deb.debian.org/debian"


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or under ``path``, deepest first."""
    prefix = str(path)
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            point = line.split()[1].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _umount(point: str, timeout: float = 30.0) -> None:
    """Unmount ``point``, retrying while processes that just died still hold it."""
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run(["umount", point], capture_output=True, text=True)
        if proc.returncode == 0 or not os.path.ismount(point):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"cannot unmount {point}: {proc.stderr.strip()}")
        time.sleep(0.2)


def _builder_running(partial: Path) -> bool:
    """Whether a process (a debootstrap of another session) is building ``partial``."""
    needle = str(partial).encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def build_root(image: Image = BOOKWORM, log: Path | None = None, timeout: float = 3600) -> Path:
    """The cached root of ``image``, built by debootstrap first when it is missing (arm64
    bookworm ~8 min, loaded).

    Built in ``<root>.partial`` and renamed when ``chroot <root> uname -m`` says the image's
    machine: an interrupted build is started over, never used. One build of a root at a time (a
    lock file); a build another process has running (its command line names the partial root)
    is waited for.
    """
    root = image.root
    if root.exists():
        return root
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    partial = root.with_name(root.name + ".partial")
    with open(cache / f".{image.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        deadline = time.monotonic() + timeout
        while not root.exists() and _builder_running(partial):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{partial} is still being built after {timeout:.0f} s")
            time.sleep(5)
        if root.exists():
            return root
        if partial.exists():
            for point in _mounts_under(partial):
                _umount(point)
            subprocess.run(["rm", "-rf", "--one-file-system", str(partial)], check=True)
        out = open(log, "w") if log else subprocess.DEVNULL
        try:
            variant = [f"--variant={image.variant}"] if image.variant else []
            proc = subprocess.run(
                ["debootstrap", f"--arch={image.arch}", *variant, f"--include={image.include}",
                 image.suite, str(partial), debian_mirror()],
                stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        finally:
            if log:
                out.close()
        for point in _mounts_under(partial):
            _umount(point)
        if proc.returncode != 0:
            raise RuntimeError(f"debootstrap of the {image.name} root failed (exit "
                               f"{proc.returncode})" + (f"; see {log}" if log else ""))
        arch = _chroot(partial, "uname", "-m", cpu=image.qemu_cpu).stdout.strip()
        if arch != image.machine:
            raise RuntimeError(f"{partial}: uname -m says {arch!r} under qemu, not "
                               f"{image.machine}")
        partial.rename(root)
    return root


def _chroot(root: Path, *cmd: str, cpu: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["chroot", str(root), *cmd], capture_output=True, text=True,
                          check=check, env={**os.environ, "QEMU_CPU": cpu})


class Arm64Hosts(NamespaceHosts):
    """Namespace sshd hosts of which those in ``arm64`` are emulated Pis (64-bit ARM, unless
    ``image`` says otherwise).

    Parameters
    ----------
    directory : Path
        Where keys, configs, the overlay's upper layer and logs go.
    n : int
        Number of hosts (pi1 .. piN).
    arm64 : iterable of str, optional
        Names of the emulated hosts (default: all). The others are x86 namespace hosts.
    image : Image
        The emulated hosts' root: :data:`BOOKWORM` (default), :data:`BULLSEYE` or
        :data:`ARMHF`.
    restore_venv : bool
        Put the venv kept by :meth:`save_venv` back into the root (default true; env
        ``RPICLUSTER_ARM64_FRESH=1`` turns it off: a bare host, as on a fresh machine).
    **kwargs
        As for :class:`~rpicluster.testing.NamespaceHosts` (``cpu_capped``, ...).

    Attributes
    ----------
    root : Path
        The emulated hosts' filesystem as this machine sees it (``root / "home/pi"`` is pi's home).
    restored : bool
        Whether a cached venv was put back (the host is not bare).

    The arm64 hosts log in as user ``pi``; :meth:`write_inventory` gives them
    ``python = VENV/bin/python`` and ``local_directory = /home/pi/rpicluster``. They share one
    root (as the x86 hosts share this machine's filesystem). Paths of this machine are not
    visible there: :meth:`share` bind-mounts a folder at the same path (like an NFS export).
    """

    def __init__(self, directory: str | Path, n: int = 1, *, arm64=None, image: Image = BOOKWORM,
                 restore_venv: bool | None = None, **kwargs) -> None:
        reason = unavailable(image)
        if reason:
            raise RuntimeError(reason)
        self.arm64 = set(arm64) if arm64 is not None else {f"pi{i}" for i in range(1, n + 1)}
        if restore_venv is None:
            restore_venv = os.environ.get("RPICLUSTER_ARM64_FRESH", "") in ("", "0")
        self._restore_venv = restore_venv
        self.image = image
        self.restored = False
        self._mounts: list[str] = []
        self.root = Path(directory) / "arm64-root"
        super().__init__(directory, n, **kwargs)

    # ----------------------------------------------------------------- the root

    def _build(self, n, cpu_capped, cpu_quota, without_sftp) -> None:
        lower = build_root(self.image, log=self.directory / "debootstrap.log")
        upper, work = self.directory / "arm64-upper", self.directory / "arm64-work"
        for d in (upper, work, self.root):
            d.mkdir(exist_ok=True)
        self._mount(["-t", "overlay", "overlay", "-o",
                     f"lowerdir={lower},upperdir={upper},workdir={work}"], self.root)
        # sshd runs in the mount namespace ``ip netns exec`` makes (a slave of this one): what
        # share() mounts later reaches it only through a shared mount.
        subprocess.run(["mount", "--make-rshared", str(self.root)], check=True,
                       capture_output=True)
        self._mount(["-t", "proc", "proc"], self.root / "proc")
        self._mount(["-t", "sysfs", "-o", "ro", "sysfs"], self.root / "sys")
        # This machine's sysfs describes its x86 cores, which no Pi has: onnxruntime's cpuinfo
        # parses it and dies under qemu (signal 11). An empty folder reads as on a board whose
        # kernel says nothing, and the emulated Cortex-A72 is what the programs then see.
        self._mount(["-t", "tmpfs", "-o", "ro,mode=0755", "tmpfs"],
                    self.root / "sys/devices/system/cpu")
        self._mount(["-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=0620", "devpts"],
                    self.root / "dev/pts")
        (self.root / "dev/shm").mkdir(exist_ok=True)
        self._mount(["-t", "tmpfs", "-o", "mode=1777", "tmpfs"], self.root / "dev/shm")
        (self.root / "run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        cpu = self.image.qemu_cpu
        if _chroot(self.root, "id", USER, cpu=cpu, check=False).returncode != 0:
            _chroot(self.root, "useradd", "-m", "-s", "/bin/bash", USER, cpu=cpu)
        # useradd leaves the account locked ("!"), and sshd refuses a locked account even for
        # key logins; "*" is unlocked with no password.
        _chroot(self.root, "usermod", "-p", "*", USER, cpu=cpu)
        uid = int(_chroot(self.root, "id", "-u", USER, cpu=cpu).stdout)
        # Every session's processes emulate the image's CPU (a Pi 4's), not qemu's "max".
        ssh = self.root / "home" / USER / ".ssh"
        ssh.mkdir(exist_ok=True)
        (ssh / "environment").write_text(f"QEMU_CPU={cpu}\n")
        os.chown(ssh, uid, uid)
        cached = self._venv_cache()
        if self._restore_venv and (cached / "bin" / "python").exists():
            target = self.root / VENV.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", str(cached), str(target)], check=True)
            os.chown(target.parent, uid, uid)
            self.restored = True
        super()._build(n, cpu_capped, cpu_quota, without_sftp)

    def _mount(self, args: list[str], point: Path) -> None:
        subprocess.run(["mount", *args, str(point)], check=True, capture_output=True)
        self._mounts.append(str(point))

    def share(self, path: str | Path) -> None:
        """Bind-mount this machine's folder ``path`` into the arm64 root at the same path."""
        path = Path(path).resolve()
        inside = self.root / str(path).lstrip("/")
        inside.mkdir(parents=True, exist_ok=True)
        self._mount(["--bind", str(path)], inside)

    def _venv_cache(self) -> Path:
        """Where :meth:`save_venv` keeps this image's provisioned venv."""
        return cache_dir() / f"{self.image.name}-venv"

    def save_venv(self) -> bool:
        """Keep the arm64 hosts' provisioned venv in the cache for the next instance, unless the
        cached one has the same wheels (``up --provision``'s marker); whether it was saved.

        Replaced atomically: copied to ``venv.partial``, then renamed over the old one.
        """
        from rpicluster.deploy.provision import MARKER

        source = self.root / VENV.lstrip("/")
        target = self._venv_cache()
        try:
            if (source / MARKER).read_bytes() == (target / MARKER).read_bytes():
                return False
        except FileNotFoundError:
            if not (source / MARKER).exists():
                return False        # not provisioned (or half done): nothing worth keeping
        partial, old = (target.with_name(target.name + s) for s in (".partial", ".old"))
        for d in (partial, old):
            subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=True)
        subprocess.run(["cp", "-a", str(source), str(partial)], check=True)
        if target.exists():
            target.rename(old)
        partial.rename(target)
        subprocess.run(["rm", "-rf", "--one-file-system", str(old)], check=True)
        return True

    # ----------------------------------------------------------------- the hosts

    def _host_dir(self, name: str) -> Path:
        if name in self.arm64:
            return self.root / _ETC / name
        return super()._host_dir(name)

    def _inventory_lines(self, name: str) -> str:
        if name not in self.arm64:
            return ""
        return f'user = "{USER}"\npython = "{PYTHON}"\nlocal_directory = "{WORKDIR}"\n'

    def _start_sshd(self, host: TestHost, hdir: Path, authorized: Path, *,
                    sftp: bool) -> subprocess.Popen:
        if host.name not in self.arm64:
            return super()._start_sshd(host, hdir, authorized, sftp=sftp)
        inside = f"/{_ETC}/{host.name}"
        keys = self.root / _ETC / "authorized_keys"
        shutil.copyfile(authorized, keys)
        (hdir / "sshd_config").write_text(sshd_config(
            host, inside, f"/{_ETC}/authorized_keys", sftp=sftp,
            # QEMU_CPU from pi's ~/.ssh/environment (written by _build), for every session.
            extra=["PermitRootLogin no", "PermitUserEnvironment QEMU_CPU"]))
        return subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "env", f"QEMU_CPU={self.image.qemu_cpu}",
             "chroot", str(self.root), "/usr/sbin/sshd", "-D", "-f", f"{inside}/sshd_config",
             "-E", f"{inside}/sshd.log"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self) -> None:
        """Stop every process (as NamespaceHosts does), then unmount everything mounted."""
        super().close()
        # Processes in the root that outlived their namespace's kill (none expected).
        for point in reversed(self._mounts):
            _umount(point)
        self._mounts.clear()
        left = _mounts_under(self.root)
        if left:
            raise RuntimeError(f"still mounted after close: {left}")
