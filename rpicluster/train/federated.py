"""Federated averaging (FedAvg): every host trains on the store on its own disk; only weights move.

Each round the driver picks the participating hosts (a seeded sample: ``fraction`` of the
connected hosts, at least ``min_clients``), shares the global model with them once, and submits
one task per host, pinned to it (``workers=[its address]``, ``allow_other_workers=False``, so
the scheduler never moves it). The task opens the host's own store *inside itself* and runs
``partial_fit`` over its blocks for ``local_epochs``; what comes back is weights, optimizer state
and a row count. Training rows never become Dask keys, task arguments or results, so they never
pass through the scheduler or the desktop. The driver averages the updates weighted by rows
(:func:`rpicluster.train.averaging.merge_updates`, the same code as data-parallel training).

Partial participation: a host that misses the round deadline, dies, or fails is left out of that
round (its future is cancelled) and named in the round report; it takes part again in a later
round once it is connected. A host whose store is missing, or whose feature count or label type
differs from the run's, is named and left out of the run. Hosts holding different subsets of the
classes are the normal non-IID case: the global model covers the union of their classes.

The global model is checkpointed after every round (:class:`~rpicluster.train.rounds.RoundDir`),
so a run whose desktop client is killed resumes at its last finished round.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from rpicluster.errors import ConfigError, DataError, RPiClusterError, TrainingError
from rpicluster.progress import Progress
from rpicluster.models.ksgd import task_seed
from rpicluster.models.remote import hold
from rpicluster.train.averaging import (_labelled, _nbytes, estimator_class, local_fit,
                                        make_estimator, merge_updates)
from rpicluster.train.engine import Strategy, is_fitted, recorded_run, run_params, run_rounds
from rpicluster.train.stopping import (MAX_ROUNDS, RoundStopper, check_fraction, default_rule,
                                       holdout_blocks)

#: Seconds to wait for ``min_clients`` hosts to be connected before a round is refused, when
#: no round timeout is given.
WAIT_FOR_CLIENTS_S = 60.0
POLL_S = 0.2


# --- worker side ---

def _label_kind(classes) -> str:
    return "str" if any(isinstance(c, str) for c in classes) else "int"


def probe_task(path: str) -> dict:
    """What the store at ``path`` (on this host) holds: features, classes, label type, rows."""
    from rpicluster import open_dataset

    ds = open_dataset(path)
    classes = [c.item() if hasattr(c, "item") else c for c in np.asarray(ds.classes)]
    return {"n_features": int(ds.n_features), "classes": classes,
            "label_kind": _label_kind(classes), "rows": int(ds.n_rows),
            "blocks": int(ds.n_blocks)}


def host_split(ds, holdout: tuple[float, int, str] | None) -> tuple[list[int], list[int]]:
    """(training blocks, held-out blocks) of a host's store: ``holdout`` is (validation
    fraction, the run's seed, the host's name), so every host holds out its own seeded draw,
    the same one in every round and after a resume; None holds out nothing."""
    if holdout is None:
        return list(range(ds.n_blocks)), []
    fraction, seed, name = holdout
    return holdout_blocks(ds.n_blocks, fraction, str(ds.url),
                          seed=[int(seed), zlib.crc32(str(name).encode())],
                          instead="a validation store (--validation)")


def federated_task(model, path: str, local_epochs: int, classes: list, n_features: int,
                   seed: int, want_model: bool, holdout=None) -> dict:
    """Train a copy of ``model`` on this host's store at ``path`` (read here; its held-out
    blocks left out, :func:`host_split`); return the update."""
    from rpicluster import open_dataset

    ds = open_dataset(path)
    if ds.n_features != n_features:
        raise DataError(f"store {ds.url} has {ds.n_features} features, the run {n_features}")
    unknown = sorted(set(map(str, np.asarray(ds.classes))) - set(map(str, classes)))
    if unknown:
        raise DataError(f"store {ds.url} holds labels {unknown[:5]} outside the run's classes")
    blocks = host_split(ds, holdout)[0]
    batches = (_labelled(ds, b) for _ in range(int(local_epochs)) for b in blocks)
    return local_fit(model, batches, np.asarray(classes), seed, want_model=want_model)


def holdout_score_task(model, path: str, holdout) -> dict:
    """(correct, rows) of ``model`` on this host's held-out blocks (:func:`host_split`)."""
    from rpicluster import open_dataset

    ds = open_dataset(path)
    correct = rows = 0
    for b in host_split(ds, holdout)[1]:
        X, labels = _labelled(ds, b)
        correct += int(np.count_nonzero(model.predict(X) == labels))
        rows += int(X.shape[0])
    return {"correct": correct, "rows": rows}


