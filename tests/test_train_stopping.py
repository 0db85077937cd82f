"""The stopping rule alone (pure functions): scikit-learn's tol / n_iter_no_change / max_iter
semantics, the reason it gives, its state through a checkpoint, and the held-out rows."""

from __future__ import annotations

import json
import math

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
