"""Scheduler side of the dashboard: the event-folding plugin and :func:`install`.

``install(scheduler)`` is the one way in. It adds :class:`TrainingMonitor` (folds the
``rpicluster.train`` events into a :class:`~rpicluster.dashboard.state.TrainingState`), registers
:class:`~rpicluster.dashboard.health.HealthPlugin` on every current and future worker, and serves
the ``/rpicluster`` bokeh page from the scheduler's own dashboard HTTP server. It works on a
scheduler that is already running, so the same call serves an in-process ``LocalCluster``, a
``dask scheduler --preload rpicluster.dashboard`` and ``client.run_on_scheduler(install)``.
"""

from __future__ import annotations

import functools
import logging
import time

from distributed.diagnostics.plugin import SchedulerPlugin

from rpicluster import events as ev
from rpicluster.dashboard.health import METRIC, HealthPlugin
from rpicluster.dashboard.state import (FeaturesState, RoundsState, RunLog, Timeline,
                                        TrainingState)
from rpicluster.errors import ConfigError

logger = logging.getLogger(__name__)

#: URL path of the page, relative to the dashboard's prefix.
PAGE = "/rpicluster"

#: Name of the scheduler plugin.
PLUGIN = "rpicluster-dashboard"

#: Seconds between two samples of the cluster's timeline (rows/s, temperature, memory).
SAMPLE_S = 2.0


class TrainingMonitor(SchedulerPlugin):
    """Scheduler plugin folding every ``rpicluster.train`` event into :attr:`state` (every
    ``rpicluster.features`` event into :attr:`features`, every ``rpicluster.rounds`` event into
    :attr:`rounds`).

    The scheduler keeps only the last ~1000 events of a topic; folding them as they arrive keeps a
    long run's counts right. Events published before the plugin came are read back on start.
    """

    name = PLUGIN

    def __init__(self) -> None:
        self.state = TrainingState()
        self.features = FeaturesState()
        self.rounds = RoundsState()
        #: (worker address, phase) -> [rows, task seconds] over every run since the start
        #: (Prometheus counters: they never go back).
        self.totals: dict[tuple[str, str], list] = {}
        #: Rows trained by the rounds of round-based runs (their events name no worker).
        self.round_rows = 0
        #: Runs seen in the events, by run id: kind, started, ended, status, done, total, accuracy.
        self.runs = RunLog()
        #: The cluster over time (:class:`~rpicluster.dashboard.state.Timeline`), sampled by
        #: :meth:`sample` every :data:`SAMPLE_S` seconds.
        self.timeline = Timeline()
        self._caught_up = False

    async def start(self, scheduler) -> None:
        # install() starts the plugin itself (the scheduler may be running already); a scheduler
        # that is still starting calls start() again, and the backlog must be folded only once.
        if not self._caught_up:
            self._caught_up = True
            backlog = [(t, topic, msg) for topic in (ev.TOPIC, ev.FEATURES_TOPIC,
                                                      ev.ROUNDS_TOPIC)
                       for t, msg in scheduler.get_events(topic)]
            for _, topic, msg in sorted(backlog, key=lambda x: x[0]):
                self.log_event(topic, msg)

    def log_event(self, topic: str, msg) -> None:
        state = {ev.TOPIC: self.state, ev.FEATURES_TOPIC: self.features,
                 ev.ROUNDS_TOPIC: self.rounds}.get(topic)
        if state is None or not isinstance(msg, dict):
            return
        state.feed(msg)
        kind = msg.get(ev.KIND)
        phase = {ev.PARTITIONED: "partition", ev.FITTED: "fit", ev.EXTRACTED: "extract"}.get(kind)
        if phase and msg.get(ev.WORKER) is not None:
            total = self.totals.setdefault((str(msg[ev.WORKER]), phase), [0, 0.0])
            total[0] += int(msg.get(ev.ROWS) or 0)
            total[1] += float(msg.get(ev.SECONDS) or 0.0)
        elif kind == ev.ROUND:
            self.round_rows += int(msg.get(ev.ROWS) or 0)
        self.runs.note(topic, state, msg)

    def sample(self, scheduler) -> None:
        """Add the cluster's present to :attr:`timeline` (rows done so far, per-worker
        temperature and memory)."""
        self.timeline.sample(time.time(), self.round_rows + sum(
            n for n, _ in self.totals.values()), _worker_readings(scheduler))


def _worker_readings(scheduler) -> dict:
    from rpicluster.dashboard.metrics import worker_name

    out = {}
    for ws in scheduler.workers.values():
        health = (ws.metrics or {}).get(METRIC) or {}
        out[worker_name(ws)] = {"temperature": health.get("temperature"),
                                "memory": int(ws.memory.process),
                                "limit": int(ws.memory_limit or 0)}
    return out