# --- driver ---

@dataclasses.dataclass
class FederatedResult:
    """What a federated run did.

    Attributes
    ----------
    model : estimator
        The global model after the last round.
    rounds : list of dict
        One report per round (resumed ones included): ``round``, ``participants`` (hosts whose
        update was averaged), ``left_out`` (host -> reason, this round), ``rows``,
        ``bytes_down``, ``bytes_up``, ``seconds``, ``loss``, ``accuracy`` (validation on the
        desktop, or None).
    excluded : dict
        Hosts left out of the whole run, with the reason (bad or missing store).
    resumed_rounds : int
    seconds : float
    """

    model: object
    rounds: list
    excluded: dict
    resumed_rounds: int
    seconds: float
    stopped: str | None = None  # why the rounds ended (set by federate: the rule's reason)


def _live_workers(client) -> dict[str, str]:
    """Connected workers right now: name -> address (asked of the scheduler, not cached)."""
    ident = client.sync(client.scheduler.identity)
    return {str(w["name"]): addr for addr, w in ident["workers"].items()}


def _sample(available: list[str], fraction: float, min_clients: int, seed: int) -> list[str]:
    """Flower's rule: ``max(int(fraction * n), min_clients)`` hosts, drawn with a seeded RNG."""
    n = min(len(available), max(int(fraction * len(available)), int(min_clients), 1))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(available, size=n, replace=False).tolist())


class _Hosts:
    """Which hosts may train in this run: probed once each, bad stores left out by name."""

    def __init__(self, client, paths: dict[str, str | None], timeout: float, prefix: str,
                 validation_fraction: float | None = None):
        self.client, self.paths, self.timeout, self.prefix = client, paths, timeout, prefix
        self.validation_fraction = validation_fraction
        self.probes: dict[str, dict] = {}
        self.excluded: dict[str, str] = {}
        for name, path in paths.items():
            if not path:
                self.excluded[name] = ("no data path (give the worker data = \"...\" in the "
                                       "inventory, or pass --data)")

    def probe(self, names: list[str], live: dict[str, str]) -> None:
        """Probe the not yet probed hosts among ``names`` (connected ones) in parallel."""
        todo = [n for n in names if n not in self.probes and n not in self.excluded]
        futures = {n: self.client.submit(probe_task, self.paths[n], pure=False,
                                         key=f"{self.prefix}-probe-{n}", workers=[live[n]],
                                         allow_other_workers=False) for n in todo}
        deadline = time.monotonic() + self.timeout
        for name, f in futures.items():
            try:
                self.probes[name] = f.result(timeout=max(0.1, deadline - time.monotonic()))
            except RPiClusterError as exc:  # names the store already
                self.excluded[name] = str(exc)
            except Exception as exc:  # noqa: BLE001 - a lost host or a timeout
                f.cancel()
                self.excluded[name] = f"could not read its store {self.paths[name]} " \
                                      f"({type(exc).__name__}: {exc})"

    def check(self, name: str, n_features: int, label_kind: str, classes: list) -> None:
        """Leave out a probed host whose store does not fit the run, with the reason."""
        p = self.probes.get(name)
        if p is None or name in self.excluded:
            return
        path = self.paths[name]
        if self.validation_fraction is not None and p.get("blocks", 0) < 2:
            self.excluded[name] = (f"store {path} has {p.get('blocks')} block: none can be "
                                   f"held out (validation_fraction="
                                   f"{self.validation_fraction:g}); ingest it with a smaller "
                                   "--block-rows, or pass a validation store (--validation)")
        elif p["n_features"] != n_features:
            self.excluded[name] = (f"store {path} has {p['n_features']} features, the run "
                                   f"{n_features}")
        elif p["label_kind"] != label_kind:
            self.excluded[name] = (f"store {path} has {p['label_kind']} labels, the run "
                                   f"{label_kind} labels")
        elif classes is not None and not set(map(str, p["classes"])) <= set(map(str, classes)):
            extra = sorted(set(map(str, p["classes"])) - set(map(str, classes)))
            self.excluded[name] = (f"store {path} holds labels {extra[:5]} outside the run's "
                                   "classes (fixed when the run started)")

    def reasons(self, live: dict[str, str]) -> str:
        """Every host that cannot train, in inventory order, with its reason."""
        return "; ".join(f"{n}: {self.excluded.get(n, 'not connected')}" for n in self.paths
                         if n in self.excluded or n not in live)

    def usable(self) -> list[str]:
        return [n for n in self.paths if n in self.probes and n not in self.excluded]


