"""One call per CLI command: train a model from a store, score it, predict with it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rpicluster import history
from rpicluster.errors import (ConfigError, DataError, RPiClusterWarning, TrainingError,
                               TrainingStopped, WriteError)
from rpicluster.progress import Progress
from rpicluster.train.checks import (check_not_pixels, check_scoreable, fingerprint,
                                     fits_in_process, open_store,
                                     record_training_store, rows_kind, some_values)
from rpicluster.train.modelfile import load_model, save_model
from rpicluster.train.rundir import RunDir

if TYPE_CHECKING:
    from rpicluster.train.result import TrainResult


@dataclasses.dataclass
class ClusterChoice:
    """Which cluster a command uses: the arguments of :func:`rpicluster.deploy.resolve.client`.

    At most one of ``scheduler``, ``inventory`` and ``local`` (``N`` workers, or ``True`` for any
    size); none = the recorded cluster, else an embedded one for this command. ``announce(ref)``
    hears which cluster was chosen.
    """

    scheduler: str | None = None
    inventory: str | None = None
    local: int | bool | None = None
    announce: Callable | None = None

    def runs_here(self, dataset) -> bool:
        """Whether a command on ``dataset`` runs in this process instead: nothing was chosen,
        no cluster is running or recorded, and the store is small
        (:func:`~rpicluster.train.checks.fits_in_process`: starting a cluster would cost more
        than the work; the result is the same)."""
        if (self.scheduler, self.inventory, self.local) != (None, None, None):
            return False
        if not fits_in_process(dataset):
            return False
        from rpicluster.deploy.state import local_record, recorded_cluster

        return local_record() is None and recorded_cluster() is None

    def client(self):
        from rpicluster.deploy.resolve import client

        return client(self.scheduler, inventory=self.inventory, local=self.local,
                      announce=self.announce)

    @contextlib.contextmanager
    def run_client(self, kept: Callable[[], str | None], run_dir):
        """:meth:`client` for a training run that checkpoints into ``run_dir``.

        A run that stops once connected (Ctrl-C, lost scheduler, full disk, a failed task)
        raises :class:`~rpicluster.errors.TrainingStopped` naming what ``kept()`` says is kept
        (``"3 of 10 rounds are finished in RUN"``; None when the run never began: the error is
        then re-raised as it is). Not reaching the scheduler at all is one TrainingError.
        """
        address = None  # set once connected: errors after that may leave work to resume
        try:
            with self.client() as client:
                address = client.scheduler.address
                yield client
        except BaseException as exc:  # noqa: BLE001 - re-raised, as one line where we can
            if address is None and _first(exc, _is_connection_error) is not None:
                raise TrainingError(f"cannot reach the scheduler ({exc}); is the cluster up? "
                                    "(rpicluster status)") from exc
            stopped = _stopped(exc, kept(), run_dir, address) if address else None
            if stopped is None:
                raise
            raise stopped from exc


@dataclasses.dataclass
class TrainSummary:
    result: TrainResult
    model_path: Path
    sha256: str
    test_accuracy: float | None
    n_workers: int


def refuse_existing_model(model_path: str | os.PathLike, overwrite: bool,
                          resume: bool = False) -> None:
    """ConfigError when ``model_path`` exists and ``overwrite`` is false (every trainer checks
    this before it contacts the cluster). With ``resume`` the file can only be the finished
    run's own model (it is written when the run ends), so the message says there is nothing to
    resume."""
    if Path(model_path).exists() and not overwrite:
        if resume:
            raise ConfigError(f"model file {model_path} already exists: its run has finished, "
                              "so there is nothing to resume; score it (rpicluster score "
                              f"{model_path} DATA), or add --overwrite to train again")
        raise ConfigError(f"model file {model_path} already exists: add --overwrite to replace "
                          "it, or choose another output with -o")


def train_model(data: str, model_path: str | os.PathLike, params: dict, *,
                cluster: ClusterChoice | None = None, run_dir: str | os.PathLike | None = None,
                resume: bool = False, overwrite: bool = False, test: str | None = None,
                storage_options: dict | None = None, show_progress: bool = True,
                allow_skewed: bool = False, allow_pixels: bool = False) -> TrainSummary:
    """Train an IncrementalKSGDClassifier on the store ``data`` and save it to ``model_path``.

    ``run_dir`` (default ``<model_path>.run``) receives each block model as it is committed;
    with ``resume=True`` the parameters recorded there are used and committed blocks are kept.
    ``test`` is a store to report accuracy on. Unset ``params`` take the estimator's defaults.
    A store whose blocks cannot hold ``n_clusters`` rows, or an unshuffled class-skewed one
    (unless ``allow_skewed``), is refused before the cluster is contacted
    (:meth:`~rpicluster.data.reader.Dataset.check_trainable`).
    An existing ``model_path`` is replaced only with ``overwrite``, which also starts the run
    directory afresh (unless resuming). One run at a time owns the run directory.

    Raises
    ------
    ConfigError
        ``model_path`` exists (without ``overwrite``), another run owns the run directory, or
        the parameters cannot work on this store (e.g. more clusters than a block has rows).
    TrainingStopped
        The run stopped after it began (Ctrl-C, lost scheduler, full disk, a failing block);
        the message says how many blocks are kept in ``run_dir`` for ``resume``.
    """
    from rpicluster.models.incremental import IncrementalKSGDClassifier, calibrate_dataset

    model_path = Path(model_path)
    run_dir = Path(run_dir) if run_dir is not None else Path(f"{model_path}.run")
    refuse_existing_model(model_path, overwrite, resume)
    if resume:
        # The run's parameters, with any given here on top: RunDir.check_resumable (in train)
        # refuses one that differs, naming it.
        params = {**RunDir(run_dir).meta()["params"], **params}
    dataset = open_store(data, storage_options)
    check_not_pixels(dataset, allow_pixels=allow_pixels)
    estimator = IncrementalKSGDClassifier(**{**params, "block_rows": dataset.block_rows})
    dataset.check_trainable(estimator.n_clusters, allow_skewed=allow_skewed)
    test_ds = open_store(test, storage_options) if test else None
    if test_ds is not None:
        check_scoreable(estimator_like(dataset), test_ds, name=f"a model of {dataset.url}")
    cluster = cluster or ClusterChoice()
    recorded = dict(params={**estimator.get_params(), "resume": resume, "test": test},
                    data=str(dataset.url), fingerprint=fingerprint(dataset))
    if not resume and cluster.runs_here(dataset):
        with history.recording("train", **recorded) as record:
            summary = _train_here(estimator, dataset, model_path, run_dir, overwrite, test_ds,
                                  show_progress)
            seconds = summary.result.seconds
            record.update(cluster="this process", workers=["this process"])
            record.result(phases={"train": seconds}, blocks=dataset.n_blocks,
                          rows_per_second=dataset.n_rows / seconds if seconds > 0 else None,
                          test_accuracy=summary.test_accuracy,
                          model_path=summary.model_path.resolve(), sha256=summary.sha256)
        return summary
    # Owned from before the first block until the model file is written: a second run into the
    # same directory is refused instead of mixing its blocks into this one.
    with RunDir(run_dir) as run, history.recording("train", **recorded) as record:
        if overwrite and not resume:
            run.clear()
        def kept() -> str | None:
            if not run.exists():
                return None  # the run never began: nothing to resume
            return (f"{len(run.verified())} of {dataset.n_blocks} blocks are committed in "
                    f"{run.path}")

        with cluster.run_client(kept, run.path) as client:
            workers = client.scheduler_info()["workers"]
            n_workers = len(workers)
            record.update(cluster=client.scheduler.address,
                          workers=[w.get("name", a) for a, w in workers.items()])
            from rpicluster.train.job import score_dataset, train

            with Progress("train", total=dataset.n_blocks, unit="blocks",
                          enabled=show_progress) as progress:
                result = train(estimator, dataset, client, run_dir=run_dir, resume=resume,
                               validation=test_ds, progress=progress)
            record.result(phases={"train": result.seconds, **result.phases},
                          blocks=len(result.trained_blocks), resumed=len(result.resumed_blocks),
                          rows_per_second=dataset.n_rows / result.seconds
                          if result.seconds > 0 else None)
            calibrate_dataset(estimator, dataset, client)
            accuracy = None
            if test_ds is not None:
                accuracy = score_dataset(estimator, test_ds, client)
                record.result(test_accuracy=accuracy)
        record_training_store(estimator, dataset)
        try:
            digest = save_model(estimator, model_path)
        except WriteError as exc:
            # Every block is committed: --resume writes the model file without training.
            raise TrainingStopped(f"{exc}; {kept()}", run.path) from None
        record.result(model_path=model_path.resolve(), sha256=digest)
    return TrainSummary(result=result, model_path=model_path, sha256=digest,
                        test_accuracy=accuracy, n_workers=n_workers)


def estimator_like(dataset):
    """An object with the ``n_features_in_`` and ``classes_`` a model of ``dataset`` will have
    (for :func:`~rpicluster.train.checks.check_scoreable` before training)."""
    return type("StoreModel", (), {"n_features_in_": dataset.n_features,
                                   "classes_": np.asarray(dataset.classes)})()


def _train_here(estimator, dataset, model_path: Path, run_dir: Path, overwrite: bool, test_ds,
                show_progress: bool) -> TrainSummary:
    """:func:`train_model` of a small store in this process (``estimator.fit``'s in-process
    path, the reference the cluster reproduces exactly)."""
    import time
    from collections import Counter

    from rpicluster.train.result import TrainResult  # not from job: it imports distributed

    with RunDir(run_dir) as run:  # still owned: a second run into it is refused
        if overwrite:
            run.clear()
        start = time.perf_counter()
        with Progress("train", total=dataset.n_blocks, unit="blocks",
                      enabled=show_progress) as progress:
            estimator.fit(dataset)
            progress.advance(dataset.n_blocks, note="trained in this process")
        seconds = time.perf_counter() - start
        accuracy = estimator.score(test_ds) if test_ds is not None else None
        record_training_store(estimator, dataset)
        digest = save_model(estimator, model_path)
    here = "this process"
    result = TrainResult(model=estimator, seconds=seconds,
                         trained_blocks=list(range(dataset.n_blocks)), resumed_blocks=[],
                         tasks_per_worker=Counter({here: dataset.n_blocks}),
                         rows_per_worker=Counter({here: dataset.n_rows}),
                         busy_seconds_per_worker=Counter({here: seconds}), run_dir=None)
    return TrainSummary(result=result, model_path=model_path, sha256=digest,
                        test_accuracy=accuracy, n_workers=1)


def _causes(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and its ``__cause__`` chain."""
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        exc = exc.__cause__
    return out


