"""The run history (rpicluster.history): one SQLite row per run, safe under concurrent writers,
and a broken database never stops a run."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from rpicluster import history
from rpicluster.errors import ConfigError, RPiClusterWarning, TrainingStopped


def test_a_run_is_recorded_with_its_outcome(home):
    with history.recording("train", params={"n_clusters": 4}, data="d.zarr",
                           fingerprint=history.fingerprint({"n_rows": 10})) as run:
        run.update(cluster="tls://127.0.0.1:1", workers=["w2", "w1"], run_id="abc")
        run.result(phases={"train": 1.5}, accuracy=0.9)
        run.result(phases={"score": 0.5}, model_path="m.skops")
    with pytest.raises(TrainingStopped):
        with history.recording("train") as run:
            raise TrainingStopped("interrupted: 1 of 4 blocks are committed in m.run\nmore")
    with pytest.raises(ValueError):
        with history.recording("bench"):
            raise ValueError("bad value")
    runs = history.list_runs()
    assert [r["outcome"] for r in runs] == ["failed", "stopped", "done"]
    assert runs[0]["reason"] == "bad value"
    assert runs[1]["reason"] == "interrupted: 1 of 4 blocks are committed in m.run"
    done = history.get_run(runs[2]["id"])
    assert done["params"] == {"n_clusters": 4} and done["workers"] == ["w1", "w2"]
    assert done["phases"] == {"train": 1.5, "score": 0.5}
    assert done["results"] == {"accuracy": 0.9} and done["model_path"] == "m.skops"
    assert done["ended"] >= done["started"] and done["run_id"] == "abc"
    assert done["fingerprint"] == history.fingerprint({"n_rows": 10})
    assert (home / "history.sqlite").exists()


def test_reading_names_the_problem(home):
    with pytest.raises(ConfigError, match="no run history at .* yet"):
        history.list_runs()
    with history.recording("features"):
        pass
    with pytest.raises(ConfigError, match=r"no run 7 in .* \(runs are numbered 1 to 1\)"):
        history.get_run(7)


def _writer(home: str, n: int, barrier) -> None:
    import os

    os.environ["RPICLUSTER_HOME"] = home
    barrier.wait()
    for i in range(n):
        with history.recording("bench", params={"i": i}) as run:
            run.result(figure=i)


def test_concurrent_processes_all_recorded(home):
    """Four processes record 15 runs each at the same moment: all 60 rows, all complete."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_writer, args=(str(home), 15, barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    runs = history.list_runs(None)
    assert len(runs) == 60
    assert {r["outcome"] for r in runs} == {"done"}
    assert sorted(r["results"]["figure"] for r in runs) == sorted(list(range(15)) * 4)
    assert len({r["pid"] for r in runs}) == 4


