"""What a host is, learned over SSH with any Python it has (no rpicluster needed there).

:func:`probe_host` sends :mod:`rpicluster.deploy.health` to a host's interpreter;
:func:`platform_problems` says, from those facts, what keeps a host from running rpicluster at
all. ``doctor`` and ``up --provision`` both use them, before anything is installed or started.
"""

from __future__ import annotations

import json
from pathlib import Path

from rpicluster.deploy import health
from rpicluster.deploy.ssh import Connection
from rpicluster.errors import SSHError

#: Architectures (of the userland) with wheels for the whole stack: numpy, scikit-learn and
#: onnxruntime publish none for 32-bit ARM (armhf, armv7l).
SUPPORTED_ARCH = ("aarch64", "x86_64")
#: The interpreter that creates the venv on a host (found on the remote PATH).
BASE_PYTHON = "python3"


class InterpreterMissing(SSHError):
    """The interpreter named for a host does not exist there."""


def userland_arch(facts: dict) -> str:
    """The architecture the host's programs are built for: ``armv7l`` for a 32-bit Python on an
    aarch64 kernel (a 32-bit Raspberry Pi OS on a 64-bit kernel reports the kernel's machine)."""
    if facts["arch"] == "aarch64" and facts.get("bits") == 32:
        return "armv7l"
    return facts["arch"]


def python_floor() -> str:
    """rpicluster's ``Requires-Python`` (e.g. ``>=3.11``)."""
    from importlib import metadata

    return metadata.metadata("rpicluster")["Requires-Python"] or ""


def platform_problems(facts: dict) -> list[str]:
    """What makes a host unable to run rpicluster at all, from its system Python's facts: a
    32-bit or unsupported userland, a Python under the floor. Each says what to do."""
    from packaging.specifiers import SpecifierSet

    problems = []
    arch = userland_arch(facts)
    if arch.startswith("armv") or arch == "armhf":
        problems.append(
            f"32-bit userland ({arch}: {facts.get('bits', 32)}-bit Python, kernel "
            f"{facts['arch']}, {facts['os']}): numpy, scikit-learn and onnxruntime have no "
            "32-bit ARM wheels; install the 64-bit (arm64) Raspberry Pi OS")
    elif arch not in SUPPORTED_ARCH:
        problems.append(f"architecture {arch} (supported: {', '.join(SUPPORTED_ARCH)}): no "
                        "wheels of the stack for it")
    floor = python_floor()
    if floor and not SpecifierSet(floor).contains(facts["python"]):
        problems.append(f"Python {facts['python']} (rpicluster needs {floor}): install a newer "
                        "OS release (Raspberry Pi OS Bookworm has 3.11) or point python = ... "
                        "at a newer interpreter")
    return problems


def probe_host(conn: Connection, args: dict, interpreter: str | None = None) -> dict:
    """Run :func:`rpicluster.deploy.health.probe` on a host by sending it the module's source.

    Raises
    ------
    SSHError
        The interpreter is missing or failed.
    """
    python = interpreter or conn.node.python
    source = Path(health.__file__).read_bytes()
    res = conn.python(["-", json.dumps(args)], stdin=source, check=False, interpreter=python)
    if res.exit_status == 127:
        raise InterpreterMissing(f"{conn.host}: python not found at {python} "
                       "(set python = ... in the inventory, or run up --provision)")
    if res.exit_status != 0:
        raise SSHError(f"{conn.host}: {python} failed: "
                       f"{(res.stderr or res.stdout).strip()[-300:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
