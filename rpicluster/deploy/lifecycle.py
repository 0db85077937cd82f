"""The cluster lifecycle for SSH clusters and the embedded local one alike: :func:`up`,
:func:`status`, :func:`logs`, :func:`down`, exported as ``rpicluster.up``/``status``/``logs``/
``down``; the CLI prints what they return, whichever cluster it is.

Which cluster a call acts on is chosen as everywhere (:func:`~rpicluster.deploy.resolve
.find_cluster`): an inventory, ``local``, or without either the SSH cluster ``up`` last
recorded, else the local cluster. ``up`` starts one: the inventory's (reconciled: only what is
missing, :func:`rpicluster.deploy.cluster.up`), else the embedded local cluster.
"""

from __future__ import annotations

import dataclasses
import os

from rpicluster.deploy.cluster import Report
from rpicluster.errors import OptionsError


@dataclasses.dataclass(frozen=True)
class LocalCluster:
    """The embedded local cluster ``up`` started or found, or ``down`` stopped.

    ``info`` is its record (``scheduler_address``, ``dashboard_link``, ``n_workers``, ``pid``,
    ``already_running``, ...)."""

    info: dict

    @property
    def address(self) -> str:
        return self.info["scheduler_address"]


def up(inventory: str | os.PathLike | None = None, *, local: int | bool | None = None,
       threads_per_worker: int | None = None, memory_limit: str | None = None,
       dashboard_address: str | None = None, open_dashboard: bool = False,
       accept_new_hosts: bool = False, insecure: bool = False, provision: bool = False,
       join_timeout: float | None = None, ssh_timeout: float | None = None
       ) -> Report | LocalCluster:
    """Start the cluster of ``inventory`` (only what is missing), or the embedded local one.

    Parameters
    ----------
    inventory : path, optional
        The TOML inventory of an SSH cluster; without it, the embedded local cluster.
    local : int or True, optional
        The local cluster with this many workers (True or None: one per core); a running one
        of another size is refused.
    threads_per_worker, memory_limit, dashboard_address : optional
        The local cluster's (``dashboard_address`` default 127.0.0.1:8787, this machine only).
    open_dashboard, accept_new_hosts, insecure, provision, join_timeout, ssh_timeout : optional
        An SSH cluster's (see :func:`rpicluster.deploy.cluster.up`).

    Returns
    -------
    Report or LocalCluster
        Every host's row (SSH), or the local cluster's record.

    Raises
    ------
    OptionsError
        Both ``inventory`` and ``local``, ``dashboard_address`` with an inventory, or
        ``open_dashboard`` without one.
    HostsFailedError
        A host could not be started (its ``report`` holds every host's row).
    """
    if inventory is not None and local is not None:
        raise OptionsError("give -c/--inventory or --local, not both")
    if inventory is not None and dashboard_address is not None:
        raise OptionsError("--dashboard-address is for --local; an inventory's dashboard "
                           "listens on its scheduler host, at dashboard_port")
    if inventory is None and open_dashboard:
        raise OptionsError("--open-dashboard is for an inventory; with --local, give "
                           "--dashboard-address :8787")
    if inventory is None:
        from rpicluster.deploy.local import start_local

        return LocalCluster(start_local(None if local is True else local,
                                        threads_per_worker=threads_per_worker,
                                        memory_limit=memory_limit,
                                        dashboard_address=dashboard_address))
    from rpicluster.deploy.cluster import up as ssh_up

    return ssh_up(inventory, accept_new_hosts=accept_new_hosts, insecure=insecure,
                  provision=provision, join_timeout=join_timeout, ssh_timeout=ssh_timeout,
                  open_dashboard=open_dashboard)


