"""rpicluster's Prometheus series, served beside Dask's own on the scheduler's ``/metrics``.

distributed serves ``/metrics`` on the dashboard port whenever ``prometheus_client`` is installed,
from ``prometheus_client``'s default registry. :func:`register` adds :class:`ClusterCollector` to
that registry once per process; it answers for the scheduler :func:`install
<rpicluster.dashboard.server.install>` ran on last (a process runs one scheduler, except in tests).

Per worker (label ``worker``: its name): ``rpicluster_worker_temperature_celsius``,
``rpicluster_worker_throttled`` (label ``flag``: one series per ``vcgencmd get_throttled`` flag,
1 while set), ``rpicluster_worker_memory_limit_bytes``, ``rpicluster_worker_memory_used_bytes``,
``rpicluster_worker_rows_total`` and ``rpicluster_worker_task_seconds_total`` (label ``phase``:
partition, fit, extract; counters over every run since the scheduler started: ``rate()`` gives
rows per second) and ``rpicluster_worker_rows_per_second`` (the latest run's rows per second of
task time). Per run (label ``run``: the run id; the latest training run): ``rpicluster_run_info``
(labels ``kind`` and ``status``), ``rpicluster_run_progress_ratio``,
``rpicluster_run_eta_seconds``, ``rpicluster_run_blocks``,
``rpicluster_run_blocks_committed_total``,
``rpicluster_run_accuracy_ratio`` (mean validation accuracy of the blocks scored so far) and
``rpicluster_run_rows_per_second``. What a host cannot tell (no thermal zone, not a Pi) is left
out, not reported as 0.
"""

from __future__ import annotations

import time

from rpicluster.deploy.health import THROTTLED_BITS
from rpicluster.events import HEALTH_METRIC

#: Every series name this module exports (the Grafana dashboard may reference only these and
#: Dask's own).
SERIES = ("rpicluster_worker_temperature_celsius", "rpicluster_worker_throttled",
          "rpicluster_worker_memory_limit_bytes", "rpicluster_worker_memory_used_bytes",
          "rpicluster_worker_rows_total", "rpicluster_worker_task_seconds_total",
          "rpicluster_worker_rows_per_second", "rpicluster_run_info",
          "rpicluster_run_progress_ratio", "rpicluster_run_eta_seconds", "rpicluster_run_blocks",
          "rpicluster_run_blocks_committed_total", "rpicluster_run_accuracy_ratio",
          "rpicluster_run_rows_per_second")


def worker_name(ws) -> str:
    """A worker's label: its name, or its address without the scheme when it has none."""
    return str(ws.name) if ws.name != ws.address else ws.address.split("://", 1)[-1]


