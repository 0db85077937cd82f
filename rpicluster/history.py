"""Run history: every train, federate, features, tune and bench run, in an embedded SQLite file.

``<rpicluster home>/history.sqlite`` (:func:`rpicluster.config.state_dir`) holds one row per run:
its kind, parameters, data and the data's fingerprint, cluster and workers, per-phase times,
result figures, model path and outcome (``running``, ``done``, ``stopped``, ``failed``, with the
one-line reason). Library entry points record through :func:`recording`::

    with history.recording("train", params=params, data=url, fingerprint=fp) as run:
        ...
        run.update(cluster=address, workers=names)
        run.result(accuracy=0.93, model_path="m.skops", phases={"train": 12.1})

Several runs may write at the same time (processes on one desktop): the database is in WAL mode
with a busy timeout, and every write is one short transaction. Monitoring never stops a run: a
history that cannot be written (locked past the timeout, corrupt, written by a newer rpicluster)
gives one :class:`~rpicluster.errors.RPiClusterWarning` line and the run goes on unrecorded.
Reading (``rpicluster runs``) raises :class:`~rpicluster.errors.ConfigError` for the same
problems, naming the file and what to do.

Standard library only (this module sits beside ``config`` in the layers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from rpicluster import config, events
from rpicluster.errors import ConfigError, RPiClusterWarning

#: Schema version, kept in SQLite's ``user_version``; a file with a higher one was written by a
#: newer rpicluster and is neither read nor written.
SCHEMA_VERSION = 1

#: Kinds of run recorded.
KINDS = ("train", "federate", "features", "tune", "bench")
#: Outcomes: a run is ``running`` until its context ends. A ``running`` run whose process is
#: gone (on this host) reads as ``lost``.
OUTCOMES = ("running", *events.OUTCOMES)

#: Seconds a writer waits for another's transaction before giving up (SQLite's busy timeout).
BUSY_TIMEOUT_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    outcome TEXT NOT NULL,
    reason TEXT,
    params TEXT NOT NULL DEFAULT '{}',
    data TEXT,
    fingerprint TEXT,
    cluster TEXT,
    workers TEXT NOT NULL DEFAULT '[]',
    phases TEXT NOT NULL DEFAULT '{}',
    results TEXT NOT NULL DEFAULT '{}',
    model_path TEXT,
    run_id TEXT,
    host TEXT,
    pid INTEGER
);
CREATE INDEX IF NOT EXISTS runs_started ON runs (started);
"""
_JSON = ("params", "workers", "phases", "results")
COLUMNS = ("id", "kind", "started", "ended", "outcome", "reason", "params", "data", "fingerprint",
           "cluster", "workers", "phases", "results", "model_path", "run_id", "host", "pid")


def path() -> Path:
    """The history database: ``history.sqlite`` in the rpicluster home."""
    return config.state_dir() / "history.sqlite"


def enabled() -> bool:
    """Whether runs are recorded: not when ``RPICLUSTER_HISTORY`` is ``0`` (``no``, ``off``,
    ``false``)."""
    return os.environ.get("RPICLUSTER_HISTORY", "1").strip().lower() not in (
        "0", "no", "off", "false")


