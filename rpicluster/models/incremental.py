"""Inc-kSGD: one kSGD per block of rows, predictions by majority vote of the block models.

This is how data larger than one machine's memory is learned: each block (in memory, a slice of
an array, or one chunk of a Zarr dataset) trains its own :class:`KSGDClassifier`, and the
ensemble votes. Block ``b`` derives its seeds from ``(random_state, b)`` only, so a block
fitted on a Dask worker equals the same block fitted here.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from rpicluster import config
from rpicluster.models.ksgd import (KSGDClassifier, check_enough_rows, check_params,
                                    check_weights, fit_block, resolve_random_state,
                                    unchanged_on_error)
from rpicluster.models.proba import (CALIBRATION_BLOCKS, CALIBRATION_ROWS, fit_proba_scale,
                                     softmax_proba)

# Rows per chunk when counting votes: bounds the (chunk, n_classes) count matrix.
_VOTE_CHUNK = 4096

# How a blocked dataset is fitted while a Dask client is current: ``fit(estimator, dataset,
# client)``. rpicluster.train.job registers itself here when imported, so the estimator never
# imports the layer above it.
_distributed_fit = None


# How a fitted estimator predicts and scores a blocked dataset on a Dask client:
# ``predict(estimator, dataset, client)``, ``score(estimator, dataset, client)``; registered by
# rpicluster.train.job like the fit.
_distributed_predict = None
_distributed_score = None


def register_distributed_predict(predict, score) -> None:
    """Set the functions that predict and score a blocked dataset on a Dask client.

    Parameters
    ----------
    predict : callable
        ``predict(estimator, dataset, client)`` -> labels of every row.
    score : callable
        ``score(estimator, dataset, client)`` -> accuracy.
    """
    global _distributed_predict, _distributed_score
    _distributed_predict, _distributed_score = predict, score


def register_distributed_fit(fit) -> None:
    """Set the function that fits a blocked dataset on a Dask client (``rpicluster.train``'s job).

    Parameters
    ----------
    fit : callable
        ``fit(estimator, dataset, client)``; fills the estimator's learned attributes.
    """
    global _distributed_fit
    _distributed_fit = fit


def is_dataset(X) -> bool:
    """Whether ``X`` is a blocked dataset (``n_blocks`` and ``block(i)``), e.g. a Zarr one."""
    return hasattr(X, "n_blocks") and callable(getattr(X, "block", None))


def _current_client():
    """The current Dask client, or None when there is none (or distributed is absent)."""
    import sys

    if "distributed" not in sys.modules:
        return None  # nothing imported distributed, so no client exists (and import is slow)
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def calibration_rows(n_blocks: int) -> tuple[list[int], int]:
    """Which rows calibrate an ensemble's ``predict_proba``: the first ``rows`` rows of each of
    the ``blocks`` (at most :data:`~rpicluster.models.proba.CALIBRATION_BLOCKS`, evenly spread),
    about :data:`~rpicluster.models.proba.CALIBRATION_ROWS` in all. The same rule in every fit
    path, so a store fitted on a cluster and the same arrays fitted here get the same scale."""
    blocks = sorted({int(b) for b in np.linspace(0, n_blocks - 1,
                                                 min(n_blocks, CALIBRATION_BLOCKS)).round()})
    return blocks, -(-CALIBRATION_ROWS // len(blocks))


def calibration_task(model, dataset, block: int, rows: int):
    """(scores, codes) of the first ``rows`` rows of block ``block`` under ``model``'s vote."""
    from sklearn.utils import check_array

    X, y = dataset.block(block)
    X = check_array(X[:rows], dtype=np.float32, order="C")
    return model._decision(X)[1], np.asarray(y[:rows])


def decision_task(model, dataset, block: int) -> np.ndarray:
    """``model.decision_function`` of block ``block``'s rows."""
    return model.decision_function(dataset.block(block)[0])


def proba_task(model, dataset, block: int) -> np.ndarray:
    """``model.predict_proba`` of block ``block``'s rows."""
    return model.predict_proba(dataset.block(block)[0])


def calibrate_dataset(model, dataset, client=None):
    """Fit ``model.proba_scale_`` on the rows :func:`calibration_rows` picks from ``dataset``
    (the store it was trained on), on ``client``'s workers when given.

    Returns
    -------
    model
    """
    blocks, rows = calibration_rows(dataset.n_blocks)
    if client is None:
        parts = [calibration_task(model, dataset, b, rows) for b in blocks]
    else:
        from rpicluster.models.remote import hold

        remote = hold(client, model)
        parts = client.gather(client.map(calibration_task, [remote] * len(blocks),
                                         [dataset] * len(blocks), blocks, [rows] * len(blocks),
                                         pure=False))
    model.proba_scale_ = fit_proba_scale(np.concatenate([p[0] for p in parts]),
                                         np.concatenate([p[1] for p in parts]))
    return model


#: ``vote`` values: the paper's majority vote, or the mean of the block models' scores.
VOTES = ("majority", "soft")


def check_incremental_params(params: dict) -> dict:
    """Validate an :class:`IncrementalKSGDClassifier`'s parameters (its ``get_params()``);
    ValueError names the parameter and what is allowed. Returns ``params``."""
    check_params(params)
    b, k = params["block_rows"], params["n_clusters"]
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < k:
        raise ValueError(f"block_rows must be an int >= n_clusters={k}, got {b!r}.")
    if params["vote"] not in VOTES:
        raise ValueError(f"vote must be one of {list(VOTES)}, got {params['vote']!r}.")
    return params


def majority_vote(block_codes, n_classes: int, tie_scores=None) -> np.ndarray:
    """Most frequent code per row.

    Parameters
    ----------
    block_codes : ndarray of shape (n_blocks, n), int
        Each block model's predicted codes.
    n_classes : int
    tie_scores : ndarray of shape (n, n_classes), optional
        Breaks ties: among the classes with the most votes, the one scoring highest wins (the
        estimator passes the block models' summed decision scores). Without it, the lowest
        class code wins.

    Returns
    -------
    ndarray of shape (n,), int64
    """
    block_codes = np.asarray(block_codes, dtype=np.int64)
    n_blocks, n = block_codes.shape
    if n_blocks == 1:
        return block_codes[0]
    out = np.empty(n, dtype=np.int64)
    for start in range(0, n, _VOTE_CHUNK):
        counts = vote_counts(block_codes[:, start:start + _VOTE_CHUNK], n_classes)
        if tie_scores is None:
            out[start:start + counts.shape[0]] = counts.argmax(axis=1)  # first code on ties
            continue
        leaders = counts == counts.max(axis=1, keepdims=True)
        scores = np.where(leaders, tie_scores[start:start + counts.shape[0]], -np.inf)
        out[start:start + counts.shape[0]] = scores.argmax(axis=1)
    return out


def vote_counts(block_codes, n_classes: int) -> np.ndarray:
    """Votes per row and class, shape ``(n, n_classes)``, of ``(n_blocks, n)`` codes."""
    block_codes = np.asarray(block_codes, dtype=np.int64)
    m = block_codes.shape[1]
    flat = (np.arange(m) * n_classes)[None, :] + block_codes
    return np.bincount(flat.ravel(), minlength=m * n_classes).reshape(m, n_classes)


class IncrementalKSGDClassifier(ClassifierMixin, BaseEstimator):
    """The paper's Inc-kSGD: a kSGD per block of ``block_rows`` rows, majority vote.

    Parameters
    ----------
    block_rows : int, default=config.BLOCK_ROWS
        Rows per block in :meth:`fit` (the last block takes the remainder; a remainder smaller
        than ``n_clusters`` joins the previous block).
    n_clusters, max_iter, alpha, learning_rate, eta0, power_t, batch_size, average, solver, n_jobs
        As :class:`KSGDClassifier`, for every block.
    vote : {'majority', 'soft'}, default='majority'
        How block models combine at predict time. 'majority' (the paper's): each block model
        votes for one class, the most votes win, and a tie goes to the tied class with the
        highest decision score summed over the block models. 'soft': the class with the highest
        mean decision score.
    random_state : int, RandomState or None, default=None
        Block ``b`` is seeded by ``(random_state, b)``.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    n_iter_ : int
        Epochs run per cluster of every block (``max_iter``).
    estimators_ : list of KSGDClassifier
        One fitted kSGD per block, all sharing ``classes_``.
    proba_scale_ : float
        Temperature of :meth:`predict_proba`, fitted on training rows.

    Notes
    -----
    :meth:`predict_proba` is ``softmax(proba_scale_ * scores)`` of :meth:`decision_function`'s
    per-class scores (so its most probable class is the predicted one, under either ``vote``),
    with ``proba_scale_`` fitted by minimising the log loss on about 2,048 training rows
    (:func:`calibration_rows`). Calibrated on training rows, it leans confident on new data;
    ``sklearn.calibration.CalibratedClassifierCV`` calibrates on held-out folds instead.
    """

    def __init__(self, block_rows=config.BLOCK_ROWS, *, n_clusters=10, max_iter=5, alpha=1e-4,
                 learning_rate="optimal", eta0=0.01, power_t=0.5, batch_size=256, average=True,
                 solver="minibatch", vote="majority", n_jobs=None, random_state=None):
        self.block_rows = block_rows
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.alpha = alpha
        self.learning_rate = learning_rate
        self.eta0 = eta0
        self.power_t = power_t
        self.batch_size = batch_size
        self.average = average
        self.solver = solver
        self.vote = vote
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _check_params(self) -> dict:
        return check_incremental_params(self.get_params())

    def fit(self, X, y=None, sample_weight=None):
        """Fit one kSGD per block of ``block_rows`` rows.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), or a dataset
            A dataset (``rpicluster.open_dataset``: ``n_blocks``, ``block(i)``, ``classes``)
            is fitted block by block, one kSGD per stored block; ``y`` must then be None.
        y : array-like of shape (n_samples,)
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative row weights scaling each row's SGD steps (arrays only; a store has
            none).

        Returns
        -------
        self
        """
        params = self._check_params()
        rs = resolve_random_state(self.random_state)
        if is_dataset(X):
            if y is not None:
                raise ValueError("y must be None when X is a dataset (labels are stored in it).")
            if sample_weight is not None:
                raise ValueError("sample_weight is not supported with a dataset X (a store "
                                 "holds no weights); fit arrays to weight rows.")
            return self._fit_dataset(X, params, rs)
        with unchanged_on_error(self):
            X, y = validate_data(self, X, y, dtype=np.float32, order="C")
            check_classification_targets(y)
            check_enough_rows(X, self.n_clusters)
            sample_weight = check_weights(sample_weight, X)
        n = X.shape[0]
        classes, codes = np.unique(y, return_inverse=True)
        starts = list(range(0, n, self.block_rows))
        if len(starts) > 1 and n - starts[-1] < self.n_clusters:
            starts.pop()  # a remainder too small to cluster joins the previous block
        stops = starts[1:] + [n]
        self.n_iter_ = int(self.max_iter)
        self.estimators_ = [fit_block(X[a:z], codes[a:z], classes, params, random_state=rs,
                                      block=b, sample_weight=None if sample_weight is None
                                      else sample_weight[a:z])
                            for b, (a, z) in enumerate(zip(starts, stops))]
        self.classes_ = classes
        blocks, rows = calibration_rows(len(starts))
        picked = np.concatenate([np.arange(starts[b], min(starts[b] + rows, stops[b]))
                                 for b in blocks])
        self.proba_scale_ = fit_proba_scale(self._decision(X[picked])[1], codes[picked])
        return self

    def _fit_dataset(self, dataset, params: dict, random_state: int):
        """Fit a blocked dataset: the one place where distributed training plugs in.

        Block ``i`` of the dataset becomes block model ``i``. With a current Dask client (as
        joblib's dask backend and dask-ml use one) the blocks are fitted on the cluster by the
        registered job (:func:`register_distributed_fit`: :func:`rpicluster.train.job.train`,
        registered when ``rpicluster.train.job`` is imported, as ``rpicluster`` does for its
        estimators); otherwise by this in-process loop, which is the reference the distributed
        path reproduces exactly.
        """
        check = getattr(dataset, "check_trainable", None)  # a Zarr store refuses bad blocks
        if check is not None:
            check(self.n_clusters)
        client = _current_client()
        if client is not None and _distributed_fit is None:
            import warnings

            warnings.warn("a Dask client is current but no distributed fit is registered "
                          "(import rpicluster.train.job): fitting the blocks in this process",
                          UserWarning, stacklevel=3)
        elif client is not None:
            _distributed_fit(self, dataset, client)
            return calibrate_dataset(self, dataset, client)
        classes = np.asarray(dataset.classes)
        if dataset.n_blocks < 1:
            raise ValueError("the dataset has no blocks.")
        estimators = []
        for i in range(dataset.n_blocks):
            Xi, yi = dataset.block(i)
            Xi, yi = self._validated_block(Xi, yi, len(classes), f"block {i}")
            estimators.append(fit_block(Xi, yi, classes, params, random_state=random_state,
                                        block=i))
        self.estimators_ = estimators
        self.classes_ = classes
        self.n_iter_ = int(self.max_iter)
        self.n_features_in_ = int(estimators[0].n_features_in_)
        return calibrate_dataset(self, dataset)

    def _validated_block(self, X, y_codes, n_classes: int, where: str):
        """Validate one stored block of float rows and integer class codes."""
        from sklearn.utils import check_array, check_consistent_length

        X = check_array(X, dtype=np.float32, order="C")
        y_codes = np.asarray(y_codes)
        check_consistent_length(X, y_codes)
        check_enough_rows(X, self.n_clusters, where=f"{where}: ")
        if y_codes.size and (y_codes.min() < 0 or y_codes.max() >= n_classes):
            raise ValueError(f"{where}: class codes must lie in [0, {n_classes}).")
        return X, y_codes

    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """Fit one more block model on ``(X, y)`` and add it to the ensemble.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        classes : array-like of shape (n_classes,), default=None
            All classes; required on the first call, and if given later, the same.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative row weights scaling each row's SGD steps.

        Returns
        -------
        self
        """
        params = self._check_params()
        first = not hasattr(self, "classes_")
        if first and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit.")
        if classes is not None:
            classes = np.unique(classes)
            if not first and not np.array_equal(classes, self.classes_):
                raise ValueError(f"`classes={classes!r}` is not the same as on last call to "
                                 f"partial_fit, was: {self.classes_!r}")
        known = self.classes_ if classes is None else classes
        with unchanged_on_error(self):
            X, y = validate_data(self, X, y, dtype=np.float32, order="C", reset=first)
            check_classification_targets(y)
            check_enough_rows(X, self.n_clusters)
            unknown = np.setdiff1d(y, known)
            if unknown.size:
                raise ValueError(f"y contains labels {unknown!r} not in classes {known!r}.")
            codes = np.searchsorted(known, y)
            sample_weight = check_weights(sample_weight, X)
            block = 0 if first else len(self.estimators_)
            est = fit_block(X, codes, known, params,
                            random_state=resolve_random_state(self.random_state), block=block,
                            sample_weight=sample_weight)
        if first:
            self.classes_ = known
            self.n_iter_ = int(self.max_iter)
            self.estimators_ = [est]
        else:
            self.estimators_ = [*self.estimators_, est]
        # calibrated on this call's rows (the earlier calls' rows are gone)
        rows = np.arange(min(X.shape[0], CALIBRATION_ROWS))
        self.proba_scale_ = fit_proba_scale(self._decision(X[rows])[1], codes[rows])
        return self

    def add_block_model(self, est: KSGDClassifier):
        """Append an already-fitted block model (e.g. one trained on a Dask worker).

        Parameters
        ----------
        est : KSGDClassifier
            Fitted, with the same ``classes_`` and ``n_features_in_`` as this ensemble (the
            first model added to an unfitted ensemble defines both).

        Returns
        -------
        self
        """
        check_is_fitted(est)
        if not hasattr(self, "classes_"):
            self.classes_ = np.asarray(est.classes_)
            self.n_features_in_ = int(est.n_features_in_)
            self.n_iter_ = int(est.n_iter_)
            self.estimators_ = [est]
            return self
        if not np.array_equal(est.classes_, self.classes_):
            raise ValueError("the block model's classes_ differ from the ensemble's classes_.")
        if est.n_features_in_ != self.n_features_in_:
            raise ValueError(f"the block model has {est.n_features_in_} features, but "
                             f"{type(self).__name__} is expecting {self.n_features_in_} "
                             f"features as input.")
        self.estimators_ = [*self.estimators_, est]
        return self

    def _block_scores(self, X):
        """Each block model's ``(n, n_classes)`` local scores, stacked: ``(n_blocks, n, C)``."""
        return np.stack([est.local_scores(X) for est in self.estimators_])

    def _decision(self, X) -> tuple[np.ndarray, np.ndarray]:
        """(codes, scores) of validated rows under ``vote``; argmax of scores is the code.

        'majority': votes plus a tie-break term in (0, 1) that grows with the summed decision
        scores (so a vote count always outranks it); 'soft': mean decision scores.
        """
        scores = self._block_scores(X)
        if self.vote == "soft":
            mean = scores.mean(axis=0)
            return mean.argmax(axis=1), mean
        summed = scores.sum(axis=0, dtype=np.float64)
        votes = vote_counts(scores.argmax(axis=2), len(self.classes_))
        codes = majority_vote(scores.argmax(axis=2), len(self.classes_), tie_scores=summed)
        return codes, votes + 0.5 + np.arctan(summed / len(self.estimators_)) / np.pi

    def decision_function(self, X):
        """Confidence scores of the ensemble, consistent with :meth:`predict`.

        With ``vote='majority'``: per class, the number of block models voting for it plus a
        term in (0, 1) that increases with the class's decision score summed over the block
        models (the tie-break). With ``vote='soft'``: the block models' mean decision score.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), or a dataset
            A dataset is scored block by block, as in :meth:`predict`.

        Returns
        -------
        ndarray of shape (n_samples, n_classes), or (n_samples,) with two classes
            With two classes, positive means ``classes_[1]``.
        """
        check_is_fitted(self)
        if is_dataset(X):
            return self._map_dataset(decision_task, X)
        X = validate_data(self, X, reset=False, dtype=np.float32, order="C")
        _, scores = self._decision(X)
        return scores[:, 1] - scores[:, 0] if len(self.classes_) == 2 else scores

    def predict_proba(self, X):
        """Class probabilities, ``softmax(proba_scale_ * scores)`` (see the class Notes).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), or a dataset
            A dataset is computed block by block, as in :meth:`predict`.

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        check_is_fitted(self)
        if is_dataset(X):
            return self._map_dataset(proba_task, X)
        X = validate_data(self, X, reset=False, dtype=np.float32, order="C")
        return softmax_proba(self._decision(X)[1], getattr(self, "proba_scale_", 1.0))

    def _map_dataset(self, task, dataset) -> np.ndarray:
        """``task(self, dataset, b)`` of every block, concatenated: on the current client's
        workers when there is one, else here."""
        self._check_dataset_features(dataset)
        n = dataset.n_blocks
        client = _current_client()
        if client is None:
            parts = [task(self, dataset, b) for b in range(n)]
        else:
            from rpicluster.models.remote import hold

            remote = hold(client, self)
            parts = client.gather(client.map(task, [remote] * n, [dataset] * n, range(n),
                                             pure=False))
        return np.concatenate(parts)

    def predict(self, X):
        """Predict by the block models' vote (see ``vote``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), or a dataset
            A dataset (``rpicluster.open_dataset``) is predicted block by block: on the cluster
            of the current Dask client when there is one, else in this process.

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        if is_dataset(X):
            return self._predict_dataset(X)
        X = validate_data(self, X, reset=False, dtype=np.float32, order="C")
        if len(self.estimators_) == 1 and self.vote == "majority":
            return self.classes_[self.estimators_[0].predict_codes(X)]
        return self.classes_[self._decision(X)[0]]

    def _predict_dataset(self, dataset) -> np.ndarray:
        self._check_dataset_features(dataset)
        client = _current_client()
        if client is not None and _distributed_predict is not None:
            return _distributed_predict(self, dataset, client)
        parts = [self.predict(dataset.block(i)[0]) for i in range(dataset.n_blocks)]
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.classes_.dtype)

    def _check_dataset_features(self, dataset) -> None:
        if int(dataset.n_features) != self.n_features_in_:
            raise ValueError(f"the dataset {getattr(dataset, 'url', '')} has "
                             f"{dataset.n_features} features, but {type(self).__name__} is "
                             f"expecting {self.n_features_in_} features as input.")

    def score(self, X, y=None, sample_weight=None):
        """Mean accuracy on ``(X, y)``, or on a labelled dataset.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), or a dataset
            A dataset is scored block by block (on the current Dask client's cluster when there
            is one); ``y`` must then be None.
        y : array-like of shape (n_samples,)
        sample_weight : array-like of shape (n_samples,), default=None
            Arrays only.

        Returns
        -------
        float
        """
        if not is_dataset(X):
            return super().score(X, y, sample_weight=sample_weight)
        if y is not None or sample_weight is not None:
            raise ValueError("y and sample_weight must be None when X is a dataset (labels are "
                             "stored in it).")
        check_is_fitted(self)
        self._check_dataset_features(X)
        client = _current_client()
        if client is not None and _distributed_score is not None:
            return _distributed_score(self, X, client)
        correct = total = 0
        classes = np.asarray(X.classes)
        for i in range(X.n_blocks):
            Xi, yi = X.block(i)
            correct += int(np.count_nonzero(self.predict(Xi) == classes[yi]))
            total += int(yi.shape[0])
        return correct / total if total else float("nan")
