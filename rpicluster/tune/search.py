"""Successive halving on the cluster: candidates trained in parallel, survivors continued.

Each rung submits one Dask task per candidate still in the search
(:func:`train_candidate`): the task starts from the candidate's model after its previous rung
(Inc-kSGD adds block models; MLP and SGD continue with ``partial_fit``), trains it up to the
rung's units over the store's training blocks (read on the worker), scores it on the held-out
rows and returns the model and score. The best ``1/factor`` of a rung go on to the next. Every
random choice derives from ``(seed, candidate, rung)``, so a task that runs twice (its worker
died) gives the same result, and a search gives the same leaderboard every time it runs.

Results are written as they arrive (:class:`~rpicluster.tune.tunedir.TuneDir`), so a search
killed mid-rung resumes without retraining a finished candidate; the leaderboard is published to
the ``/rpicluster`` page as events on :data:`TOPIC` and written to ``leaderboard.json``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import uuid
import warnings
from pathlib import Path

import numpy as np

from rpicluster.errors import (ConfigError, DataError, ModelError, RPiClusterError,
                               TrainingError)
from rpicluster.progress import Progress
from rpicluster.tune.halving import Plan, plan as make_plan
from rpicluster.tune.space import check_space, estimator_class, sample, to_params
from rpicluster.train.stopping import holdout_blocks
from rpicluster.tune.tunedir import TuneDir

#: Event topic of a tune's progress (``client.log_event``): flat dicts with ``kind`` one of
#: ``tune-start`` (run_id, model, n_candidates, rungs, units), ``tune-result`` (run_id,
#: candidate, rung, units, score, params, worker, seconds, error) and ``tune-end`` (run_id,
#: best candidate, score, params, leaderboard path).
TOPIC = "rpicluster.tune"
#: Epochs a MLP or SGD candidate may reach (scikit-learn's ``max_iter`` is 200 / 1,000, but a
#: tune's budget, not this cap, usually decides).
MAX_EPOCHS = 50
DEFAULT_VALIDATION_FRACTION = 0.1
#: Default budget: this many full trainings' worth of units.
DEFAULT_BUDGET_RUNS = 3


# --- worker side ---

def _rows(dataset, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Block ``block`` as (float features, labels); image stores' uint8 pixels scaled to [0, 1]."""
    X, codes = dataset.block(block)
    if X.dtype == np.uint8:
        X = X.astype(np.float32) / 255.0
    return X, np.asarray(dataset.classes)[codes]


def new_estimator(model: str, params: dict, seed: int, block_rows: int):
    """The untrained estimator of one candidate (``seed`` is its ``random_state``)."""
    extra = {"block_rows": block_rows} if model == "ksgd" else {}
    return estimator_class(model)(**to_params(params), **extra, random_state=int(seed))


def train_candidate(model: str, params: dict, state, dataset, train_blocks: list[int],
                    start: int, stop: int, validation, val_blocks: list[int],
                    seed: int) -> dict | None:
    """Train one candidate from ``start`` to ``stop`` units and score it on held-out blocks.

    ``state`` is the candidate's model after ``start`` units (None at 0). Unit ``u`` trains on
    block ``train_blocks[u % len(train_blocks)]``. Returns the model, its accuracy on
    ``val_blocks`` of ``validation``, and the rows and seconds it took; None when the task was
    cancelled while it trained (a refit started for a candidate that then lost; nobody waits
    for its result).
    """
    from rpicluster.train.tasks import one_blas_thread, task_cancelled, worker_name

    t0 = time.perf_counter()
    est = state if state is not None else new_estimator(model, params, seed, dataset.block_rows)
    if model == "mlp":
        # An MLP shuffles with its _random_state: reseed per (candidate, rung), so a resumed
        # continuation equals an uninterrupted one.
        est._random_state = np.random.RandomState(seed)
    classes = np.asarray(dataset.classes)
    rows = 0
    with one_blas_thread(), warnings.catch_warnings():
        # A block smaller than the MLP's batch_size is one batch: scikit-learn says so per call.
        warnings.filterwarnings("ignore", message="Got `batch_size` less than 1 or larger")
        for u in range(int(start), int(stop)):
            if task_cancelled():
                return None
            X, labels = _rows(dataset, train_blocks[u % len(train_blocks)])
            est.partial_fit(X, labels, classes=classes)
            rows += int(X.shape[0])
        correct = total = 0
        for b in val_blocks:
            X, labels = _rows(validation, b)
            correct += int(np.count_nonzero(est.predict(X) == labels))
            total += int(X.shape[0])
    return {"model": est, "score": correct / total if total else float("nan"), "rows": rows,
            "seconds": time.perf_counter() - t0, "worker": worker_name()}