class ClusterCollector:
    """A ``prometheus_client`` collector of the series above, read from :attr:`scheduler` (its
    workers' heartbeats and its :class:`~rpicluster.dashboard.server.TrainingMonitor`)."""

    def __init__(self, scheduler=None, monitor=None) -> None:
        self.scheduler = scheduler
        self.monitor = monitor

    def describe(self):
        # Nothing to describe up front (the series depend on the cluster): registering must
        # not call collect() before a scheduler is set.
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        scheduler, monitor = self.scheduler, self.monitor
        if scheduler is None:
            return
        gauge = {name: GaugeMetricFamily(name, doc, labels=labels) for name, doc, labels in (
            ("rpicluster_worker_temperature_celsius", "Highest thermal zone of the worker's "
             "host", ["worker"]),
            ("rpicluster_worker_throttled", "vcgencmd get_throttled flag set (1) or clear (0)",
             ["worker", "flag"]),
            ("rpicluster_worker_memory_limit_bytes", "The worker's memory limit", ["worker"]),
            ("rpicluster_worker_memory_used_bytes", "The worker process's memory", ["worker"]),
        )}
        for ws in scheduler.workers.values():
            name = worker_name(ws)
            health = (ws.metrics or {}).get(HEALTH_METRIC) or {}
            if health.get("temperature") is not None:
                gauge["rpicluster_worker_temperature_celsius"].add_metric(
                    [name], float(health["temperature"]))
            flags = health.get("throttled")
            if flags is not None:
                for flag in THROTTLED_BITS.values():
                    gauge["rpicluster_worker_throttled"].add_metric([name, flag],
                                                                    float(flag in flags))
            if ws.memory_limit:
                gauge["rpicluster_worker_memory_limit_bytes"].add_metric([name],
                                                                         float(ws.memory_limit))
            gauge["rpicluster_worker_memory_used_bytes"].add_metric([name],
                                                                    float(ws.memory.process))
        yield from gauge.values()
        if monitor is None:
            return
        names = {ws.address: worker_name(ws) for ws in scheduler.workers.values()}
        rows = CounterMetricFamily("rpicluster_worker_rows", "Rows processed by the worker's "
                                   "tasks since the scheduler started", labels=["worker", "phase"])
        busy = CounterMetricFamily("rpicluster_worker_task_seconds", "Seconds the worker's tasks "
                                   "took since the scheduler started", labels=["worker", "phase"])
        for (address, phase), (n, seconds) in sorted(monitor.totals.items()):
            label = [names.get(address, address.split("://", 1)[-1]), phase]
            rows.add_metric(label, n)
            busy.add_metric(label, seconds)
        yield rows
        yield busy
        rate = GaugeMetricFamily("rpicluster_worker_rows_per_second",
                                 "Rows per second of task time in the latest run",
                                 labels=["worker"])
        s = monitor.state
        for address, stats in sorted(s.workers.items()):
            seconds = stats.partition_seconds + stats.fit_seconds
            if seconds > 0:
                rate.add_metric([names.get(address, address.split("://", 1)[-1])],
                                (stats.partition_rows + stats.fit_rows) / seconds)
        yield rate
        yield from _run_series(monitor, time.time())


def _run_series(monitor, now: float):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    s = monitor.state
    if s.run_id is None:
        return
    run = [str(s.run_id)]
    info = GaugeMetricFamily("rpicluster_run_info", "The latest training run (1)",
                             labels=["run", "kind", "status"])
    info.add_metric([*run, "train", s.status()], 1.0)
    yield info
    blocks = GaugeMetricFamily("rpicluster_run_blocks", "Blocks of the run", labels=["run"])
    committed = CounterMetricFamily("rpicluster_run_blocks_committed",
                                    "Blocks committed (resumed ones included)", labels=["run"])
    progress = GaugeMetricFamily("rpicluster_run_progress_ratio", "Share of the run done",
                                 labels=["run"])
    eta = GaugeMetricFamily("rpicluster_run_eta_seconds", "Seconds left at the recent rate of "
                            "blocks committed (the terminal's ETA)", labels=["run"])
    accuracy = GaugeMetricFamily("rpicluster_run_accuracy_ratio", "Mean validation accuracy of "
                                 "the blocks scored so far", labels=["run"])
    rate = GaugeMetricFamily("rpicluster_run_rows_per_second", "Training rows committed per "
                             "second of the run's wall time", labels=["run"])
    done, _ = s.stages()[2]
    committed.add_metric(run, float(done))
    if s.n_blocks is not None:
        blocks.add_metric(run, float(s.n_blocks))
    for family, value in ((progress, s.fraction()), (eta, s.eta(now)),
                          (rate, s.rows_per_second(now)),
                          (accuracy, sum(s.accuracy.values()) / len(s.accuracy)
                           if s.accuracy else None)):
        if value is not None:
            family.add_metric(run, float(value))
    yield from (blocks, committed, progress, eta, accuracy, rate)


_COLLECTOR = ClusterCollector()


def register(scheduler, monitor) -> None:
    """Serve rpicluster's series on ``scheduler``'s ``/metrics`` from its ``monitor`` (the
    :class:`~rpicluster.dashboard.server.TrainingMonitor`) (idempotent; the latest scheduler of
    the process answers). Without ``prometheus_client`` nothing is served, as distributed serves
    nothing then."""
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return
    if _COLLECTOR.scheduler is None:
        REGISTRY.register(_COLLECTOR)
    _COLLECTOR.scheduler, _COLLECTOR.monitor = scheduler, monitor