def _first(exc: BaseException, test) -> BaseException | None:
    """The exception behind ``exc`` that passes ``test``, looking first at the one raised first
    (the end of the ``__context__`` chain: the cause, not a later failure while cleaning up
    after it), then along ``exc``'s own chain."""
    return next((e for e in _causes(_origin(exc)) + _contexts(exc) + _causes(exc) if test(e)),
                None)


def _contexts(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised while handling, newest first."""
    out = [exc]
    while out[-1].__context__ is not None and all(out[-1].__context__ is not e for e in out):
        out.append(out[-1].__context__)
    return out


def _origin(exc: BaseException) -> BaseException:
    """The exception raised first in ``exc``'s chain."""
    return _contexts(exc)[-1]


def _is_connection_error(exc: BaseException) -> bool:
    from distributed.comm import CommClosedError

    return isinstance(exc, (CommClosedError, ConnectionError)) or (
        isinstance(exc, OSError) and not isinstance(exc, WriteError) and "connect" in str(exc))


def _stopped(exc: BaseException, kept: str | None, run_dir, address: str | None
             ) -> TrainingStopped | None:
    """The one-line error for a run that stopped after it began (``kept`` says what is kept in
    ``run_dir``); None to re-raise ``exc``.

    Cleanup after a lost scheduler can fail in its turn (a timeout while cancelling), so the
    first cause is found by following the exception chain.
    """
    if kept is None:
        return None  # the run never began: nothing to resume
    if _first(exc, lambda e: isinstance(e, KeyboardInterrupt)) is not None:
        return TrainingStopped(f"interrupted: {kept}", run_dir, interrupted=True)
    lost = _first(exc, _is_connection_error)
    if lost is not None:
        # Quote the connection error only when it is the cause; one raised while cleaning up
        # (cancelling, logging the run's end) would only say that cleanup timed out, and a
        # connect that timed out (the client's own reconnecting, which the run can meet first
        # when it asks the scheduler just after the loss) says no more than the fallback.
        why = (f"{type(lost).__name__}: {str(lost).splitlines()[0][:160]}"
               if any(lost is e for e in _causes(_origin(exc)))
               and "Timed out trying to connect" not in str(lost) else
               "it stopped answering and the client gave up reconnecting")
        return TrainingStopped(f"lost the scheduler {address} during training ({why}): "
                               f"{kept}; bring the cluster back (rpicluster up)", run_dir)
    cause = _first(exc, lambda e: isinstance(e, (WriteError, TrainingError)))
    if cause is not None and not isinstance(cause, TrainingStopped):
        return TrainingStopped(f"{cause}; {kept}", run_dir)
    return None


@dataclasses.dataclass
class ScoreSummary:
    """What ``score`` reports: the accuracy, the store and which rows they are to the model
    (:func:`~rpicluster.train.checks.rows_kind`: "TRAINING rows (not a held-out estimate)",
    "held-out rows" or "rows")."""

    accuracy: float
    url: str
    n_rows: int
    rows: str


def _model_and_store(model_path, data: str, storage_options: dict | None):
    """The saved model and the store, checked against each other from metadata (features,
    label kind) before anything runs on them."""
    model = load_model(model_path)
    dataset = open_store(data, storage_options)
    check_scoreable(model, dataset, name=str(model_path))
    return model, dataset


def score_model(model_path: str | os.PathLike, data: str, *, cluster: ClusterChoice | None = None,
                storage_options: dict | None = None, show_progress: bool = True) -> float:
    """Accuracy of the saved model on the store ``data`` (:func:`score_summary`'s)."""
    return score_summary(model_path, data, cluster=cluster, storage_options=storage_options,
                         show_progress=show_progress).accuracy


def score_summary(model_path: str | os.PathLike, data: str, *,
                  cluster: ClusterChoice | None = None, storage_options: dict | None = None,
                  show_progress: bool = True) -> ScoreSummary:
    """Accuracy of the saved model on the store ``data``, computed on the cluster (in this
    process for a small store when no cluster is chosen or running), and which rows those
    are to the model.

    The model's features and label kind are checked against the store's metadata first
    (:func:`~rpicluster.train.checks.check_scoreable`).
    """
    model, dataset = _model_and_store(model_path, data, storage_options)
    cluster = cluster or ClusterChoice()
    if cluster.runs_here(dataset):
        check_labels(model, dataset, name=str(model_path))
        accuracy = model.score(dataset)
    else:
        from rpicluster.train.job import score_dataset

        with cluster.client() as client:
            check_labels(model, dataset, client, name=str(model_path))
            progress = Progress("score", total=dataset.n_blocks, unit="blocks",
                                enabled=show_progress)
            accuracy = score_dataset(model, dataset, client, progress=progress)
    return ScoreSummary(accuracy, dataset.url, dataset.n_rows, rows_kind(model, dataset))


def check_labels(model, dataset, client=None, *, name: str = "the model") -> None:
    """Refuse a store whose labels the model can never predict; warn, with counts, when some are.

    The labels are counted on ``client``'s workers, or in this process without one (a store
    scored here: the same warning either way).

    Raises
    ------
    DataError
        The store's labels are of another type than the model's (strings against numbers), or
        none of them was seen in training.
    """
    from rpicluster.data.reader import block_label_counts

    check_scoreable(model, dataset, name=name)
    known, labels = np.asarray(model.classes_), np.asarray(dataset.classes)
    unseen = ~np.isin(labels, known)
    if not unseen.any():
        return
    if client is None:
        per_block = [block_label_counts(dataset, b) for b in range(dataset.n_blocks)]
    else:
        per_block = client.gather(client.map(block_label_counts, [dataset] * dataset.n_blocks,
                                             range(dataset.n_blocks), pure=False))
    counts = np.sum(per_block, axis=0)
    total, missed = int(counts.sum()), int(counts[unseen].sum())
    what = (f"{missed} of {total} rows of {dataset.url} have labels {name} never saw in "
            f"training ({int(unseen.sum())} labels: {some_values(labels[unseen])})")
    if missed == total:
        raise DataError(f"{what}: accuracy would be 0; score a store of the classes it was "
                        "trained on")
    warnings.warn(f"{what}; they count as errors ({missed / total:.1%} of the rows)",
                  RPiClusterWarning, stacklevel=2)


def predict_to_file(model_path: str | os.PathLike, data: str, out: str | os.PathLike, *,
                    cluster: ClusterChoice | None = None, storage_options: dict | None = None,
                    show_progress: bool = True) -> int:
    """Predict every row of ``data`` on the cluster and write the labels to ``out``.

    ``out`` ending in ``.npy`` gets a numpy array, ``.csv``/``.txt`` one label per line.
    Returns the number of rows written.
    """
    from rpicluster.train.modelfile import atomic_write_bytes

    out = Path(out)
    if out.suffix not in (".npy", ".csv", ".txt"):
        raise ConfigError(f"output {out}: unknown file type {out.suffix!r} "
                          "(known: .npy, .csv, .txt)")
    model, dataset = _model_and_store(model_path, data, storage_options)
    cluster = cluster or ClusterChoice()
    if cluster.runs_here(dataset):
        labels = model.predict(dataset)
    else:
        from rpicluster.train.job import predict_dataset

        with cluster.client() as client:
            progress = Progress("predict", total=dataset.n_blocks, unit="blocks",
                                enabled=show_progress)
            labels = predict_dataset(model, dataset, client, progress=progress)
    if out.suffix == ".npy":
        import io

        buf = io.BytesIO()
        np.save(buf, labels, allow_pickle=False)
        atomic_write_bytes(out, buf.getvalue())
    else:
        atomic_write_bytes(out, "".join(f"{v}\n" for v in labels.tolist()).encode())
    return int(labels.shape[0])