# --- driver ---

@dataclasses.dataclass
class TuneResult:
    """What a tune found.

    Attributes
    ----------
    best_params : dict
        The best candidate's parameters (as sampled; ``random_state`` is ``best_seed``).
    best_score : float
        Its held-out accuracy at the top rung it reached.
    best_model : estimator
        Its model after the top rung, then (``refit=True``, blocks held out) refit so that it
        has seen the held-out blocks too (``refit`` says how).
    leaderboard : list of dict
        Every candidate, best first: ``candidate``, ``params``, ``rung`` (the highest it
        reached, from 1), ``units``, ``rows``, ``score``, ``scores`` (one per rung), ``error``.
    plan : Plan
    trained, resumed : int
        (candidate, rung) results trained by this call, and taken from the tune directory.
    seconds : float
    tune_dir : Path or None
    refit : str or None
        How ``best_model`` was refit after the search (None: it was not).
    """

    best_params: dict
    best_score: float
    best_model: object
    best_seed: int
    leaderboard: list
    plan: Plan
    trained: int
    resumed: int
    seconds: float
    tune_dir: Path | None = None
    refit: str | None = None

    def table(self, top: int = 10) -> list[list[str]]:
        """The leaderboard's first ``top`` rows as text cells (header first)."""
        rows = [["rank", "candidate", "score", "rung", "units", "params"]]
        for i, e in enumerate(self.leaderboard[:top]):
            score = "failed" if e["error"] else f"{e['score']:.4f}"
            rows.append([str(i + 1), str(e["candidate"]), score, str(e["rung"]), str(e["units"]),
                         ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(e["params"].items()))])
        return rows


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def parse_budget(budget, *, block_rows: int, max_units: int) -> float:
    """A budget in units (block passes): rows (``600000``, ``"600k"``, ``"2M"``) or ``"Nx"``:
    N full trainings of one candidate. None: :data:`DEFAULT_BUDGET_RUNS` full trainings."""
    if budget is None:
        return float(DEFAULT_BUDGET_RUNS * max_units)
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmM]?|x)\s*", budget)
        if not m:
            raise ConfigError(f"budget {budget!r}: expected rows (600000, 600k, 2M) or full "
                              "trainings (3x)")
        value, unit = float(m.group(1)), m.group(2).lower()
        if unit == "x":
            return value * max_units
        budget = value * {"": 1, "k": 1e3, "m": 1e6}[unit]
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ConfigError(f"budget must be a positive number of rows, got {budget!r}")
    return float(budget) / block_rows


@dataclasses.dataclass(frozen=True)
class SearchSetup:
    """A search checked before anything runs (:func:`check_search`)."""

    ds: object  # the training store (a Dataset)
    val: object  # the store candidates are scored on (``ds`` itself when blocks are held out)
    space: dict  # the checked space
    train_blocks: list
    val_blocks: list
    plan: Plan


