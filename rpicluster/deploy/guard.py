"""The scheduler preload that narrows what a connection may ask of the schedulers rpicluster starts.

``dask scheduler --preload rpicluster.deploy.guard`` (``up``, ``deploy systemd`` and the embedded
cluster all pass it) does three things when the scheduler starts:

* it blocks the operations whose purpose is to run a function a client sends *on the scheduler*:
  ``run_function`` (``client.run_on_scheduler``), ``register_scheduler_plugin``
  (``client.register_plugin(SchedulerPlugin)``) and ``feed`` (distributed's progress streams).
  rpicluster's own scheduler side (the ``/rpicluster`` page) comes by its own preload. Dask's
  ``distributed.scheduler.pickle: false`` would be the stock switch, but distributed >= 2024
  refuses to start a scheduler with it (task graphs themselves travel pickled).
* over TLS, it refuses the operations that control the cluster rather than compute on it
  (:data:`CLIENT_ONLY`: ``client.run``/broadcast, worker and nanny plugins, restart, terminate,
  rebalance, replicate, cluster dumps, logs, state, stories, profiles, metadata writes) to a peer
  whose certificate has role ``worker`` (:mod:`rpicluster.deploy.tls`), and lets such a peer
  unregister, retire or set the resources of its own worker only (:data:`OWN_WORKER`). A
  worker's certificate may still open a client: tasks do (``get_client``, joblib's dask
  backend), so it can submit tasks.
* it refuses the dashboard's logs and call-stack pages (:data:`REFUSED_PAGES`).

What it cannot stop is written down in docs/security.md: task graphs are unpickled on
the scheduler, and distributed unpickles the pickled parts of any message before a handler runs,
so the holder of *any* certificate of the cluster can still run code on the scheduler.

Standard library only at import time (``rpicluster.deploy.remote`` names it).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

#: Module name for ``--preload`` (before the dashboard's, so the page is installed on a guarded
#: scheduler).
GUARD = "rpicluster.deploy.guard"

#: Operations blocked on the scheduler: they run a function a client sent on it.
REMOVED = ("run_function", "register_scheduler_plugin", "feed")

#: Operations a peer holding a worker's certificate may not call: they control the cluster
#: (run code on every worker, install plugins, restart, stop, move data around), which neither a
#: worker nor a task needs. Workers retire themselves through ``retire_workers``: not listed.
#: Reading the cluster's logs, state, task stories, stacks, profiles and events (task keys,
#: exceptions, paths), writing task metadata, steering the memory manager, retrying or
#: re-restricting tasks, or watching workers come and go are a client's business too. Reviewed
#: against every handler of distributed 2026.8's Scheduler; what stays open to a worker's
#: certificate is what workers, nannies and the tasks on them call (registration, heartbeats,
#: task results, keys, gather/scatter, who_has, events logged, locks, semaphores, variables,
#: queues, publish, shuffles, metadata reads, identity and versions).
CLIENT_ONLY = ("broadcast", "proxy", "terminate", "restart", "restart_workers", "rebalance",
               "replicate", "register_worker_plugin", "unregister_worker_plugin",
               "register_nanny_plugin", "unregister_nanny_plugin", "unregister_scheduler_plugin",
               "dump_cluster_state_to_url", "get_cluster_state", "benchmark_hardware",
               "worker_logs", "logs", "get_logs", "dump_state", "events", "get_story",
               "call_stack", "profile", "performance_report", "get_task_stream",
               "memory_sampler_start", "memory_sampler_stop", "set_metadata", "amm_handler",
               "retry", "set_restrictions", "workers_to_close", "subscribe_worker_status")

#: Operations a worker's certificate may call only about its own worker (operation -> the
#: argument naming the worker address or addresses): a worker and its nanny unregister, retire
#: and set the resources of themselves, never of another worker.
OWN_WORKER = {"unregister": "address", "retire_workers": "workers", "set_resources": "worker"}


#: Dashboard pages a guarded scheduler does not serve (URL path patterns, any prefix): the
#: scheduler's and workers' logs and live call stacks, which show task keys, exceptions and paths
#: to whoever reaches the dashboard, without a password (``rpicluster logs`` shows the logs).
REFUSED_PAGES = (r".*/info/main/logs\.html", r".*/info/logs/.*", r".*/info/call-stacks?/.*")


class RefusedOperation(PermissionError):
    """A guarded scheduler's answer to an operation it does not allow this peer."""


