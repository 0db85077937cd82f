"""The stopping rule alone (pure functions): scikit-learn's tol / n_iter_no_change / max_iter
semantics, the reason it gives, its state through a checkpoint, and the held-out rows."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from rpicluster.errors import ConfigError
from rpicluster.train.stopping import StopRule, StopState, holdout_rows


def test_score_rule_stops_after_n_rounds_without_improvement():
    rule = StopRule(tol=0.01, n_iter_no_change=3, max_rounds=100, monitor="score")
    # 0.805 improves on 0.80 by less than tol: it counts as no change, but becomes the best.
    values = [0.5, 0.7, 0.8, 0.805, 0.79, 0.80, 0.9, 0.9]
    state = rule.replay(values)
    assert state.stopped and state.rounds == 6
    assert state.best == 0.805 and state.best_round == 4
    assert state.reason == ("converged: validation score did not improve by tol=0.01 for 3 "
                            "rounds (best 0.8050 at round 4)")


def test_loss_rule_is_lower_is_better():
    rule = StopRule(tol=1e-3, n_iter_no_change=2, monitor="loss")
    state = rule.replay([1.0, 0.5, 0.4995, 0.6, 0.1])
    assert state.rounds == 4 and state.best == 0.4995
    assert state.reason.startswith("converged: training loss did not improve by tol=0.001")


def test_max_rounds_and_tol_none():
    rising = [i / 10 for i in range(20)]
    state = StopRule(tol=1e-4, max_rounds=5).replay(rising)
    assert state.rounds == 5
    assert state.reason.startswith("max_rounds reached (5) before the validation score stopped")
    flat = [0.5] * 20
    state = StopRule(tol=None, n_iter_no_change=2, max_rounds=7).replay(flat)
    assert state.rounds == 7 and state.reason == "max_rounds reached (7)"


def test_missing_values_neither_improve_nor_count():
    rule = StopRule(tol=0.0, n_iter_no_change=2, max_rounds=10)
    state = rule.replay([None, math.nan, 0.5, None, 0.5, 0.4])
    assert state.rounds == 6 and state.best_round == 3 and state.stopped


def test_state_round_trips_through_json_and_continues_identically():
    rule = StopRule(tol=0.01, n_iter_no_change=4)
    values = [0.1, 0.3, 0.31, 0.305, 0.33, 0.2, 0.2, 0.2, 0.2, 0.2]
    whole = rule.replay(values)
    half = rule.replay(values[:3])
    state = StopState.from_dict(json.loads(json.dumps(half.to_dict())))
    for v in values[3:]:
        state = rule.update(state, v)
        if state.stopped:
            break
    assert state == whole
    assert StopState.from_dict(None) == StopState()
    with pytest.raises(ValueError, match="already stopped"):
        rule.update(whole, 0.9)


def test_same_stop_as_scikit_learn_mlp():
    """MLPClassifier's loss rule (no improvement = loss > best - tol) replayed on its own
    loss_curve_ stops on the epoch it stopped on. It stops once the count *exceeds*
    n_iter_no_change (SGDClassifier's, like ours, once it reaches it): hence the + 1."""
    import warnings

    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = MLPClassifier(hidden_layer_sizes=(16,), tol=1e-3, n_iter_no_change=4,
                            max_iter=300, random_state=0).fit(X / 16.0, y)
    assert est.n_iter_ < 300
    state = StopRule(tol=1e-3, n_iter_no_change=5, max_rounds=300,
                     monitor="loss").replay(est.loss_curve_)
    assert state.stopped and state.rounds == est.n_iter_ == len(est.loss_curve_)
    assert state.best == est.best_loss_


def test_bad_parameters_are_one_line_config_errors():
    for kwargs, match in [({"tol": -1}, "tol must be"), ({"n_iter_no_change": 0},
                                                          "n_iter_no_change must be"),
                          ({"max_rounds": 1.5}, "max_rounds must be"),
                          ({"monitor": "acc"}, "unknown monitor 'acc'")]:
        with pytest.raises(ConfigError, match=match):
            StopRule(**kwargs)


def test_holdout_rows():
    assert holdout_rows(100, 0.1) == (slice(0, 90), slice(90, 100))
    assert holdout_rows(100, None) == (slice(0, 100), slice(100, 100))
    assert holdout_rows(5, 0.01) == (slice(0, 4), slice(4, 5))  # at least one held out
    assert holdout_rows(1, 0.5) == (slice(0, 1), slice(1, 1))  # at least one kept
    with pytest.raises(ConfigError, match="validation_fraction must be a number in"):
        holdout_rows(10, 1.5)


def test_holdout_blocks_are_a_seeded_draw_that_a_resume_repeats():
    from rpicluster.errors import DataError
    from rpicluster.train.stopping import holdout_blocks

    train, held = holdout_blocks(10, 0.25, "s.zarr", seed=3)
    assert len(held) == 3 and sorted(train + held) == list(range(10))
    assert holdout_blocks(10, 0.25, "s.zarr", seed=3) == (train, held)  # same seed, same split
    assert any(holdout_blocks(10, 0.25, "s.zarr", seed=s)[1] != held for s in range(4, 9))
    assert holdout_blocks(10, 0.25, "s.zarr") == (list(range(7)), [7, 8, 9])  # no seed: last
    assert holdout_blocks(2, 0.9, "s.zarr", seed=0)[0] != []  # one block is left to train on
    with pytest.raises(DataError, match=r"^s.zarr has 1 block: none can be held out for "
                       r"scoring \(validation_fraction=0.1\); ingest it with a smaller "
                       r"--block-rows, or pass --test$"):
        holdout_blocks(1, 0.1, "s.zarr", seed=0, instead="--test")
    with pytest.raises(ConfigError, match="validation_fraction must be a number in"):
        holdout_blocks(10, 0.0, "s.zarr")


# --- wired into the round engine, on a real cluster ---

class Killed(Exception):
    """Ends a run from ``on_round``, as a killed desktop client would."""


def kill_after_two(report):
    if report["round"] == 2:
        raise Killed


def killed_then_resumed(train, rule, run_dir, resume_kw=None, **kw):
    """``train(**kw)`` (a round run: train_averaged, federate_on) killed after its second round,
    then resumed (with ``resume_kw`` changed): (the resumed result, its stopper)."""
    from rpicluster.train.stopping import RoundStopper

    with pytest.raises(Killed):
        train(**kw, stop=RoundStopper(rule), run_dir=run_dir, on_round=kill_after_two)
    again = RoundStopper(rule)
    return train(**{**kw, **(resume_kw or {})}, stop=again, run_dir=run_dir, resume=True), again


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn's digits as a 4-block training store and a held-out test store (75/25,
    stratified at ingest)."""
    import numpy as np
    from sklearn.datasets import load_digits

    from rpicluster import ingest

    root = tmp_path_factory.mktemp("stop-data")
    X, y = load_digits(return_X_y=True)
    np.savez(root / "digits.npz", X=(X / 16.0).astype(np.float32), y=y)
    ingest(str(root / "digits.npz"), root / "train.zarr", block_rows=350, test_fraction=0.25,
           test_out=root / "test.zarr")
    return root


def test_rounds_stop_by_the_rule_and_a_resumed_run_stops_on_the_same_round(digits, client,
                                                                          tmp_path):
    import numpy as np

    from rpicluster import open_dataset
    from rpicluster.train.averaging import train_averaged
    from rpicluster.train.stopping import RoundStopper

    ds, test = open_dataset(digits / "train.zarr"), open_dataset(digits / "test.zarr")
    rule = StopRule(tol=0.01, n_iter_no_change=2, max_rounds=40, monitor="score")
    kw = dict(model="sgd", params={"random_state": 0}, rounds=40, validation=test)
    whole = RoundStopper(rule)
    full = train_averaged(ds, client, **kw, stop=whole, run_dir=tmp_path / "full")
    assert whole.reason.startswith("converged: validation score did not improve by tol=0.01 "
                                   "for 2 rounds")
    assert len(full.rounds) == whole.state.best_round + 2 < 40

    resumed, again = killed_then_resumed(train_averaged, rule, tmp_path / "cut", dataset=ds,
                                         client=client, **kw)
    assert resumed.resumed_rounds == 2 and len(resumed.rounds) == len(full.rounds)
    assert again.state == whole.state
    np.testing.assert_array_equal(resumed.model.coef_, full.model.coef_)


def test_cli_train_says_why_it_stopped(digits, cluster, tmp_path):
    from click.testing import CliRunner

    from rpicluster.cli import main

    args = ["train", str(digits / "train.zarr"), "-o", str(tmp_path / "m.skops"), "--model",
            "sgd", "--seed", "0", "--test", str(digits / "test.zarr"), "--tol", "0.01",
            "--n-iter-no-change", "2", "--scheduler", cluster.scheduler_address]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "stopped: converged: validation score did not improve by tol=0.01 for 2 rounds" \
        in res.output
    res = CliRunner().invoke(main, [*args[:5], "inc-ksgd", *args[6:8], "--tol", "none",
                                    "--overwrite", "--scheduler", cluster.scheduler_address])
    assert res.exit_code == 2 and ("--tol, --n-iter-no-change and --validation-fraction are for "
                                   "--model mlp") in res.output


def test_validation_fraction_holds_out_blocks_and_a_resume_gives_the_same_model(
        digits, client, tmp_path):
    """scikit-learn's early_stopping: a seeded quarter of the blocks is never trained on and
    its accuracy is what the rule watches; a run killed after 2 rounds and resumed holds out
    the same blocks and ends on the same round with the same model."""
    import numpy as np

    from rpicluster import open_dataset
    from rpicluster.train.averaging import score_on_cluster, train_averaged
    from rpicluster.train.stopping import RoundStopper

    ds = open_dataset(digits / "train.zarr")
    assert ds.n_blocks == 4
    rule = StopRule(tol=0.01, n_iter_no_change=3, max_rounds=40, monitor="score")
    kw = dict(model="sgd", params={"random_state": 0}, rounds=40, validation_fraction=0.25)
    whole = RoundStopper(rule)
    full = train_averaged(ds, client, **kw, stop=whole, run_dir=tmp_path / "full")
    assert len(full.held_out) == 1
    [held] = full.held_out
    start, stop = ds.block_slice(held)
    assert all(r["rows"] == ds.n_rows - (stop - start) for r in full.rounds)  # not trained on
    assert full.rounds[-1]["accuracy"] == score_on_cluster(full.model, ds, client,
                                                           blocks=[held])
    assert whole.reason.startswith("converged: validation score did not improve by tol=0.01")
    assert 2 < len(full.rounds) == whole.state.rounds < 40

    resumed, again = killed_then_resumed(  # resumed with the recorded fraction
        train_averaged, rule, tmp_path / "cut", {"validation_fraction": None}, dataset=ds,
        client=client, **kw)
    assert resumed.held_out == full.held_out and again.state == whole.state
    np.testing.assert_array_equal(resumed.model.coef_, full.model.coef_)
    with pytest.raises(ConfigError, match="validation_fraction was 0.25 in the run, now 0.5"):
        train_averaged(ds, client, **{**kw, "validation_fraction": 0.5},
                       run_dir=tmp_path / "cut", resume=True)


def test_mlp_with_validation_fraction_ends_with_its_best_round_even_after_a_resume(
        digits, client, tmp_path):
    """As MLPClassifier(early_stopping=True) restores its best weights: the run ends with the
    model of the round whose held-out score was best, not the last one; a run killed after
    that round and resumed keeps it from the run directory and ends with the same model."""
    import numpy as np

    from rpicluster import open_dataset
    from rpicluster.train.averaging import score_on_cluster, train_averaged
    from rpicluster.train.stopping import RoundStopper

    ds = open_dataset(digits / "train.zarr")
    rule = StopRule(tol=0.0, n_iter_no_change=3, max_rounds=60, monitor="score")
    kw = dict(model="mlp", params={"random_state": 0, "learning_rate_init": 0.01},
              rounds=60, validation_fraction=0.25)
    whole = RoundStopper(rule)
    full = train_averaged(ds, client, **kw, stop=whole, run_dir=tmp_path / "full")
    best = whole.state.best_round
    assert len(full.rounds) == best + 3 and whole.kept == best
    assert whole.reason.endswith(f"; the model is round {best}'s, the best validation score "
                                 "(as MLPClassifier's early_stopping keeps it)")
    [held] = full.held_out
    scores = [r["accuracy"] for r in full.rounds]
    assert score_on_cluster(full.model, ds, client, blocks=[held]) == scores[best - 1] \
        == max(scores)

    def kill_after_best(report):
        if report["round"] == best + 1:
            raise Killed

    with pytest.raises(Killed):
        train_averaged(ds, client, **kw, stop=RoundStopper(rule), run_dir=tmp_path / "cut",
                       on_round=kill_after_best)
    again = RoundStopper(rule)
    resumed = train_averaged(ds, client, **kw, stop=again, run_dir=tmp_path / "cut",
                             resume=True)
    assert resumed.resumed_rounds == best + 1 and again.kept == best
    for a, b in zip(resumed.model.coefs_, full.model.coefs_):
        np.testing.assert_array_equal(a, b)
    # The same rule on an SGD run keeps its last model, as SGDClassifier does.
    sgd = RoundStopper(rule)
    train_averaged(ds, client, **{**kw, "model": "sgd", "params": {"random_state": 0}},
                   stop=sgd, run_dir=tmp_path / "sgd")
    assert sgd.kept is None


def test_cli_validation_fraction(digits, cluster, tmp_path):
    """train --validation-fraction: the rounds table's accuracy is the held-out blocks', the
    test store is scored once at the end; a one-block store is refused in one line before
    any cluster is contacted (the scheduler given does not exist)."""
    import numpy as np
    from click.testing import CliRunner

    from rpicluster import ingest
    from rpicluster.cli import main

    args = ["train", str(digits / "train.zarr"), "-o", str(tmp_path / "m.skops"), "--model",
            "sgd", "--seed", "0", "--validation-fraction", "0.25", "--tol", "0.01",
            "--n-iter-no-change", "2", "--test", str(digits / "test.zarr"),
            "--scheduler", cluster.scheduler_address]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert re.search(r"held out for the stopping rule \(accuracy column\): blocks \d of "
                     r".*train.zarr \(3\d\d of 13\d\d rows\)", res.output), res.output
    assert "stopped: converged: validation score did not improve by tol=0.01 for 2 rounds" \
        in res.output
    assert "test accuracy: 0." in res.output

    X = np.random.default_rng(0).random((50, 4), dtype=np.float32)
    np.savez(tmp_path / "one.npz", X=X, y=np.arange(50) % 2)
    ingest(str(tmp_path / "one.npz"), tmp_path / "one.zarr")
    res = CliRunner().invoke(main, ["train", str(tmp_path / "one.zarr"), "-o",
                                    str(tmp_path / "one.skops"), "--model", "mlp",
                                    "--validation-fraction", "0.1",
                                    "--scheduler", "tcp://127.0.0.1:9"])
    assert res.exit_code == 1
    assert res.output.strip().endswith("has 1 block: none can be held out for scoring "
                                       "(validation_fraction=0.1); ingest it with a smaller "
                                       "--block-rows, or pass a test store (--test) to watch "
                                       "instead"), res.output
    assert len(res.output.strip().splitlines()) == 1
    inventory = Path(__file__).parents[1] / "deploy" / "inventories" / "paper-cluster.toml"
    res = CliRunner().invoke(main, ["federate", "-c", str(inventory), "-o",
                                    str(tmp_path / "f.skops"), "--validation",
                                    str(digits / "test.zarr"), "--validation-fraction", "0.1"])
    assert res.exit_code == 1
    assert res.output == "error: give --validation or --validation-fraction, not both\n"


def test_federated_validation_fraction_each_host_holds_out_its_own_blocks(tmp_path):
    """federate with a validation fraction: every host trains on all but a seeded draw of its
    blocks and scores the global model on those; a host whose store has one block is named
    and left out; a killed run resumes to the same model."""
    import numpy as np
    from distributed import Client, LocalCluster
    from sklearn.datasets import load_digits

    from rpicluster import ingest, open_dataset
    from rpicluster.train.federated import federate_on, host_split
    from rpicluster.train.stopping import RoundStopper

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    hosts = {}
    for h, idx in enumerate((slice(0, 900), slice(900, 1797))):
        np.savez(tmp_path / f"h{h}.npz", X=X[idx], y=y[idx])
        ingest(str(tmp_path / f"h{h}.npz"), tmp_path / f"h{h}.zarr", block_rows=150)
        hosts[str(h)] = str(tmp_path / f"h{h}.zarr")
    np.savez(tmp_path / "h2.npz", X=X[:100], y=y[:100])
    ingest(str(tmp_path / "h2.npz"), tmp_path / "h2.zarr")
    hosts["2"] = str(tmp_path / "h2.zarr")
    rule = StopRule(tol=0.01, n_iter_no_change=2, max_rounds=30, monitor="score")
    kw = dict(model="sgd", params={"random_state": 0}, rounds=30, validation_fraction=0.2)

    with LocalCluster(n_workers=3, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        whole = RoundStopper(rule)
        full = federate_on(client, hosts, **kw, stop=whole, run_dir=tmp_path / "full")
        resumed, again = killed_then_resumed(federate_on, rule, tmp_path / "cut",
                                             client=client, hosts=hosts, **kw)
    assert "has 1 block: none can be held out" in full.excluded["2"]
    # 6 blocks of 150 rows each (the second host's last: 147); 2 held out per host, drawn
    # with the run's seed and the host's name.
    trained = 0
    for h in "01":
        ds = open_dataset(hosts[h])
        train, held = host_split(ds, (0.2, 0, h))
        assert ds.n_blocks == 6 and len(held) == 2
        trained += sum(np.subtract(*ds.block_slice(b)[::-1]) for b in train)
    assert all(r["rows"] == trained for r in full.rounds)
    assert all(0.5 < r["accuracy"] <= 1 for r in full.rounds)
    assert whole.reason.startswith("converged: validation score did not improve by tol=0.01")
    assert resumed.resumed_rounds == 2 and again.state == whole.state
    np.testing.assert_array_equal(resumed.model.coef_, full.model.coef_)


@pytest.mark.timeout(900)
def test_federated_non_iid_digits_reaches_090_with_the_default_rule(tmp_path):
    """FedAvg of scikit-learn's default MLP over 3 hosts holding Dirichlet(0.5) class shares of
    digits: the default rule (watching the desktop's validation store) decides how many rounds
    of one local epoch run, and the held-out test rows score >= 0.90."""
    import numpy as np
    from distributed import Client, LocalCluster
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from rpicluster import ingest, open_dataset
    from rpicluster.train.federated import federate_on
    from rpicluster.train.stopping import RoundStopper, default_rule

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    Xtr, Xrest, ytr, yrest = train_test_split(X, y, test_size=0.4, stratify=y, random_state=0)
    Xval, Xte, yval, yte = train_test_split(Xrest, yrest, test_size=0.5, stratify=yrest,
                                            random_state=0)
    rng = np.random.default_rng(0)
    parts = [[], [], []]
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(ytr == c))
        cuts = (np.cumsum(rng.dirichlet([0.5] * 3))[:-1] * len(rows)).astype(int)
        for h, chunk in enumerate(np.split(rows, cuts)):
            parts[h] += chunk.tolist()
    hosts = {}
    for h, idx in enumerate(parts):
        np.savez(tmp_path / f"h{h}.npz", X=Xtr[idx], y=ytr[idx])
        ingest(str(tmp_path / f"h{h}.npz"), tmp_path / f"h{h}.zarr")
        hosts[str(h)] = str(tmp_path / f"h{h}.zarr")
    # Really non-IID: every host nearly lacks some class.
    assert all(np.bincount(ytr[p], minlength=10).min() < 10 for p in parts)
    np.savez(tmp_path / "val.npz", X=Xval, y=yval)
    ingest(str(tmp_path / "val.npz"), tmp_path / "val.zarr")
    stopper = RoundStopper(default_rule("mlp", validated=True))
    with LocalCluster(n_workers=3, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        result = federate_on(client, hosts, model="mlp", params={"random_state": 0},
                             rounds=stopper.rule.max_rounds,
                             validation=open_dataset(tmp_path / "val.zarr"), stop=stopper)
    assert stopper.reason is not None and len(result.rounds) == stopper.state.rounds
    assert result.model.score(Xte, yte) >= 0.90, stopper.reason
