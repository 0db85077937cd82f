"""The run directory: committed block models of one training run, so a killed run can resume.

Layout::

    RUN_DIR/
      run.json                   parameters, dataset identity, classes (written once, at the start)
      blocks/block-000003.skops  one committed block model (KSGDClassifier, skops format)
      manifest.json              committed blocks with their files' sha256, written last

A block counts as committed only once the manifest names it, and the manifest is replaced
atomically after the block file is complete, so a crash at any point leaves either the old or the
new manifest, never a block that looks committed but is not. Resuming checks each listed file's
sha256 and recomputes a block whose file is missing or damaged.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from rpicluster.errors import ConfigError, ModelError
from rpicluster.train.modelfile import atomic_write_bytes, file_sha256, load_model, save_model

FORMAT = 1


def dataset_identity(dataset) -> dict:
    """What must not change between a run and its resume: the dataset's shape and attributes."""
    attrs = json.dumps(dict(dataset.attrs), sort_keys=True, default=str)
    return {
        "url": str(dataset.url),
        "n_rows": int(dataset.n_rows),
        "n_features": int(dataset.n_features),
        "n_blocks": int(dataset.n_blocks),
        "fingerprint": hashlib.sha256(attrs.encode()).hexdigest()[:16],
    }


class RunDir:
    """A training run's directory (see the module docstring for the layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def meta_path(self) -> Path:
        return self.path / "run.json"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def exists(self) -> bool:
        return self.meta_path.is_file()

    def meta(self) -> dict:
        try:
            return json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{self.path} is not a run directory (no run.json)") from None

    def create(self, params: dict, dataset) -> dict:
        """Start a new run; refuses a directory that already holds committed blocks."""
        if self.exists() and self.committed():
            raise ConfigError(f"run directory {self.path} already holds committed blocks; "
                              "resume it with --resume or choose another directory")
        meta = {"format": FORMAT, "params": params, "dataset": dataset_identity(dataset),
                "created": time.time()}
        atomic_write_bytes(self.meta_path, json.dumps(meta, indent=2).encode())
        atomic_write_bytes(self.manifest_path, json.dumps({"blocks": {}}).encode())
        return meta

    def check_resumable(self, params: dict, dataset) -> None:
        """Raise ConfigError naming what differs when ``params``/``dataset`` do not match the run."""
        meta = self.meta()
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{self.meta_path}: unknown run format {meta.get('format')!r} "
                              f"(this rpicluster reads format {FORMAT})")
        for key, value in params.items():
            if key in meta["params"] and meta["params"][key] != value:
                raise ConfigError(f"cannot resume {self.path}: parameter {key!r} was "
                                  f"{meta['params'][key]!r} in the run, now {value!r}")
        now = dataset_identity(dataset)
        for key in ("n_rows", "n_features", "n_blocks", "fingerprint"):
            if meta["dataset"][key] != now[key]:
                raise ConfigError(f"cannot resume {self.path}: the dataset changed ({key} was "
                                  f"{meta['dataset'][key]!r}, now {now[key]!r})")

    def committed(self) -> dict[int, dict]:
        """Blocks the manifest lists as committed: ``{block: entry}``."""
        try:
            blocks = json.loads(self.manifest_path.read_text())["blocks"]
        except FileNotFoundError:
            return {}
        return {int(b): entry for b, entry in blocks.items()}

    def verified(self) -> dict[int, dict]:
        """Committed blocks whose file is present and matches its recorded sha256."""
        good = {}
        for b, entry in self.committed().items():
            f = self.path / entry["file"]
            if f.is_file() and file_sha256(f) == entry["sha256"]:
                good[b] = entry
        return good

    def commit_block(self, block: int, model, info: dict | None = None) -> dict:
        """Write block ``block``'s model, then record it in the manifest (in that order)."""
        rel = f"blocks/block-{block:06d}.skops"
        digest = save_model(model, self.path / rel)
        entry = {"file": rel, "sha256": digest, "committed": time.time(), **(info or {})}
        blocks = {str(b): e for b, e in self.committed().items()}
        blocks[str(block)] = entry
        atomic_write_bytes(self.manifest_path,
                           json.dumps({"blocks": blocks}, indent=2, sort_keys=True).encode())
        return entry

    def load_block(self, block: int):
        entry = self.committed().get(block)
        if entry is None:
            raise ModelError(f"block {block} is not committed in {self.path}")
        return load_model(self.path / entry["file"], sha256=entry["sha256"])
