"""Model averaging over Zarr blocks on a real Dask cluster: MLPClassifier and SGDClassifier,
round / epoch / batch synchronisation, checkpoints and a resume after the client is killed."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.linear_model import SGDClassifier
from sklearn.neural_network import MLPClassifier

from rpicluster import IncrementalKSGDClassifier, ingest, open_dataset
from rpicluster.cli import main
from rpicluster.errors import ConfigError, ModelError
from rpicluster.testing import cli_argv, wait_until
from rpicluster.train.averaging import (merge_updates, parse_hidden, shard_blocks,
                                        train_averaged, weighted_average)
from rpicluster.train.modelfile import load_model, save_model
from rpicluster.train.rounds import RoundDir

MLP = dict(hidden_layer_sizes=(32,), random_state=3, learning_rate_init=0.01)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn's digits (1,797 x 64, 10 classes) as a 4-block train store and a test store."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("avg-data")
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    np.savez(root / "train.npz", X=X[:1400], y=y[:1400])
    np.savez(root / "test.npz", X=X[1400:], y=y[1400:])
    ingest(str(root / "train.npz"), root / "train.zarr", block_rows=350)
    ingest(str(root / "test.npz"), root / "test.zarr", block_rows=400)
    return root




def _all(ds):
    X, y = zip(*(ds.block(b) for b in range(ds.n_blocks)))
    return np.concatenate(X), np.asarray(ds.classes)[np.concatenate(y)]


def _same_weights(a, b):
    for wa, wb in zip(a.coefs_ + a.intercepts_, b.coefs_ + b.intercepts_, strict=True):
        np.testing.assert_array_equal(wa, wb)


def test_weighted_average_and_sharding():
    a = [np.array([1.0, 2.0]), np.array([[0.0]])]
    b = [np.array([3.0, 6.0]), np.array([[4.0]])]
    avg = weighted_average([a, b], [1, 3])
    np.testing.assert_allclose(avg[0], [2.5, 5.0])
    np.testing.assert_allclose(avg[1], [[3.0]])
    assert shard_blocks(5, 2) == [[0, 2, 4], [1, 3]]
    assert shard_blocks(2, 8) == [[0], [1]]
    with pytest.raises(ValueError):
        weighted_average([], [])


def test_parse_hidden():
    assert parse_hidden("256,128") == (256, 128)
    for bad in ("", "256,", "a,b", "0", "-3"):
        with pytest.raises(ConfigError, match="--hidden"):
            parse_hidden(bad)


def test_one_shard_equals_plain_partial_fit(digits, client):
    """One shard, round sync: averaging is the identity, so the model equals scikit-learn's
    own partial_fit over the blocks in order (no shuffling, so no reseeding shows)."""
    ds = open_dataset(digits / "train.zarr")
    params = {**MLP, "shuffle": False}
    result = train_averaged(ds, client, model="mlp", params=params, rounds=3, local_epochs=2,
                            shards=1)
    ref = MLPClassifier(**params)
    for _ in range(3 * 2):
        for b in range(ds.n_blocks):
            X, y = ds.block(b)
            ref.partial_fit(X, np.asarray(ds.classes)[y], classes=ds.classes)
    _same_weights(result.model, ref)
    assert result.model._optimizer.t == ref._optimizer.t


def test_a_stopping_rule_ends_the_run_after_the_round_it_says_and_the_checkpoint_holds_it(
        digits, client, tmp_path):
    """The round engine asks the stopping rule after every checkpointed round; resuming the
    stopped run continues from the round it stopped at."""
    ds = open_dataset(digits / "train.zarr")
    seen = []

    def stop(history):
        seen.append(len(history))
        return history[-1]["round"] == 2

    result = train_averaged(ds, client, model="sgd", params={"random_state": 1}, rounds=5,
                            run_dir=tmp_path / "run", stop=stop)
    assert [r["round"] for r in result.rounds] == [1, 2] and seen == [1, 2]
    assert len(RoundDir(tmp_path / "run").history()) == 2
    resumed = train_averaged(ds, client, model="sgd", rounds=3, run_dir=tmp_path / "run",
                             resume=True)
    assert resumed.resumed_rounds == 2 and [r["round"] for r in resumed.rounds] == [1, 2, 3]


@pytest.mark.parametrize("sync", ["round", "epoch", "batch"])
def test_mlp_learns_digits_with_every_sync(digits, client, sync):
    ds, test = open_dataset(digits / "train.zarr"), open_dataset(digits / "test.zarr")
    result = train_averaged(ds, client, model="mlp", params=MLP, rounds=4, local_epochs=2,
                            sync=sync, validation=test)
    X, y = _all(test)
    accuracy = result.model.score(X, y)
    assert accuracy > 0.8, (sync, accuracy)
    assert result.rounds[-1]["accuracy"] == pytest.approx(accuracy)
    steps = [r["steps"] for r in result.rounds]
    # 2 shards of 700 rows; MLP minibatches of 200 rows: 4 per epoch.
    assert steps == {"round": [1] * 4, "epoch": [2] * 4, "batch": [8] * 4}[sync]
    model_bytes = sum(w.nbytes for w in result.model.coefs_ + result.model.intercepts_)
    for r in result.rounds[1:]:  # (the first sends the unfitted estimator)
        # At least the weights go out to each worker and come back from each shard per sync.
        assert r["bytes_down"] >= 2 * model_bytes * r["steps"]
        assert r["bytes_up"] >= 2 * model_bytes * r["steps"]
        assert sum(r["busy"].values()) > 0


def test_sgd_classifier_by_the_same_mechanism(digits, client):
    ds, test = open_dataset(digits / "train.zarr"), open_dataset(digits / "test.zarr")
    result = train_averaged(ds, client, model="sgd", params={"random_state": 0}, rounds=5)
    assert isinstance(result.model, SGDClassifier)
    assert result.model.coef_.shape == (10, 64)
    assert result.model.score(*_all(test)) > 0.85


def test_bad_parameters_are_named(digits, client):
    ds = open_dataset(digits / "train.zarr")
    with pytest.raises(ConfigError, match="no parameter.*'hidden'"):
        train_averaged(ds, client, model="mlp", params={"hidden": 3}, rounds=1)
    with pytest.raises(ConfigError, match="unknown model 'cnn'"):
        train_averaged(ds, client, model="cnn", rounds=1)
    with pytest.raises(ConfigError, match="lbfgs"):
        train_averaged(ds, client, model="mlp", params={"solver": "lbfgs"}, rounds=1)


@pytest.mark.timeout(900)
def test_resume_after_the_client_is_killed(digits, cluster, client, tmp_path):
    """The CLI is killed after its second round; the resumed run ends with the same model as an
    uninterrupted run."""
    run_dir, model_path = tmp_path / "run", tmp_path / "mlp.skops"
    cmd = [sys.executable, "-m", "rpicluster.cli", "train", str(digits / "train.zarr"), "-o",
           str(model_path), "--model", "mlp", "--hidden", "32", "--rounds", "40", "--seed", "3",
           "--eta", "0.01", "--run-dir", str(run_dir), "--scheduler", cluster.scheduler_address]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # 400 s: a loaded machine starts the CLI slowly.
    wait_until(lambda: len(RoundDir(run_dir).history()) >= 2, 400,
               what=f"two rounds checkpointed in {run_dir}", process=proc, interval=0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(RoundDir(run_dir).history())
    assert 2 <= done < 40, "the kill should land mid-run"
    assert not model_path.exists(), "a killed run must not leave a model file"

    ds = open_dataset(digits / "train.zarr")
    resumed = train_averaged(ds, client, model="mlp", params={}, rounds=6, run_dir=run_dir,
                             resume=True)
    assert resumed.resumed_rounds == done and len(resumed.rounds) == max(done, 6)
    # The uninterrupted run, with the CLI's parameters.
    whole = train_averaged(ds, client, model="mlp", rounds=max(done, 6),
                           params={**MLP, "random_state": 3})
    _same_weights(resumed.model, whole.model)

    # Resuming as another kind, or with other parameters, is refused by name.
    with pytest.raises(ConfigError, match="model was 'mlp'"):
        train_averaged(ds, client, model="sgd", rounds=6, run_dir=run_dir, resume=True)
    with pytest.raises(ConfigError, match="already holds"):
        train_averaged(ds, client, model="mlp", rounds=6, run_dir=run_dir)


def test_model_files_of_another_kind_are_refused(digits, client, tmp_path):
    ds = open_dataset(digits / "train.zarr")
    result = train_averaged(ds, client, model="mlp", params=MLP, rounds=1)
    path = tmp_path / "mlp.skops"
    save_model(result.model, path)
    loaded = load_model(path, expected=MLPClassifier)
    _same_weights(loaded, result.model)
    with pytest.raises(ModelError, match=r"holds a MLPClassifier, not a IncrementalKSGDClassifier"):
        load_model(path, expected=IncrementalKSGDClassifier)


def test_merge_keeps_the_template_unchanged(digits):
    ds = open_dataset(digits / "train.zarr")
    X, y = _all(ds)
    est = MLPClassifier(**MLP).partial_fit(X, y, classes=ds.classes)
    before = [w.copy() for w in est.coefs_]
    upd = {"weights": [w * 0 for w in est.coefs_ + est.intercepts_], "opt": [],
           "opt_t": est._optimizer.t, "rows": 5, "t_": est.t_, "n_iter_": est.n_iter_}
    upd["opt"] = [a * 0 for a in est._optimizer.ms + est._optimizer.vs]
    merged = merge_updates(est, [upd])
    assert all(np.all(w == 0) for w in merged.coefs_)
    for a, b in zip(est.coefs_, before):
        np.testing.assert_array_equal(a, b)


def test_cli_train_score_and_bad_flags(digits, cluster, tmp_path):
    runner = CliRunner()
    model_path = tmp_path / "m.skops"
    base = ["train", str(digits / "train.zarr"), "-o", str(model_path), "--scheduler",
            cluster.scheduler_address]
    res = runner.invoke(main, base + ["--model", "mlp", "--hidden", "32", "--rounds", "3",
                                      "--local-epochs", "2", "--eta", "0.01", "--seed", "1",
                                      "--sync", "epoch", "--test", str(digits / "test.zarr")])
    assert res.exit_code == 0, res.output
    assert "trained 3 rounds of mlp (sync epoch)" in res.output
    assert "test accuracy" in res.output
    model = load_model(model_path)
    assert isinstance(model, MLPClassifier) and model.hidden_layer_sizes == (32,)
    res = runner.invoke(main, ["score", str(model_path), str(digits / "test.zarr"),
                               "--scheduler", cluster.scheduler_address])
    assert res.exit_code == 0, res.output
    assert f"{model.score(*_all(open_dataset(digits / 'test.zarr'))):.4f}" in res.output

    res = runner.invoke(main, base + ["--model", "mlp", "--hidden", "256,x"])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        "error: --hidden '256,x': expected comma-separated positive layer sizes, e.g. 256,128"]
    res = runner.invoke(main, base + ["--model", "mlp", "--clusters", "4"])
    assert res.exit_code == 2 and "--clusters is for --model inc-ksgd" in res.output
    res = runner.invoke(main, base + ["--hidden", "32"])
    assert res.exit_code == 2 and "--hidden is for --model mlp" in res.output


def _averaging_runs(client) -> list[int]:
    """Rounds of every model-averaging run announced on the scheduler so far."""
    from rpicluster import events as ev

    return [e[1]["n_rounds"] for e in client.get_events(ev.ROUNDS_TOPIC)
            if e[1].get(ev.KIND) == ev.RUN_START and e[1].get("mode") == "averaging"]


def test_bench_averaging_scaling_report(digits, client, tmp_path):
    """bench scaling --job mlp as a library call: every (sync, worker set) row, files written."""
    from rpicluster.bench.averaging import run_averaging_scaling

    workers = {str(w["name"]): a for a, w in client.scheduler_info()["workers"].items()}
    names = sorted(workers)
    runs_before = _averaging_runs(client)
    doc = run_averaging_scaling(client, open_dataset(digits / "train.zarr"), tmp_path,
                                steps=[names[:1], names], addresses=workers,
                                params={"hidden_layer_sizes": (8,)}, epochs=2, local_epochs=2,
                                test=open_dataset(digits / "test.zarr"), repeats=2)
    # Per (sync, worker set): a one-round warm-up run, all of them first; then 2 timed runs of
    # the whole budget in rounds: run 1 of every pair before any run 2.
    runs = _averaging_runs(client)[len(runs_before):]
    assert runs == [1] * 4 + [2, 2, 1, 1] * 2  # batch: 2 rounds of 1 epoch; round: 1 of 2
    assert doc["method"]["order"] == "rounds"
    assert doc["method"]["warmup"] == "reduced"
    assert doc["method"]["repeats"] == 2 and doc["method"]["statistic"] == "median"
    for r in doc["rows"]:
        assert len(r["runs"]) == 2 and r["warmup_seconds"] > 0
        assert r["seconds_min"] <= r["seconds"] <= r["seconds_max"]
    md = (tmp_path / "averaging.md").read_text()
    assert "Method: Every step: warm-up on the step's workers: one untimed reduced run (one " \
           "round of the same sync and local epochs); then 2 timed repeats" in md
    assert "then the timed runs in rounds (round r: run r of every step" in md
    # How quiet the machine was is measured, not asserted by a fixed label.
    assert len(doc["load"]["before"]) == 3 and doc["load"]["cpus"] >= 1
    assert re.search(r"Load average before/after: \d+\.\d\d / \d+\.\d\d on \d+ CPUs", md)
    rows = {(r["sync"], r["workers"]): r for r in doc["rows"]}
    assert sorted(rows) == [("batch", 1), ("batch", 2), ("round", 1), ("round", 2)]
    # 1,400 rows in minibatches of 200: 7 syncs per epoch on one worker, 4 on two (700 each).
    assert rows["batch", 1]["syncs_per_epoch"] == 7 and rows["batch", 2]["syncs_per_epoch"] == 4
    assert rows["round", 2]["syncs_per_epoch"] == 0.5
    assert rows["batch", 2]["mb_per_epoch"] > rows["round", 2]["mb_per_epoch"]
    assert all(0 <= r["accuracy"] <= 1 and r["cpu_mean"] >= 0 for r in doc["rows"])
    assert set(rows["round", 2]["cpu_per_worker"]) == set(names)
    for ext in ("json", "csv", "md"):
        assert (tmp_path / f"averaging.{ext}").stat().st_size > 0


# --- the same safety as Inc-kSGD: no silent overwrite, a resume line when a run stops ---------

def test_cli_refuses_to_overwrite_a_model_without_overwrite(digits, cluster, tmp_path):
    model = tmp_path / "m.skops"
    model.write_bytes(b"precious")
    args = ["train", str(digits / "train.zarr"), "-o", str(model), "--model", "sgd",
            "--rounds", "1", "--seed", "1", "--scheduler", cluster.scheduler_address]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines() == [
        f"error: model file {model} already exists: add --overwrite to replace it, or choose "
        "another output with -o"]
    assert model.read_bytes() == b"precious" and not (tmp_path / "m.skops.run").exists()
    res = CliRunner().invoke(main, args + ["--overwrite"])
    assert res.exit_code == 0, res.output
    first = load_model(model)
    # Again with --overwrite and another seed: the run directory (1 round finished) starts afresh.
    res = CliRunner().invoke(main, args + ["--overwrite", "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert "trained 1 rounds of sgd" in res.output and "resumed" not in res.output
    assert RoundDir(tmp_path / "m.skops.run").meta()["params"]["random_state"] == 2
    assert not np.array_equal(load_model(model).coef_, first.coef_)
    # --resume of the finished run: nothing to resume, said so (not "add --overwrite").
    written = model.read_bytes()
    res = CliRunner().invoke(main, args + ["--seed", "2", "--resume", str(tmp_path / "m.skops.run")])
    assert res.exit_code == 1 and "its run has finished, so there is nothing to resume" \
        in res.output, res.output
    assert model.read_bytes() == written


@pytest.mark.timeout(900)
def test_ctrl_c_says_what_was_kept_and_the_resume_command(digits, cluster, tmp_path):
    """Ctrl-C on `train --model mlp` prints one line: the rounds kept and the exact command
    that continues the run (which then finishes it)."""
    import re
    import shlex

    model, run_dir = tmp_path / "m.skops", tmp_path / "m.skops.run"
    proc = subprocess.Popen(
        cli_argv("train", str(digits / "train.zarr"), "-o", str(model), "--model", "mlp",
                 "--hidden", "32", "--rounds", "500", "--seed", "3", "--sync", "epoch",
                 "--scheduler", cluster.scheduler_address),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # 400 s: a loaded machine starts the CLI slowly.
    wait_until(lambda: len(RoundDir(run_dir).history()) >= 2, 400,
               what=f"two rounds checkpointed in {run_dir}", process=proc, interval=0.02)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "Aborted!" not in out, out
    kept = len(RoundDir(run_dir).history())
    assert 2 <= kept < 500
    assert re.search(rf"error: interrupted: {kept} of 500 rounds are finished in "
                     rf"{re.escape(str(run_dir))}; continue with: ", out), out
    again = shlex.split(re.search(r"continue with: (.*)$", out, re.M).group(1))
    assert again == ["rpicluster", "train", str(digits / "train.zarr"), "-o", str(model),
                     "--resume", str(run_dir), "--model", "mlp", "--rounds", "500",
                     "--local-epochs", "1", "--sync", "epoch", "--scheduler",
                     cluster.scheduler_address]
    again[again.index("--rounds") + 1] = str(kept + 1)  # the whole 500 would take minutes
    res = CliRunner().invoke(main, again[1:])
    assert res.exit_code == 0, res.output
    assert f"trained 1 rounds (+{kept} resumed) of mlp" in res.output


@pytest.mark.timeout(900)
def test_a_killed_scheduler_is_one_line_with_the_resume_command(digits, tmp_path):
    import json
    import os
    import re
    import shlex

    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "10s"}
    sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--port",
                              "0", "--no-dashboard", "--scheduler-file",
                              str(tmp_path / "s.json")], stderr=subprocess.DEVNULL, env=env)
    workers = None
    model, run_dir = tmp_path / "m.skops", tmp_path / "m.skops.run"
    try:
        # The file appears before its contents: OSError, then ValueError.
        address = wait_until(lambda: json.loads((tmp_path / "s.json").read_text())["address"],
                             120, what="the scheduler's address in s.json", process=sched,
                             ignore=(OSError, ValueError), interval=0.1)
        workers = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                    "--nworkers", "2", "--nthreads", "1", "--no-dashboard",
                                    "--local-directory", str(tmp_path / "w")],
                                   stderr=subprocess.DEVNULL, env=env)
        proc = subprocess.Popen(
            [sys.executable, "-m", "rpicluster.cli", "train", str(digits / "train.zarr"), "-o",
             str(model), "--model", "sgd", "--rounds", "500", "--seed", "1", "--scheduler",
             address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        wait_until(lambda: len(RoundDir(run_dir).history()) >= 2, 400,
                   what=f"two rounds checkpointed in {run_dir}", process=proc, interval=0.02)
        sched.kill()
        out, _ = proc.communicate(timeout=240)
    finally:
        for p in (sched, workers):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert proc.returncode == 1, out
    assert "Traceback" not in out, out
    [line] = [x for x in out.splitlines() if x.startswith("error: ")]
    kept = len(RoundDir(run_dir).history())
    assert f"error: lost the scheduler {address} during training (" in line
    assert f"{kept} of 500 rounds are finished in {run_dir}" in line
    again = shlex.split(re.search(r"continue with: (.*)$", line).group(1))
    assert again == ["rpicluster", "train", str(digits / "train.zarr"), "-o", str(model),
                     "--resume", str(run_dir), "--model", "sgd", "--rounds", "500",
                     "--local-epochs", "1", "--sync", "round", "--scheduler", address]
