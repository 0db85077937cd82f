"""Which cluster a command, a script or a page uses: the one resolver.

Every command that runs on a cluster (``train``, ``score``, ``predict``, ``bench scaling``,
``status``, ``down``, ``logs``, ``dashboard``, ``demo``), the examples and Python users
(:func:`rpicluster.connect`, :func:`rpicluster.client`) go through :func:`find_cluster`, in this
order:

1. ``scheduler``: an explicit address (``--scheduler tls://host:8786``). When it is the address
   of a cluster ``up`` or ``up --local`` recorded, that cluster's TLS certificate is used; otherwise Dask's own
   configuration supplies any TLS settings (``rpicluster deploy systemd`` writes them).
2. ``inventory``: the SSH cluster ``up -c cluster.toml`` started from that file.
3. ``local``: the embedded cluster ``up --local`` started; ``local=N`` also asks that it has N
   workers, and a running one of another size is an error that says so (never silently reused).
4. Nothing given: the SSH cluster ``up`` last recorded, else the running embedded cluster.

At most one of the first three may be given. :func:`client` and :func:`use_cluster` go one step
further than :func:`connect`: where the embedded cluster is asked for (or nothing is recorded) and
none is running, they start one for the duration of the ``with`` block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator

from rpicluster import config
from rpicluster.deploy.local import check_local, local_security, start_local, stop_local
from rpicluster.deploy.state import load_state, local_record, recorded_cluster
from rpicluster.errors import ConfigError

#: A cluster started for one command that took this long says that ``up --local`` would help.
SLOW_START_SECONDS = 3.0

#: ``local=ANY_SIZE`` asks for the embedded cluster whatever its number of workers (the CLI's
#: bare ``--local``); ``local=N`` asks for N workers.
ANY_SIZE = True


@dataclasses.dataclass(frozen=True)
class ClusterRef:
    """A cluster :func:`find_cluster` chose: how to reach it, and what to call it.

    Attributes
    ----------
    kind : str
        ``"ssh"`` (``up -c cluster.toml``), ``"local"`` (``up --local``, or started for one
        command) or ``"address"`` (a scheduler rpicluster did not start).
    address : str
        The scheduler address.
    dashboard : str or None
        The Dask dashboard's status URL, where recorded.
    inventory : str or None
        The inventory file of an SSH cluster.
    n_workers : int or None
        Workers of an embedded cluster.
    started : bool
        Whether the embedded cluster was started for this ``with`` block (and stops after it).
    start_seconds : float or None
        How long starting it took (where ``started``).
    """

    kind: str
    address: str
    dashboard: str | None = None
    inventory: str | None = None
    n_workers: int | None = None
    started: bool = False
    start_seconds: float | None = None

    def describe(self) -> str:
        """One phrase naming the cluster, for "acting on ..." lines."""
        if self.kind == "ssh":
            return f"the SSH cluster of {self.inventory} at {self.address}"
        if self.kind == "local":
            size = (f", {self.n_workers} worker{'s' if self.n_workers != 1 else ''}"
                    if self.n_workers else "")
            when = "started for this command" if self.started else "up --local"
            text = f"the local cluster at {self.address} ({when}{size})"
            if self.started and (self.start_seconds or 0) >= SLOW_START_SECONDS:
                text += (f"; starting it took {self.start_seconds:.0f} s: `rpicluster up "
                         "--local` keeps one running for the next commands")
            return text
        return f"the scheduler at {self.address}"

    def security(self):
        """The ``distributed.Security`` to connect with: the client certificate ``up`` (or
        ``up --local``) recorded; None for a scheduler rpicluster did not start."""
        if self.kind == "ssh":
            return load_state(self.inventory).security()
        if self.kind == "local" and self.address.startswith("tls://"):
            return local_security()
        return None

    def client(self, timeout: float | str | None = None, **client_kwargs):
        """A new ``distributed.Client`` of this cluster (``timeout``: ``config.CONNECT_TIMEOUT``)."""
        from distributed import Client

        if timeout is None:
            timeout = config.CONNECT_TIMEOUT
        security = self.security()
        if security is not None:
            client_kwargs["security"] = security
        return Client(self.address, timeout=timeout, **client_kwargs)


def _local_ref(info: dict, started: bool = False, start_seconds: float | None = None
               ) -> ClusterRef:
    return ClusterRef("local", info["scheduler_address"], info.get("dashboard_link"),
                      n_workers=info.get("n_workers"), started=started,
                      start_seconds=start_seconds)


def _recorded_ssh_ref(inventory: str | os.PathLike | None = None) -> ClusterRef | None:
    recorded = recorded_cluster(inventory)
    if recorded is None:
        return None
    return ClusterRef("ssh", recorded["address"], recorded["dashboard"], recorded["inventory"])


def _no_cluster() -> ConfigError:
    return ConfigError(f"no cluster recorded in {config.state_dir()} (run rpicluster up "
                       "-c cluster.toml or rpicluster up --local N first, or pass "
                       "--scheduler ADDR)")


def _check_choice(scheduler, inventory, local) -> None:
    if sum(x is not None for x in (scheduler, inventory, local)) > 1:
        raise ConfigError("give at most one of --scheduler, -c/--inventory and --local")
    if local is not None and local is not True and (isinstance(local, bool) or local < 1):
        raise ConfigError(f"--local needs at least 1 worker, got {local}")


def find_cluster(scheduler: str | None = None, *, inventory: str | os.PathLike | None = None,
                 local: int | bool | None = None, threads_per_worker: int | None = None,
                 memory_limit: str | None = None) -> ClusterRef:
    """The running cluster these arguments choose (see the module's order). Connects nowhere.

    Parameters
    ----------
    scheduler : str, optional
        A scheduler address.
    inventory : path, optional
        The inventory of an SSH cluster ``up`` started.
    local : int or True, optional
        The embedded cluster: ``True`` whatever its size, ``N`` with N workers.
    threads_per_worker, memory_limit : optional
        With ``local``: what the embedded cluster must have (compared when given).

    Raises
    ------
    ConfigError
        More than one choice given; the chosen cluster is not running or differs from what was
        asked for; nothing given and nothing recorded. The message says what to run.
    """
    _check_choice(scheduler, inventory, local)
    if scheduler is not None:
        ssh = _recorded_ssh_ref()
        if ssh is not None and ssh.address == scheduler:
            return ssh
        info = local_record()
        if info is not None and info["scheduler_address"] == scheduler:
            return _local_ref(info)
        return ClusterRef("address", scheduler)
    if inventory is not None:
        ref = _recorded_ssh_ref(inventory)
        if ref is None:
            load_state(inventory)  # raises the precise "nothing recorded for ..." error
            raise ConfigError(f"{inventory}: the cluster is recorded but its scheduler is not "
                              f"(run rpicluster up -c {inventory})")
        return ref
    if local is not None:
        info = local_record()
        if info is None:
            size = local if local is not True else "N"
            raise ConfigError(f"no local cluster running (start one with rpicluster up "
                              f"--local {size})")
        check_local(info, None if local is True else local, threads_per_worker, memory_limit)
        return _local_ref(info)
    ref = _recorded_ssh_ref()
    if ref is not None:
        return ref
    info = local_record()
    if info is not None:
        return _local_ref(info)
    raise _no_cluster()


@contextlib.contextmanager
def use_cluster(scheduler: str | None = None, *, inventory: str | os.PathLike | None = None,
                local: int | bool | None = None, threads_per_worker: int | None = None,
                memory_limit: str | None = None,
                announce: Callable[[ClusterRef], None] | None = None) -> Iterator[ClusterRef]:
    """Yield the :class:`ClusterRef` :func:`find_cluster` chooses, starting one when needed.

    When ``local`` is given, or nothing is given and nothing is recorded, and no embedded cluster
    runs, one is started (``local`` workers, default one per core) and stopped when the block
    exits. ``announce(ref)`` is called once the cluster is known (the CLI prints which one).
    """
    _check_choice(scheduler, inventory, local)
    nothing_chosen = scheduler is None and inventory is None and local is None
    if local_record() is None and (local is not None or (nothing_chosen
                                                         and recorded_cluster() is None)):
        t0 = time.perf_counter()
        # Started for this command only: it stops with the command, even a killed one.
        info = start_local(None if local is None or local is True else local,
                           threads_per_worker=threads_per_worker, memory_limit=memory_limit,
                           owner=os.getpid())
        ref = _local_ref(info, started=not info["already_running"],
                         start_seconds=time.perf_counter() - t0)
    else:
        ref = find_cluster(scheduler, inventory=inventory, local=local,
                           threads_per_worker=threads_per_worker, memory_limit=memory_limit)
    if announce is not None:
        announce(ref)
    try:
        yield ref
    finally:
        if ref.started:
            stop_local()


@contextlib.contextmanager
def client(scheduler: str | None = None, *, inventory: str | os.PathLike | None = None,
           local: int | bool | None = None, timeout: float | str | None = None,
           announce: Callable[[ClusterRef], None] | None = None, **client_kwargs):
    """``with rpicluster.client(...) as c:`` a ``distributed.Client`` of the chosen cluster.

    The resolution order is :func:`find_cluster`'s; an embedded cluster is started for the block
    where :func:`use_cluster` starts one. ``timeout`` defaults to ``config.CONNECT_TIMEOUT``.
    """
    with use_cluster(scheduler, inventory=inventory, local=local, announce=announce) as ref, \
            ref.client(timeout, **client_kwargs) as c:
        yield c


def _inventory_given_as_scheduler(scheduler: str | None) -> bool:
    """Whether ``scheduler`` names an inventory file rather than an address
    (``rpicluster.connect("cluster.toml")``)."""
    return scheduler is not None and "://" not in scheduler and (
        scheduler.endswith(".toml") or os.path.isfile(scheduler))


def connect(scheduler: str | None = None, *, inventory: str | os.PathLike | None = None,
            local: int | bool | None = None, timeout: float | str | None = None,
            **client_kwargs):
    """A ``distributed.Client`` of a running cluster, with its TLS certificate where recorded.

    ``rpicluster.connect()`` after ``rpicluster up --local 2`` reaches that cluster; after
    ``rpicluster up -c cluster.toml``, that one (see :func:`find_cluster` for the order). Nothing
    is started: use :func:`client` for that. Close the client when done (or use ``with``).

    ``scheduler``, ``inventory`` and ``local`` are :func:`find_cluster`'s (an inventory path given
    as ``scheduler``, ``connect("cluster.toml")``, is taken as ``inventory``); ``timeout``
    (default ``config.CONNECT_TIMEOUT``) and ``client_kwargs`` go to ``distributed.Client``.
    """
    if _inventory_given_as_scheduler(scheduler):
        if inventory is not None or local is not None:
            raise ConfigError(f"{scheduler} is an inventory file, not a scheduler address: pass "
                              "it as inventory= (and nothing else)")
        scheduler, inventory = None, scheduler
    return find_cluster(scheduler, inventory=inventory, local=local).client(timeout,
                                                                            **client_kwargs)


__all__ = ["ClusterRef", "find_cluster", "use_cluster", "client", "connect", "ANY_SIZE"]
