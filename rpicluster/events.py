"""Names shared by the training job and the dashboard: the event schema and the page's hooks.

This module sits below both :mod:`rpicluster.train` and :mod:`rpicluster.dashboard` (and
:mod:`rpicluster.deploy`, which starts schedulers with the page preloaded), so neither reaches
into the other for a name.

The training event schema: one topic, a few kinds, a fixed set of field names.

Training publishes with ``client.log_event(TOPIC, {KIND: ..., ...})`` (or ``distributed.get_worker()
.log_event`` from inside a task); the dashboard reads them back from the scheduler with
``scheduler.get_events(TOPIC)``. Both sides import the names from here so they cannot drift.

Every event is a flat ``dict`` of plain Python values (str, int, float, None) so it stays cheap to
send and safe to keep in the scheduler's bounded event log; the one exception is a ``round``
event, whose ``participants`` is a list of host names and ``left_out`` a dict of host name to
reason (a few short strings).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rpicluster.errors import ConfigError, TrainingStopped

#: Module a scheduler preloads to serve the ``/rpicluster`` page (``dask scheduler --preload``,
#: ``LocalCluster(scheduler_kwargs={"preload": [PRELOAD]})``). A name, not an import: the
#: scheduler process imports it.
PRELOAD = "rpicluster.dashboard"

#: Scheduler operation the page's preload adds, answering where the dashboard is and the system
#: monitor's count (``rpicluster dashboard`` and the scaling bench's performance reports ask it
#: instead of running code on the scheduler, which the schedulers rpicluster starts refuse).
FACTS_OP = "rpicluster_dashboard"

#: Name of the worker heartbeat metric (and worker plugin) carrying hardware health.
HEALTH_METRIC = "rpicluster"

#: Scheduler event topic for training progress.
TOPIC = "rpicluster.train"
#: Scheduler event topic for feature extraction (``rpicluster features``): run-start, extracted,
#: run-end.
FEATURES_TOPIC = "rpicluster.features"
#: Scheduler event topic for round-based runs (``train --model mlp|sgd``, ``federate``):
#: run-start (run_id, mode, model, n_rounds, resumed), one ``round`` per finished round (the
#: resumed ones are published again at the start), run-end.
ROUNDS_TOPIC = "rpicluster.rounds"

# Event kinds ("kind" field).
#: a run begins: run_id, n_blocks (every block, resumed ones included), n_clusters, rows (total),
#: resumed (how many blocks were loaded from the run directory instead of trained), t
RUN_START = "run-start"
PARTITIONED = "partitioned"  #: block clustered: block, rows, worker, seconds
#: one fit task's local models fitted: block, cluster (its first), clusters (how many: the
#: clusters are cluster .. cluster + clusters - 1; 1 when absent), rows, worker, seconds
FITTED = "fitted"
COMMITTED = "committed"  #: block model written to the run directory: block
#: run ended: run_id, t, outcome (:data:`OUTCOMES`; absent from older clients), reason
RUN_END = "run-end"
VALIDATION = "validation"  #: block model scored on the validation set: block, accuracy
EXTRACTED = "extracted"  #: features of a block written: block, rows (images), worker, seconds
#: what a run waits on changed: worker (the paused or silent workers, comma-separated, or None),
#: note (the progress line's alert, or None once it clears)
STALLED = "stalled"
#: a round of a round-based run finished: round, participants, left_out, rows, bytes_down,
#: bytes_up, seconds, loss, accuracy (validation, or None)
ROUND = "round"
#: the terminal's count moved (:class:`rpicluster.progress.Progress`): done, total, started
#: (when its count started), base (items done before this run), t (the mark's time). The page
#: computes its blocks done and ETA from these marks, so it tells what the terminal tells.
PROGRESS = "progress"

KINDS = (RUN_START, PARTITIONED, FITTED, COMMITTED, RUN_END, VALIDATION, EXTRACTED, ROUND,
         STALLED, PROGRESS)

# Field names.
KIND = "kind"
RUN_ID = "run_id"
N_BLOCKS = "n_blocks"
N_CLUSTERS = "n_clusters"
BLOCK = "block"
CLUSTER = "cluster"
CLUSTERS = "clusters"
ROWS = "rows"
WORKER = "worker"
SECONDS = "seconds"
ACCURACY = "accuracy"
RESUMED = "resumed"
T = "t"
MODE = "mode"  #: "averaging" (train --model mlp|sgd) or "federated"
MODEL = "model"  #: "mlp" or "sgd"
N_ROUNDS = "n_rounds"
ROUND_NO = "round"
PARTICIPANTS = "participants"
LEFT_OUT = "left_out"
BYTES_DOWN = "bytes_down"  #: global model sent to the workers in a round
BYTES_UP = "bytes_up"  #: updates sent back in a round
LOSS = "loss"
NOTE = "note"  #: stalled: what the run waits on
DONE = "done"  #: progress: items done (the terminal's count)
TOTAL = "total"  #: progress: items in all
STARTED = "started"  #: progress: when the terminal's count started (time.time())
BASE = "base"  #: progress: items done before this run (resumed)
OUTCOME = "outcome"  #: run-end: how the run ended (:data:`OUTCOMES`)
REASON = "reason"  #: run-end: the one-line reason of a stopped or failed run

#: How a run ends: the words of the run history, the page and ``rpicluster runs`` alike.
OUTCOMES = ("done", "stopped", "failed")

FIELDS = (KIND, RUN_ID, N_BLOCKS, N_CLUSTERS, BLOCK, CLUSTER, CLUSTERS, ROWS, WORKER, SECONDS,
          ACCURACY, RESUMED, T, MODE, MODEL, N_ROUNDS, ROUND_NO, PARTICIPANTS, LEFT_OUT, BYTES_DOWN,
          BYTES_UP, LOSS, NOTE, DONE, TOTAL, STARTED, BASE, OUTCOME, REASON)


def ending(exc: BaseException | None) -> dict:
    """How a run that raised ``exc`` (None: it returned) ended, as the ``outcome`` and
    ``reason`` fields of its :data:`RUN_END` event: ``done``; ``stopped`` (Ctrl-C, or a
    :class:`~rpicluster.errors.TrainingStopped`: its work is kept for ``--resume``); or
    ``failed``, each with the error's first line (500 characters at most)."""
    if exc is None:
        return {OUTCOME: "done"}
    stopped = isinstance(exc, (KeyboardInterrupt, TrainingStopped))
    reason = (str(exc).strip().splitlines() or [""])[0][:500] or type(exc).__name__
    return {OUTCOME: "stopped" if stopped else "failed", REASON: reason}


