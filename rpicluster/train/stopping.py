"""When round-based training stops: scikit-learn's convergence rule, as pure functions.

scikit-learn's ``MLPClassifier`` and ``SGDClassifier`` stop once the monitored value has not
improved by ``tol`` for ``n_iter_no_change`` consecutive epochs, or after ``max_iter`` epochs.
The same rule decides here how many rounds a model-averaging or federated run trains (and how
many successive-halving rungs a tuning candidate needs): ``max_rounds`` plays ``max_iter``.

What is monitored (``monitor``):

- ``"score"``: accuracy on held-out rows, higher is better (scikit-learn's
  ``early_stopping=True``): a seeded ``validation_fraction`` of the store's blocks
  (:func:`holdout_blocks`), which are then not trained on, or a validation store.
- ``"loss"``: the training loss, lower is better (scikit-learn's default).

The rule's whole state is a small JSON-able dict (:meth:`StopState.to_dict`), checkpointed with
each round's report, so a resumed run continues the count exactly where it was and ends on the
same round with the same model. ``tol=None`` turns the rule off (``max_rounds`` rounds run), as
scikit-learn's ``tol=None`` does.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from rpicluster.errors import ConfigError

MONITORS = ("score", "loss")
#: What each monitored value is called in a stop reason.
_WHAT = {"score": "validation score", "loss": "training loss"}


@dataclasses.dataclass(frozen=True)
class StopState:
    """Where the rule stands after ``rounds`` rounds.

    Attributes
    ----------
    rounds : int
        Rounds seen.
    best : float or None
        Best monitored value so far (None before the first round with a value).
    best_round : int
        Round (1-based) of ``best``.
    no_change : int
        Consecutive rounds, up to now, that did not improve ``best`` by ``tol``.
    reason : str or None
        Why the run stopped; None while it goes on.
    """

    rounds: int = 0
    best: float | None = None
    best_round: int = 0
    no_change: int = 0
    reason: str | None = None

    @property
    def stopped(self) -> bool:
        return self.reason is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "StopState":
        """The state recorded by :meth:`to_dict` (a fresh one for None)."""
        if not data:
            return cls()
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclasses.dataclass(frozen=True)
class StopRule:
    """Stop after ``n_iter_no_change`` rounds without an improvement of ``tol``, or at
    ``max_rounds``.

    Parameters
    ----------
    tol : float or None, default=1e-4
        The improvement that counts (scikit-learn's ``tol``); None: never converge, run
        ``max_rounds`` rounds.
    n_iter_no_change : int, default=10
        Rounds without such an improvement before the run stops.
    max_rounds : int, default=200
        Rounds at most (scikit-learn's ``max_iter``).
    monitor : {"score", "loss"}, default="score"
        Held-out accuracy (higher is better) or training loss (lower is better).
    """

    tol: float | None = 1e-4
    n_iter_no_change: int = 10
    max_rounds: int = 200
    monitor: str = "score"

    def __post_init__(self):
        if self.tol is not None and (not _is_number(self.tol) or self.tol < 0):
            raise ConfigError(f"tol must be a number >= 0 or None, got {self.tol!r}")
        if not _is_int(self.n_iter_no_change) or self.n_iter_no_change < 1:
            raise ConfigError(f"n_iter_no_change must be an int >= 1, got "
                              f"{self.n_iter_no_change!r}")
        if not _is_int(self.max_rounds) or self.max_rounds < 1:
            raise ConfigError(f"max_rounds must be an int >= 1, got {self.max_rounds!r}")
        if self.monitor not in MONITORS:
            raise ConfigError(f"unknown monitor {self.monitor!r} (choices: "
                              f"{', '.join(MONITORS)})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def update(self, state: StopState, value: float | None) -> StopState:
        """The state after one more round whose monitored value is ``value``.

        A missing value (None or NaN: no loss reported, no held-out rows scored) neither
        improves nor counts against the run; only ``max_rounds`` can then stop it.
        """
        if state.stopped:
            raise ValueError(f"the run already stopped ({state.reason})")
        rounds = state.rounds + 1
        best, best_round, no_change = state.best, state.best_round, state.no_change
        if value is not None and not math.isnan(value):
            value = float(value)
            sign = 1.0 if self.monitor == "score" else -1.0  # compare as "higher is better"
            tol = 0.0 if self.tol is None else float(self.tol)
            if best is None or sign * (value - best) > tol:
                no_change = 0
            else:
                no_change += 1
            if best is None or sign * (value - best) > 0:
                best, best_round = value, rounds
        reason = None
        if self.tol is not None and no_change >= self.n_iter_no_change:
            reason = (f"converged: {_WHAT[self.monitor]} did not improve by tol={self.tol:g} for "
                      f"{self.n_iter_no_change} rounds (best {best:.4f} at round {best_round})")
        elif rounds >= self.max_rounds:
            reason = (f"max_rounds reached ({self.max_rounds})" if self.tol is None else
                      f"max_rounds reached ({self.max_rounds}) before the {_WHAT[self.monitor]} "
                      f"stopped improving by tol={self.tol:g}; raise max_rounds to train longer")
        return StopState(rounds=rounds, best=best, best_round=best_round, no_change=no_change,
                         reason=reason)

    def replay(self, values) -> StopState:
        """The state after rounds whose monitored values are ``values``, in order (stops
        early if the rule stops)."""
        state = StopState()
        for v in values:
            state = self.update(state, v)
            if state.stopped:
                break
        return state


def holdout_rows(n_rows: int, fraction: float | None) -> tuple[slice, slice]:
    """(training rows, held-out rows) of a block of ``n_rows``: its last ``fraction``.

    At least one row is held out when ``fraction`` > 0 and at least one is kept for training;
    ``fraction`` None or 0 holds out nothing.
    """
    n_rows = int(n_rows)
    if not fraction:
        return slice(0, n_rows), slice(n_rows, n_rows)
    check_fraction(fraction)
    n_val = min(max(1, math.ceil(float(fraction) * n_rows)), max(0, n_rows - 1))
    return slice(0, n_rows - n_val), slice(n_rows - n_val, n_rows)


def holdout_blocks(n_blocks: int, fraction, where: str, *, seed=None,
                   instead: str = "a validation store") -> tuple[list[int], list[int]]:
    """(training blocks, held-out blocks) of a store of ``n_blocks``: ``ceil(fraction *
    n_blocks)`` of them (at least one, and one left to train on) are held out for scoring.

    With ``seed`` (an int or a sequence of ints: the run's ``random_state``) the held-out
    blocks are a seeded draw, as scikit-learn's ``early_stopping`` draws its
    ``validation_fraction`` of the rows with the estimator's ``random_state``; without one they
    are the last blocks (stores are shuffled at ingest: every block is a random sample). The
    same arguments give the same split, so a resumed run holds out what it held out before.

    Raises
    ------
    ConfigError
        ``fraction`` outside (0, 1).
    DataError
        Fewer than 2 blocks: none can be held out (``where`` names the store, ``instead`` the
        alternative to offer).
    """
    from rpicluster.errors import DataError

    fraction = check_fraction(fraction)
    if n_blocks < 2:
        raise DataError(f"{where} has {n_blocks} block: none can be held out for scoring "
                        f"(validation_fraction={fraction:g}); ingest it with a smaller "
                        f"--block-rows, or pass {instead}")
    n_val = min(n_blocks - 1, max(1, math.ceil(fraction * n_blocks)))
    if seed is None:
        held = list(range(n_blocks - n_val, n_blocks))
    else:
        import numpy as np

        rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), int(n_blocks)])
        held = sorted(int(b) for b in rng.choice(n_blocks, size=n_val, replace=False))
    return [b for b in range(n_blocks) if b not in held], held


def check_fraction(fraction, name: str = "validation_fraction") -> float:
    """``fraction`` as a float in (0, 1); ConfigError naming ``name`` otherwise."""
    if not _is_number(fraction) or not 0 < float(fraction) < 1:
        raise ConfigError(f"{name} must be a number in (0, 1), got {fraction!r}")
    return float(fraction)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, numbers.Real) and not isinstance(v, bool)
            and not math.isnan(float(v)))


#: Models whose scikit-learn early stopping ends with the weights of the best validation epoch
#: (``MLPClassifier`` restores them; ``SGDClassifier`` ends with its last ones).
KEEPS_BEST = frozenset({"mlp"})


class RoundStopper:
    """The rule as the round engine's ``stop(history)`` hook.

    The state is replayed from the round reports every time (they are checkpointed with each
    round), so a resumed run reaches exactly the state an uninterrupted one had: nothing else
    needs saving. ``state`` and ``reason`` say where the rule stands after the last call;
    ``kept`` is the round whose model the run ended with when the engine restored the best
    one (:meth:`keeps_best`), else None.
    """

    def __init__(self, rule: StopRule):
        self.rule = rule
        self.state = StopState()
        self.kept: int | None = None

    def keeps_best(self, model: str, held_out: bool) -> bool:
        """Whether a ``model`` run ends with its best round's model rather than its last, as
        ``MLPClassifier(early_stopping=True)`` restores its best weights: when the rule
        watches the score of rows held out from training (``held_out``: a
        ``validation_fraction``; a store scored every round may be the test store, and
        choosing the model by it would flatter the test score)."""
        return held_out and self.rule.monitor == "score" and model in KEEPS_BEST

    def value(self, report: dict) -> float | None:
        """The monitored value of one round's report (``accuracy`` or ``loss``)."""
        return report.get("accuracy" if self.rule.monitor == "score" else "loss")

    def __call__(self, history: list[dict]) -> bool:
        self.state = self.rule.replay(self.value(r) for r in history)
        return self.state.stopped

    @property
    def reason(self) -> str | None:
        if self.state.reason is not None and self.kept is not None:
            return (f"{self.state.reason}; the model is round {self.kept}'s, the best "
                    "validation score (as MLPClassifier's early_stopping keeps it)")
        return self.state.reason


#: scikit-learn's defaults: (tol, n_iter_no_change) of MLPClassifier and SGDClassifier.
SKLEARN_DEFAULTS = {"mlp": (1e-4, 10), "sgd": (1e-3, 5)}
#: Rounds at most by default (MLPClassifier's max_iter).
MAX_ROUNDS = 200


def default_rule(model: str, *, validated: bool, tol: float | str | None = "default",
                 n_iter_no_change: int | None = None, max_rounds: int | None = None
                 ) -> StopRule:
    """The rule of a ``model`` run: scikit-learn's defaults ("mlp": ``MLPClassifier``'s
    tol=1e-4, n_iter_no_change=10; "sgd": ``SGDClassifier``'s 1e-3, 5; max_rounds
    :data:`MAX_ROUNDS`), watching the held-out score when the run scores a store every round
    (``validated``), else the training loss. Given values replace the defaults; ``tol=None``
    turns convergence off (``max_rounds`` rounds run), as in scikit-learn."""
    base_tol, base_n = SKLEARN_DEFAULTS.get(model, SKLEARN_DEFAULTS["mlp"])
    return StopRule(tol=base_tol if tol == "default" else tol,
                    n_iter_no_change=n_iter_no_change or base_n,
                    max_rounds=max_rounds or MAX_ROUNDS,
                    monitor="score" if validated else "loss")