def check_search(data, model: str, space=None, budget=None, *, factor: int = 3,
                 n_candidates: int | None = None, validation=None,
                 validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
                 max_epochs: int = MAX_EPOCHS, storage_options: dict | None = None
                 ) -> SearchSetup:
    """Every check :func:`tune` makes before it trains (space, held-out blocks, budget, rungs,
    ``n_clusters`` against a block's rows), with no cluster: ``rpicluster tune`` runs it
    before it connects, so a mistake is one line even when no cluster is reachable.

    Raises
    ------
    ConfigError, DataError
        As :func:`tune`.
    """
    from rpicluster.data.reader import Dataset, open_dataset

    ds = data if isinstance(data, Dataset) else open_dataset(data, storage_options=storage_options)
    where = f"search space {space}" if isinstance(space, (str, Path)) else "search space"
    if isinstance(space, (str, Path)):
        from rpicluster.tune.space import load_space

        space = load_space(space)
    checked = check_space(model, space, where=where)
    if validation is not None:
        val = (validation if isinstance(validation, Dataset)
               else open_dataset(validation, storage_options=storage_options))
        if val.n_features != ds.n_features:
            raise DataError(f"validation store {val.url} has {val.n_features} features, "
                            f"{ds.url} {ds.n_features}")
        train_blocks, val_blocks = list(range(ds.n_blocks)), list(range(val.n_blocks))
    else:
        val = ds
        train_blocks, val_blocks = holdout_blocks(ds.n_blocks, validation_fraction, ds.url,
                                                  instead="a validation store (--validation)")
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
        raise ConfigError(f"max_epochs must be an int >= 1, got {max_epochs!r}")
    max_units = len(train_blocks) * (1 if model == "ksgd" else int(max_epochs))
    units = parse_budget(budget, block_rows=ds.block_rows, max_units=max_units)
    schedule = make_plan(units, max_units, factor=factor, n_candidates=n_candidates,
                         where=f"{ds.url} ({len(train_blocks)} training blocks)")
    _check_rows(model, checked, ds)
    return SearchSetup(ds=ds, val=val, space=checked, train_blocks=train_blocks,
                       val_blocks=val_blocks, plan=schedule)


