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
from rpicluster.models.ksgd import (KSGDClassifier, check_enough_rows, check_params, fit_block,
                                    resolve_random_state, unchanged_on_error)

# Rows per chunk when counting votes: bounds the (chunk, n_classes) count matrix.
_VOTE_CHUNK = 4096

# How a blocked dataset is fitted while a Dask client is current: ``fit(estimator, dataset,
# client)``. rpicluster.train.job registers itself here when imported, so the estimator never
# imports the layer above it.
_distributed_fit = None


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
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def majority_vote(block_codes, n_classes: int) -> np.ndarray:
    """Most frequent code per row; ties go to the lowest class code.

    Parameters
    ----------
    block_codes : ndarray of shape (n_blocks, n), int
        Each block model's predicted codes.
    n_classes : int

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
        chunk = block_codes[:, start:start + _VOTE_CHUNK]
        m = chunk.shape[1]
        flat = (np.arange(m) * n_classes)[None, :] + chunk
        counts = np.bincount(flat.ravel(), minlength=m * n_classes).reshape(m, n_classes)
        out[start:start + m] = counts.argmax(axis=1)  # argmax: first (lowest) code on ties
    return out


class IncrementalKSGDClassifier(ClassifierMixin, BaseEstimator):
    """The paper's Inc-kSGD: a kSGD per block of ``block_rows`` rows, majority vote.

    Parameters
    ----------
    block_rows : int, default=config.BLOCK_ROWS
        Rows per block in :meth:`fit` (the last block takes the remainder; a remainder smaller
        than ``n_clusters`` joins the previous block).
    n_clusters, max_iter, alpha, learning_rate, eta0, power_t, batch_size, average, solver, n_jobs
        As :class:`KSGDClassifier`, for every block.
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

    Notes
    -----
    ``predict`` returns, per row, the class most block models predict; a tie goes to the class
    that comes first in ``classes_``.
    """

    def __init__(self, block_rows=config.BLOCK_ROWS, *, n_clusters=10, max_iter=5, alpha=1e-4,
                 learning_rate="optimal", eta0=0.01, power_t=0.5, batch_size=256, average=True,
                 solver="minibatch", n_jobs=None, random_state=None):
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
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _check_params(self) -> dict:
        params = self.get_params()
        check_params(params)
        b = self.block_rows
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < self.n_clusters:
            raise ValueError(f"block_rows must be an int >= n_clusters={self.n_clusters}, "
                             f"got {b!r}.")
        return params

    def fit(self, X, y=None):
        """Fit one kSGD per block of ``block_rows`` rows.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), or a dataset
            A dataset (``rpicluster.open_dataset``: ``n_blocks``, ``block(i)``, ``classes``)
            is fitted block by block, one kSGD per stored block; ``y`` must then be None.
        y : array-like of shape (n_samples,)

        Returns
        -------
        self
        """
        params = self._check_params()
        rs = resolve_random_state(self.random_state)
        if is_dataset(X):
            if y is not None:
                raise ValueError("y must be None when X is a dataset (labels are stored in it).")
            return self._fit_dataset(X, params, rs)
        with unchanged_on_error(self):
            X, y = validate_data(self, X, y, dtype=np.float32, order="C")
            check_classification_targets(y)
            check_enough_rows(X, self.n_clusters)
        n = X.shape[0]
        classes, codes = np.unique(y, return_inverse=True)
        starts = list(range(0, n, self.block_rows))
        if len(starts) > 1 and n - starts[-1] < self.n_clusters:
            starts.pop()  # a remainder too small to cluster joins the previous block
        stops = starts[1:] + [n]
        self.n_iter_ = int(self.max_iter)
        self.estimators_ = [fit_block(X[a:z], codes[a:z], classes, params, random_state=rs,
                                      block=b)
                            for b, (a, z) in enumerate(zip(starts, stops))]
        self.classes_ = classes
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
        client = _current_client()
        if client is not None and _distributed_fit is None:
            import warnings

            warnings.warn("a Dask client is current but no distributed fit is registered "
                          "(import rpicluster.train.job): fitting the blocks in this process",
                          UserWarning, stacklevel=3)
        elif client is not None:
            _distributed_fit(self, dataset, client)
            return self
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
        return self

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

    def partial_fit(self, X, y, classes=None):
        """Fit one more block model on ``(X, y)`` and add it to the ensemble.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        classes : array-like of shape (n_classes,), default=None
            All classes; required on the first call, and if given later, the same.

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
            block = 0 if first else len(self.estimators_)
            est = fit_block(X, codes, known, params,
                            random_state=resolve_random_state(self.random_state), block=block)
        if first:
            self.classes_ = known
            self.n_iter_ = int(self.max_iter)
            self.estimators_ = [est]
        else:
            self.estimators_ = [*self.estimators_, est]
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

    def predict(self, X):
        """Predict by majority vote of the block models (ties: first class in ``classes_``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32, order="C")
        votes = np.stack([est.predict_codes(X) for est in self.estimators_])
        return self.classes_[majority_vote(votes, len(self.classes_))]