def _subject(comm, field: str) -> str | None:
    cert = (getattr(comm, "extra_info", None) or {}).get("peercert") or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == field:
                return value
    return None


def peer_role(comm) -> str | None:
    """The role (organizational unit) of the TLS certificate ``comm``'s peer presented, or None."""
    return _subject(comm, "organizationalUnitName")


def _is_own(scheduler, comm, address: str) -> bool:
    """Whether the worker at ``address`` is the one ``comm``'s worker certificate was issued to.

    ``up`` issues each worker a certificate under its name (``pi01``): the name must match. The
    embedded cluster's workers share one certificate (``worker``, readable by its owner only):
    there the worker must be on the peer's host.
    """
    ws = scheduler.workers.get(address)
    if ws is None:
        return True     # gone already: nothing to take from anyone
    cn = _subject(comm, "commonName")
    if cn == str(ws.name):
        return True
    peer_host = comm.peer_address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return cn == "worker" and peer_host == ws.host


def _client_only(op: str, handler):
    from distributed.core import _expects_comm

    pass_comm = _expects_comm(handler)

    # distributed passes the comm to a handler whose first parameter is named "comm".
    def guarded(comm, *args, **kwargs):
        if peer_role(comm) == "worker":
            logger.warning("refused %r from %s: a worker certificate", op, comm.peer_address)
            raise RefusedOperation(f"{op!r} needs a client certificate, not a worker's")
        return handler(comm, *args, **kwargs) if pass_comm else handler(*args, **kwargs)

    guarded.__name__ = getattr(handler, "__name__", op)
    guarded._rpicluster_guarded = True
    return guarded


def _own_worker_only(scheduler, op: str, arg: str, handler):
    from distributed.core import _expects_comm

    pass_comm = _expects_comm(handler)

    def guarded(comm, *args, **kwargs):
        if peer_role(comm) == "worker":
            named = kwargs.get(arg)
            addresses = [named] if isinstance(named, str) else list(named or ())
            if not addresses or not all(_is_own(scheduler, comm, a) for a in addresses):
                logger.warning("refused %r of %s from %s: a worker certificate may name only "
                               "its own worker", op, addresses or "any worker",
                               comm.peer_address)
                raise RefusedOperation(f"{op!r} of another worker needs a client certificate")
        return handler(comm, *args, **kwargs) if pass_comm else handler(*args, **kwargs)

    guarded.__name__ = getattr(handler, "__name__", op)
    guarded._rpicluster_guarded = True
    return guarded


def guard(scheduler) -> None:
    """Remove :data:`REMOVED`, restrict :data:`CLIENT_ONLY` and :data:`OWN_WORKER` on
    ``scheduler`` (idempotent)."""
    # distributed's own switch (config distributed.scheduler.blocked-handlers): the caller gets
    # "The 'run_function' handler has been explicitly disallowed in Scheduler".
    scheduler.blocked_handlers = [*scheduler.blocked_handlers,
                                  *(op for op in REMOVED if op not in scheduler.blocked_handlers)]
    for op in CLIENT_ONLY:
        handler = scheduler.handlers.get(op)
        if handler is not None and not getattr(handler, "_rpicluster_guarded", False):
            scheduler.handlers[op] = _client_only(op, handler)
    for op, arg in OWN_WORKER.items():
        handler = scheduler.handlers.get(op)
        if handler is not None and not getattr(handler, "_rpicluster_guarded", False):
            scheduler.handlers[op] = _own_worker_only(scheduler, op, arg, handler)
    app = getattr(scheduler, "http_application", None)
    if app is not None and not getattr(app, "_rpicluster_guarded", False):
        # Host rules added here are matched before the routes the application was made with.
        app.add_handlers(r".*$", [(page, _refused_page()) for page in REFUSED_PAGES])
        app._rpicluster_guarded = True


def _refused_page():
    from tornado.web import RequestHandler

    class RefusedPage(RequestHandler):
        def get(self, *args):
            self.set_status(403)
            self.finish("rpicluster: this page is not served (it shows logs and call stacks to "
                        "anyone who reaches the dashboard); use `rpicluster logs`\n")

    return RefusedPage


async def dask_setup(scheduler) -> None:
    """Preload hook: guard the scheduler (refused on a worker or nanny)."""
    from distributed import Scheduler

    from rpicluster.errors import ConfigError

    if not isinstance(scheduler, Scheduler):
        raise ConfigError(f"--preload {GUARD} belongs on the scheduler, not on a "
                          f"{type(scheduler).__name__}")
    guard(scheduler)