def down(inventory: str | os.PathLike | None = None, *, local: int | bool | None = None,
         announce=None) -> Report | LocalCluster | None:
    """Stop exactly what ``up`` started (SSH: workers, then scheduler, verified by pid).

    Without ``inventory`` or ``local``: the SSH cluster ``up`` last recorded, else the local
    cluster. ``announce(ref)`` is told which cluster is stopped.

    Returns
    -------
    Report, LocalCluster or None
        Every host's row (SSH), the stopped local cluster's record, or None when no local
        cluster was running.
    """
    from rpicluster.deploy.resolve import find_cluster
    from rpicluster.deploy.state import local_record

    if local is not None and local_record() is None:
        return None
    ref = find_cluster(inventory=inventory, local=local)
    if announce is not None:
        announce(ref)
    if ref.kind == "local":
        from rpicluster.deploy.local import stop_local

        info = stop_local()
        return None if info is None else LocalCluster(info)
    from rpicluster.deploy.cluster import down as ssh_down

    return ssh_down(ref.inventory)


def status(inventory: str | os.PathLike | None = None, *, local: int | bool | None = None,
           ssh_timeout: float | None = None, announce=None) -> tuple:
    """Scheduler and workers of the cluster, one :class:`~rpicluster.deploy.cluster.StatusRow`
    each, for an SSH cluster and the local one alike (``rpicluster.status()``).

    An SSH cluster's rows are :func:`rpicluster.deploy.cluster.status`'s (every inventory worker,
    with the reason one is not running); the local cluster's, its scheduler and the workers it
    lists (threads, memory limit, tasks in hand). Without ``inventory`` or ``local``: the SSH
    cluster ``up`` last recorded, else the local cluster (``announce(ref)`` is told which).

    Raises
    ------
    ConfigError
        Nothing is running (the message says what to start), as
        :func:`~rpicluster.deploy.resolve.find_cluster`.
    """
    from rpicluster.deploy.resolve import find_cluster

    ref = find_cluster(inventory=inventory, local=local)
    if announce is not None:
        announce(ref)
    if ref.kind == "ssh":
        from rpicluster.deploy.cluster import status as ssh_status

        return ssh_status(ref.inventory, ssh_timeout=ssh_timeout)
    return _local_status(ref)


def _local_status(ref) -> tuple:
    """The local cluster's rows: its scheduler, then each worker the scheduler lists."""
    from dask.utils import format_bytes

    from rpicluster import config
    from rpicluster.deploy.cluster import StatusRow
    from rpicluster.deploy.state import local_record

    info = local_record() or {}
    with ref.client(config.PROBE_TIMEOUT) as c:
        workers = c.scheduler_info(n_workers=-1)["workers"]
        processing = c.processing()
    rows = [StatusRow("localhost", "scheduler", "running", info.get("pid"),
                      detail=f"{ref.address}, dashboard {ref.dashboard}")]
    for address, w in sorted(workers.items(), key=lambda item: str(item[1].get("name"))):
        rows.append(StatusRow(str(w.get("name", address)), "worker", "running", w.get("pid"),
                              threads=w.get("nthreads"),
                              memory=format_bytes(w["memory_limit"]) if w.get("memory_limit")
                              else "", tasks=len(processing.get(address, ())), detail=address))
    return tuple(rows)


def logs(host: str | None = None, inventory: str | os.PathLike | None = None, *,
         local: int | bool | None = None, lines: int = 100, announce=None) -> str:
    """The end of the log of the worker on ``host`` (``"scheduler"``: the scheduler's).

    The local cluster keeps one log for its scheduler and workers: ``host`` is not needed there.
    Without ``inventory`` or ``local``: the SSH cluster ``up`` last recorded, else the local
    cluster (``announce(ref)`` is told which).

    Raises
    ------
    OptionsError
        No ``host`` for an SSH cluster.
    """
    from rpicluster.deploy.resolve import find_cluster

    ref = find_cluster(inventory=inventory, local=local)
    if announce is not None:
        announce(ref)
    if ref.kind == "local":
        from rpicluster.deploy.local import log_tail

        return log_tail(lines)
    if host is None:
        raise OptionsError(f"name the HOST whose log to show ({ref.describe()} has several)")
    from rpicluster.deploy.cluster import logs as ssh_logs

    return ssh_logs(host, ref.inventory, lines=lines)
