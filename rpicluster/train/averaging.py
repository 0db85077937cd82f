"""Data-parallel training by model averaging over Zarr blocks (local SGD / parameter server).

Any scikit-learn estimator with ``partial_fit`` and array weights trains this way; two are wired
in: ``MLPClassifier`` (weights ``coefs_`` + ``intercepts_``, numpy only, so it runs on any Pi) and
``SGDClassifier`` (``coef_`` + ``intercept_``).

The store's blocks are dealt round-robin into *shards* (one per worker by default). One **round**:

1. the driver shares the global model with the workers once
   (:func:`rpicluster.models.remote.hold`: a recomputable task, so a lost worker cannot hang
   or lose it);
2. every shard's task starts from it, runs ``partial_fit`` over its blocks (read on the worker)
   and returns its weights, optimizer state and row count;
3. the driver averages them, weighted by rows, in shard order (the same model on every run).

``sync`` says how often 1-3 happen inside a round of ``local_epochs`` passes: ``"round"`` once
per round (local SGD, FedAvg's schedule), ``"epoch"`` after every local epoch, ``"batch"`` after
every minibatch (the parameter-server pattern: each shard's rows stay in its worker's memory and
one minibatch step per shard is averaged, which for plain SGD equals synchronous SGD on the union
of the minibatches). Every random choice derives from ``(random_state, round, step, shard)``, and
the global model is checkpointed after every round (:class:`~rpicluster.train.rounds.RoundDir`),
so a killed run resumes at the last finished round and ends with the same model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pickle
import time
import uuid
from pathlib import Path

import numpy as np

from rpicluster.errors import ConfigError, OptionsError, RPiClusterError, TrainingError
from rpicluster.models.ksgd import task_seed
from rpicluster.models.remote import hold
from rpicluster.progress import Progress
from rpicluster.train.engine import Strategy, is_fitted, recorded_run, run_params, run_rounds
from rpicluster.train.stopping import MAX_ROUNDS, RoundStopper, default_rule, holdout_blocks
from rpicluster.train.watch import ClusterWatch

#: Estimators this module trains, by the name the CLI uses.
MODELS = ("mlp", "sgd")
SYNC = ("round", "epoch", "batch")
#: Minibatch rows of ``sync="batch"`` when the estimator has no integer ``batch_size``.
DEFAULT_BATCH_ROWS = 200


def estimator_class(model: str):
    """The scikit-learn class of ``model`` (one of :data:`MODELS`)."""
    if model == "mlp":
        from sklearn.neural_network import MLPClassifier

        return MLPClassifier
    if model == "sgd":
        from sklearn.linear_model import SGDClassifier

        return SGDClassifier
    raise ConfigError(f"unknown model {model!r} (models trained by averaging: {', '.join(MODELS)})")


def make_estimator(model: str, params: dict | None = None):
    """A new estimator ``model`` with ``params``; ConfigError naming an unknown parameter."""
    cls = estimator_class(model)
    params = dict(params or {})
    known = cls().get_params()
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"{cls.__name__} has no parameter(s) {unknown} "
                          f"(known: {', '.join(sorted(known))})")
    if model == "mlp" and params.get("solver", "adam") == "lbfgs":
        raise ConfigError("MLPClassifier solver 'lbfgs' has no partial_fit; use 'adam' or 'sgd'")
    return cls(**params)


def parse_hidden(text: str) -> tuple[int, ...]:
    """``"256,128"`` -> ``(256, 128)``; ConfigError naming the text otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError(f"--hidden {text!r}: expected comma-separated positive layer sizes, "
                          "e.g. 256,128")
    return sizes


