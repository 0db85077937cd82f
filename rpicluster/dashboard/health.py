"""Worker hardware health for the dashboard: a worker plugin reporting temperature and throttling.

The readers (``/sys/class/thermal``, ``vcgencmd get_throttled`` and its decoder) are the ones
``doctor`` uses, from :mod:`rpicluster.deploy.health`; they return ``None`` for what a host cannot
tell (no thermal zone, not a Pi).

:class:`HealthPlugin` adds a ``"rpicluster"`` entry to the worker's custom metrics, so the values
travel with Dask's own heartbeats and the scheduler sees them as
``scheduler.workers[addr].metrics["rpicluster"]``: no extra connection, no extra task.
"""

from __future__ import annotations

import asyncio
import os
import platform
import time

from distributed.diagnostics.plugin import WorkerPlugin

from rpicluster.deploy.health import read_temperature, read_throttled
from rpicluster.events import HEALTH_METRIC as METRIC


def static_info() -> dict:
    """What does not change while a worker runs: CPU architecture, cores, total memory (bytes)."""
    import psutil

    return {"arch": platform.machine(), "cores": os.cpu_count(),
            "memory": int(psutil.virtual_memory().total)}


def snapshot(thermal_root: str | None = None) -> dict:
    """One reading of this host's health as plain values (msgpack-friendly).

    ``thermal_root`` defaults to ``RPICLUSTER_THERMAL_ROOT``, else ``/sys/class/thermal`` (a
    worker in a container may see the host's zones mounted elsewhere).

    Returns
    -------
    dict
        ``arch``, ``cores``, ``memory`` (bytes), ``temperature`` (°C or None), ``throttled``
        (decoded ``vcgencmd get_throttled`` flags, ``[]`` for a healthy Pi, None where there is
        no vcgencmd), ``t`` (time.time() of the reading).
    """
    if thermal_root is None:
        thermal_root = os.environ.get("RPICLUSTER_THERMAL_ROOT") or "/sys/class/thermal"
    return {**static_info(), "temperature": read_temperature(thermal_root),
            "throttled": read_throttled(), "t": time.time()}


class HealthPlugin(WorkerPlugin):
    """Worker plugin that reports :func:`snapshot` through the worker's heartbeat metrics.

    Parameters
    ----------
    every : float
        Seconds between real readings; heartbeats in between reuse the last one, so a busy Pi
        does not spawn ``vcgencmd`` several times a second.
    """

    name = METRIC
    idempotent = True

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self._last: dict | None = None

    def setup(self, worker) -> None:
        worker.metrics[METRIC] = self._metric

    def teardown(self, worker) -> None:
        worker.metrics.pop(METRIC, None)

    async def _metric(self, worker) -> dict:
        if self._last is None or time.time() - self._last["t"] >= self.every:
            # vcgencmd and sysfs reads block; keep them off the worker's event loop.
            self._last = await asyncio.to_thread(snapshot)
        return self._last