def tune(data, model: str = "ksgd", space: dict | str | None = None, budget=None,
         client=None, seed: int = 0, *, factor: int = 3, n_candidates: int | None = None,
         validation=None, validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
         max_epochs: int = MAX_EPOCHS, tune_dir=None, resume: bool = False,
         overwrite: bool = False, storage_options: dict | None = None,
         progress: Progress | None = None, on_result=None, refit: bool = True) -> TuneResult:
    """Search ``model``'s parameters on the store ``data`` by successive halving on the cluster.

    Parameters
    ----------
    data : str, path or Dataset
        The training store (read by the workers).
    model : {"ksgd", "mlp", "sgd"}
        Inc-kSGD (block models are the resource), ``MLPClassifier`` or ``SGDClassifier``
        (``partial_fit`` passes over blocks are the resource).
    space : dict or path, optional
        The search space (:mod:`rpicluster.tune.space`), or a TOML/JSON file holding one;
        default: the model's :data:`~rpicluster.tune.space.DEFAULT_SPACES` entry.
    budget : int, float or str, optional
        Rows the whole search may train on (``600000``, ``"600k"``), or ``"Nx"``: N full
        trainings of one candidate. Default ``"3x"``.
    client : distributed.Client, optional
        Default: the current client.
    seed : int
        Seeds the candidates' draw and every candidate's ``random_state``.
    factor : int
        Keep the best ``1/factor`` of each rung (scikit-learn's ``factor``).
    n_candidates : int, optional
        Candidates in the first rung (default: chosen from the budget, :func:`~rpicluster.tune.
        halving.plan`).
    validation : str, path or Dataset, optional
        A store to score on; default: the last ``validation_fraction`` of ``data``'s blocks,
        which are then not trained on.
    max_epochs : int
        MLP/SGD: epochs the top rung may reach.
    tune_dir : path, optional
        Where results go as they finish; ``resume`` continues the search there, ``overwrite``
        starts afresh over finished results (refused otherwise).
    on_result : callable, optional
        Called with each (candidate, rung) result as it is recorded.
    refit : bool
        As scikit-learn's ``HalvingRandomSearchCV(refit=True)``: when candidates were scored on
        held-out blocks of ``data``, the best one ends up having seen them too. Inc-kSGD adds
        one block model per held-out block (``partial_fit``: the same model as a candidate
        trained on every block); MLP and SGD are refit from scratch with the best parameters
        and seed over every block, for as many epochs as the top rung gave (continuing them on
        the held-out blocks alone would bias them towards those rows). ``best_score`` stays
        the held-out score, as scikit-learn's ``best_score_``. With a ``validation`` store
        there is nothing to refit: the best model was trained on all of ``data``.

    Returns
    -------
    TuneResult

    Raises
    ------
    ConfigError
        A bad space, budget or factor; a store too small for the rungs; a tune directory that
        holds another search.
    TrainingError
        Every candidate failed (the first failure quoted).
    """
    from rpicluster.train.rundir import dataset_identity

    t0 = time.perf_counter()
    setup = check_search(data, model, space, budget, factor=factor, n_candidates=n_candidates,
                         validation=validation, validation_fraction=validation_fraction,
                         max_epochs=max_epochs, storage_options=storage_options)
    ds, val, checked, schedule = setup.ds, setup.val, setup.space, setup.plan
    train_blocks, val_blocks = setup.train_blocks, setup.val_blocks
    if client is None:
        from distributed import default_client

        try:
            client = default_client()
        except ValueError:
            raise ConfigError("tune needs a Dask client: pass client=, or run it inside "
                              "`with rpicluster.client():`") from None
    candidates = sample(checked, schedule.n_candidates, seed)
    seeds = [int(np.random.SeedSequence([int(seed), c]).generate_state(1)[0] >> 1)
             for c in range(len(candidates))]
    meta = {"model": model, "space": {k: [kind, v] for k, (kind, v) in checked.items()},
            "seed": int(seed), "plan": schedule.to_dict(), "candidates": candidates,
            "train_blocks": train_blocks, "val_blocks": val_blocks,
            "data": dataset_identity(ds),
            "validation": None if val is ds else dataset_identity(val)}
    tdir = TuneDir(tune_dir) if tune_dir is not None else None
    done = tdir.begin(meta, resume=resume, overwrite=overwrite) if tdir is not None else {}
    resumed = len(done)
    progress = progress or Progress.null()
    cls = estimator_class(model)
    run_id = f"tune-{uuid.uuid4().hex[:8]}"
    _log(client, kind="tune-start", run_id=run_id, model=model,
         n_candidates=schedule.n_candidates, rungs=len(schedule.sizes),
         units=list(schedule.units))
    results: dict[tuple[int, int], dict] = dict(done)
    models: dict[int, object] = {}  # the latest model of each candidate still in the search
    alive = list(range(len(candidates)))
    trained = 0
    refits = refit and val is ds
    # An MLP/SGD refit starts from scratch and needs only the best candidate's parameters and
    # seed, so it need not wait for the search to end: it runs beside the top rung's one
    # candidate (the best unless it fails) and, where a worker would otherwise idle at the end
    # of the rung before, it starts there for the best candidate finished so far. A candidate
    # that then loses the lead has its refit cancelled (the task stops at its next block), so
    # the choice, and the model, never depend on which task finished first.
    early = None  # (candidate, future, how): the refit started before the search ended
    refits_early = refits and model != "ksgd" and schedule.sizes[-1] == 1
    n_refits = 0

    def refit_early(c: int) -> None:
        nonlocal early, n_refits
        if early is not None and early[0] == c:
            return
        if early is not None:
            early[1].cancel()
        n_refits += 1
        early = (c, *_submit_refit(client, model, c, candidates[c], schedule.units[-1], None,
                                   ds, train_blocks, val_blocks, _task_seed(seeds[c], 0),
                                   f"{run_id}-{n_refits}"))

    with progress:
        if resumed:
            progress.skip(resumed, note=f"{resumed} results resumed")
        for rung, (size, stop) in enumerate(zip(schedule.sizes, schedule.units)):
            start = schedule.units[rung - 1] if rung else 0
            todo = [c for c in alive if (c, rung) not in results]
            futures = {}
            for c in todo:
                state = models.pop(c, None)
                if state is None and rung:
                    state = tdir.load(results[(c, rung - 1)], expected=cls)
                futures[c] = client.submit(
                    train_candidate, model, candidates[c], state, ds, train_blocks, start,
                    stop, val, val_blocks, _task_seed(seeds[c], rung), pure=False,
                    key=f"tune-{run_id[5:]}-c{c}-r{rung + 1}")
            if refits_early and rung == len(schedule.sizes) - 1 and len(alive) == 1:
                refit_early(alive[0])
            # Before the top rung: a worker thread with no task of this rung left to start may
            # take the refit of the best finished candidate (see refit_early).
            threads = sum(client.nthreads().values()) \
                if refits_early and rung == len(schedule.sizes) - 2 else 0
            left = len(futures)
            for c, out in _as_finished(client, futures):
                left -= 1
                entry = {"candidate": c, "rung": rung, "units": stop,
                         "rows": int(stop * ds.block_rows), "params": candidates[c]}
                if isinstance(out, BaseException):
                    entry.update(score=None, error=f"{type(out).__name__}: "
                                 f"{str(out).splitlines()[0] if str(out) else ''}"[:300])
                    mod = None
                else:
                    entry.update(score=float(out["score"]), error=None, worker=out["worker"],
                                 seconds=round(out["seconds"], 3))
                    mod = out["model"]
                    models[c] = mod
                if tdir is not None:
                    entry = tdir.commit(entry, mod)
                results[(c, rung)] = entry
                trained += 1
                _log(client, kind="tune-result", run_id=run_id, candidate=c, rung=rung + 1,
                     units=stop, score=entry["score"], params=_jsonable(candidates[c]),
                     worker=entry.get("worker"), seconds=entry.get("seconds"),
                     error=entry["error"])
                progress.advance(note=f"rung {rung + 1}: candidate {c} "
                                 + ("failed" if entry["error"] else f"{entry['score']:.4f}"))
                if on_result is not None:
                    on_result(entry)
                if left < threads:
                    finished = [c2 for c2 in alive if (c2, rung) in results
                                and results[(c2, rung)]["error"] is None]
                    if finished:
                        refit_early(min(finished, key=lambda c2: _rank_key(results[(c2, rung)],
                                                                            c2)))
            ranked = sorted(alive, key=lambda c: _rank_key(results[(c, rung)], c))
            if rung + 1 < len(schedule.sizes):
                keep = [c for c in ranked[:schedule.sizes[rung + 1]]
                        if results[(c, rung)]["error"] is None]
                for c in set(alive) - set(keep):
                    models.pop(c, None)
                    if tdir is not None:
                        tdir.forget_model(results[(c, rung)])
                if not keep:
                    break  # every candidate of the rung failed
                alive = keep
            else:
                alive = ranked
            board = leaderboard(results, candidates)
            if tdir is not None:
                tdir.write_leaderboard(board)
    board = leaderboard(results, candidates)
    best = board[0]
    if best["error"] is not None:
        raise TrainingError(f"every candidate failed; the first: {best['error']}")
    key = (best["candidate"], best["rung"] - 1)
    best_model = models.get(best["candidate"])
    if best_model is None and not (refits and model != "ksgd"):  # a refit from scratch needs none
        try:
            best_model = tdir.load(results[key], expected=cls)
        except (AttributeError, ModelError):  # no tune directory, or the file was forgotten
            failed = next(e for e in board if e["error"] is not None)
            raise TrainingError(
                f"candidate {failed['candidate']} failed in rung {failed['rung']} "
                f"({failed['error']}), and the model of candidate {best['candidate']}, best of "
                f"the rest, was not kept after rung {best['rung']} (only the candidates that "
                "continue keep theirs); see why it failed, then run the search again") from None
    how = None
    if refits:
        if early is not None and early[0] == best["candidate"]:
            future, how = early[1:]
        else:
            if early is not None:  # the top rung's candidate failed: another one is best
                early[1].cancel()
            # The seed of the candidate's first rung: a refit MLP/SGD starts from its very
            # weights.
            future, how = _submit_refit(client, model, best["candidate"], best["params"],
                                        best["units"], best_model, ds, train_blocks,
                                        val_blocks, _task_seed(seeds[best["candidate"]], 0),
                                        f"{run_id}-{n_refits + 1}")
        best_model = _refit_result(future, best["candidate"])
    _log(client, kind="tune-end", run_id=run_id, candidate=best["candidate"],
         score=best["score"], params=_jsonable(best["params"]),
         leaderboard=str(tdir.leaderboard_path) if tdir else None)
    return TuneResult(best_params=to_params(best["params"]), best_score=best["score"],
                      best_model=best_model, best_seed=seeds[best["candidate"]],
                      leaderboard=board, plan=schedule, trained=trained, resumed=resumed,
                      seconds=time.perf_counter() - t0,
                      tune_dir=tdir.path if tdir is not None else None, refit=how)


