"""The Pis rpicluster cannot run on, as users have them: refused in one line before anything is
pushed or started.

Real hosts, built by the arm64 fixture's machinery (:class:`rpicluster.testing_arm64.Arm64Hosts`
with another image): Raspberry Pi OS Bullseye's arm64 root (Debian 11, Python 3.9.2, under the
3.11 floor) and a 32-bit (armhf) bookworm root under qemu-arm, each with python3 and sshd only,
in a network namespace, logging in as ``pi`` with no venv yet.

Cost (loaded 2-core machine): each root is debootstrapped once (minbase) and cached beside the
arm64 one; see docs/pi-shelf.md for the measured build and test times.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from rpicluster.deploy.hostfacts import platform_problems, userland_arch
from rpicluster.deploy.ssh import Connection
from rpicluster.inventory import load_inventory
from rpicluster.testing_arm64 import ARMHF, BULLSEYE, VENV, WORKDIR, Arm64Hosts, unavailable


def _on_emulated_host(test):
    """Marks of a test on an emulated host (a first run debootstraps its root: fixtures count in
    the timeout)."""
    for mark in (pytest.mark.arm64, pytest.mark.netns, pytest.mark.timeout(2400)):
        test = mark(test)
    return test


#: Per image: the facts its host reports, and what the one line must say was found and to do.
EXPECTED = {
    BULLSEYE.name: {"facts": {"arch": "aarch64", "bits": 64, "glibc": "2.31"},
                    "python": "3.9.",
                    "found": "Python 3.9.2 (rpicluster needs >=3.11)",
                    "todo": "install a newer OS release (Raspberry Pi OS Bookworm has 3.11)"},
    ARMHF.name: {"facts": {"arch": "armv7l", "bits": 32, "glibc": "2.36"},
                 "python": "3.11.",
                 "found": "32-bit userland (armv7l: 32-bit Python, kernel armv7l",
                 "todo": "install the 64-bit (arm64) Raspberry Pi OS"},
}


@pytest.fixture(scope="module", params=[BULLSEYE, ARMHF], ids=lambda image: image.name)
def pi(request, tmp_path_factory):
    """One emulated host of the image, bare (no venv), and its inventory: (hosts, path, want)."""
    image = request.param
    reason = unavailable(image)
    if reason:
        pytest.skip(f"no emulated {image.name} host: {reason}")
    base = tmp_path_factory.mktemp(image.name)
    with Arm64Hosts(base / "hosts", 1, image=image, restore_venv=False) as hosts:
        path = hosts.write_inventory(base / "cluster.toml", local_directory=base / "x86")
        yield hosts, path, EXPECTED[image.name]


def _cli(*args, home):
    return subprocess.run([sys.executable, "-m", "rpicluster.cli", *args], capture_output=True,
                          text=True, timeout=600, cwd="/",
                          env={**os.environ, "RPICLUSTER_HOME": str(home)})


def _one_line(text: str, host: str, want: dict) -> str:
    """The single line of ``text`` that names ``host``; it says what was found and what to do."""
    (line,) = [ln for ln in text.splitlines() if host in ln]
    assert want["found"] in line and want["todo"] in line, line
    return line


@_on_emulated_host
def test_doctor_names_what_was_found_and_what_to_do(pi, tmp_path):
    """doctor on the bare host: its system python3's facts (the real ones), and the refusal in
    the host's row."""
    from rpicluster.deploy.doctor import doctor

    hosts, path, want = pi
    with Connection(load_inventory(path).workers[0], timeout=60) as conn:
        seen = conn.run("uname -m; id -un; echo $QEMU_CPU").stdout.split()
    assert seen == [want["facts"]["arch"], "pi", hosts.image.qemu_cpu]   # the image's CPU
    (check,) = doctor(path, ssh_timeout=60)
    facts = check.facts
    assert {k: facts[k] for k in want["facts"]} == want["facts"]
    assert facts["python"].startswith(want["python"]) and facts["system_python"]
    assert facts["provision"] is None           # no wheels planned for a host that cannot run them
    assert len(check.errors) == 1
    res = _cli("doctor", "-c", str(path), home=tmp_path / "home")
    assert res.returncode == 1 and "Traceback" not in res.stdout + res.stderr
    _one_line(res.stdout, hosts.hosts["pi1"].address, want)


@_on_emulated_host
def test_up_provision_refuses_before_anything_is_pushed_or_started(pi, tmp_path):
    """up --provision: one line for the host, no wheelhouse built here or pushed there, no venv
    made, no scheduler started."""
    hosts, path, want = pi
    home = tmp_path / "home"
    res = _cli("up", "-c", str(path), "--provision", home=home)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    address = hosts.hosts["pi1"].address
    line = _one_line(res.stderr, address, want)
    assert line.startswith(f"{address}: ")
    assert "failed" in res.stdout                # the table: the host's row
    assert not (home / "wheelhouse").exists()
    assert not (hosts.root / WORKDIR.lstrip("/")).exists()
    assert not (hosts.root / VENV.lstrip("/")).exists()
    sched = load_inventory(path).scheduler
    with pytest.raises(OSError):
        socket.create_connection((sched.host, sched.scheduler_port), timeout=5).close()


def test_a_32_bit_userland_on_a_64_bit_kernel_is_refused_too():
    """32-bit Raspberry Pi OS on a Pi 4 boots a 64-bit kernel: its Python says machine aarch64
    and 32 bits. qemu-arm reports armv7l, so the emulated host cannot show this: facts as such a
    Pi reports them."""
    facts = {"arch": "aarch64", "bits": 32, "python": "3.11.2",
             "os": "Raspbian GNU/Linux 12 (bookworm)"}
    assert userland_arch(facts) == "armv7l"
    (problem,) = platform_problems(facts)
    assert problem.startswith("32-bit userland (armv7l: 32-bit Python, kernel aarch64, Raspbian")
    assert "install the 64-bit (arm64) Raspberry Pi OS" in problem