def _reference(probes: dict[str, dict], validation) -> tuple[int, str]:
    """The run's feature count and label type: the validation store's, else those of most rows
    (a host with an odd store is outvoted by the others)."""
    if validation is not None:
        return int(validation.n_features), _label_kind(list(validation.classes))
    shapes = Counter()
    for p in probes.values():
        shapes[(p["n_features"], p["label_kind"])] += p["rows"]
    return shapes.most_common(1)[0][0]


def _union(values) -> list:
    """Sorted distinct labels (ints and strings never mix: a run has one label type)."""
    return sorted(set(values), key=lambda c: (str(type(c)), c))


def federate_on(client, hosts: dict[str, str | None], *, model: str = "mlp",
                params: dict | None = None, rounds: int = 10, local_epochs: int = 1,
                fraction: float = 1.0, min_clients: int = 1,
                round_timeout: float | None = None, validation=None, run_dir=None,
                resume: bool = False, overwrite: bool = False,
                progress: Progress | None = None, on_round=None,
                on_round_start=None, stop=None,
                validation_fraction: float | None = None) -> FederatedResult:
    """Federated averaging over ``hosts`` (Dask worker name -> path of its own store).

    Parameters
    ----------
    client : distributed.Client
    hosts : dict
        Worker name -> store path on that worker's disk (None: the host has none; named).
    model : {"mlp", "sgd"}
    params : dict, optional
        Estimator parameters; ``random_state`` None draws a seed, recorded in ``run_dir``.
    rounds, local_epochs : int
        Rounds to reach, and passes over its store each host makes per round.
    fraction : float
        Fraction of the connected hosts sampled each round (Flower's ``fraction_fit``).
    min_clients : int
        Hosts a round needs (Flower's ``min_fit_clients`` / ``min_available_clients``): a round
        waits up to ``round_timeout`` (or a minute) for that many, then the run stops.
    round_timeout : float, optional
        Seconds a host has to return its update; late hosts are left out of the round.
    validation : Dataset, optional
        A labelled store on the desktop, scored after every round (read here, not on a host).
    validation_fraction : float, optional
        Instead of ``validation``: every host holds out this fraction of its store's blocks (a
        draw seeded by ``random_state`` and the host's name), never trains on them, and scores
        the global model on them after every round, on the host; the round's ``accuracy`` is
        over the held-out rows of the hosts connected at the round's start. A host whose store
        has one block is left out of the run, named. A resumed run keeps the recorded value.
    run_dir : path, optional
        Round checkpoints. ``resume`` continues from its last finished round; ``overwrite``
        starts afresh in one that holds finished rounds (refused otherwise).
    on_round, on_round_start : callable, optional
        ``on_round(report)`` after each round is checkpointed; ``on_round_start(round,
        participants)`` right after a round's tasks are submitted.
    stop : callable, optional
        The stopping rule: ``stop(history)`` after every round; true ends the run there
        (:func:`rpicluster.train.engine.run_rounds`).

    Raises
    ------
    DataError
        No host holds a usable store (each host named with its reason).
    TrainingError
        Fewer than ``min_clients`` hosts connected.
    """
    from rpicluster.train.rounds import RoundDir

    t0 = time.perf_counter()
    if not 0 < float(fraction) <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    if int(min_clients) < 1:
        raise ConfigError(f"min_clients must be >= 1, got {min_clients}")
    if round_timeout is not None and float(round_timeout) <= 0:
        raise ConfigError(f"round_timeout must be > 0 seconds, got {round_timeout}")
    if int(rounds) < 1 or int(local_epochs) < 1:
        raise ConfigError(f"rounds and local_epochs must be >= 1, got {rounds}, {local_epochs}")
    cls = estimator_class(model)
    rundir = RoundDir(run_dir) if run_dir is not None else None
    recorded = rundir.meta() if (rundir is not None and resume) else {}
    if recorded and recorded.get("kind") != "federated":
        raise ConfigError(f"cannot resume {rundir.path}: it is not a federated run")
    recorded = recorded_run(rundir, model, resume)
    params = run_params(model, params, recorded, make_estimator)
    if validation_fraction is None:
        validation_fraction = recorded.get("validation_fraction")
    if validation_fraction is not None:
        check_fraction(validation_fraction)
        if validation is not None:
            raise ConfigError("give a validation store or a validation_fraction, not both")
    prefix = f"rpicluster-fed-{uuid.uuid4().hex[:8]}"
    wait_s = float(round_timeout) if round_timeout is not None else WAIT_FOR_CLIENTS_S
    registry = _Hosts(client, dict(hosts), wait_s, prefix, validation_fraction)

    live = _live_workers(client)
    registry.probe([n for n in hosts if n in live], live)
    if recorded:
        n_features, label_kind = recorded["n_features"], recorded["label_kind"]
        classes = recorded["classes"]
    else:
        if not registry.probes:
            raise DataError(f"no host holds a usable store: {registry.reasons(live)}")
        n_features, label_kind = _reference(registry.probes, validation)
        for name in list(registry.probes):
            registry.check(name, n_features, label_kind, None)
        classes = _union(c for n in registry.usable() for c in registry.probes[n]["classes"])
        if validation is not None:
            classes = _union([*classes, *(c.item() if hasattr(c, "item") else c
                                          for c in np.asarray(validation.classes))])
    for name in list(registry.probes):
        registry.check(name, n_features, label_kind, classes)
    if not registry.usable():
        raise DataError(f"no host holds a usable store: {registry.reasons(live)}")

    meta = {"kind": "federated", "model": model, "params": params,
            "local_epochs": int(local_epochs), "n_features": int(n_features),
            "label_kind": label_kind, "classes": classes}
    if validation_fraction is not None:
        meta["validation_fraction"] = float(validation_fraction)
    rounds_of = _FederatedRounds(client, registry, int(params["random_state"]), prefix,
                                 int(local_epochs), classes, int(n_features), fraction,
                                 int(min_clients), round_timeout, wait_s, validation,
                                 on_round_start, validation_fraction)
    global_model, history, resumed = run_rounds(
        rounds_of, client, model=model, rounds=rounds, rundir=rundir, meta=meta, resume=resume,
        overwrite=overwrite, expected=cls, initial_model=lambda: make_estimator(model, params),
        progress=progress, on_round=on_round, stop=stop)
    return FederatedResult(model=global_model, rounds=history, excluded=dict(registry.excluded),
                           resumed_rounds=resumed, seconds=time.perf_counter() - t0)