def _submit_refit(client, model: str, candidate: int, params: dict, units: int, searched, ds,
                  train_blocks: list[int], val_blocks: list[int], seed: int, key: str):
    """``(future, how)``: the task that refits ``candidate`` searched up to ``units`` units so
    that it has seen the held-out blocks too (see :func:`tune`'s ``refit``). Inc-kSGD
    continues ``searched``, its model after the search; MLP and SGD start from scratch."""
    if model == "ksgd":
        args = (searched, val_blocks, 0, len(val_blocks))
        how = f"continued on the {len(val_blocks)} held-out blocks (partial_fit)"
    else:
        units = round(units * ds.n_blocks / len(train_blocks))
        args = (None, list(range(ds.n_blocks)), 0, units)
        how = (f"refit from scratch on all {ds.n_blocks} blocks "
               f"({units / ds.n_blocks:g} epochs, as the top rung)")
    state, blocks, start, stop = args
    return client.submit(train_candidate, model, params, state, ds, blocks, start, stop, ds, [],
                         seed, pure=False, key=f"{key}-refit-c{candidate}"), how


def _refit_result(future, candidate: int):
    """The refit model of ``candidate`` (a task of :func:`_submit_refit`)."""
    try:
        return future.result()["model"]
    except RPiClusterError:
        raise
    except Exception as exc:  # noqa: BLE001 - a candidate's own failure, named
        raise TrainingError(f"refitting the best candidate {candidate} failed: "
                            f"{type(exc).__name__}: {exc}") from exc


