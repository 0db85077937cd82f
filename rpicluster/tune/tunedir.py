"""The tune directory: what a search is, and one atomic result per candidate and rung.

Layout::

    TUNE_DIR/
      tune.json                  the search (model, space, plan, seed, data, candidates' params)
      results/c0007-r1.json      candidate 7 after rung 1: units, score, seconds, its model file
      models/c0007-r1.skops      that candidate's model (kept while it may still continue)
      leaderboard.json           every candidate's best rung, best first (replaced atomically)

A result counts once its JSON file exists, and that file is written after the model file is
complete (both through a temporary file and a rename), so a search killed at any point keeps
every finished (candidate, rung) and a resumed search trains only the others.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rpicluster.errors import ConfigError, ModelError
from rpicluster.train.modelfile import atomic_write_bytes, load_model, save_model

FORMAT = 1


class TuneDir:
    """A tune directory (see the module docstring for its layout)."""

    def __init__(self, path):
        self.path = Path(path)

    @property
    def meta_path(self) -> Path:
        return self.path / "tune.json"

    @property
    def leaderboard_path(self) -> Path:
        return self.path / "leaderboard.json"

    def _result_path(self, candidate: int, rung: int) -> Path:
        return self.path / "results" / f"c{candidate:04d}-r{rung + 1}.json"

    def _model_rel(self, candidate: int, rung: int) -> str:
        return f"models/c{candidate:04d}-r{rung + 1}.skops"

    def results(self) -> dict[tuple[int, int], dict]:
        """Every finished result, by ``(candidate, rung)`` (rung counted from 0)."""
        out = {}
        for p in sorted((self.path / "results").glob("c*-r*.json")):
            r = json.loads(p.read_text())
            out[(int(r["candidate"]), int(r["rung"]))] = r
        return out

    def begin(self, meta: dict, *, resume: bool, overwrite: bool) -> dict:
        """Start the search ``meta`` describes, or resume it: the finished results.

        Raises
        ------
        ConfigError
            Finished results here without ``resume`` or ``overwrite``; or, resuming, a search
            that differs (the first differing key named) or none at all.
        """
        if resume:
            try:
                recorded = json.loads(self.meta_path.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{self.path} holds no tune to resume (no tune.json); run "
                                  "without --resume to start one") from None
            if recorded.get("format") != FORMAT:
                raise ConfigError(f"{self.meta_path}: unknown tune format "
                                  f"{recorded.get('format')!r} (this rpicluster reads {FORMAT})")
            for key, value in meta.items():
                if json.loads(json.dumps(value)) != recorded.get(key):
                    raise ConfigError(f"cannot resume {self.path}: {key} was "
                                      f"{_short(recorded.get(key))} in the tune, now "
                                      f"{_short(value)}; resume with the same settings, or "
                                      "start afresh with --overwrite")
            return self.results()
        done = self.results() if self.path.exists() else {}
        if done and not overwrite:
            raise ConfigError(f"tune directory {self.path} already holds {len(done)} finished "
                              "results; resume it with --resume, start afresh with --overwrite, "
                              "or choose another directory")
        for p in [*(self.path / "results").glob("*.json"), *(self.path / "models").glob("*")]:
            p.unlink(missing_ok=True)
        self.leaderboard_path.unlink(missing_ok=True)
        atomic_write_bytes(self.meta_path, json.dumps(
            {"format": FORMAT, **meta, "created": time.time()}, indent=1).encode())
        return {}

    def commit(self, result: dict, model) -> dict:
        """Record one finished (candidate, rung): its model file first, then its result."""
        c, r = int(result["candidate"]), int(result["rung"])
        entry = dict(result)
        if model is not None:
            rel = self._model_rel(c, r)
            entry["model"] = {"file": rel, "sha256": save_model(model, self.path / rel)}
        atomic_write_bytes(self._result_path(c, r), json.dumps(entry, indent=1).encode())
        return entry

    def load(self, result: dict, expected=None):
        """The model a result names."""
        entry = result.get("model")
        if not entry:
            raise ModelError(f"{self.path}: candidate {result['candidate']} rung "
                             f"{result['rung'] + 1} has no model file")
        return load_model(self.path / entry["file"], sha256=entry["sha256"], expected=expected)

    def forget_model(self, result: dict) -> None:
        """Delete the model file of a candidate that will not continue (its result stays)."""
        entry = result.get("model")
        if entry:
            (self.path / entry["file"]).unlink(missing_ok=True)
            Path(f"{self.path / entry['file']}.sha256").unlink(missing_ok=True)

    def write_leaderboard(self, board: list[dict]) -> None:
        atomic_write_bytes(self.leaderboard_path, json.dumps(board, indent=1).encode())


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