class _FederatedRounds(Strategy):
    """FedAvg as a round :class:`~rpicluster.train.engine.Strategy`: each round samples the
    connected usable hosts, pins one task to each, leaves out the late, lost and failed ones
    (named in the report) and averages the others' updates."""

    mode = "federated"
    nothing_trained = "no host returned an update in any round; nothing to save"

    def __init__(self, client, registry: _Hosts, seed: int, prefix: str, local_epochs: int,
                 classes: list, n_features: int, fraction: float, min_clients: int,
                 round_timeout: float | None, wait_s: float, validation, on_round_start,
                 validation_fraction: float | None = None):
        self.client, self.registry, self.seed, self.prefix = client, registry, seed, prefix
        self.local_epochs, self.classes, self.n_features = local_epochs, classes, n_features
        self.fraction, self.min_clients, self.round_timeout = fraction, min_clients, round_timeout
        self.wait_s, self.on_round_start = wait_s, on_round_start
        self.validation_fraction = validation_fraction
        self.X_val = self.y_val = None
        self.why: dict[str, str] = {}
        if validation is not None:
            parts = [_labelled(validation, b) for b in range(validation.n_blocks)]
            self.X_val = np.concatenate([p[0] for p in parts])
            self.y_val = np.concatenate([p[1] for p in parts])

    def fit_round(self, r: int, global_model):
        client, registry, hosts = self.client, self.registry, self.registry.paths
        t_round = time.perf_counter()
        live, available = _wait_for_clients(client, registry, self.min_clients, self.wait_s, r)
        participants = _sample(available, self.fraction, self.min_clients,
                               task_seed(self.seed, r, 0))
        left_out = {n: why for n, why in registry.excluded.items()}
        left_out.update({n: "not connected" for n in hosts
                         if n not in live and n not in left_out})
        remote = _hold_on_each(client, global_model, {n: live[n] for n in participants})
        bytes_down = _nbytes(global_model) * len(participants)
        want_model = not is_fitted(global_model)
        futures = {n: client.submit(federated_task, remote[n], hosts[n], self.local_epochs,
                                    self.classes, self.n_features, task_seed(self.seed, r, i + 1),
                                    want_model, self.holdout(n), pure=False,
                                    key=f"{self.prefix}-r{r + 1}-{n}",
                                    workers=[live[n]], allow_other_workers=False)
                   for i, n in enumerate(participants)}
        if self.on_round_start is not None:
            self.on_round_start(r + 1, participants)
        updates, self.why = _collect(client, futures, live, self.round_timeout, registry)
        left_out.update(self.why)
        del remote
        done = [n for n in participants if n in updates]
        if done:
            global_model = merge_updates(global_model, [updates[n] for n in done])
        losses = [(updates[n]["loss"], updates[n]["rows"]) for n in done
                  if not math.isnan(updates[n]["loss"])]
        report = {
            "round": r + 1, "participants": done, "left_out": left_out,
            "rows": int(sum(updates[n]["rows"] for n in done)),
            "bytes_down": bytes_down,
            "bytes_up": int(sum(_nbytes(updates[n]) for n in done)),
            "seconds": time.perf_counter() - t_round,
            "loss": (sum(l * k for l, k in losses) / sum(k for _, k in losses)
                     if losses else None),
            "accuracy": self.score(global_model, live, available, r),
        }
        return global_model, report

    def holdout(self, name: str):
        """What :func:`host_split` needs to find host ``name``'s held-out blocks (or None)."""
        if self.validation_fraction is None:
            return None
        return (self.validation_fraction, self.seed, name)

    def score(self, model, live: dict[str, str], hosts: list[str], r: int) -> float | None:
        """The round's monitored accuracy: the desktop's validation store, or the held-out
        blocks of ``hosts`` (scored on each host; one that is lost or late is left out)."""
        if not is_fitted(model):
            return None
        if self.X_val is not None:
            return float(model.score(self.X_val, self.y_val))
        if self.validation_fraction is None:
            return None
        remote = _hold_on_each(self.client, model, {n: live[n] for n in hosts})
        futures = {n: self.client.submit(holdout_score_task, remote[n], self.registry.paths[n],
                                         self.holdout(n), pure=False,
                                         key=f"{self.prefix}-r{r + 1}-score-{n}",
                                         workers=[live[n]], allow_other_workers=False)
                   for n in hosts}
        parts, why = _collect(self.client, futures, live, self.round_timeout, self.registry)
        self.why.update({n: f"not scored: {reason}" for n, reason in why.items()})
        rows = sum(p["rows"] for p in parts.values())
        return sum(p["correct"] for p in parts.values()) / rows if rows else None

    def note(self, report: dict) -> str:
        acc = "" if report["accuracy"] is None else f", accuracy {report['accuracy']:.4f}"
        gone = f", left out: {', '.join(sorted(self.why))}" if self.why else ""
        return f"round {report['round']}: {len(report['participants'])} hosts{acc}{gone}"


