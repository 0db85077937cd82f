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
                ssh_connection: str | None = None, user: str | None = None) -> DashboardLinks:
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
    if bind_host in _LOOPBACK and ssh_connection:
        fields = ssh_connection.split()
        if len(fields) == 4:
            _, _, server_ip, server_port = fields
            via = "" if server_port == "22" else f" -p {server_port}"
            tunnel = (f"ssh -L {port}:localhost:{port}{via} "
                      f"{user or getpass.getuser()}@{server_ip}")
    return DashboardLinks(status=f"{root}{prefix}/status", page=f"{root}{page}" if page else None,
                          tunnel=tunnel)


def _dashboard_facts(dask_scheduler) -> dict | None:
    # Runs on the scheduler (client.run_on_scheduler).
    from rpicluster.dashboard.server import dashboard_prefix

    http = dask_scheduler.services.get("dashboard")
    if http is None:
        return None
    return {"address": http.address, "port": http.port,
            "prefix": dashboard_prefix(dask_scheduler) or "",
            "tls": getattr(http, "ssl_options", None) is not None}


@dataclasses.dataclass(frozen=True)
class RecordedScheduler:
    """A scheduler ``rpicluster up`` recorded on this machine.

    Attributes
    ----------
    address : str
        Its address (``tls://host:8786`` for an SSH cluster with TLS).
    kind : str
        ``"ssh"``: the cluster ``up -c cluster.toml`` started (connected with its recorded TLS
        certificate); ``"local"``: the embedded cluster of ``up --local``.
    """

    address: str
    kind: str

    def client(self, timeout: str = "10s"):
        """A ``distributed.Client`` of this scheduler, with the cluster's security."""
        if self.kind == "ssh":
            from rpicluster.deploy.cluster import connect

            return connect(timeout=timeout)
        from distributed import Client

        return Client(self.address, timeout=timeout)


def recorded_scheduler() -> RecordedScheduler | None:
    """The cluster ``rpicluster up`` recorded on this machine: the SSH one, else the embedded one.

    The same order as the commands that run on a cluster (see
    :func:`rpicluster.deploy.local.cluster_client`). None when neither is recorded.
    """
    from rpicluster.deploy.cluster import recorded_cluster
    from rpicluster.deploy.local import local_status

    ssh = recorded_cluster()
    if ssh is not None:
        return RecordedScheduler(ssh["address"], "ssh")
    info = local_status()
    return RecordedScheduler(info["scheduler_address"], "local") if info else None


def dashboard_links(address: str | None = None, *, client=None,
                    timeout: str = "10s") -> DashboardLinks:
    """Make sure a scheduler serves the rpicluster page, and return the dashboard's URLs.

    Parameters
    ----------
    address : str or None
        Scheduler address (``tcp://host:8786``); None uses ``client``'s scheduler, else
        :func:`recorded_scheduler`. The recorded cluster's TLS certificate is used when
        ``address`` is its address.
    client : distributed.Client, optional
        An open client to use instead of connecting.
    timeout : str
        How long to try to connect.

    Raises
    ------
    rpicluster.errors.ConfigError
        No address given and no cluster recorded, or the scheduler serves no dashboard.
    rpicluster.errors.RPiClusterError
        The scheduler cannot be reached.
    """
    from distributed import Client

    if client is not None:
        return _links(client, address or client.scheduler.address)
    recorded = recorded_scheduler()
    if address is None:
        if recorded is None:
            raise ConfigError("no cluster to show: pass --scheduler tcp://HOST:8786, or start one "
                              "with `rpicluster up`")
        address = recorded.address
    try:
        client = (recorded.client(timeout) if recorded is not None and recorded.address == address
                  else Client(address, timeout=timeout))
    except OSError as exc:
        hint = (" (a TLS scheduler needs the certificate `rpicluster up` recorded: run this on "
                "the machine that started the cluster)" if address.startswith("tls://") else "")
        raise RPiClusterError(f"cannot reach the scheduler at {address}: {exc}{hint}") from exc
    with client:
        return _links(client, address)


def _links(client, address: str) -> DashboardLinks:
    from distributed.comm import get_address_host

    from rpicluster.dashboard import install

    facts = client.run_on_scheduler(_dashboard_facts)
    if facts is None:
        raise ConfigError(f"the scheduler at {address} serves no dashboard (started with "
                          "--no-dashboard?)")
    page = client.run_on_scheduler(install)
    return build_links(facts["address"], facts["port"], get_address_host(address),
                       prefix=facts["prefix"], page=page, tls=facts["tls"],
                       ssh_connection=os.environ.get("SSH_CONNECTION"))