def progress_event(progress, run_id: str | None = None) -> dict:
    """The :data:`PROGRESS` event of a :class:`rpicluster.progress.Progress` whose count just
    moved (its latest mark), for run ``run_id``."""
    t, done = progress.marks()[-1]
    return make_event(PROGRESS, run_id=run_id, done=int(done), total=progress.total,
                      started=progress.started, base=progress.base, t=t)


def make_event(kind: str, **fields) -> dict:
    """Build one training event, checking the kind and field names against the schema.

    Parameters
    ----------
    kind : str
        One of :data:`KINDS`.
    **fields
        Any of :data:`FIELDS` except ``kind``. ``t`` defaults to ``time.time()``.

    Returns
    -------
    dict
        The event, ready for ``client.log_event(TOPIC, event)``.

    Raises
    ------
    rpicluster.errors.ConfigError
        If ``kind`` or a field name is not part of the schema.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown training event kind {kind!r} (known kinds: {list(KINDS)})")
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown training event field(s) {unknown} (known fields: {list(FIELDS)})")
    event = {KIND: kind, **fields}
    event.setdefault(T, time.time())
    return event


#: Listeners of the events this process publishes (:func:`publish`), e.g. the MLflow logger.
_TAPS: list = []


@contextlib.contextmanager
def tapping(listener) -> Iterator[None]:
    """Call ``listener(topic, event)`` for every event this process publishes through
    :func:`publish` inside the block, in the publisher's thread, before it is sent: a local
    observer sees every event of its run, in order, without asking the scheduler."""
    _TAPS.append(listener)
    try:
        yield
    finally:
        _TAPS.remove(listener)


def publish(client, topic: str, event: dict) -> None:
    """Send ``event`` to the scheduler's ``topic`` (``client.log_event``), for the page, and
    hand it to this process's listeners (:func:`tapping`). A listener's error never reaches
    the run: it is the listener's to report."""
    client.log_event(topic, event)
    for listener in list(_TAPS):
        try:
            listener(topic, event)
        except Exception:  # noqa: BLE001 - monitoring never stops a run
            pass


def publish_progress(client, progress, run_id: str | None = None):
    """Publish every move of ``progress``'s count as a :data:`PROGRESS` event of run ``run_id``
    through ``client`` (a ``distributed.Client``), so the page shows the terminal's count and
    ETA; returns the function that stops publishing.

    Monitoring never stops a run: an event that cannot be sent (the scheduler went away; the
    run finds that out by itself) is dropped.
    """
    def listener(p) -> None:
        try:
            publish(client, TOPIC, progress_event(p, run_id))
        except Exception:  # noqa: BLE001 - see above
            pass

    return progress.listen(listener)