def averaged_params(kind: str, hidden: str | None, params: dict) -> dict:
    """Map the shared train options onto MLPClassifier (``kind="mlp"``) or SGDClassifier
    parameters; :class:`~rpicluster.errors.OptionsError` names a flag that is not for ``kind``.

    ``params`` holds the inc-ksgd names the flags set (``eta0``, ``alpha``, ``batch_size``,
    ``random_state``, ...); ``hidden`` is ``--hidden``'s text.
    """
    for flag, key in (("--clusters", "n_clusters"), ("--epochs", "max_iter"),
                      ("--solver", "solver")):
        if key in params:
            raise OptionsError(f"{flag} is for --model inc-ksgd (with {kind}: "
                               "--rounds and --local-epochs)")
    if hidden is not None and kind != "mlp":
        raise OptionsError("--hidden is for --model mlp")
    out = {"random_state": params.get("random_state"), "alpha": params.get("alpha")}
    if kind == "mlp":
        out["learning_rate_init"] = params.get("eta0")
        out["batch_size"] = params.get("batch_size")
        out["hidden_layer_sizes"] = parse_hidden(hidden) if hidden is not None else None
    else:
        if "batch_size" in params:
            raise OptionsError("--batch-size is for --model inc-ksgd or mlp")
        if "eta0" in params:
            out.update(eta0=params["eta0"], learning_rate="constant")
    return {k: v for k, v in out.items() if v is not None}


# --- weights: pure functions ---

def get_weights(est) -> list[np.ndarray]:
    """The estimator's trainable arrays, in a fixed order."""
    if hasattr(est, "coefs_"):
        return list(est.coefs_) + list(est.intercepts_)
    return [est.coef_, est.intercept_]


def set_weights(est, weights: list[np.ndarray]) -> None:
    """Copy ``weights`` into the estimator's arrays in place.

    In place because an MLP's optimizer keeps references to these very arrays.
    """
    for dst, src in zip(get_weights(est), weights, strict=True):
        dst[...] = src


def optimizer_state(est) -> list[np.ndarray]:
    """Arrays of an MLP's optimizer (Adam moments or SGD velocities); [] for others."""
    opt = getattr(est, "_optimizer", None)
    if opt is None:
        return []
    if hasattr(opt, "ms"):
        return list(opt.ms) + list(opt.vs)
    return list(getattr(opt, "velocities", []))


def weighted_average(arrays: list[list[np.ndarray]], rows: list[int]) -> list[np.ndarray]:
    """Element-wise average of several lists of arrays, weighted by ``rows`` (in list order)."""
    total = float(sum(rows))
    if not arrays or total <= 0:
        raise ValueError("nothing to average")
    out = []
    for parts in zip(*arrays, strict=True):
        acc = np.zeros(parts[0].shape, dtype=np.float64)
        for a, n in zip(parts, rows):
            acc += (n / total) * a
        out.append(acc.astype(parts[0].dtype, copy=False))
    return out


def merge_updates(template, updates: list[dict]):
    """A copy of ``template`` holding the row-weighted average of ``updates``.

    ``template`` is the global model before the step, or None in the very first step (then the
    first update's own model supplies the fitted structure). Each update is a task result
    (:func:`fit_update`), in shard order.
    """
    base = template if is_fitted(template) else updates[0]["model"]
    model = copy.deepcopy(base)
    rows = [u["rows"] for u in updates]
    set_weights(model, weighted_average([u["weights"] for u in updates], rows))
    state = optimizer_state(model)
    if state:
        for dst, src in zip(state, weighted_average([u["opt"] for u in updates], rows)):
            dst[...] = src
        if hasattr(model._optimizer, "t"):  # Adam's step count (bias correction)
            model._optimizer.t = max(u["opt_t"] for u in updates)
    for attr in ("t_", "n_iter_"):
        if hasattr(model, attr):
            setattr(model, attr, max(u[attr] for u in updates))
    return model


# --- worker side ---

def local_fit(model, batches, classes: np.ndarray, seed: int, *, want_model: bool = False
              ) -> dict:
    """Train a copy of ``model`` with ``partial_fit`` on each ``(X, labels)`` of ``batches``.

    The global model is never changed (Dask hands one object to every task on a worker).
    Returns the update :func:`merge_updates` takes: weights, optimizer state, rows, loss.
    """
    t0 = time.perf_counter()
    est = copy.deepcopy(model)
    if hasattr(est, "coefs_"):
        # MLP shuffling draws from _random_state: reseed per (round, step, shard).
        est._random_state = np.random.RandomState(seed)
    rows = 0
    for X, labels in batches:
        est.partial_fit(X, labels, classes=classes)
        rows += int(X.shape[0])
    opt = getattr(est, "_optimizer", None)
    out = {"weights": get_weights(est), "opt": optimizer_state(est),
           "opt_t": getattr(opt, "t", None), "rows": rows,
           "loss": float(getattr(est, "loss_", float("nan"))),
           "t_": getattr(est, "t_", 0), "n_iter_": getattr(est, "n_iter_", 0),
           "worker": _worker_name(), "seconds": time.perf_counter() - t0}
    if want_model:
        out["model"] = est
    return out


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except ValueError:
        return "local"


