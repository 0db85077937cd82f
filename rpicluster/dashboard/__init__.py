"""The rpicluster page in the Dask dashboard: live training progress and worker health.

Two ways to add it, both ending in :func:`install`:

* a scheduler started by ``dask scheduler`` (the SSH bring-up): pass ``--preload rpicluster.dashboard``
  (this module's :func:`dask_setup` runs ``install``);
* a scheduler already running, e.g. a ``LocalCluster``: ``client.run_on_scheduler(install)`` or
  ``await install(cluster.scheduler)``; or create it with
  ``LocalCluster(scheduler_kwargs={"preload": [PRELOAD]})``.

The page is then at ``http://<scheduler host>:8787/rpicluster``.
"""

from __future__ import annotations

#: Module name to pass to ``--preload`` (or ``scheduler_kwargs={"preload": [PRELOAD]}``); defined
#: in :mod:`rpicluster.events` so that ``deploy`` can name the page without importing it.
from rpicluster.events import PRELOAD


async def install(dask_scheduler) -> str | None:
    """Add the ``/rpicluster`` page and worker health reports to a scheduler (idempotent).

    The parameter is named so that ``client.run_on_scheduler(install)`` passes the scheduler.
    See :func:`rpicluster.dashboard.server.install`.
    """
    from rpicluster.dashboard import server

    return await server.install(dask_scheduler)


async def dask_setup(scheduler) -> None:
    """Preload hook: ``dask scheduler --preload rpicluster.dashboard`` installs the page.

    Raises
    ------
    rpicluster.errors.ConfigError
        If preloaded into a worker or nanny: the page lives on the scheduler, which installs the
        worker side on every worker by itself.
    """
    from distributed import Scheduler

    from rpicluster.errors import ConfigError

    if not isinstance(scheduler, Scheduler):
        raise ConfigError(f"--preload {PRELOAD} belongs on the scheduler, not on a "
                          f"{type(scheduler).__name__}: the scheduler adds the worker side itself")
    await install(scheduler)