def fingerprint(facts: Mapping) -> str:
    """A short content fingerprint (16 hex digits of a sha256) of a store's identifying facts.

    Pass what identifies the data, e.g. a store's per-chunk checksums, shape and classes: two
    stores with equal facts get the same fingerprint whatever their path.
    """
    text = json.dumps(facts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def connect(db: str | os.PathLike | None = None, *, create: bool = True) -> sqlite3.Connection:
    """Open (and create or migrate) the history database.

    Raises
    ------
    rpicluster.errors.ConfigError
        The file is not an rpicluster history (corrupt, or another kind of file), was written
        by a newer rpicluster, or stays locked past :data:`BUSY_TIMEOUT_S`.
    """
    where = Path(db) if db is not None else path()
    if not create and not where.exists():
        raise ConfigError(f"no run history at {where} yet: it is written by the first train, "
                          "federate, features, tune or bench run")
    where.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(where, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot open the run history {where} ({exc}); check the folder's "
                          "permissions") from None
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(f"the run history {where} has schema version {version}, newer than "
                              f"this rpicluster's {SCHEMA_VERSION}: it was written by a newer "
                              "rpicluster; upgrade rpicluster, or set RPICLUSTER_HOME elsewhere")
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if version < SCHEMA_VERSION:
            _create(conn)
        else:
            conn.execute("SELECT id FROM runs LIMIT 1").fetchall()
    except ConfigError:
        conn.close()
        raise
    except sqlite3.OperationalError as exc:
        conn.close()
        if "locked" in str(exc) or "busy" in str(exc):
            raise ConfigError(f"the run history {where} stayed locked for {BUSY_TIMEOUT_S:g} s "
                              f"(another process holds it: {exc}); try again") from None
        raise _corrupt(where, exc) from None
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise _corrupt(where, exc) from None
    return conn


def _create(conn: sqlite3.Connection) -> None:
    """Create the schema (one writer at a time: the others wait on the busy timeout), then
    switch to WAL, where readers never block the writer and writers queue instead of failing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    # Changing the journal mode answers "locked" at once (no busy handler) while another
    # connection has the file open: retry within the busy timeout; WAL, once set, stays.
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _corrupt(where: Path, exc: Exception) -> ConfigError:
    return ConfigError(f"the run history {where} is not a readable rpicluster history ({exc}); "
                       f"move it aside (mv {where} {where}.bad) and a new one is started")


def _row(cursor_row: tuple) -> dict:
    run = dict(zip(COLUMNS, cursor_row))
    for key in _JSON:
        run[key] = json.loads(run[key] or ("[]" if key == "workers" else "{}"))
    if run["outcome"] == "running" and run["host"] == socket.gethostname() and \
            not _alive(run["pid"]):
        # Killed (SIGKILL, power cut) before it could record how it ended.
        run["outcome"] = "lost"
        run["reason"] = f"its process (pid {run['pid']}) ended without recording an outcome"
    return run


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def list_runs(limit: int | None = 50, *, db: str | os.PathLike | None = None) -> list[dict]:
    """Recorded runs, newest first (at most ``limit``; None for all).

    Raises
    ------
    rpicluster.errors.ConfigError
        See :func:`connect` (no history yet, corrupt, newer, locked).
    """
    with contextlib.closing(connect(db, create=False)) as conn:
        try:
            rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM runs ORDER BY id DESC"
                                + (" LIMIT ?" if limit is not None else ""),
                                (limit,) if limit is not None else ()).fetchall()
        except sqlite3.DatabaseError as exc:
            raise _corrupt(Path(db) if db else path(), exc) from None
    return [_row(r) for r in rows]


def get_run(run: int, *, db: str | os.PathLike | None = None) -> dict:
    """One recorded run by its number.

    Raises
    ------
    rpicluster.errors.ConfigError
        No run ``run`` (naming the newest one), or see :func:`connect`.
    """
    with contextlib.closing(connect(db, create=False)) as conn:
        row = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM runs WHERE id = ?",
                           (int(run),)).fetchone()
        if row is None:
            newest = conn.execute("SELECT max(id) FROM runs").fetchone()[0]
            raise ConfigError(f"no run {run} in {Path(db) if db else path()} "
                              + (f"(runs are numbered 1 to {newest}); list them with "
                                 "`rpicluster runs`" if newest else "(it records no run yet)"))
    return _row(row)


#: Observers of every run recorded in this process (:func:`observing`), e.g. the MLflow logger.
_OBSERVERS: list = []


@contextlib.contextmanager
def observing(observer) -> Iterator[None]:
    """Tell ``observer`` about every run recorded (:func:`recording`) inside the block, whether
    or not the history itself is written: its ``run_started(recorder, params=, data=,
    fingerprint=, cluster=)``, ``run_updated(recorder, **fields)``, ``run_result(recorder,
    phases, figures)`` and ``run_finished(recorder, outcome, reason)`` are called as the run
    goes, in the run's thread. An observer reports its own failures; one that raises is
    dropped with one warning line, and the run goes on."""
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


class Recorder:
    """One run's row in the history; what :func:`recording` yields.

    Each method writes at once (one short transaction), so a run killed half-way stays visible
    as ``running`` with what it had recorded. A recorder whose database failed records nothing
    more and warns once.
    """

    def __init__(self, kind: str, db: str | os.PathLike | None = None) -> None:
        if kind not in KINDS:
            raise ConfigError(f"unknown run kind {kind!r} (known kinds: {list(KINDS)})")
        self.kind = kind
        self.db = db
        self.id: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._failed = False
        self._phases: dict[str, float] = {}
        self._results: dict = {}
        self._observers = list(_OBSERVERS)

    def _tell(self, what: str, *args, **fields) -> None:
        for observer in list(self._observers):
            try:
                getattr(observer, what)(self, *args, **fields)
            except Exception as exc:  # noqa: BLE001 - monitoring never stops a run
                self._observers.remove(observer)
                warnings.warn(f"{type(observer).__name__} failed ({exc}); it watches this "
                              f"{self.kind} run no more", RPiClusterWarning, stacklevel=3)

    def _write(self, sql: str, args: tuple) -> sqlite3.Cursor | None:
        if self._failed:
            return None
        try:
            if self._conn is None:
                self._conn = connect(self.db)
            return self._conn.execute(sql, args)
        except (ConfigError, sqlite3.Error, OSError) as exc:
            self._failed = True
            text = str(exc) if isinstance(exc, ConfigError) else (
                f"the run history {Path(self.db) if self.db else path()}: {exc}")
            warnings.warn(f"{text}; this {self.kind} run is not recorded", RPiClusterWarning,
                          stacklevel=3)
            self.close()
            return None

    def start(self, *, params: Mapping | None = None, data: str | None = None,
              fingerprint: str | None = None, cluster: str | None = None) -> None:
        """Insert the run's row (outcome ``running``)."""
        self._tell("run_started", params=dict(params or {}), data=data,
                   fingerprint=fingerprint, cluster=cluster)
        cur = self._write(
            "INSERT INTO runs (kind, started, outcome, params, data, fingerprint, cluster, host,"
            " pid) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?)",
            (self.kind, time.time(), _dumps(params or {}), data, fingerprint, cluster,
             socket.gethostname(), os.getpid()))
        if cur is not None:
            self.id = cur.lastrowid

    def update(self, *, cluster: str | None = None, workers: list | None = None,
               run_id: str | None = None, model_path: str | os.PathLike | None = None,
               params: Mapping | None = None) -> None:
        """Record what became known while the run went on (only the arguments given)."""
        fields = {"cluster": cluster, "workers": None if workers is None else _dumps(
            sorted(map(str, workers))), "run_id": run_id,
                  "model_path": None if model_path is None else str(model_path),
                  "params": None if params is None else _dumps(params)}
        fields = {k: v for k, v in fields.items() if v is not None}
        self._tell("run_updated", cluster=cluster, workers=workers, run_id=run_id,
                   model_path=model_path, params=params)
        if fields and self.id is not None:
            self._write(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                        (*fields.values(), self.id))

    def connected(self, client) -> None:
        """Record the cluster a ``distributed.Client`` is connected to and its workers' names."""
        workers = client.scheduler_info()["workers"]
        self.update(cluster=client.scheduler.address,
                    workers=[w.get("name", a) for a, w in workers.items()])

    def result(self, *, phases: Mapping[str, float] | None = None,
               model_path: str | os.PathLike | None = None, **figures) -> None:
        """Record result figures (accuracy, rows/s, ...), per-phase seconds and the model path;
        later calls add to earlier ones."""
        self._phases.update({k: float(v) for k, v in (phases or {}).items()})
        self._results.update(figures)
        self._tell("run_result", {k: float(v) for k, v in (phases or {}).items()}, figures)
        if self.id is not None:
            self._write("UPDATE runs SET phases = ?, results = ? WHERE id = ?",
                        (_dumps(self._phases), _dumps(self._results), self.id))
        if model_path is not None:
            self.update(model_path=model_path)

    def finish(self, outcome: str, reason: str | None = None) -> None:
        """Set the outcome (and the one-line reason of a stopped or failed run)."""
        if outcome not in OUTCOMES[1:]:
            raise ConfigError(f"unknown outcome {outcome!r} (known: {list(OUTCOMES[1:])})")
        self._tell("run_finished", outcome, reason)
        if self.id is not None:
            line = None if reason is None else (str(reason).strip().splitlines() or [""])[0][:500]
            self._write("UPDATE runs SET ended = ?, outcome = ?, reason = ? WHERE id = ?",
                        (time.time(), outcome, line, self.id))
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None


def _dumps(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@contextlib.contextmanager
def recording(kind: str, *, params: Mapping | None = None, data: str | None = None,
              fingerprint: str | None = None, cluster: str | None = None,
              db: str | os.PathLike | None = None) -> Iterator[Recorder]:
    """Record one run in the history: ``running`` on entry; on exit ``done``, ``stopped``
    (Ctrl-C, or a :class:`~rpicluster.errors.TrainingStopped`) or ``failed`` with the error's
    first line. Exceptions pass through unchanged; a history that cannot be written only warns.

    Set ``RPICLUSTER_HISTORY=0`` to record nothing.
    """
    recorder = Recorder(kind, db)
    if not enabled():
        recorder._failed = True
    recorder.start(params=params, data=data, fingerprint=fingerprint, cluster=cluster)
    try:
        yield recorder
    except BaseException as exc:
        end = events.ending(exc)
        recorder.finish(end[events.OUTCOME], end[events.REASON])
        raise
    else:
        recorder.finish("done")
