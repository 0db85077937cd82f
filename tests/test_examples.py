"""Smoke tests of examples/: each script runs as a user would run it, on the embedded cluster.

One embedded local cluster (2 workers) serves every example, started with ``rpicluster up
--local 2`` in a private RPICLUSTER_HOME so no cluster state leaks in or out; each example finds
it as a user's would. Assertions are on what the scripts write (result.json, reports, model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory):
    """Environment with a private RPICLUSTER_HOME in which an embedded 2-worker cluster runs."""
    home = tmp_path_factory.mktemp("rpicluster-home")
    env = {**os.environ, "RPICLUSTER_HOME": str(home)}
    cli = [sys.executable, "-m", "rpicluster.cli"]
    subprocess.run([*cli, "up", "--local", "2"], env=env, check=True, timeout=120,
                   capture_output=True)
    try:
        yield env
    finally:
        subprocess.run([*cli, "down", "--local"], env=env, timeout=60, capture_output=True)


def run_example(name: str, env: dict, *args: str) -> str:
    """Run examples/<name> with ``args``; return its stdout (its stderr on failure)."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], env=env,
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_imagenet_like(cluster_env, tmp_path, monkeypatch):
    out = run_example("imagenet_like.py", cluster_env, "--workdir", str(tmp_path),
                      "--rows", "6000", "--test-rows", "1500", "--block-rows", "1500",
                      "--features", "64", "--classes", "10")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["blocks"] == 4 and result["workers"] == 2
    assert result["accuracy"] > 0.4, out        # 10 classes: chance is 0.1
    from rpicluster.train.modelfile import load_model

    # The example signed its model with that home's key (docs/security.md).
    monkeypatch.setenv("RPICLUSTER_HOME", cluster_env["RPICLUSTER_HOME"])
    model = load_model(result["model"], sha256=result["sha256"])
    assert len(model.estimators_) == 4 and len(model.classes_) == 10


def test_digits(cluster_env, tmp_path):
    out = run_example("digits.py", cluster_env, "--workdir", str(tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["blocks"] == 3 and result["test_rows"] == 450
    assert result["accuracy"] > 0.85, out


def test_random_forest_joblib(cluster_env, tmp_path):
    out = run_example("random_forest_joblib.py", cluster_env, "--workdir", str(tmp_path),
                      "--rows", "2000", "--trees", "16")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["trees"] == 16
    # The trees were built by the cluster's workers, and seeded exactly as n_jobs=1 seeds them.
    assert sum(result["tasks_per_worker"].values()) > 0, out
    assert result["accuracy"] == result["local_accuracy"] > 0.3


def test_scaling_report(cluster_env, tmp_path):
    out = run_example("scaling_report.py", cluster_env, "--workdir", str(tmp_path),
                      "--rows", "3000", "--block-rows", "500")
    for name in ("scaling.csv", "scaling.json", "scaling.md", "scaling.png", "timed-runs.html"):
        assert (tmp_path / name).stat().st_size > 0, name
    doc = json.loads((tmp_path / "scaling.json").read_text())
    assert [len(s["workers"]) for s in doc["steps"]] == [1, 2]
    assert all(s["median"] > 0 for s in doc["steps"])
    assert "scal. capacity" in out
    assert "Every step: warm-up on the step's workers: one untimed reduced run" in out


def test_transfer_learning(cluster_env, tmp_path):
    out = run_example("transfer_learning.py", cluster_env, "--workdir", str(tmp_path),
                      "--images", "200", "--input-size", "64", "--block-rows", "40")
    result = json.loads((tmp_path / "result.json").read_text())
    fashion, faces = result["cases"]
    assert (fashion["train_images"], fashion["test_images"]) == (150, 50)
    assert (faces["train_images"], faces["test_images"]) == (150, 50)
    assert fashion["linear_accuracy"] > 0.4, out   # 10 classes: chance is 0.1
    assert faces["linear_accuracy"] > 0.7, out     # 2 balanced classes
    assert set(fashion["images_per_s_per_worker"]) and "| faces |" in out