def _task_seed(seed: int, rung: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(rung)]).generate_state(1)[0])


def _rank_key(result: dict, candidate: int) -> tuple:
    """Best first: higher score, then the lower candidate number (a stable, seeded order)."""
    score = result["score"]
    return (score is None or math.isnan(score), -(score or 0.0), candidate)


def leaderboard(results: dict, candidates: list[dict]) -> list[dict]:
    """Every candidate at the highest rung it reached, best first (higher rungs first: a score
    after more training is not comparable with one after less)."""
    rows = []
    for c, params in enumerate(candidates):
        mine = sorted((r for (cc, _), r in results.items() if cc == c), key=lambda r: r["rung"])
        if not mine:
            continue
        top = mine[-1]
        rows.append({"candidate": c, "params": params, "rung": top["rung"] + 1,
                     "units": top["units"], "rows": top["rows"], "score": top["score"],
                     "scores": [r["score"] for r in mine], "error": top["error"]})
    rows.sort(key=lambda e: (e["error"] is not None, -e["rung"],
                             *_rank_key(e, e["candidate"])))
    return rows


def _as_finished(client, futures: dict):
    """``(candidate, result or exception)`` as each task ends; a user's data error (bad store)
    stops the search, a candidate's own failure only eliminates it."""
    from distributed import as_completed

    by_key = {f.key: c for c, f in futures.items()}
    for f in as_completed(list(futures.values())):
        c = by_key[f.key]
        if f.status == "error":
            exc = f.exception()
            if isinstance(exc, DataError):
                raise DataError(f"candidate {c}: {exc}") from exc
            if isinstance(exc, RPiClusterError) and not isinstance(exc, ConfigError):
                raise exc
            yield c, exc
        else:
            yield c, f.result()
        f.release()


