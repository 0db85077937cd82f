"""Round checkpoints of model-averaging and federated runs, so a killed run resumes per round.

Layout::

    RUN_DIR/
      run.json                     what the run is (model kind, parameters, data): written once
      rounds.json                  one report per finished round and the latest model's file and
                                   sha256: replaced atomically, written last
      models/round-000004.skops    the global model after round 4 (skops format)

A round counts as finished only once ``rounds.json`` lists it, and that file is replaced after
the model file is complete, so a crash at any point leaves the previous round's state intact.
Only the newest two model files are kept.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rpicluster.errors import ConfigError, ModelError
from rpicluster.train.modelfile import atomic_write_bytes, load_model, save_model

FORMAT = 1
KEEP_MODELS = 2


class RoundDir:
    """The run directory of a round-based run (see the module docstring for the layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def meta_path(self) -> Path:
        return self.path / "run.json"

    @property
    def rounds_path(self) -> Path:
        return self.path / "rounds.json"

    def meta(self) -> dict:
        try:
            return json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{self.path} is not a run directory of a round-based run "
                              "(no run.json)") from None

    def _state(self) -> dict:
        try:
            return json.loads(self.rounds_path.read_text())
        except FileNotFoundError:
            return {"rounds": [], "model": None}

    def history(self) -> list[dict]:
        """The report of every finished round, oldest first."""
        return self._state()["rounds"]

    def create(self, meta: dict) -> None:
        """Start a new run; refuses a directory that already holds finished rounds."""
        if self.meta_path.is_file() and self.history():
            raise ConfigError(f"run directory {self.path} already holds "
                              f"{len(self.history())} finished rounds; resume it with --resume "
                              "or choose another directory")
        atomic_write_bytes(self.meta_path, json.dumps(
            {"format": FORMAT, **meta, "created": time.time()}, indent=2).encode())
        atomic_write_bytes(self.rounds_path, json.dumps({"rounds": [], "model": None}).encode())

    def check_resumable(self, meta: dict) -> dict:
        """The recorded run description; ConfigError naming the first key that differs."""
        recorded = self.meta()
        if recorded.get("format") != FORMAT:
            raise ConfigError(f"{self.meta_path}: unknown run format {recorded.get('format')!r} "
                              f"(this rpicluster reads format {FORMAT})")
        for key, value in meta.items():
            if key in recorded and recorded[key] != value:
                raise ConfigError(f"cannot resume {self.path}: {key} was {recorded[key]!r} in "
                                  f"the run, now {value!r}")
        return recorded

    def begin(self, meta: dict, *, resume: bool, expected=None) -> tuple[list[dict], object]:
        """Start the run described by ``meta``, or resume it: ``(history, latest model)``, the
        model None before the first finished round."""
        if not resume:
            self.create(meta)
            return [], None
        self.check_resumable(meta)
        return self.history(), self.latest_model(expected=expected)

    def commit(self, model, report: dict) -> None:
        """Record a finished round: its model file first, then the round list naming it."""
        state = self._state()
        n = len(state["rounds"]) + 1
        rel = f"models/round-{n:06d}.skops"
        digest = save_model(model, self.path / rel)
        state["rounds"].append(report)
        state["model"] = {"file": rel, "sha256": digest}
        atomic_write_bytes(self.rounds_path, json.dumps(state, indent=1).encode())
        for old in sorted((self.path / "models").glob("round-*.skops"))[:-KEEP_MODELS]:
            old.unlink(missing_ok=True)
            Path(f"{old}.sha256").unlink(missing_ok=True)

    def latest_model(self, expected=None):
        """The global model after the last finished round, or None before the first."""
        entry = self._state()["model"]
        if entry is None:
            return None
        try:
            return load_model(self.path / entry["file"], sha256=entry["sha256"],
                              expected=expected)
        except ModelError as exc:
            raise ModelError(f"cannot resume {self.path}: {exc}") from None
