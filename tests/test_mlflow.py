"""The optional MLflow logger (``--mlflow [URI]``, extra ``mlflow``): real runs logged to a real
MLflow file store and read back with MLflow's own client; a tracking server that does not
answer and a missing mlflow each give one line while training goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from rpicluster import history
from rpicluster.cli import main
from rpicluster.errors import RPiClusterWarning
from rpicluster.testing import free_port

NEEDS_MLFLOW = "the mlflow extra is not installed (pip install -e \".[mlflow]\")"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn's digits: a 3-block training store and a held-out store."""
    from sklearn.datasets import load_digits

    from rpicluster import ingest
    from rpicluster.data.sources import ArraySource

    root = tmp_path_factory.mktemp("digits")
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    train = ingest(ArraySource("digits", X[:1500], y[:1500]), root / "train.zarr",
                   block_rows=500)
    test = ingest(ArraySource("digits test", X[1500:], y[1500:]), root / "test.zarr",
                  block_rows=300)
    return train, test


@pytest.fixture(scope="module")
def scheduler():
    """An in-process Dask cluster (two workers): the runs publish their events here."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def _runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("rpicluster")
    return client, client.search_runs([experiment.experiment_id],
                                      order_by=["attributes.start_time ASC"])


def test_train_runs_are_logged_to_an_mlflow_file_store(home, tmp_path, digits, scheduler):
    """An Inc-kSGD run with --test and an MLP run through `rpicluster train --mlflow DIR`: each
    is one MLflow run with the history's parameters, figures, outcome and model file, plus
    per-block (validation accuracy, blocks committed) and per-round (loss, accuracy) metrics."""
    pytest.importorskip("mlflow", reason=NEEDS_MLFLOW)
    train, test = digits
    store = tmp_path / "mlruns"
    runner = CliRunner()
    ksgd = runner.invoke(main, ["train", str(train.url), "-o", str(tmp_path / "k.skops"),
                                "--clusters", "2", "--epochs", "3", "--seed", "0", "--test",
                                str(test.url), "--scheduler", scheduler, "--mlflow", str(store)])
    assert ksgd.exit_code == 0, ksgd.output
    mlp = runner.invoke(main, ["train", str(train.url), "-o", str(tmp_path / "m.skops"),
                               "--model", "mlp", "--hidden", "8", "--rounds", "3", "--tol",
                               "none", "--seed", "0", "--scheduler", scheduler,
                               "--mlflow", str(store)])
    assert mlp.exit_code == 0, mlp.output
    assert "warning" not in ksgd.output + mlp.output
    recorded = {r["id"]: r for r in history.list_runs()}
    client, (k_run, m_run) = _runs(str(store))

    for run, path in ((k_run, tmp_path / "k.skops"), (m_run, tmp_path / "m.skops")):
        mine = recorded[int(run.data.tags["rpicluster.history_id"])]
        assert run.info.status == "FINISHED" and run.data.tags["rpicluster.outcome"] == "done"
        assert run.data.tags["rpicluster.kind"] == mine["kind"] == "train"
        assert run.data.tags["rpicluster.data"] == mine["data"] == str(train.url)
        assert run.data.tags["rpicluster.fingerprint"] == mine["fingerprint"]
        assert run.data.tags["rpicluster.cluster"] == mine["cluster"] == scheduler
        assert run.data.tags["rpicluster.workers"] == ", ".join(mine["workers"])
        assert run.data.tags["rpicluster.model_path"] == mine["model_path"] == str(path)
        assert run.data.tags["rpicluster.sha256"] == mine["results"]["sha256"]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [path.name]
        for name, value in mine["params"].items():
            if isinstance(value, (str, int, float)):  # JSON made tuples lists in the history
                assert run.data.params[name] == str(value), name
        for name, value in mine["results"].items():
            if isinstance(value, float):
                assert run.data.metrics[name] == pytest.approx(value), name
        for phase, seconds in mine["phases"].items():
            assert run.data.metrics[f"seconds/{phase}"] == pytest.approx(seconds), phase

    # Per block: the validation accuracy of each block model, and the blocks committed.
    accuracy = client.get_metric_history(k_run.info.run_id, "block/validation_accuracy")
    assert sorted(m.step for m in accuracy) == [0, 1, 2]
    assert all(0.5 < m.value <= 1.0 for m in accuracy)
    committed = client.get_metric_history(k_run.info.run_id, "blocks_committed")
    assert sorted((m.step, m.value) for m in committed) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert k_run.data.metrics["test_accuracy"] > 0.8
    # Per round: the loss of each of the three rounds, falling.
    loss = sorted((m.step, m.value) for m in client.get_metric_history(m_run.info.run_id,
                                                                      "round/loss"))
    assert [s for s, _ in loss] == [1, 2, 3] and loss[2][1] < loss[0][1]
    assert m_run.data.params["model"] == "mlp" and m_run.data.params["rounds"] == "3"


def test_stopped_and_failed_runs_and_the_default_store(home, monkeypatch):
    """A run stopped by Ctrl-C is KILLED and a failed one FAILED, each with the history's word
    and one-line reason; `--mlflow` without a URI means the file store in the rpicluster home."""
    pytest.importorskip("mlflow", reason=NEEDS_MLFLOW)
    from rpicluster.mlflow_logger import MLflowLogger, default_uri

    assert default_uri() == (home / "mlruns").as_uri()
    with MLflowLogger(default_uri()):
        with pytest.raises(KeyboardInterrupt):
            with history.recording("tune", params={"factor": 3}):
                raise KeyboardInterrupt
        with pytest.raises(ValueError):
            with history.recording("bench", data="d.zarr"):
                raise ValueError("step 2 lost its workers\nmore")
    _, (stopped, failed) = _runs(default_uri())
    assert (stopped.info.status, stopped.data.tags["rpicluster.outcome"],
            stopped.data.tags["rpicluster.reason"]) == ("KILLED", "stopped", "KeyboardInterrupt")
    assert stopped.data.params == {"factor": "3"}
    assert (failed.info.status, failed.data.tags["rpicluster.outcome"],
            failed.data.tags["rpicluster.reason"]) == ("FAILED", "failed",
                                                       "step 2 lost its workers")
    # A URI MLflow has no store for: one line, and the run is recorded all the same.
    with pytest.warns(RPiClusterWarning) as caught:
        with MLflowLogger("foo://nowhere"), history.recording("bench") as run:
            run.result(accuracy=0.5)
    [line] = [str(w.message) for w in caught]
    assert line.startswith("MLflow at foo://nowhere: ") and "unsupported URI" in line
    assert line.endswith("; the run goes on, not logged to MLflow") and "\n" not in line
    assert history.list_runs()[0]["outcome"] == "done"


def test_a_tracking_server_that_does_not_answer_gives_one_line(home, tmp_path, digits):
    """Nothing listens at the URI: one warning line naming it, and the model is trained,
    written and recorded in the run history all the same."""
    pytest.importorskip("mlflow", reason=NEEDS_MLFLOW)
    train, _ = digits
    uri = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, ["train", str(train.url), "-o", str(tmp_path / "m.skops"),
                                       "--clusters", "2", "--epochs", "2", "--mlflow", uri])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if "MLflow" in line]
    assert warned == [f"warning: MLflow at {uri}: the tracking server does not answer "
                      "([Errno 111] Connection refused); the run goes on, not logged to MLflow"]
    assert (tmp_path / "m.skops").exists()
    [run] = history.list_runs()
    assert (run["kind"], run["outcome"], run["model_path"]) == (
        "train", "done", str(tmp_path / "m.skops"))


def test_without_mlflow_one_line_says_how_to_install_it(home, tmp_path, digits):
    """In a Python where mlflow cannot be imported, `train --mlflow` says how to install it in
    one line and trains all the same."""
    train, _ = digits
    hide = ("import sys; sys.modules['mlflow'] = None; from rpicluster.cli import main; "
            "main()")
    out = subprocess.run([sys.executable, "-c", hide, "train", str(train.url), "-o",
                          str(tmp_path / "m.skops"), "--clusters", "2", "--epochs", "2",
                          "--mlflow"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RPICLUSTER_HOME": str(home)})
    assert out.returncode == 0, out.stderr
    warned = [line for line in out.stderr.splitlines() if "mlflow" in line.lower()]
    assert warned == ['warning: --mlflow needs MLflow, which is not installed: pip install -e '
                      '".[mlflow]" (or pip install mlflow-skinny); this run is not logged to '
                      'MLflow'], out.stderr
    assert (tmp_path / "m.skops").exists()
    assert json.loads(CliRunner().invoke(main, ["runs", "--json"]).output)[0]["outcome"] == "done"


def test_a_tune_is_logged_like_its_history_row(home, tmp_path, digits, scheduler):
    """`rpicluster tune --mlflow DIR`: one MLflow run of kind tune with the history's
    parameters, figures and the best model as its artifact."""
    pytest.importorskip("mlflow", reason=NEEDS_MLFLOW)
    train, test = digits
    store = tmp_path / "mlruns"
    result = CliRunner().invoke(main, ["tune", str(train.url), "--model", "ksgd", "--budget",
                                       "2x", "--validation", str(test.url), "-o",
                                       str(tmp_path / "best.skops"), "--scheduler", scheduler,
                                       "--mlflow", str(store)])
    assert result.exit_code == 0, result.output
    [mine] = history.list_runs()
    client, [run] = _runs(str(store))
    assert run.info.status == "FINISHED" and run.data.tags["rpicluster.kind"] == "tune"
    assert run.data.tags["rpicluster.history_id"] == str(mine["id"])
    scalars = {k: str(v) for k, v in mine["params"].items() if isinstance(v, (str, int, float))}
    assert run.data.params["model"] == "ksgd" and scalars.items() <= run.data.params.items()
    figures = {k: v for k, v in mine["results"].items() if isinstance(v, float)}
    assert figures and all(run.data.metrics[k] == pytest.approx(v) for k, v in figures.items())
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["best.skops"]
    # Each candidate's held-out score at the first rung (rungs count from 1; step = candidate).
    first = client.get_metric_history(run.info.run_id, "rung 1/score")
    assert sorted(m.step for m in first) == list(range(mine["results"]["candidates"]))
    assert max(m.value for m in first) <= 1.0 and min(m.value for m in first) > 0.0
