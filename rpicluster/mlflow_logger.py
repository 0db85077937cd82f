"""Log rpicluster runs to MLflow (the optional ``mlflow`` extra: ``pip install -e ".[mlflow]"``).

:class:`MLflowLogger` records what the run history records (:mod:`rpicluster.history`), as one
MLflow run per recorded run in the experiment ``rpicluster``: the parameters; the data, its
fingerprint, the cluster and workers as tags; the result figures and per-phase seconds as
metrics; per block (Inc-kSGD validation accuracy, blocks committed, images per second of a
feature block), per round (loss, accuracy, seconds, rows, bytes moved) and per tune
candidate (its held-out score at each rung) metrics with their step, from the events the run
publishes (:func:`rpicluster.events.publish`); the model file as
an artifact (its path as a tag); and the outcome (``FINISHED``, ``KILLED`` for a stopped run,
``FAILED``, with the history's word and reason as tags)::

    with MLflowLogger("mlruns"):       # or http://mlflow.lan:5000, sqlite:///mlflow.db
        train_model(...)

A plain path (or ``file:`` URI) is an MLflow file store. MLflow 3 keeps that store in
maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is true: asking for one here
is that opt-in, so the logger sets ``MLFLOW_ALLOW_FILE_STORE=true`` for this process unless it
is set already (``mlflow ui`` needs it too to show the store).

Monitoring never stops a run, nor slows it: every MLflow call is made on one background thread
fed by a queue. A tracking server that does not answer, a store that refuses the run, or
mlflow missing give one :class:`~rpicluster.errors.RPiClusterWarning` line and the run goes on
unlogged; when the run ends the logger waits at most :data:`FLUSH_TIMEOUT_S` for MLflow.
"""

from __future__ import annotations

import math
import numbers
import os
import queue
import re
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from rpicluster import events as ev
from rpicluster import history
from rpicluster.errors import RPiClusterWarning

#: The MLflow experiment rpicluster's runs go to.
EXPERIMENT = "rpicluster"
#: Seconds a run's end waits for its MLflow calls to finish (a slow server is left behind).
FLUSH_TIMEOUT_S = 30.0
#: Seconds the first request to a tracking server may take before it counts as not answering.
CONNECT_TIMEOUT_S = 5.0

#: MLflow run status for each outcome of the history.
_STATUS = {"done": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
#: Per-round report fields logged as step metrics (``round`` events).
_ROUND_METRICS = (ev.LOSS, ev.ACCURACY, ev.SECONDS, ev.ROWS)
#: The kind of a tune's per-candidate result event (:mod:`rpicluster.tune.search`, a sibling
#: this module does not import).
_TUNE_RESULT = "tune-result"
_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-. /]+")


def default_uri() -> str:
    """The file store ``mlruns`` in the rpicluster home (``--mlflow`` without a URI)."""
    from rpicluster import config

    return (config.state_dir() / "mlruns").as_uri()


def _key(name: str) -> str:
    """``name`` as an MLflow metric or parameter key (letters, digits, ``_-. /`` only)."""
    return _BAD_KEY.sub("_", str(name)).strip("_") or "_"


def _number(value) -> float | None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and \
            math.isfinite(float(value)):
        return float(value)
    return None


def _is_file_store(uri: str) -> bool:
    scheme = uri.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", uri) else ""
    return scheme in ("", "file")


