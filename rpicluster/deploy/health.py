"""Facts about the machine this runs on: platform, versions, free memory and disk, Pi health.

Standard library only, and no import of rpicluster: ``doctor`` sends this file's source to a
host's interpreter over SSH, so it works before rpicluster (or anything else) is installed there.
``status`` calls :func:`read_temperature` on the workers through Dask.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import struct
import subprocess
import sys

#: Distributions whose versions must match the desktop's exactly (serialised tasks and models).
PACKAGES = ("dask", "distributed", "numpy", "scikit-learn", "zarr", "numcodecs", "cloudpickle",
            "msgpack", "rpicluster")

#: Bits of ``vcgencmd get_throttled`` (Raspberry Pi firmware documentation).
THROTTLED_BITS = {
    0: "under-voltage",
    1: "frequency capped",
    2: "throttled",
    3: "soft temperature limit",
    16: "under-voltage occurred",
    17: "frequency capping occurred",
    18: "throttling occurred",
    19: "soft temperature limit occurred",
}


def decode_throttled(output: str) -> list[str]:
    """Decode ``vcgencmd get_throttled`` output such as ``throttled=0x50005``.

    Returns the names of the set bits, ``[]`` for a healthy Pi.

    Raises
    ------
    ValueError
        The text is not ``throttled=0x...``.
    """
    text = output.strip()
    if not text.startswith("throttled="):
        raise ValueError(f"unexpected vcgencmd output {text!r} (expected throttled=0x...)")
    value = int(text.split("=", 1)[1], 16)
    return [name for bit, name in sorted(THROTTLED_BITS.items()) if value >> bit & 1]


def read_temperature(root: str = "/sys/class/thermal") -> float | None:
    """Highest temperature (deg C) among the thermal zones, or None where there are none."""
    temps = []
    try:
        zones = sorted(z for z in os.listdir(root) if z.startswith("thermal_zone"))
    except OSError:
        return None
    for zone in zones:
        try:
            with open(os.path.join(root, zone, "temp")) as f:
                temps.append(int(f.read().strip()) / 1000.0)
        except (OSError, ValueError):
            continue
    return max(temps) if temps else None


def read_throttled() -> list[str] | None:
    """Decoded throttling flags, or None where ``vcgencmd`` is absent (not a Pi)."""
    exe = shutil.which("vcgencmd") or ("/usr/bin/vcgencmd"
                                       if os.path.exists("/usr/bin/vcgencmd") else None)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "get_throttled"], capture_output=True, text=True, timeout=10)
        return decode_throttled(out.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def _meminfo() -> dict[str, int]:
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return info


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            fields = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
        return fields.get("PRETTY_NAME", "").strip('"') or platform.system()
    except OSError:
        return platform.system()


def versions(packages=PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution in ``packages`` (None where it is missing)."""
    from importlib import metadata

    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _free_disk(path: str) -> int | None:
    path = os.path.expanduser(path)
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or "/").free
    except OSError:
        return None


def _port_open(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to host:port succeeds, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return str(exc) or type(exc).__name__


def probe(scheduler_host: str | None = None, scheduler_port: int | None = None,
          directory: str = "~", timeout: float = 5.0) -> dict:
    """Everything ``doctor`` checks on one machine, as a JSON-able dict."""
    mem = _meminfo()
    libc = platform.libc_ver()
    return {
        "arch": platform.machine(),
        "os": _os_name(),
        "glibc": libc[1] if libc[0] == "glibc" else None,
        "python": platform.python_version(),
        "python_tag": f"cp{sys.version_info[0]}{sys.version_info[1]}",
        # A 32-bit userland on a 64-bit kernel reports the kernel's aarch64 as its machine.
        "bits": struct.calcsize("P") * 8,
        "versions": versions(),
        "mem_total": mem.get("MemTotal"),
        "mem_available": mem.get("MemAvailable"),
        "disk_free": _free_disk(directory),
        "scheduler_error": (None if scheduler_host is None
                            else _port_open(scheduler_host, int(scheduler_port), timeout)),
        "temperature": read_temperature(),
        "throttled": read_throttled(),
    }


if __name__ == "__main__":
    # ``python - '{"scheduler_host": ...}' < health.py`` on a host, run by doctor.
    print(json.dumps(probe(**json.loads(sys.argv[1]))))
