"""Which host names mean this machine (``up`` runs a scheduler on it without SSH)."""

from __future__ import annotations


def is_local_host(host: str) -> bool:
    """Whether ``host`` names this machine (loopback, or an address of a local interface)."""
    import socket

    import psutil

    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    local = {a.address.split("%")[0] for nics in psutil.net_if_addrs().values() for a in nics}
    return any(a.startswith("127.") or a == "::1" or a in local for a in addrs)