def monitor_of(scheduler) -> TrainingMonitor:
    """The :class:`TrainingMonitor` installed on ``scheduler``.

    Raises
    ------
    rpicluster.errors.ConfigError
        If :func:`install` was not run on this scheduler.
    """
    try:
        return scheduler.plugins[PLUGIN]
    except KeyError:
        raise ConfigError(f"scheduler plugin {PLUGIN!r} is not installed: run "
                          "rpicluster.dashboard.install(scheduler) or start the scheduler with "
                          "--preload rpicluster.dashboard") from None


async def install(scheduler) -> str | None:
    """Add the rpicluster training page and worker health reports to a running scheduler.

    Idempotent: a second call changes nothing.

    Parameters
    ----------
    scheduler : distributed.Scheduler
        The scheduler, running or starting (a preload's ``dask_setup`` passes it).

    Returns
    -------
    str or None
        The page's URL path (``/rpicluster`` under the dashboard prefix), or None when the
        scheduler serves no bokeh dashboard (events and health are still collected).
    """
    from distributed.protocol.pickle import dumps

    if PLUGIN not in scheduler.plugins:
        from tornado.ioloop import PeriodicCallback

        monitor = TrainingMonitor()
        scheduler.add_plugin(monitor)
        await monitor.start(scheduler)
        sampler = PeriodicCallback(lambda: monitor.sample(scheduler), SAMPLE_S * 1000)
        scheduler.periodic_callbacks["rpicluster-timeline"] = sampler
        sampler.start()  # (the scheduler's own start skips a running one; close stops it)
        monitor.sample(scheduler)
    from rpicluster.dashboard.metrics import register

    register(scheduler, monitor_of(scheduler))
    await scheduler.register_worker_plugin(None, dumps(HealthPlugin()), METRIC, idempotent=True)
    page = _serve_page(scheduler)

    def facts() -> dict:
        return dashboard_facts(scheduler, page)

    scheduler.handlers[ev.FACTS_OP] = facts
    return page


def dashboard_facts(scheduler, page: str | None = None) -> dict:
    """What the :data:`~rpicluster.events.FACTS_OP` operation answers.

    ``dashboard``: where ``scheduler``'s dashboard listens (``address``, ``port``, ``prefix``,
    ``tls``), None when it serves none; ``page``: the page's path; ``monitor_count``: the system
    monitor's sample count (what ``performance_report`` starts from). Always a dict: a scheduler
    without the operation answers None.
    """
    http = scheduler.services.get("dashboard")
    where = None if http is None else {
        "address": http.address, "port": http.port, "prefix": dashboard_prefix(scheduler) or "",
        "tls": getattr(http, "ssl_options", None) is not None}
    return {"dashboard": where, "page": page, "monitor_count": scheduler.monitor.count}


def _bokeh_apps(scheduler) -> list:
    try:
        from bokeh.server.tornado import BokehTornado
    except ImportError:
        return []
    http = getattr(scheduler, "http_application", None)
    return [a for a in getattr(http, "applications", ()) if isinstance(a, BokehTornado)]


def dashboard_prefix(scheduler) -> str | None:
    """The URL prefix of the scheduler's bokeh dashboard (``""`` for none, else ``"/name"``).

    Returns None when the scheduler serves no bokeh dashboard (``--no-dashboard``, or a bokeh
    version distributed refuses).
    """
    apps = _bokeh_apps(scheduler)
    # distributed keeps the --dashboard-prefix only inside its bokeh server.
    return apps[0]._prefix if apps else None


def _serve_page(scheduler) -> str | None:
    prefix = dashboard_prefix(scheduler)
    if prefix is None:
        return None
    path = prefix + PAGE
    if any(PAGE in a.app_paths for a in _bokeh_apps(scheduler)):
        return path
    from distributed.dashboard import scheduler as dashboard
    from distributed.dashboard.core import BokehApplication
    from tornado.ioloop import IOLoop

    from rpicluster.dashboard.page import training_doc

    nav = dashboard.template_variables(scheduler)
    # The variables are memoized per scheduler and shared by every built-in page, so this adds the
    # page to the navigation bar of the whole dashboard, not only its own.
    if PAGE.strip("/") not in nav["pages"]:
        nav["pages"].append(PAGE.strip("/"))
    # A second bokeh server app beside distributed's own: distributed builds its app once at
    # scheduler start, and the routing application falls through to added apps for unknown paths.
    monitor = monitor_of(scheduler)
    doc = functools.partial(training_doc, state=monitor.state, features=monitor.features,
                            rounds=monitor.rounds, runs=monitor.runs, timeline=monitor.timeline)
    app = BokehApplication({PAGE: doc}, scheduler, prefix=prefix, template_variables=nav)
    scheduler.http_application.add_application(app)
    app.initialize(IOLoop.current())
    app.start()
    logger.info("rpicluster training page at %s", path)
    return path
