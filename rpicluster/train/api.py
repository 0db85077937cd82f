"""One call per CLI command: train a model from a store, score it, predict with it."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rpicluster.errors import ConfigError
from rpicluster.progress import Progress
from rpicluster.train.job import TrainResult, predict_dataset, score_dataset, train
from rpicluster.train.modelfile import load_model, save_model
from rpicluster.train.rundir import RunDir


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

    def client(self):
        from rpicluster.deploy.resolve import client

        return client(self.scheduler, inventory=self.inventory, local=self.local,
                      announce=self.announce)


@dataclasses.dataclass
class TrainSummary:
    result: TrainResult
    model_path: Path
    sha256: str
    test_accuracy: float | None
    n_workers: int


def train_model(data: str, model_path: str | os.PathLike, params: dict, *,
                cluster: ClusterChoice | None = None, run_dir: str | os.PathLike | None = None,
                resume: bool = False, test: str | None = None,
                storage_options: dict | None = None, show_progress: bool = True) -> TrainSummary:
    """Train an IncrementalKSGDClassifier on the store ``data`` and save it to ``model_path``.

    ``run_dir`` (default ``<model_path>.run``) receives each block model as it is committed;
    with ``resume=True`` the parameters recorded there are used and committed blocks are kept.
    ``test`` is a store to report accuracy on. Unset ``params`` take the estimator's defaults.
    """
    from rpicluster import open_dataset
    from rpicluster.models.incremental import IncrementalKSGDClassifier

    model_path = Path(model_path)
    run_dir = Path(run_dir) if run_dir is not None else Path(f"{model_path}.run")
    if resume:
        # The run's parameters, with any given here on top: RunDir.check_resumable (in train)
        # refuses one that differs, naming it.
        params = {**RunDir(run_dir).meta()["params"], **params}
    dataset = open_dataset(data, storage_options=storage_options)
    estimator = IncrementalKSGDClassifier(**{**params, "block_rows": dataset.block_rows})
    test_ds = open_dataset(test, storage_options=storage_options) if test else None
    with (cluster or ClusterChoice()).client() as client:
        n_workers = len(client.scheduler_info()["workers"])
        with Progress("train", total=dataset.n_blocks, unit="blocks",
                      enabled=show_progress) as progress:
            result = train(estimator, dataset, client, run_dir=run_dir, resume=resume,
                           validation=test_ds, progress=progress)
        accuracy = None
        if test_ds is not None:
            accuracy = score_dataset(estimator, test_ds, client)
    digest = save_model(estimator, model_path)
    return TrainSummary(result=result, model_path=model_path, sha256=digest,
                        test_accuracy=accuracy, n_workers=n_workers)


def score_model(model_path: str | os.PathLike, data: str, *, cluster: ClusterChoice | None = None,
                storage_options: dict | None = None, show_progress: bool = True) -> float:
    """Accuracy of the saved model on the store ``data``, computed on the cluster."""
    from rpicluster import open_dataset

    model = load_model(model_path)
    dataset = open_dataset(data, storage_options=storage_options)
    with (cluster or ClusterChoice()).client() as client:
        progress = Progress("score", total=dataset.n_blocks, unit="blocks", enabled=show_progress)
        return score_dataset(model, dataset, client, progress=progress)


def predict_to_file(model_path: str | os.PathLike, data: str, out: str | os.PathLike, *,
                    cluster: ClusterChoice | None = None, storage_options: dict | None = None,
                    show_progress: bool = True) -> int:
    """Predict every row of ``data`` on the cluster and write the labels to ``out``.

    ``out`` ending in ``.npy`` gets a numpy array, ``.csv``/``.txt`` one label per line.
    Returns the number of rows written.
    """
    from rpicluster import open_dataset
    from rpicluster.train.modelfile import atomic_write_bytes

    out = Path(out)
    if out.suffix not in (".npy", ".csv", ".txt"):
        raise ConfigError(f"output {out}: unknown file type {out.suffix!r} "
                          "(known: .npy, .csv, .txt)")
    model = load_model(model_path)
    dataset = open_dataset(data, storage_options=storage_options)
    with (cluster or ClusterChoice()).client() as client:
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
