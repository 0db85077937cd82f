"""Round checkpoints of model-averaging and federated runs, so a killed run resumes per round.

Layout::

    RUN_DIR/
      lock                         the owner (as a block run's: one run writes here at a time)
      run.json                     what the run is (model kind, parameters, data): written once
      rounds.json                  one report per finished round and the latest model's file and
                                   sha256: replaced atomically, written last
      models/round-000004.skops    the global model after round 4 (skops format)

A round counts as finished only once ``rounds.json`` lists it, and that file is replaced after
the model file is complete, so a crash at any point leaves the previous round's state intact.
Only the newest two model files are kept.

:class:`RoundEvents` publishes the rounds to the ``/rpicluster`` page as they finish.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from rpicluster import events as ev
from rpicluster.errors import ConfigError, ModelError
from rpicluster.train.modelfile import atomic_write_bytes, load_model, save_model
from rpicluster.train.rundir import OwnedDir

FORMAT = 1
KEEP_MODELS = 2


class RoundDir(OwnedDir):
    """The run directory of a round-based run (see the module docstring for the layout).

    :meth:`begin` owns it (the lock of :class:`~rpicluster.train.rundir.OwnedDir`) until
    :meth:`release` or the end of a ``with`` block: a second run into it is refused."""

    kind = "a run directory of a round-based run"

    @property
    def rounds_path(self) -> Path:
        return self.path / "rounds.json"

    def _state(self) -> dict:
        try:
            return json.loads(self.rounds_path.read_text())
        except FileNotFoundError:
            return {"rounds": [], "model": None}

    def history(self) -> list[dict]:
        """The report of every finished round, oldest first."""
        return self._state()["rounds"]

    def create(self, meta: dict, *, overwrite: bool = False) -> None:
        """Start a new run; refuses a directory that already holds finished rounds unless
        ``overwrite`` (they are then forgotten and their model files deleted)."""
        if self.exists() and self.history() and not overwrite:
            raise ConfigError(f"run directory {self.path} already holds "
                              f"{len(self.history())} finished rounds; resume it with --resume, "
                              "start afresh with --overwrite, or choose another directory")
        # The empty round list first: from then on no old round counts as finished.
        atomic_write_bytes(self.rounds_path, json.dumps({"rounds": [], "model": None}).encode())
        for old in (self.path / "models").glob("round-*.skops*"):
            old.unlink(missing_ok=True)
        atomic_write_bytes(self.meta_path, json.dumps(
            {"format": FORMAT, **meta, "created": time.time()}, indent=2).encode())

    def check_resumable(self, meta: dict) -> dict:
        """The recorded run description; ConfigError naming the first key that differs."""
        recorded = self.meta()
        if recorded.get("format") != FORMAT:
            raise ConfigError(f"{self.meta_path}: unknown run format {recorded.get('format')!r} "
                              f"(this rpicluster reads format {FORMAT})")
        for key, value in meta.items():
            # Compared as recorded: JSON keeps a tuple such as --hidden's (512,) as [512].
            value = json.loads(json.dumps(value))
            if key in recorded and recorded[key] != value:
                raise ConfigError(f"cannot resume {self.path}: {key} was {recorded[key]!r} in "
                                  f"the run, now {value!r}")
        return recorded

    def begin(self, meta: dict, *, resume: bool, overwrite: bool = False, expected=None
              ) -> tuple[list[dict], object]:
        """Own the directory and start the run described by ``meta`` (over an old one with
        ``overwrite``), or resume it: ``(history, latest model)``, the model None before the
        first finished round."""
        self.acquire()
        try:
            if not resume:
                self.create(meta, overwrite=overwrite)
                return [], None
            self.check_resumable(meta)
            return self.history(), self.latest_model(expected=expected)
        except BaseException:
            self.release()
            raise

    def commit(self, model, report: dict, *, best: bool = False) -> None:
        """Record a finished round: its model file first, then the round list naming it.
        ``best``: the run may end with this round's model (the engine's best round), so its
        file is kept until another round is the best."""
        state = self._state()
        n = len(state["rounds"]) + 1
        rel = f"models/round-{n:06d}.skops"
        digest = save_model(model, self.path / rel)
        state["rounds"].append(report)
        state["model"] = {"file": rel, "sha256": digest}
        if best:
            state["best"] = {"round": n, **state["model"]}
        atomic_write_bytes(self.rounds_path, json.dumps(state, indent=1).encode())
        kept = (state.get("best") or {}).get("file")
        for old in sorted((self.path / "models").glob("round-*.skops"))[:-KEEP_MODELS]:
            if old.name != Path(kept or "").name:
                old.unlink(missing_ok=True)
                Path(f"{old}.sha256").unlink(missing_ok=True)

    def best_model(self, expected=None):
        """The model of the round committed as the best (:meth:`commit`), or None where none
        was (a run begun by an rpicluster that did not keep it)."""
        return self._load(self._state().get("best"), expected)

    def kept(self, rounds: int):
        """For :meth:`~rpicluster.train.api.ClusterChoice.run_client`: a function saying how many
        of ``rounds`` are finished here (None while no run has begun: nothing to resume)."""
        def describe() -> str | None:
            if not self.exists():
                return None
            return f"{len(self.history())} of {int(rounds)} rounds are finished in {self.path}"

        return describe

    def latest_model(self, expected=None):
        """The global model after the last finished round, or None before the first."""
        return self._load(self._state()["model"], expected)

    def _load(self, entry: dict | None, expected):
        if entry is None:
            return None
        try:
            return load_model(self.path / entry["file"], sha256=entry["sha256"],
                              expected=expected)
        except ModelError as exc:
            raise ModelError(f"cannot resume {self.path}: {exc}") from None


class RoundEvents:
    """Publishes a round-based run to the ``/rpicluster`` page (``ROUNDS_TOPIC`` events).

    A context manager around the run's rounds: entering publishes ``run-start`` and the resumed
    rounds of ``history`` (so a resumed run shows its whole history), :meth:`round` each new
    round, leaving ``run-end`` (also when the run fails). Events go through
    ``client.log_event`` to the scheduler, where the page's plugin folds them; nothing is
    installed from the client.
    """

    def __init__(self, client, mode: str, model: str, n_rounds: int, history: list[dict]):
        self.client, self.mode, self.model, self.n_rounds = client, mode, model, int(n_rounds)
        self.history = list(history)
        self.run_id = f"{mode}-{uuid.uuid4().hex[:8]}"

    def _log(self, kind: str, **fields) -> None:
        ev.publish(self.client, ev.ROUNDS_TOPIC, ev.make_event(kind, run_id=self.run_id,
                                                             **fields))

    def __enter__(self) -> "RoundEvents":
        self._log(ev.RUN_START, mode=self.mode, model=self.model, n_rounds=self.n_rounds,
                  resumed=len(self.history))
        for report in self.history:
            self.round(report)
        return self

    def __exit__(self, kind, exc, tb) -> None:
        # May fail in turn (a lost scheduler); the run's own error stays in the chain.
        self._log(ev.RUN_END, **ev.ending(exc))

    def round(self, report: dict) -> None:
        """Publish one finished round's report (the fields the page shows)."""
        self._log(ev.ROUND, round=int(report["round"]),
                  participants=[str(p) for p in report.get("participants", [])],
                  left_out={str(h): str(why) for h, why in report.get("left_out", {}).items()},
                  rows=int(report["rows"]), bytes_down=int(report["bytes_down"]),
                  bytes_up=int(report["bytes_up"]), seconds=float(report["seconds"]),
                  loss=report.get("loss"), accuracy=report.get("accuracy"))