def test_corrupt_newer_and_locked_databases_warn_and_the_run_goes_on(home):
    db = home / "history.sqlite"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.warns(RPiClusterWarning, match="is not a readable rpicluster history .* move "
                                               "it aside"):
        with history.recording("train") as run:
            run.result(accuracy=1.0)
            ran = True
    assert ran
    with pytest.raises(ConfigError, match="not a readable rpicluster history"):
        history.list_runs()

    db.unlink()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {history.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.warns(RPiClusterWarning, match="schema version 2, newer than this "
                                               "rpicluster's 1"):
        with history.recording("train"):
            pass
    with pytest.raises(ConfigError, match="written by a newer rpicluster"):
        history.list_runs()

    db.unlink()
    with history.recording("train"):
        pass
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        old = history.BUSY_TIMEOUT_S
        history.BUSY_TIMEOUT_S = 0.2
        with pytest.warns(RPiClusterWarning, match="not recorded"):
            with history.recording("train"):
                pass
    finally:
        history.BUSY_TIMEOUT_S = old
        locker.execute("ROLLBACK")
        locker.close()
    assert [r["outcome"] for r in history.list_runs()] == ["done"]


def test_runs_command_lists_shows_and_prints_json(home):
    import json

    from click.testing import CliRunner

    from rpicluster.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["runs"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: no run history at ")
    with history.recording("train", params={"n_clusters": 3}, data="digits.zarr",
                           fingerprint="0123456789abcdef") as run:
        run.update(workers=["0", "1"], cluster="tls://127.0.0.1:9")
        run.result(phases={"train": 2.25}, test_accuracy=0.9312, model_path="/m.skops")
    with pytest.raises(KeyboardInterrupt):
        with history.recording("features", data="photos.zarr"):
            raise KeyboardInterrupt
    listed = runner.invoke(main, ["runs"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[1].split()[:3] == ["id", "kind", "started"]
    assert lines[2].split()[:2] == ["2", "features"] and "stopped: KeyboardInterrupt" in lines[2]
    assert lines[3].split()[:2] == ["1", "train"] and "test accuracy 0.9312" in lines[3]
    shown = runner.invoke(main, ["runs", "show", "1"])
    assert shown.exit_code == 0, shown.output
    assert "outcome:     done" in shown.output and "fingerprint: 0123456789abcdef" in shown.output
    assert "workers:     0, 1" in shown.output and "  n_clusters" in shown.output
    as_json = json.loads(runner.invoke(main, ["runs", "--json"]).output)
    assert [r["id"] for r in as_json] == [2, 1] and as_json[1]["phases"] == {"train": 2.25}
    assert json.loads(runner.invoke(main, ["runs", "show", "1", "--json"]).output)[
        "results"] == {"test_accuracy": 0.9312}
    missing = runner.invoke(main, ["runs", "show", "9"])
    assert missing.exit_code == 1
    assert missing.output.strip().endswith("(runs are numbered 1 to 2); list them with "
                                           "`rpicluster runs`")
    (home / "history.sqlite").write_bytes(b"garbage" * 1000)
    for f in home.glob("history.sqlite-*"):
        f.unlink()
    bad = runner.invoke(main, ["runs"])
    assert bad.exit_code == 1 and len(bad.output.strip().splitlines()) == 1
    assert "is not a readable rpicluster history" in bad.output


def test_training_goes_on_when_the_history_is_broken(home, tmp_path):
    """A corrupt history: train_model warns in one line and trains and saves the model."""
    from distributed import LocalCluster
    from sklearn.datasets import load_digits

    from rpicluster import ingest
    from rpicluster.data.sources import ArraySource
    from rpicluster.train.api import ClusterChoice, train_model

    X, y = load_digits(return_X_y=True)
    store = ingest(ArraySource("digits", X.astype("float32"), y), tmp_path / "d.zarr",
                   block_rows=900)
    (home / "history.sqlite").write_bytes(b"garbage" * 1000)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        with pytest.warns(RPiClusterWarning, match="not a readable rpicluster history"):
            summary = train_model(str(store.url), tmp_path / "m.skops",
                                  {"n_clusters": 2, "max_iter": 3, "random_state": 0},
                                  cluster=ClusterChoice(scheduler=cluster.scheduler_address),
                                  show_progress=False)
    assert summary.model_path.exists() and len(summary.result.trained_blocks) == 2


def _killed(home: str) -> None:
    import os

    os.environ["RPICLUSTER_HOME"] = home
    with history.recording("train"):
        os._exit(9)  # like a SIGKILL: no outcome recorded


def test_a_run_whose_process_died_reads_lost(home):
    proc = multiprocessing.get_context("spawn").Process(target=_killed, args=(str(home),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 9
    [run] = history.list_runs()
    assert run["outcome"] == "lost"
    assert run["reason"] == (f"its process (pid {proc.pid}) ended without recording an "
                             "outcome")


def test_history_off_records_nothing(home, monkeypatch):
    monkeypatch.setenv("RPICLUSTER_HISTORY", "off")
    with history.recording("bench") as run:
        run.result(x=1)
    assert not (home / "history.sqlite").exists()


@pytest.fixture(scope="module")
def history_seen_by_a_module_fixture():
    """What a module fixture (one that builds a store, trains, extracts features) sees: it runs
    before any of a test's function fixtures."""
    return history.enabled()


def test_a_module_fixture_does_not_record_in_the_developer_home(
        history_seen_by_a_module_fixture):
    assert history_seen_by_a_module_fixture is False


def test_a_features_run_is_recorded_and_listed(home, tmp_path):
    """A real feature extraction (the packaged EfficientNet-Lite0 weights on scikit-image's
    faces) is recorded through its library entry point: `rpicluster runs --json` shows its
    parameters, data fingerprint, cluster, workers, phase time, figures and output store; a
    second run refused by the existing store is recorded as failed with that one line."""
    import json

    import numpy as np
    from click.testing import CliRunner
    from distributed import Client, LocalCluster
    from skimage.data import lfw_subset

    from rpicluster import extract_features
    from rpicluster.cli import main
    from rpicluster.errors import DataError
    from rpicluster.features.images import write_image_store
    from rpicluster.train.checks import fingerprint

    pick = np.r_[0:24, 100:124]  # 24 faces, 24 non-faces
    images = write_image_store(tmp_path / "faces.zarr",
                               (lfw_subset()[pick] * 255).round().astype(np.uint8),
                               np.repeat(["face", "other"], 24), block_rows=16)
    out = tmp_path / "feats.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        r = extract_features(images.url, str(out), input_size=48, client=client)
        with pytest.raises(DataError, match="already"):
            extract_features(images.url, str(out), input_size=48, client=client)
        worker = next(iter(cluster.workers.values())).name
    listed = CliRunner().invoke(main, ["runs", "--json"])
    assert listed.exit_code == 0, listed.output
    failed, done = json.loads(listed.output)
    assert done["kind"] == "features" and done["outcome"] == "done" and done["reason"] is None
    assert done["data"] == images.url and done["fingerprint"] == fingerprint(images)
    assert done["params"]["model"] == "efficientnet-lite0"
    assert (done["params"]["input_size"], done["params"]["block_rows"]) == (48, 16)
    assert done["params"]["model_sha256"] == r.sha256
    assert done["cluster"] == cluster.scheduler_address and done["workers"] == [str(worker)]
    assert done["model_path"] == r.store.url
    assert done["phases"]["extract"] == pytest.approx(r.seconds)
    assert (done["results"]["images"], done["results"]["blocks"],
            done["results"]["n_features"]) == (48, 3, 1280)
    assert done["results"]["images_per_second"] > 0
    assert (failed["kind"], failed["outcome"]) == ("features", "failed")
    assert "already" in failed["reason"] and "\n" not in failed["reason"]