class MLflowLogger:
    """Log every run recorded inside ``with MLflowLogger(uri):`` to the MLflow tracking ``uri``.

    Parameters
    ----------
    uri : str
        An MLflow tracking URI: a folder or ``file:`` URI (a file store), ``http(s)://`` (a
        tracking server), ``sqlite:///...`` (needs the full ``mlflow`` package), ...
    experiment : str
        The experiment the runs go to (created if missing).
    """

    def __init__(self, uri: str, experiment: str = EXPERIMENT) -> None:
        self.uri = str(uri)
        self.experiment = experiment
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._client = None
        self._experiment_id: str | None = None
        self._runs: dict[int, str] = {}  # id(recorder) -> MLflow run id
        self._active: list = []  # recorders running, innermost last (events go to it)
        self._counts: dict[int, int] = {}
        self._error: str | None = None
        self._warned = False
        self._stacks: list = []

    # -- the context: observe the history's runs and the events this process publishes ----
    def __enter__(self) -> "MLflowLogger":
        import contextlib

        if self._import_error() is not None:
            warnings.warn(self._import_error(), RPiClusterWarning, stacklevel=2)
            self._warned = True
            self._stacks.append(contextlib.nullcontext())
            return self
        if _is_file_store(self.uri):
            # MLflow 3 refuses its file store unless opted in: naming one is that opt-in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        stack = contextlib.ExitStack()
        stack.enter_context(history.observing(self))
        stack.enter_context(ev.tapping(self._event))
        self._stacks.append(stack)
        return self

    def __exit__(self, *exc) -> None:
        self._stacks.pop().__exit__(*exc)
        self._stop_thread()

    @staticmethod
    def _import_error() -> str | None:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            return ('--mlflow needs MLflow, which is not installed: pip install -e ".[mlflow]" '
                    "(or pip install mlflow-skinny); this run is not logged to MLflow")
        return None

    # -- history observer (the run's thread): queue the calls -------------------------------
    def run_started(self, recorder, *, params, data, fingerprint, cluster) -> None:
        # A run recorded inside another (a bench's steps) is its MLflow child run.
        parent = id(self._active[-1]) if self._active else None
        self._active.append(recorder)
        tags = {"rpicluster.kind": recorder.kind, "rpicluster.data": data,
                "rpicluster.fingerprint": fingerprint, "rpicluster.cluster": cluster}
        self._submit(self._start, id(recorder), parent, recorder.kind, data, params,
                     {k: str(v) for k, v in tags.items() if v is not None}, time.time())
        self._report()

    def run_updated(self, recorder, **fields) -> None:
        tags = {"rpicluster.cluster": fields.get("cluster"),
                "rpicluster.run_id": fields.get("run_id"),
                "rpicluster.workers": None if fields.get("workers") is None else
                ", ".join(sorted(map(str, fields["workers"])))}
        if fields.get("model_path") is not None:
            tags["rpicluster.model_path"] = str(fields["model_path"])
            self._submit(self._artifact, id(recorder), str(fields["model_path"]))
        if recorder.id is not None:
            tags["rpicluster.history_id"] = str(recorder.id)
        self._submit(self._tags, id(recorder), {k: str(v) for k, v in tags.items()
                                                if v is not None})
        if fields.get("params"):
            self._submit(self._params, id(recorder), fields["params"])
        self._report()

    def run_result(self, recorder, phases: dict, figures: dict) -> None:
        metrics = {f"seconds/{_key(k)}": v for k, v in phases.items()}
        tags = {}
        for name, value in figures.items():
            number = _number(value)
            if number is not None:
                metrics[_key(name)] = number
            elif value is not None:
                tags[f"rpicluster.{_key(name)}"] = str(value)[:5000]
        self._submit(self._metrics, id(recorder), metrics, None, time.time())
        if tags:
            self._submit(self._tags, id(recorder), tags)
        self._report()

    def run_finished(self, recorder, outcome: str, reason: str | None) -> None:
        if recorder in self._active:
            self._active.remove(recorder)
        tags = {"rpicluster.outcome": outcome}
        if reason:
            tags["rpicluster.reason"] = str(reason)[:5000]
        self._submit(self._tags, id(recorder), tags)
        self._submit(self._end, id(recorder), _STATUS.get(outcome, "FAILED"), time.time())
        self.flush()

    # -- events tap (the publisher's thread): per block and per round metrics ---------------
    def _event(self, topic: str, event: dict) -> None:
        if not self._active:
            return
        run = id(self._active[-1])
        kind, t = event.get(ev.KIND), float(event.get(ev.T) or time.time())
        metrics, step = {}, None
        if kind == ev.ROUND and event.get(ev.ROUND_NO) is not None:
            step = int(event[ev.ROUND_NO])
            metrics = {f"round/{k}": event.get(k) for k in _ROUND_METRICS}
            metrics["round/bytes_moved"] = (event.get(ev.BYTES_DOWN) or 0) + (
                event.get(ev.BYTES_UP) or 0)
        elif kind == ev.VALIDATION and event.get(ev.BLOCK) is not None:
            step, metrics = int(event[ev.BLOCK]), {"block/validation_accuracy":
                                                   event.get(ev.ACCURACY)}
        elif kind == ev.COMMITTED:
            self._counts[run] = step = self._counts.get(run, 0) + 1
            metrics = {"blocks_committed": step}
        elif kind == _TUNE_RESULT and event.get("candidate") is not None:
            # rpicluster.tune's events: each candidate's held-out score at each rung.
            step = int(event["candidate"])
            metrics = {f"rung {event.get('rung')}/score": event.get("score")}
        elif kind == ev.EXTRACTED and event.get(ev.BLOCK) is not None:
            rows, seconds = event.get(ev.ROWS), event.get(ev.SECONDS)
            step = int(event[ev.BLOCK])
            metrics = {"block/images_per_second": rows / seconds if rows and seconds else None}
        metrics = {k: _number(v) for k, v in metrics.items()}
        metrics = {k: v for k, v in metrics.items() if v is not None}
        if metrics:
            self._submit(self._metrics, run, metrics, step, t)

    # -- plumbing ------------------------------------------------------------------------------
    def _submit(self, fn, *args) -> None:
        if self._error is not None:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="rpicluster-mlflow",
                                            daemon=True)
            self._thread.start()
        self._queue.put((fn, args))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    fn, args = item
                    try:
                        fn(*args)
                    except Exception as exc:  # noqa: BLE001 - reported once, by _report
                        first = (str(exc).strip().splitlines() or [""])[0][:300]
                        self._error = first or type(exc).__name__
            finally:
                self._queue.task_done()

    def flush(self, timeout: float | None = None) -> None:
        """Wait (at most ``timeout``, default :data:`FLUSH_TIMEOUT_S`) for the queued MLflow
        calls; report a failure or a server that did not answer in one warning line."""
        if self._thread is not None:
            deadline = time.monotonic() + (FLUSH_TIMEOUT_S if timeout is None else timeout)
            while self._queue.unfinished_tasks and time.monotonic() < deadline:
                time.sleep(0.02)
            if self._queue.unfinished_tasks and self._error is None:
                waited = FLUSH_TIMEOUT_S if timeout is None else timeout
                self._error = f"no answer within {waited:g} s"
        self._report()

    def _report(self) -> None:
        if self._error is not None and not self._warned:
            self._warned = True
            warnings.warn(f"MLflow at {self.uri}: {self._error}; the run goes on, not logged "
                          "to MLflow", RPiClusterWarning, stacklevel=4)

    def _stop_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=1.0)
        self._thread = None

    # -- MLflow calls (the logger's thread) ----------------------------------------------------
    def _mlflow(self):
        if self._client is None:
            if self.uri.lower().startswith(("http://", "https://")):
                # MLflow retries a silent server for minutes: ask once, quickly, first.
                try:
                    urllib.request.urlopen(self.uri.rstrip("/") + "/health",
                                           timeout=CONNECT_TIMEOUT_S).close()
                except (urllib.error.URLError, OSError) as exc:
                    raise ConnectionError(f"the tracking server does not answer "
                                          f"({getattr(exc, 'reason', exc)})") from None
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.uri)
            found = client.get_experiment_by_name(self.experiment)
            self._experiment_id = (found.experiment_id if found is not None else
                                   client.create_experiment(self.experiment))
            self._client = client
        return self._client

    def _start(self, run: int, parent: int | None, kind: str, data: str | None, params: dict,
               tags: dict, t: float) -> None:
        client = self._mlflow()
        name = f"{kind} {Path(str(data)).name}" if data else kind
        if parent in self._runs:
            tags["mlflow.parentRunId"] = self._runs[parent]
        created = client.create_run(self._experiment_id, start_time=int(t * 1000), tags=tags,
                                    run_name=name)
        self._runs[run] = created.info.run_id
        self._params(run, params, existing={})

    def _params(self, run: int, params: dict, existing: dict | None = None) -> None:
        from mlflow.entities import Param

        if run in self._runs and params:
            # A parameter is written once: a value that changed later goes in as a tag.
            if existing is None:
                existing = self._mlflow().get_run(self._runs[run]).data.params
            new = {_key(k): str(v)[:6000] for k, v in params.items()}
            self._mlflow().log_batch(self._runs[run], params=[
                Param(k, v) for k, v in new.items() if k not in existing])
            changed = {f"rpicluster.param.{k}": v for k, v in new.items()
                       if k in existing and existing[k] != v}
            if changed:
                self._tags(run, changed)

    def _tags(self, run: int, tags: dict) -> None:
        from mlflow.entities import RunTag

        if run in self._runs and tags:
            self._mlflow().log_batch(self._runs[run],
                                     tags=[RunTag(k, v) for k, v in tags.items()])

    def _metrics(self, run: int, metrics: dict, step: int | None, t: float) -> None:
        from mlflow.entities import Metric

        if run in self._runs and metrics:
            self._mlflow().log_batch(self._runs[run], metrics=[
                Metric(k, v, int(t * 1000), step or 0) for k, v in metrics.items()])

    def _artifact(self, run: int, path: str) -> None:
        if run in self._runs and os.path.isfile(path):
            self._mlflow().log_artifact(self._runs[run], path)

    def _end(self, run: int, status: str, t: float) -> None:
        if run in self._runs:
            self._mlflow().set_terminated(self._runs.pop(run), status=status,
                                          end_time=int(t * 1000))