def _hold_on_each(client, model, addrs: dict[str, str]) -> dict:
    """Host name -> a copy of ``model`` held on that host (:func:`~rpicluster.models.remote.hold`):
    each host's task reads its own copy, so a slow or lost host delays no other (one shared
    copy would make every host fetch it from its holder), and nothing hangs on a lost host as a
    broadcast scatter does."""
    return {n: hold(client, model, workers=[a]) for n, a in addrs.items()}


def _wait_for_clients(client, registry: _Hosts, min_clients: int, wait_s: float, r: int):
    """Connected usable hosts (probing newly connected ones); waits for ``min_clients``."""
    deadline = time.monotonic() + wait_s
    while True:
        live = _live_workers(client)
        registry.probe([n for n in registry.paths if n in live], live)
        available = [n for n in registry.usable() if n in live]
        if len(available) >= min_clients:
            return live, available
        if time.monotonic() > deadline:
            raise TrainingError(
                f"round {r + 1}: {len(available)} usable hosts connected "
                f"({', '.join(available) or 'none'}), --min-clients is {min_clients}; waited "
                f"{wait_s:.0f} s (start the missing workers with rpicluster up)")
        time.sleep(1.0)


def _collect(client, futures: dict, live: dict[str, str], round_timeout: float | None,
             registry: _Hosts) -> tuple[dict, dict]:
    """Updates of the hosts that finished; reasons for the ones that did not."""
    deadline = None if round_timeout is None else time.monotonic() + float(round_timeout)
    updates, why = {}, {}
    pending = dict(futures)
    while pending:
        for name, f in list(pending.items()):
            if f.status == "finished":
                updates[name] = f.result()
            elif f.status in ("error", "cancelled"):
                exc = f.exception() if f.status == "error" else None
                if isinstance(exc, DataError):
                    registry.excluded[name] = str(exc)
                    why[name] = str(exc)
                else:
                    why[name] = f"failed ({type(exc).__name__}: {exc})"
            else:
                continue
            del pending[name]
        if not pending:
            break
        now_live = _live_workers(client)
        for name, f in list(pending.items()):
            if now_live.get(name) != live[name]:
                why[name] = "lost during the round (its worker left the cluster)"
                f.cancel()
                del pending[name]
        if deadline is not None and time.monotonic() > deadline:
            for name, f in pending.items():
                why[name] = f"missed the {round_timeout:g} s round deadline"
                f.cancel()
            break
        time.sleep(POLL_S)
    return updates, why


