"""Where the dashboard is: its URLs and, from a remote shell, the SSH tunnel that reaches it."""

from __future__ import annotations

import dataclasses
import getpass
import os

from rpicluster.errors import ConfigError, RPiClusterError

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_WILDCARD = {"", "0.0.0.0", "::"}


@dataclasses.dataclass(frozen=True)
class DashboardLinks:
    """The Dask dashboard's status URL, the rpicluster page's URL, and a tunnel command or None."""

    status: str
    page: str | None
    tunnel: str | None = None

    def lines(self) -> list[str]:
        """What ``rpicluster dashboard`` prints."""
        out = [f"dashboard: {self.status}"]
        out.append(f"training:  {self.page}" if self.page else
                   "training:  (no /rpicluster page: this scheduler serves no bokeh dashboard)")
        if self.tunnel:
            out.append(f"from your own machine, first run:  {self.tunnel}")
        return out


def build_links(bind_host: str, port: int, scheduler_host: str, *, prefix: str = "",
                page: str | None = "/rpicluster", tls: bool = False,
                ssh_connection: str | None = None, user: str | None = None,
                ssh_target: str | None = None) -> DashboardLinks:
    """URLs of a dashboard listening on ``bind_host:port``, as seen by whoever asks.

    Parameters
    ----------
    bind_host : str
        Address the dashboard's HTTP server is bound to (``0.0.0.0`` = every interface).
    port : int
        Its port.
    scheduler_host : str
        Host of the scheduler address the user gave: the name that reaches that machine when the
        dashboard listens on every interface.
    prefix : str
        The dashboard's URL prefix (``dask scheduler --dashboard-prefix``).
    page : str or None
        URL path of the rpicluster page (prefix included), None when it is not served.
    tls : bool
        Whether the dashboard serves HTTPS.
    ssh_connection : str or None
        The ``SSH_CONNECTION`` variable (``client_ip client_port server_ip server_port``): set when
        this shell runs on a machine reached over SSH, whose loopback the user's browser cannot see.
    user : str or None
        User name for the tunnel command (default: the current user).
    ssh_target : str or None
        ``[-p PORT ]user@host`` of a scheduler on another machine (an SSH cluster's): a dashboard
        on its loopback is reached through ``ssh -L`` to it.

    Returns
    -------
    DashboardLinks
    """
    host = scheduler_host if bind_host in _WILDCARD else bind_host
    if ":" in host:  # a literal IPv6 address
        host = f"[{host}]"
    root = f"{'https' if tls else 'http'}://{host}:{port}"
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    tunnel = None
    if bind_host in _LOOPBACK and ssh_target:
        tunnel = f"ssh -L {port}:localhost:{port} {ssh_target}"
    elif bind_host in _LOOPBACK and ssh_connection:
        fields = ssh_connection.split()
        if len(fields) == 4:
            _, _, server_ip, server_port = fields
            via = "" if server_port == "22" else f" -p {server_port}"
            tunnel = (f"ssh -L {port}:localhost:{port}{via} "
                      f"{user or getpass.getuser()}@{server_ip}")
    return DashboardLinks(status=f"{root}{prefix}/status", page=f"{root}{page}" if page else None,
                          tunnel=tunnel)


def dashboard_links(address: str | None = None, *, client=None, inventory=None,
                    local: int | bool | None = None, timeout: float | str | None = None,
                    announce=None) -> DashboardLinks:
    """Make sure a scheduler serves the rpicluster page, and return the dashboard's URLs.

    Parameters
    ----------
    address : str or None
        Scheduler address (``tcp://host:8786``); with ``inventory`` and ``local`` the cluster
        choice of every command (:func:`rpicluster.deploy.resolve.find_cluster`): by default the
        cluster ``up`` recorded. A recorded cluster is reached with its TLS certificate.
    client : distributed.Client, optional
        An open client to use instead of connecting.
    timeout : float or str, optional
        How long to try to connect (default ``config.CONNECT_TIMEOUT``).
    announce : callable, optional
        Called with the chosen :class:`~rpicluster.deploy.resolve.ClusterRef` (the CLI says which
        cluster it shows).

    Raises
    ------
    rpicluster.errors.ConfigError
        No cluster chosen and none recorded, or the scheduler serves no dashboard.
    rpicluster.errors.RPiClusterError
        The scheduler cannot be reached.
    """
    from rpicluster.deploy.resolve import find_cluster

    if client is not None:
        return _links(client, address or client.scheduler.address)
    try:
        ref = find_cluster(address, inventory=inventory, local=local)
    except ConfigError as exc:
        if address is None and inventory is None and local is None:
            raise ConfigError(f"no cluster to show: pass --scheduler tcp://HOST:8786, or start "
                              f"one with `rpicluster up` ({exc})") from None
        raise
    if announce is not None:
        announce(ref)
    try:
        client = ref.client(timeout)
    except OSError as exc:
        hint = (" (a TLS scheduler needs the certificate `rpicluster up` recorded: run this on "
                "the machine that started the cluster)" if ref.address.startswith("tls://")
                else "")
        raise RPiClusterError(f"cannot reach {ref.describe()}: {exc}{hint}") from exc
    with client:
        return _links(client, ref.address, _ssh_target(ref))


def _ssh_target(ref) -> str | None:
    """``[-p PORT ]user@host`` of an SSH cluster's scheduler on another machine, else None."""
    if ref.kind != "ssh":
        return None
    from rpicluster.deploy.hosts import is_local_host
    from rpicluster.inventory import load_inventory

    node = load_inventory(ref.inventory).scheduler.node
    if is_local_host(node.host):
        return None
    return f"{'' if node.port == 22 else f'-p {node.port} '}{node.user}@{node.host}"


def _facts(client, address: str) -> dict:
    """Ask the scheduler where its dashboard is; install the page first where it is missing."""
    from rpicluster.dashboard import install
    from rpicluster.events import FACTS_OP

    # Served by the page's preload: no code sent to the scheduler. A scheduler without the
    # operation answers None.
    facts = client.sync(getattr(client.scheduler, FACTS_OP))
    if facts is not None:
        return facts
    try:
        client.run_on_scheduler(install)
    except Exception as exc:  # noqa: BLE001 - e.g. a guarded scheduler refusing run_function
        raise ConfigError(f"the scheduler at {address} does not serve the rpicluster page and "
                          f"refused to install it ({exc}); start it with --preload "
                          f"rpicluster.dashboard") from None
    return client.sync(getattr(client.scheduler, FACTS_OP))


def _links(client, address: str, ssh_target: str | None = None) -> DashboardLinks:
    from distributed.comm import get_address_host

    facts = _facts(client, address)
    where = facts["dashboard"]
    if where is None:
        raise ConfigError(f"the scheduler at {address} serves no dashboard (started with "
                          "--no-dashboard?)")
    return build_links(where["address"], where["port"], get_address_host(address),
                       prefix=where["prefix"], page=facts["page"], tls=where["tls"],
                       ssh_connection=os.environ.get("SSH_CONNECTION"), ssh_target=ssh_target)