def _labelled(dataset, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Block ``block`` as (float features, original labels); image stores' uint8 pixels / 255."""
    X, y = dataset.block(block)
    if X.dtype == np.uint8:
        X = X.astype(np.float32) / 255.0
    return X, np.asarray(dataset.classes)[y]


def blocks_task(model, dataset, blocks: list[int], epochs: int, seed: int,
                want_model: bool) -> dict:
    """``epochs`` passes over ``blocks`` of ``dataset``, each block read here, on the worker."""
    classes = np.asarray(dataset.classes)
    batches = (_labelled(dataset, b) for _ in range(epochs) for b in blocks)
    return local_fit(model, batches, classes, seed, want_model=want_model)


def load_shard_task(dataset, blocks: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``blocks``, held in the worker's memory for ``sync="batch"`` steps."""
    parts = [_labelled(dataset, b) for b in blocks]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def minibatch_task(model, shard, classes, epoch_seed: int, batch: int, batch_rows: int,
                   seed: int, want_model: bool) -> dict:
    """One minibatch step: rows ``batch`` of this epoch's permutation of the shard."""
    X, labels = shard
    order = np.random.default_rng(epoch_seed).permutation(X.shape[0])
    pick = np.sort(order[batch * batch_rows:(batch + 1) * batch_rows])
    return local_fit(model, [(X[pick], labels[pick])], np.asarray(classes), seed,
                     want_model=want_model)


def score_task(model, dataset, block: int) -> tuple[int, int]:
    """(correct, rows) of ``model`` on block ``block``."""
    X, labels = _labelled(dataset, block)
    return int(np.count_nonzero(model.predict(X) == labels)), int(X.shape[0])


# --- driver ---

@dataclasses.dataclass
class AveragingResult:
    """What a model-averaging run did.

    Attributes
    ----------
    model : estimator
        The global model after the last round.
    rounds : list of dict
        One report per round (resumed ones included): ``round``, ``seconds``, ``steps``,
        ``rows``, ``bytes_down`` (global model sent to workers), ``bytes_up`` (updates sent
        back), ``loss``, ``accuracy`` (validation, or None), ``busy`` (task seconds per worker),
        ``participants`` (the workers whose tasks ran).
    resumed_rounds : int
        Rounds taken from the run directory.
    seconds : float
        Wall time of this call.
    """

    model: object
    rounds: list
    resumed_rounds: int
    seconds: float
    run_dir: Path | None = None
    held_out: list[int] = dataclasses.field(default_factory=list)  # blocks scored, not trained
    held_out_rows: int = 0


def shard_blocks(n_blocks: int, n_shards: int) -> list[list[int]]:
    """Blocks dealt round-robin into ``min(n_shards, n_blocks)`` shards."""
    n = max(1, min(int(n_shards), int(n_blocks)))
    return [list(range(s, n_blocks, n)) for s in range(n)]


def _nbytes(obj) -> int:
    return len(pickle.dumps(obj, protocol=5))


class _Stepper:
    """Submits one synchronisation step and merges its updates (shared by every sync mode)."""

    def __init__(self, client, workers, prefix: str, watch: ClusterWatch):
        self.client, self.workers, self.prefix, self.watch = client, workers, prefix, watch
        self.where = {"workers": workers, "allow_other_workers": False} if workers else {}
        self.bytes_down = self.bytes_up = 0
        self.busy: dict[str, float] = {}
        self.losses: list[tuple[float, int]] = []

    def step(self, model, name: str, submit_one, n: int):
        """Share ``model`` once, run ``submit_one(remote, i)`` for shards ``0..n-1``, merge."""
        n_receivers = len(self.workers or self.client.scheduler_info()["workers"])
        remote = hold(self.client, model, workers=self.workers)
        self.bytes_down += _nbytes(model) * n_receivers
        tag = name.replace(" ", "-")
        futures = [submit_one(remote, i, key=f"{self.prefix}-{tag}-{i}", **self.where)
                   for i in range(n)]
        self.watch.wait(futures, f"{name} of the run")
        updates = []
        for i, f in enumerate(futures):
            if f.status == "error":
                exc = f.exception()
                if isinstance(exc, RPiClusterError):
                    raise type(exc)(f"{name}, shard {i}: {exc}") from exc
                raise TrainingError(f"{name}, shard {i} failed on a worker: "
                                    f"{type(exc).__name__}: {exc}") from exc
        for u in self.client.gather(futures):
            self.bytes_up += _nbytes(u)
            self.busy[u["worker"]] = self.busy.get(u["worker"], 0.0) + u["seconds"]
            if not math.isnan(u["loss"]):
                self.losses.append((u["loss"], u["rows"]))
            updates.append(u)
        del remote
        return merge_updates(model, updates)


def train_averaged(dataset, client, *, model: str = "mlp", params: dict | None = None,
                   rounds: int = 10, local_epochs: int = 1, sync: str = "round",
                   shards: int | None = None, run_dir=None, resume: bool = False,
                   validation=None, workers: list[str] | None = None,
                   progress: Progress | None = None, on_round=None,
                   overwrite: bool = False, stop=None,
                   validation_fraction: float | None = None) -> AveragingResult:
    """Train ``model`` on a Zarr ``dataset`` by averaging local ``partial_fit`` runs.

    Parameters
    ----------
    dataset : rpicluster.data.reader.Dataset
        Read by the workers (its URL must be readable from every worker).
    client : distributed.Client
    model : {"mlp", "sgd"}
    params : dict, optional
        Estimator parameters (``MLPClassifier`` / ``SGDClassifier``). ``random_state`` None
        draws a seed, recorded in the run directory.
    rounds : int
        Rounds to reach (a resumed run continues up to this many).
    local_epochs : int
        Passes over its shard each worker makes per round.
    sync : {"round", "epoch", "batch"}
        Average once per round, after every local epoch, or after every minibatch.
    shards : int, optional
        Groups the blocks are dealt into (default: one per worker, capped at the blocks).
        Part of the run: a resumed run keeps the recorded value.
    run_dir : path, optional
        Round checkpoints; without one nothing is written.
    resume : bool
        Continue the run in ``run_dir`` from its last finished round.
    overwrite : bool
        Start afresh in a ``run_dir`` that holds finished rounds (refused otherwise).
    validation : Dataset, optional
        Scored on the cluster after every round (``accuracy`` in the round report).
    validation_fraction : float, optional
        Hold out this fraction of the store's blocks (a draw seeded by ``random_state``, as
        scikit-learn's ``early_stopping``): never trained on, scored after every round instead
        of ``validation``. A resumed run keeps the recorded value and so the same blocks.
    workers : list of str, optional
        Run on these workers only (e.g. one step of a scaling benchmark).
    progress : Progress, optional
        Advanced once per round.
    on_round : callable, optional
        Called with each round's report after it is checkpointed.
    stop : callable, optional
        The stopping rule: ``stop(history)`` after every round; true ends the run there
        (:func:`rpicluster.train.engine.run_rounds`).

    Raises
    ------
    ConfigError
        Bad parameters, or a run directory that does not match.
    TrainingError
        A task failed; the message names the round, step and shard.
    """
    from rpicluster.train.rounds import RoundDir
    from rpicluster.train.rundir import dataset_identity

    t0 = time.perf_counter()
    if sync not in SYNC:
        raise ConfigError(f"unknown sync {sync!r} (choices: {', '.join(SYNC)})")
    for name, value in (("rounds", rounds), ("local_epochs", local_epochs)):
        if int(value) < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    cls = estimator_class(model)
    rundir = RoundDir(run_dir) if run_dir is not None else None
    recorded = recorded_run(rundir, model, resume)
    params = run_params(model, params, recorded, make_estimator)
    if validation_fraction is None:
        validation_fraction = recorded.get("validation_fraction")
    train_blocks, held_out = list(range(dataset.n_blocks)), []
    if validation_fraction is not None:
        if validation is not None:
            raise ConfigError("give a validation store or a validation_fraction, not both")
        train_blocks, held_out = holdout_blocks(
            dataset.n_blocks, validation_fraction, dataset.url, seed=params["random_state"],
            instead="a test store (--test) to watch instead")
    progress = progress or Progress.null()
    watch = ClusterWatch(client, progress, workers=workers)
    watch.wait_for_workers(f"{rounds} rounds to train")
    n_workers = len(workers) if workers else max(1, len(client.scheduler_info()["workers"]))
    if shards is None:
        shards = recorded.get("shards", n_workers)
    shards_of = [[train_blocks[i] for i in s] for s in shard_blocks(len(train_blocks), shards)]
    rounds_of = _AveragingRounds(client, dataset, shards_of, params, sync, int(local_epochs),
                                 workers, watch, validation, held_out)
    meta = {"kind": "averaging", "model": model, "params": params, "sync": sync,
            "local_epochs": int(local_epochs), "shards": len(rounds_of.shards),
            "dataset": dataset_identity(dataset)}
    if held_out:
        meta.update(validation_fraction=float(validation_fraction), held_out=held_out)
    global_model, history, resumed = run_rounds(
        rounds_of, client, model=model, rounds=rounds, rundir=rundir, meta=meta, resume=resume,
        overwrite=overwrite, expected=cls, initial_model=lambda: make_estimator(model, params),
        progress=progress, on_round=on_round, stop=stop)
    return AveragingResult(model=global_model, rounds=history, resumed_rounds=resumed,
                           seconds=time.perf_counter() - t0,
                           run_dir=rundir.path if rundir else None, held_out=held_out,
                           held_out_rows=int(dataset.n_rows) - rounds_of.train_rows)


class _AveragingRounds(Strategy):
    """Model averaging as a round :class:`~rpicluster.train.engine.Strategy`: every shard of
    the store takes part in every round; ``sync`` says how often within a round the shards'
    updates are averaged (see the module docstring)."""

    mode = "averaging"
    nothing_trained = "no round ran: rounds must exceed the rounds already finished"

    def __init__(self, client, dataset, shards: list[list[int]], params: dict, sync: str,
                 local_epochs: int, workers, watch: ClusterWatch, validation,
                 held_out: list[int]):
        self.client, self.dataset, self.shards, self.sync = client, dataset, shards, sync
        self.local_epochs, self.workers, self.watch = local_epochs, workers, watch
        self.validation, self.params, self.held_out = validation, params, held_out
        self.train_rows = int(sum(np.subtract(*dataset.block_slice(b)[::-1])
                                  for s in shards for b in s))
        self.seed = int(params["random_state"])
        self.classes = np.asarray(dataset.classes)
        self.prefix = f"rpicluster-avg-{uuid.uuid4().hex[:8]}"
        self.where = {"workers": workers, "allow_other_workers": False} if workers else {}
        self.shard_data = None

    def start(self) -> None:
        if self.sync != "batch":
            return
        # Each shard's rows stay in one worker's memory for the whole run (loaded there once).
        client, dataset, workers = self.client, self.dataset, self.workers
        addrs = list(workers or client.scheduler_info()["workers"])
        self.shard_data = [client.submit(load_shard_task, dataset, blocks, pure=False,
                                         key=f"{self.prefix}-shard-{s}",
                                         workers=[addrs[s % len(addrs)]],
                                         allow_other_workers=not workers)
                           for s, blocks in enumerate(self.shards)]
        shard_rows = [sum(np.subtract(*dataset.block_slice(b)[::-1]) for b in blocks)
                      for blocks in self.shards]
        batch_rows = self.params.get("batch_size")
        self.batch_rows = batch_rows if isinstance(batch_rows, int) else DEFAULT_BATCH_ROWS
        self.n_batches = [math.ceil(n / self.batch_rows) for n in shard_rows]

    def fit_round(self, r: int, global_model):
        client, dataset, shards, seed = self.client, self.dataset, self.shards, self.seed
        t_round = time.perf_counter()
        stepper = _Stepper(client, self.workers, f"{self.prefix}-r{r + 1}", self.watch)
        steps = 0
        if self.sync == "round":
            global_model = stepper.step(
                global_model, f"round {r + 1}",
                lambda remote, s, **kw: client.submit(
                    blocks_task, remote, dataset, shards[s], self.local_epochs,
                    task_seed(seed, r, 0, s), not is_fitted(global_model), pure=False, **kw),
                len(shards))
            steps = 1
        elif self.sync == "epoch":
            for e in range(self.local_epochs):
                global_model = stepper.step(
                    global_model, f"round {r + 1} epoch {e + 1}",
                    lambda remote, s, **kw: client.submit(
                        blocks_task, remote, dataset, shards[s], 1, task_seed(seed, r, e, s),
                        not is_fitted(global_model), pure=False, **kw),
                    len(shards))
                steps += 1
        else:
            for e in range(self.local_epochs):
                epoch_seeds = [task_seed(seed, r, e, s, 1) for s in range(len(shards))]
                for b in range(max(self.n_batches)):
                    live = [s for s in range(len(shards)) if b < self.n_batches[s]]
                    global_model = stepper.step(
                        global_model, f"round {r + 1} epoch {e + 1} batch {b + 1}",
                        lambda remote, i, **kw: client.submit(
                            minibatch_task, remote, self.shard_data[live[i]], self.classes,
                            epoch_seeds[live[i]], b, self.batch_rows,
                            task_seed(seed, r, e, live[i], b + 2),
                            not is_fitted(global_model), pure=False, **kw),
                        len(live))
                    steps += 1
        losses = stepper.losses
        report = {
            "round": r + 1, "seconds": time.perf_counter() - t_round, "steps": steps,
            "rows": self.train_rows * self.local_epochs,
            "bytes_down": stepper.bytes_down, "bytes_up": stepper.bytes_up,
            "loss": (sum(l * n for l, n in losses) / sum(n for _, n in losses)
                     if losses else None),
            "accuracy": self.score(global_model),
            "busy": stepper.busy, "participants": sorted(stepper.busy),
        }
        return global_model, report

    def score(self, model) -> float | None:
        """The round's monitored accuracy: on the held-out blocks, or the validation store."""
        if self.held_out:
            return score_on_cluster(model, self.dataset, self.client, self.where,
                                    blocks=self.held_out)
        if self.validation is not None:
            return score_on_cluster(model, self.validation, self.client, self.where)
        return None

    def close(self) -> None:
        if self.shard_data is not None:
            self.client.cancel(self.shard_data)


def score_on_cluster(model, dataset, client, where: dict | None = None,
                     blocks: list[int] | None = None) -> float:
    """Accuracy of ``model`` on ``dataset`` (its ``blocks``; default all), block by block on
    the workers."""
    remote = hold(client, model, workers=where["workers"] if where else None)
    futures = [client.submit(score_task, remote, dataset, b, pure=False, **(where or {}))
               for b in (range(dataset.n_blocks) if blocks is None else blocks)]
    parts = client.gather(futures)
    total = sum(n for _, n in parts)
    return sum(c for c, _ in parts) / total if total else float("nan")


@dataclasses.dataclass
class AveragedSummary:
    result: AveragingResult
    model_path: Path
    sha256: str
    test_accuracy: float | None
    n_workers: int
    stopped: str | None = None  # why the rounds ended (the stopping rule's reason)


def train_averaged_model(data: str, model_path: str | os.PathLike, *, model: str = "mlp",
                         params: dict | None = None, rounds: int = MAX_ROUNDS,
                         local_epochs: int = 1, sync: str = "round", cluster=None, run_dir=None,
                         resume: bool = False, overwrite: bool = False, test: str | None = None,
                         tol: float | str | None = "default",
                         n_iter_no_change: int | None = None,
                         validation_fraction: float | None = None,
                         storage_options: dict | None = None,
                         show_progress: bool = True) -> AveragedSummary:
    """``rpicluster train --model mlp|sgd``: train on the store ``data``, save to ``model_path``.

    ``run_dir`` (default ``<model_path>.run``) receives a checkpoint after every round; with
    ``resume=True`` the run continues from its last finished round. ``test`` is a store scored
    after every round and at the end. An existing ``model_path`` is replaced only with
    ``overwrite``, which also starts the run directory afresh (unless resuming).

    The run stops by scikit-learn's rule (:func:`~rpicluster.train.stopping.default_rule`):
    after ``n_iter_no_change`` rounds in which the monitored value did not improve by ``tol``,
    or after ``rounds`` rounds (``max_iter``); ``tol=None`` always trains ``rounds`` rounds.
    The summary's ``stopped`` says why. The monitored value is the accuracy on the held-out
    ``validation_fraction`` of the store's blocks when one is given (scikit-learn's
    ``early_stopping=True``; ``test`` is then scored once, at the end), else the ``test``
    accuracy, else the training loss (scikit-learn's default, ``early_stopping=False``).

    Raises
    ------
    ConfigError
        ``model_path`` exists (without ``overwrite``), or the run directory holds another run.
    TrainingStopped
        The run stopped after it began (Ctrl-C, lost scheduler, a failed task); the message
        says how many rounds are kept in ``run_dir`` for ``resume``.
    """
    from rpicluster import history, open_dataset
    from rpicluster.train.api import ClusterChoice, refuse_existing_model
    from rpicluster.train.checks import fingerprint
    from rpicluster.train.modelfile import save_model
    from rpicluster.train.rounds import RoundDir

    model_path = Path(model_path)
    refuse_existing_model(model_path, overwrite, resume)
    run_dir = Path(run_dir) if run_dir is not None else Path(f"{model_path}.run")
    dataset = open_dataset(data, storage_options=storage_options)
    test_ds = open_dataset(test, storage_options=storage_options) if test else None
    if validation_fraction is None and resume:
        validation_fraction = RoundDir(run_dir).meta().get("validation_fraction")
    if validation_fraction is not None:  # an impossible fraction is refused before connecting
        holdout_blocks(dataset.n_blocks, validation_fraction, dataset.url,
                       instead="a test store (--test) to watch instead")
    stopper = RoundStopper(default_rule(
        model, validated=test is not None or validation_fraction is not None, tol=tol,
        n_iter_no_change=n_iter_no_change, max_rounds=rounds))
    with history.recording(
            "train", params={"model": model, **(params or {}), "rounds": rounds,
                             "local_epochs": local_epochs, "sync": sync, "resume": resume,
                             "test": test, "validation_fraction": validation_fraction},
            data=str(dataset.url), fingerprint=fingerprint(dataset)) as record:
        with (cluster or ClusterChoice()).run_client(RoundDir(run_dir).kept(rounds), run_dir
                                                     ) as client:
            workers = client.scheduler_info()["workers"]
            n_workers = len(workers)
            record.update(cluster=client.scheduler.address,
                          workers=[w.get("name", a) for a, w in workers.items()])
            with Progress(f"train {model}", total=int(rounds), unit="rounds",
                          enabled=show_progress) as progress:
                result = train_averaged(dataset, client, model=model, params=params,
                                        rounds=rounds, local_epochs=local_epochs, sync=sync,
                                        run_dir=run_dir, resume=resume,
                                        overwrite=overwrite and not resume,
                                        validation=None if validation_fraction else test_ds,
                                        validation_fraction=validation_fraction,
                                        progress=progress, stop=stopper)
            accuracy = result.rounds[-1]["accuracy"] if result.rounds else None
            if validation_fraction is not None:
                accuracy = (score_on_cluster(result.model, test_ds, client) if test_ds
                            else None)
        digest = save_model(result.model, model_path)
        record.result(rounds=len(result.rounds), resumed=result.resumed_rounds,
                      stopped=stopper.reason, test_accuracy=accuracy,
                      phases={"rounds": sum(r.get("seconds") or 0 for r in result.rounds)},
                      model_path=model_path.resolve(), sha256=digest)
    return AveragedSummary(result=result, model_path=model_path, sha256=digest,
                           test_accuracy=accuracy, n_workers=n_workers,
                           stopped=stopper.reason)