def federate(inventory, model_path, *, model: str = "mlp", params: dict | None = None,
             data: str | None = None, rounds: int = MAX_ROUNDS, local_epochs: int = 1,
             fraction: float = 1.0, min_clients: int = 1, round_timeout: float | None = None,
             validation: str | None = None, run_dir=None, resume: bool = False,
             overwrite: bool = False, show_progress: bool = True, on_round=None,
             on_round_start=None, tol: float | str | None = "default",
             n_iter_no_change: int | None = None,
             validation_fraction: float | None = None) -> tuple[FederatedResult, str]:
    """``rpicluster federate``: FedAvg over the workers of ``inventory``; save the model.

    Each worker trains on ``data`` (the same path on every host) or, without it, on the
    ``data`` path its inventory entry gives. ``run_dir`` defaults to ``<model_path>.run``.
    An existing ``model_path`` is replaced only with ``overwrite``, which also starts the run
    directory afresh (unless resuming). Returns the result and the model file's sha256.

    The rounds stop by scikit-learn's rule (:func:`~rpicluster.train.stopping.default_rule`):
    after ``n_iter_no_change`` rounds in which the ``validation`` accuracy (or, with
    ``validation_fraction``, the accuracy on the blocks each host holds out; without either:
    the hosts' training loss) did not improve by ``tol``, or after ``rounds``; ``tol=None``
    always trains ``rounds``. ``result.stopped`` says why.

    Raises
    ------
    ConfigError
        ``model_path`` exists (without ``overwrite``), or the run directory holds another run.
    TrainingStopped
        The run stopped after it began (Ctrl-C, lost scheduler); the message says how many
        rounds are kept in ``run_dir`` for ``resume``.
    """
    from rpicluster import history, open_dataset
    from rpicluster.inventory import load_inventory
    from rpicluster.train.api import ClusterChoice, refuse_existing_model
    from rpicluster.train.modelfile import save_model
    from rpicluster.train.rounds import RoundDir

    refuse_existing_model(model_path, overwrite, resume)
    spec = load_inventory(inventory)
    hosts = {w.name: data or w.data for w in spec.workers}
    model_path = Path(model_path)
    run_dir = Path(run_dir) if run_dir is not None else Path(f"{model_path}.run")
    if validation_fraction is None and resume:
        validation_fraction = RoundDir(run_dir).meta().get("validation_fraction")
    if validation_fraction is not None:
        check_fraction(validation_fraction)
        if validation:
            raise ConfigError("give --validation or --validation-fraction, not both")
    stopper = RoundStopper(default_rule(
        model, validated=validation is not None or validation_fraction is not None, tol=tol,
        n_iter_no_change=n_iter_no_change, max_rounds=rounds))
    val = open_dataset(validation) if validation else None
    choice = ClusterChoice(inventory=os.fspath(inventory))
    with history.recording(
            "federate", params={"model": model, **(params or {}), "rounds": rounds,
                                "local_epochs": local_epochs, "fraction": fraction,
                                "min_clients": min_clients, "resume": resume,
                                "validation": validation,
                                "validation_fraction": validation_fraction},
            data=", ".join(f"{h}:{d}" for h, d in hosts.items())) as record:
        with choice.run_client(RoundDir(run_dir).kept(rounds), run_dir) as client:
            record.update(cluster=client.scheduler.address, workers=sorted(hosts))
            with Progress(f"federate {model}", total=int(rounds), unit="rounds",
                          enabled=show_progress) as progress:
                result = federate_on(client, hosts, model=model, params=params, rounds=rounds,
                                     local_epochs=local_epochs, fraction=fraction,
                                     min_clients=min_clients, round_timeout=round_timeout,
                                     validation=val, run_dir=run_dir, resume=resume,
                                     overwrite=overwrite and not resume, progress=progress,
                                     on_round=on_round, on_round_start=on_round_start,
                                     stop=stopper, validation_fraction=validation_fraction)
        result.stopped = stopper.reason
        digest = save_model(result.model, model_path)
        record.result(rounds=len(result.rounds), resumed=result.resumed_rounds,
                      stopped=stopper.reason, model_path=model_path.resolve(), sha256=digest)
    return result, digest
