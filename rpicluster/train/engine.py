"""One round engine for model averaging and federated rounds.

As Flower separates its ``Strategy`` (which clients train a round, how their updates combine)
from the server loop, a round-based run here is a :class:`Strategy` driven by
:func:`run_rounds`. The strategy trains one round: it picks the round's participants (shards of
a store, or hosts with their own stores), submits their tasks and aggregates their updates into
the next global model. The loop owns everything around the rounds: the run directory (owner
lock, a checkpoint after every round, resume at the last finished one), the page's round
events, progress, the ``on_round`` callback, and when to stop.

**Stopping rule.** ``run_rounds(..., stop=rule)`` calls ``rule(history)`` after every round,
with the report of every round so far (resumed ones first); a true value ends the run after
that round, as if ``rounds`` had been reached (the reports say how many ran), and a resumed run
that had stopped trains no further. Without a rule the run trains up to ``rounds``. An MLP run
whose rule watches rows held out by a ``validation_fraction`` ends with its best round's model,
as ``MLPClassifier(early_stopping=True)`` restores its best weights
(:meth:`~rpicluster.train.stopping.RoundStopper.keeps_best`); the run directory keeps that
round's model file for a resume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np

from rpicluster.errors import ConfigError, TrainingError
from rpicluster.progress import Progress


def is_fitted(est) -> bool:
    """Whether ``est`` holds trained weights (``coefs_`` or ``coef_``)."""
    return est is not None and (hasattr(est, "coefs_") or hasattr(est, "coef_"))


class Strategy:
    """What a round-based run does in a round (subclass it; see the module docstring).

    Attributes
    ----------
    mode : str
        The run's kind on the page and in ``run.json``: ``"averaging"``, ``"federated"``.
    nothing_trained : str
        The TrainingError of a run that ends without a trained model.
    """

    mode = ""
    nothing_trained = "no round ran"

    def start(self) -> None:
        """Set up on the cluster what every round uses, once the run directory is begun."""

    def fit_round(self, r: int, model) -> tuple[object, dict]:
        """Train round ``r`` (0-based) from the global ``model``: ``(next global model,
        report)``. The report holds at least ``round``, ``rows``, ``bytes_down``, ``bytes_up``,
        ``seconds``, ``loss`` and ``accuracy`` (as
        :class:`~rpicluster.train.rounds.RoundEvents` publishes them)."""
        raise NotImplementedError

    def note(self, report: dict) -> str:
        """The progress line's note after a round."""
        acc = "" if report["accuracy"] is None else f", accuracy {report['accuracy']:.4f}"
        return f"round {report['round']}: {report['seconds']:.1f} s{acc}"

    def close(self) -> None:
        """Release what the rounds kept on the cluster (after the last round)."""


def run_params(model: str, params: dict | None, recorded: dict, make_estimator) -> dict:
    """The run's estimator parameters: the recorded run's (resume), updated by ``params``, with a
    drawn ``random_state`` when none is given (recorded in the run directory); validated by
    building the estimator (``make_estimator(model, params)``) before any work."""
    params = {**recorded.get("params", {}), **(params or {})}
    if params.get("random_state") is None:
        params["random_state"] = int(np.random.SeedSequence().generate_state(1)[0] >> 1)
    make_estimator(model, params)
    return params


def recorded_run(rundir, model: str, resume: bool) -> dict:
    """What ``rundir`` records of the run to resume ({} for a new run); ConfigError when it
    trained another model."""
    recorded = rundir.meta() if (rundir is not None and resume) else {}
    if recorded.get("model", model) != model:
        raise ConfigError(f"cannot resume {rundir.path}: model was {recorded['model']!r} in the "
                          f"run, now {model!r}")
    return recorded


def run_rounds(strategy: Strategy, client, *, model: str, rounds: int, rundir, meta: dict,
               resume: bool, overwrite: bool, expected, initial_model: Callable[[], object],
               progress: Progress | None = None, on_round=None,
               stop: Callable[[list[dict]], bool] | None = None) -> tuple[object, list, int]:
    """Run ``strategy``'s rounds up to ``rounds`` (or until ``stop``).

    Parameters
    ----------
    strategy : Strategy
    client : distributed.Client
        Where the page's round events go.
    model : str
        The estimator's name (``"mlp"``, ``"sgd"``), for the page.
    rounds : int
        Rounds to reach (a resumed run continues up to this many).
    rundir : RoundDir or None
        Checkpoints; owned (locked) from its start until the run ends.
    meta : dict
        What the run is (``run.json``); a resume must match it.
    resume, overwrite : bool
        Continue the run in ``rundir``; start afresh over finished rounds there.
    expected : type
        The estimator class a resumed model file must hold.
    initial_model : callable
        The global model of a run with no finished round.
    progress : Progress, optional
        Advanced once per round.
    on_round : callable, optional
        Called with each round's report after it is checkpointed.
    stop : callable, optional
        The stopping rule (module docstring).

    Returns
    -------
    (model, history, resumed)
        The global model after the last round, every round's report (resumed ones first), and
        how many rounds were resumed.
    """
    from rpicluster.train.rounds import RoundEvents
    from rpicluster.train.stopping import RoundStopper

    keep_best = (isinstance(stop, RoundStopper)
                 and stop.keeps_best(model, meta.get("validation_fraction") is not None))
    best = None  # the best round's model, kept in memory while later rounds train
    with rundir if rundir is not None else contextlib.nullcontext():
        history, global_model = (rundir.begin(meta, resume=resume, overwrite=overwrite,
                                              expected=expected)
                                 if rundir is not None else ([], None))
        if global_model is None:
            global_model = initial_model()
        strategy.start()
        resumed = len(history)
        stopped = bool(history) and stop is not None and stop(history)
        progress = progress or Progress.null()
        with progress, RoundEvents(client, strategy.mode, model, int(rounds),
                                   history) as events:
            if resumed:
                progress.skip(resumed, note=f"{resumed} rounds resumed")
            for r in range(resumed, int(rounds)):
                if stopped:
                    break
                global_model, report = strategy.fit_round(r, global_model)
                history.append(report)
                stopped = stop is not None and stop(history)
                is_best = keep_best and stop.state.best_round == len(history)
                if rundir is not None and is_fitted(global_model):
                    rundir.commit(global_model, report, best=is_best)
                if is_best:
                    best = global_model
                progress.advance(note=strategy.note(report))
                events.round(report)
                if on_round is not None:
                    on_round(report)
        if keep_best and 0 < stop.state.best_round < len(history):
            if best is None and rundir is not None:  # the best round was before the resume
                best = rundir.best_model(expected=expected)
            if best is not None:
                global_model, stop.kept = best, stop.state.best_round
    strategy.close()
    if not is_fitted(global_model):
        raise TrainingError(strategy.nothing_trained)
    return global_model, history, resumed