def _check_rows(model: str, space: dict, ds) -> None:
    """Inc-kSGD clusters every block: refuse n_clusters above a block's rows before training."""
    if model != "ksgd" or "n_clusters" not in space:
        return
    kind, values = space["n_clusters"]
    most = max(values) if kind != "loguniform" else values[1]
    smallest = min(np.subtract(*ds.block_slice(b)[::-1]) for b in range(ds.n_blocks))
    if most > smallest:
        raise ConfigError(f"search space: n_clusters up to {most} but the smallest block of "
                          f"{ds.url} has {smallest} rows; lower n_clusters or ingest with a "
                          "larger --block-rows")


def _jsonable(params: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
            for k, v in params.items()}


def _log(client, **event) -> None:
    from rpicluster.events import publish

    event.setdefault("t", time.time())
    publish(client, TOPIC, event)  # to the scheduler, and to local listeners (--mlflow)


@dataclasses.dataclass
class TuneSummary:
    result: TuneResult
    model_path: Path
    sha256: str
    n_workers: int


def tune_to_file(data: str, model_path, *, model: str = "ksgd", space=None, budget=None,
                 seed: int = 0, factor: int = 3, n_candidates: int | None = None,
                 validation: str | None = None, cluster=None, tune_dir=None,
                 resume: bool = False, overwrite: bool = False, refit: bool = True,
                 storage_options: dict | None = None, show_progress: bool = True
                 ) -> TuneSummary:
    """``rpicluster tune``: :func:`tune` on the chosen cluster, the best model saved to
    ``model_path`` (an ordinary model file: ``rpicluster score``/``predict`` read it).

    ``tune_dir`` defaults to ``<model_path>.tune``. An existing ``model_path`` is replaced only
    with ``overwrite``. ``refit`` as :func:`tune`'s.

    Raises
    ------
    TrainingStopped
        The search stopped after it began (Ctrl-C, lost scheduler); the message says how many
        results are kept in ``tune_dir`` for ``resume``.
    """
    from rpicluster import history
    from rpicluster.train.api import ClusterChoice, refuse_existing_model
    from rpicluster.train.checks import fingerprint
    from rpicluster.train.modelfile import save_model

    model_path = Path(model_path)
    refuse_existing_model(model_path, overwrite or resume)
    tdir = TuneDir(tune_dir if tune_dir is not None else f"{model_path}.tune")
    # A bad space, budget or store is one line before any cluster is started or reached.
    setup = check_search(data, model, space, budget, factor=factor, n_candidates=n_candidates,
                         validation=validation, storage_options=storage_options)

    def kept() -> str | None:
        if not tdir.meta_path.exists():
            return None
        return f"{len(tdir.results())} candidate results are finished in {tdir.path}"

    params = {"model": model, "space": str(space) if space is not None else None,
              "budget": budget, "seed": seed, "factor": factor, "n_candidates": n_candidates,
              "validation": validation, "resume": resume, "refit": refit}
    # The store as train records it (its full URL), with its fingerprint: `runs` then names
    # the same store the same way whatever path the command was given.
    with history.recording("tune", params=params, data=str(setup.ds.url),
                           fingerprint=fingerprint(setup.ds)) as record, \
            (cluster or ClusterChoice()).run_client(kept, tdir.path) as client:
        workers = client.scheduler_info()["workers"]
        n_workers = len(workers)
        record.update(cluster=client.scheduler.address,
                      workers=[w.get("name", a) for a, w in workers.items()])
        with Progress(f"tune {model}", unit="results", enabled=show_progress) as progress:
            result = tune(data, model=model, space=space, budget=budget, client=client,
                          seed=seed, factor=factor, n_candidates=n_candidates,
                          validation=validation, tune_dir=tdir.path, resume=resume,
                          overwrite=overwrite and not resume, storage_options=storage_options,
                          progress=progress, refit=refit)
        digest = save_model(result.best_model, model_path)
        record.result(phases={"tune": result.seconds}, model_path=model_path.resolve(),
                      sha256=digest, best_score=result.best_score,
                      candidates=len(result.leaderboard), trained=result.trained,
                      resumed=result.resumed)
    return TuneSummary(result=result, model_path=model_path, sha256=digest, n_workers=n_workers)
