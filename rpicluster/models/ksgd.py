"""kSGD: k-means splits a block of rows into cells, one linear SVM (hinge, L2, OvR) per cell.

The paper's "local SGD": a block's rows are clustered with k-means; each cluster trains a
one-vs-rest linear model over only the classes present in it; a row is predicted by the model of
its nearest centroid. The pieces are module-level pure functions so that the Dask training room
can run them as separate tasks and :meth:`KSGDClassifier.from_parts` can assemble the result:

* :func:`partition_block` -- k-means of one block (task seed ``task_seed(rs, block)``),
* :func:`fit_cluster` -- one cluster's model (task seed ``task_seed(rs, block, cluster)``),
* :func:`fit_block` -- both, in process, with the per-cluster fits on ``n_jobs`` threads.

Rules for awkward clusters (documented behaviour, relied on by tests):

* a centroid whose cluster receives no row of the block is dropped, so every remaining centroid
  routes to a model trained on at least one row;
* a cluster whose rows all share one class predicts that class (no SGD is run);
* any other cluster, however small, trains the SGD over the classes present in it.
"""

from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from rpicluster.models._sgd import LEARNING_RATES, sgd_ovr_fit
from rpicluster.models.proba import CALIBRATION_ROWS, fit_proba_scale, softmax_proba

#: ``solver`` values: our minibatch kernel, or one scikit-learn ``SGDClassifier`` per cluster.
SOLVERS = ("minibatch", "sklearn")
#: A cluster's SGD runs at least this many samples: small clusters get more than ``max_iter``
#: epochs. SGD's 'optimal' rate is still large after a few hundred samples, so five epochs of a
#: 25-row cluster leave its model unconverged (iris in 50-row blocks, k=2: 0.67-0.91 accuracy
#: with 5 epochs, 0.97 with 200); large clusters are unaffected.
MIN_SAMPLES_SEEN = 5_000

# k-means is fitted on at most this many rows per cluster (and at least _KMEANS_MIN_SAMPLE rows)
# and then every row is assigned to its nearest centroid: Lloyd's cost is linear in the rows, and
# a few dozen rows per centroid place it as well as the whole block does. k-means++ seeds from a
# smaller sample still (as MiniBatchKMeans' init_size): its k sequential passes dominate
# otherwise (measured 59 s at 100k x 2048, k=300).
_KMEANS_ROWS_PER_CLUSTER = 30
_KMEANS_MIN_SAMPLE = 5_000
_KMEANS_INIT_ROWS_PER_CLUSTER = 4
_KMEANS_MIN_INIT_SAMPLE = 1_000
_KMEANS_MAX_ITER = 10
# Rows per chunk when assigning rows to centroids: bounds the (chunk, k) distance matrix.
_ASSIGN_CHUNK = 8192


class LocalModel(NamedTuple):
    """One cluster's linear model: arrays only, cheap to ship between Dask workers.

    Attributes
    ----------
    classes : ndarray of shape (c,), int
        Codes (indices into the estimator's ``classes_``) of the classes present in the cluster.
    coef : ndarray of shape (c, d), float32
    intercept : ndarray of shape (c,), float32
    """

    classes: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray


def task_seed(random_state: int, *key: int) -> int:
    """Seed of one task, derived from integers only, identical in-process and on any worker.

    ``task_seed(rs, block)`` seeds block ``block``'s k-means, ``task_seed(rs, block, cluster)``
    the SGD of one of its clusters.

    Parameters
    ----------
    random_state : int
        The estimator's integer seed.
    *key : int
        Block index, then optionally cluster index.

    Returns
    -------
    int
        A 32-bit seed.
    """
    seq = np.random.SeedSequence(int(random_state), spawn_key=tuple(int(k) for k in key))
    return int(seq.generate_state(1)[0])


def resolve_random_state(random_state) -> int:
    """Turn an estimator's ``random_state`` (None, int or RandomState) into one integer.

    None draws fresh entropy, so unseeded fits differ; an int is used as is.
    """
    if random_state is None:
        return int(np.random.SeedSequence().generate_state(1)[0])
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(np.iinfo(np.int32).max))
    return int(random_state)


def nearest_center(X, centers, *, n_jobs: int = 1) -> np.ndarray:
    """Index of each row's nearest centre (squared Euclidean), computed in row chunks.

    Training and prediction both route rows with this function, so a training row always lands
    on the model trained with it. The result does not depend on ``n_jobs``.

    Parameters
    ----------
    X : ndarray of shape (n, d)
    centers : ndarray of shape (k, d)
    n_jobs : int
        Threads working on separate chunks.

    Returns
    -------
    ndarray of shape (n,), intp
    """
    X = np.asarray(X, dtype=np.float32)
    centers = np.asarray(centers, dtype=np.float32)
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the first term does not change the argmin
    half_sq = 0.5 * np.einsum("ij,ij->i", centers, centers)
    labels = np.empty(X.shape[0], dtype=np.intp)

    def chunk(start):
        d = X[start:start + _ASSIGN_CHUNK] @ centers.T
        np.subtract(half_sq, d, out=d)
        np.argmin(d, axis=1, out=labels[start:start + d.shape[0]])

    starts = range(0, X.shape[0], _ASSIGN_CHUNK)
    if n_jobs == 1 or len(starts) == 1:
        for start in starts:
            chunk(start)
    else:
        with ThreadPoolExecutor(n_jobs) as pool:
            list(pool.map(chunk, starts))
    return labels


def partition_block(X, n_clusters: int, *, seed: int, n_jobs: int = 1):
    """k-means of one block: centroids and each row's cluster.

    k-means (k-means++ seeded on ``max(1_000, 4 * n_clusters)`` rows, then 10 Lloyd
    iterations) is fitted on a seeded subsample of ``max(5_000, 30 * n_clusters)`` rows,
    then every row is assigned to its nearest centroid
    with :func:`nearest_center`. Centroids that receive no row are dropped and the labels
    renumbered, so the result may have fewer than ``n_clusters`` centres.

    Parameters
    ----------
    X : ndarray of shape (n, d), float32
        The block's rows; ``n >= n_clusters``.
    n_clusters : int
    seed : int
        For example ``task_seed(random_state, block)``.
    n_jobs : int
        Threads assigning rows to centroids (the result does not depend on it).

    Returns
    -------
    centers : ndarray of shape (k, d), float32, ``k <= n_clusters``
    labels : ndarray of shape (n,), intp, values in ``[0, k)``
    """
    from sklearn.cluster import KMeans, kmeans_plusplus

    X = np.ascontiguousarray(X, dtype=np.float32)
    n = X.shape[0]
    check_enough_rows(X, n_clusters)
    if n_clusters == 1:
        return X.mean(axis=0, keepdims=True), np.zeros(n, dtype=np.intp)
    rng = np.random.default_rng(seed)
    n_sample = min(n, max(_KMEANS_MIN_SAMPLE, _KMEANS_ROWS_PER_CLUSTER * n_clusters))
    sample = X if n_sample == n else X[np.sort(rng.choice(n, n_sample, replace=False))]
    n_seed = min(n_sample,
                 max(_KMEANS_MIN_INIT_SAMPLE, _KMEANS_INIT_ROWS_PER_CLUSTER * n_clusters))
    init_rows = np.sort(rng.choice(n_sample, n_seed, replace=False))
    with warnings.catch_warnings():
        # duplicate rows give fewer distinct centroids than asked: the empty ones are dropped
        warnings.simplefilter("ignore", ConvergenceWarning)
        # float64 rows: on float32 ones scikit-learn upcasts the rows again for each of the k
        # centroids it draws (2.2 CPU-s against 0.8 at 1,200 x 2,048, k=300). A near-tie can
        # seed another row than in float32 (the paper's block 0, k=300: held-out 0.9583
        # against 0.9596); seeds are sample rows, exact in float32
        init, _ = kmeans_plusplus(sample[init_rows].astype(np.float64), n_clusters,
                                  random_state=int(rng.integers(np.iinfo(np.int32).max)))
        # One OpenMP thread: k-means' threaded sums round differently with the thread count,
        # and a block must get the same centroids in-process and on any worker.
        with threadpool_limits(limits=1, user_api="openmp"):
            km = KMeans(n_clusters, init=init, n_init=1, max_iter=_KMEANS_MAX_ITER,
                        algorithm="lloyd").fit(sample)
    centers = km.cluster_centers_.astype(np.float32, copy=False)
    labels = nearest_center(X, centers, n_jobs=n_jobs)
    used = np.bincount(labels, minlength=centers.shape[0]) > 0
    if not used.all():
        renumber = np.cumsum(used) - 1
        centers, labels = centers[used], renumber[labels]
    return np.ascontiguousarray(centers), labels


def group_rows(labels, n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows grouped by cluster, once: ``order`` lists cluster 0's rows, then cluster 1's, ...

    Within a cluster rows keep their original order (a stable sort), which is the order the
    cluster's SGD sees them in, in-process and on a worker alike.

    Parameters
    ----------
    labels : ndarray of shape (n,), int
        Each row's cluster, in ``[0, n_clusters)``.
    n_clusters : int

    Returns
    -------
    order : ndarray of shape (n,), intp
    bounds : ndarray of shape (n_clusters + 1,), intp
        Cluster ``j``'s rows are ``order[bounds[j]:bounds[j + 1]]``.
    """
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    bounds = np.zeros(n_clusters + 1, dtype=np.intp)
    np.cumsum(np.bincount(labels, minlength=n_clusters), out=bounds[1:])
    return order, bounds


def permute_rows(X: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Reorder ``X``'s rows in place so that row ``i`` becomes old row ``order[i]``.

    Same result as ``X[order]`` without a second copy of ``X``: the permutation is followed
    cycle by cycle with one row of scratch (a block is the largest array a worker holds, and
    a copy of it is what would push a Pi over its memory). Costs about one row copy per row.

    Returns
    -------
    ndarray
        ``X`` itself.
    """
    order = np.asarray(order)
    n = order.shape[0]
    if n != X.shape[0]:
        raise ValueError(f"order has {n} entries for {X.shape[0]} rows.")
    nxt = order.tolist()
    done = (order == np.arange(n)).tolist()
    scratch = np.empty(X.shape[1:], dtype=X.dtype)
    for start in range(n):
        if done[start]:
            continue
        scratch[...] = X[start]
        j = start
        while True:
            k = nxt[j]
            done[j] = True
            if k == start:
                X[j] = scratch
                break
            X[j] = X[k]
            j = k
    return X


def _sgd_params(params: dict) -> dict:
    """The SGD settings of an estimator's ``get_params()`` dict (other keys are ignored)."""
    return {k: params[k] for k in ("max_iter", "alpha", "learning_rate", "eta0", "power_t",
                                   "batch_size", "average", "solver")}


def fit_cluster(X, y_codes, *, params: dict, seed: int, rows=None, n_jobs: int = 1,
                sample_weight=None) -> LocalModel:
    """Fit one cluster's one-vs-rest hinge model over the classes present in it.

    Parameters
    ----------
    X : ndarray of shape (n, d), float32
        The cluster's rows (or a whole block with ``rows`` selecting the cluster's rows).
    y_codes : ndarray of shape (n,), int
        Class codes, indices into the estimator's ``classes_``.
    params : dict
        Estimator parameters (``get_params()``); uses ``max_iter``, ``alpha``,
        ``learning_rate``, ``eta0``, ``power_t``, ``batch_size``, ``average`` and ``solver``.
    seed : int
        For example ``task_seed(random_state, block, cluster)``.
    rows : ndarray of int, optional
        Row indices of the cluster in ``X``; the rows are gathered batch by batch, not copied.
    n_jobs : int
        Threads of the 'minibatch' kernel, splitting the classes (see
        :func:`~rpicluster.models._sgd.sgd_ovr_fit`; limit BLAS to one thread around it).
    sample_weight : ndarray, optional
        Weights of ``X``'s rows (all of them, like ``y_codes``), scaling each row's SGD steps.

    Returns
    -------
    LocalModel
        A single-class cluster gets a zero model of its one class.
    """
    p = _sgd_params(params)
    y_codes = np.asarray(y_codes)
    y_rows = y_codes if rows is None else y_codes[rows]
    classes, local = np.unique(y_rows, return_inverse=True)
    d = X.shape[1]
    if classes.shape[0] == 1:
        return LocalModel(classes, np.zeros((1, d), np.float32), np.zeros(1, np.float32))
    p["max_iter"] = cluster_epochs(p["max_iter"], y_rows.shape[0])
    w = None
    if sample_weight is not None:
        w = np.asarray(sample_weight, dtype=np.float64)
        w = w if rows is None else w[rows]
    if p["solver"] == "sklearn":
        coef, intercept = _fit_sklearn(X if rows is None else X[rows], local, p, seed, w)
    else:
        coef, intercept = sgd_ovr_fit(
            X, local, classes.shape[0], epochs=p["max_iter"], alpha=p["alpha"],
            learning_rate=p["learning_rate"], eta0=p["eta0"], power_t=p["power_t"],
            batch_size=p["batch_size"], average=p["average"], seed=seed, rows=rows,
            n_jobs=n_jobs, sample_weight=w)
    return LocalModel(classes, coef, intercept)


def cluster_epochs(max_iter: int, n_rows: int) -> int:
    """Epochs of a cluster of ``n_rows`` rows: ``max_iter``, or enough to see
    :data:`MIN_SAMPLES_SEEN` samples."""
    return max(int(max_iter), math.ceil(MIN_SAMPLES_SEEN / max(n_rows, 1)))


def _fit_sklearn(X, y_local, p: dict, seed: int, sample_weight=None):
    """The paper's path: one scikit-learn ``SGDClassifier`` (hinge, L2), OvR over local codes.

    ``average=True`` averages over the second half of the samples seen, as our kernel does.
    """
    from sklearn.linear_model import SGDClassifier

    average = max(1, X.shape[0] * p["max_iter"] // 2) if p["average"] else False
    clf = SGDClassifier(loss="hinge", penalty="l2", alpha=p["alpha"], max_iter=p["max_iter"],
                        tol=None, learning_rate=p["learning_rate"], eta0=p["eta0"],
                        power_t=p["power_t"], average=average, random_state=seed)
    clf.fit(X, y_local, sample_weight=sample_weight)
    coef = clf.coef_.astype(np.float32)
    intercept = clf.intercept_.astype(np.float32)
    if coef.shape[0] == 1:  # binary: one model, predicted class 1 when positive
        return np.vstack([-coef, coef]), np.concatenate([-intercept, intercept])
    return coef, intercept


def effective_n_jobs(n_jobs) -> int:
    """Threads for ``n_jobs`` (None -> 1, negative -> cores + 1 + n_jobs, as joblib)."""
    if n_jobs is None:
        return 1
    if n_jobs < 0:
        return max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    return max(1, int(n_jobs))


def fit_block(X, y_codes, classes, params: dict, *, random_state: int, block: int = 0,
              sample_weight=None):
    """Fit one block's kSGD in process: :func:`partition_block`, then :func:`fit_cluster` each.

    Everything runs with BLAS limited to one thread, and ``params['n_jobs']`` threads of our
    own share the work, like the paper's OpenMP loop: row chunks when assigning centroids,
    clusters when fitting (numpy and scikit-learn's SGD release the GIL), and classes inside a
    cluster when there are fewer clusters than threads. One-thread BLAS is deliberate: the
    per-batch products are small, and BLAS threads competing with ours or with other processes
    were measured a hundred times slower.

    Parameters
    ----------
    X : ndarray of shape (n, d), float32
    y_codes : ndarray of shape (n,), int
        Codes into ``classes``.
    classes : ndarray
        The estimator's ``classes_`` (all classes, not only this block's).
    params : dict
        Estimator parameters (``get_params()``).
    random_state : int
    block : int
        Block index: seeds are ``task_seed(random_state, block[, cluster])``.
    sample_weight : ndarray of shape (n,), optional
        Row weights for the SGD steps (k-means places its cells unweighted).

    Returns
    -------
    KSGDClassifier
        Fitted, built with :meth:`KSGDClassifier.from_parts`. With more threads than clusters
        the kernel splits classes over threads, which changes results only by float rounding.
    """
    jobs = effective_n_jobs(params.get("n_jobs"))
    with threadpool_limits(limits=1, user_api="blas"):
        centers, labels = partition_block(X, params["n_clusters"], n_jobs=jobs,
                                          seed=task_seed(random_state, block))
        k = centers.shape[0]
        order, bounds = group_rows(labels, k)
        cluster_jobs = min(jobs, k)

        def one(j):
            return fit_cluster(X, y_codes, params=params, rows=order[bounds[j]:bounds[j + 1]],
                               seed=task_seed(random_state, block, j),
                               n_jobs=max(1, jobs // k), sample_weight=sample_weight)

        if cluster_jobs == 1:
            models = [one(j) for j in range(k)]
        else:
            with ThreadPoolExecutor(cluster_jobs) as pool:
                models = list(pool.map(one, range(k)))
    return KSGDClassifier.from_parts(classes, centers, models, params)


def check_enough_rows(X, n_clusters: int, where: str = "") -> None:
    """ValueError, in scikit-learn's KMeans wording, when X has fewer rows than clusters."""
    if X.shape[0] < n_clusters:
        raise ValueError(f"{where}n_samples={X.shape[0]} should be >= n_clusters={n_clusters}.")


@contextmanager
def unchanged_on_error(est):
    """Restore ``est``'s attributes if the block raises, so bad input changes no state.

    scikit-learn's ``validate_data`` records ``n_features_in_`` before later checks (rows,
    targets) can fail; this undoes that on failure.
    """
    saved = dict(est.__dict__)
    try:
        yield
    except BaseException:
        est.__dict__.clear()
        est.__dict__.update(saved)
        raise


def check_weights(sample_weight, X):
    """Validated float64 row weights, or None when they are None or all ones (same result)."""
    from sklearn.utils.validation import _check_sample_weight

    if sample_weight is None:
        return None
    w = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
    return None if np.all(w == 1.0) else w


def check_params(params: dict) -> None:
    """Validate the kSGD hyper-parameters; ValueError names the parameter and what is allowed."""
    def positive_int(name):
        v = params[name]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}.")

    for name in ("n_clusters", "max_iter", "batch_size"):
        positive_int(name)
    for name in ("alpha", "eta0"):
        v = params[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name} must be a float > 0, got {v!r}.")
    if params["learning_rate"] not in LEARNING_RATES:
        raise ValueError(f"learning_rate must be one of {list(LEARNING_RATES)}, "
                         f"got {params['learning_rate']!r}.")
    if not isinstance(params["average"], (bool, np.bool_)):
        raise ValueError(f"average must be a bool, got {params['average']!r}.")
    if params["solver"] not in SOLVERS:
        raise ValueError(f"solver must be one of {list(SOLVERS)}, got {params['solver']!r}.")
    n_jobs = params.get("n_jobs")
    if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, int)
                               or n_jobs == 0):
        raise ValueError(f"n_jobs must be None or a non-zero int, got {n_jobs!r}.")


class KSGDClassifier(ClassifierMixin, BaseEstimator):
    """The paper's kSGD: k-means cells, one linear SVM per cell over the classes it holds.

    Parameters
    ----------
    n_clusters : int, default=10
        k-means clusters (cells); ``fit`` needs at least this many rows.
    max_iter : int, default=5
        Epochs of SGD per cluster; a small cluster runs more, enough to see
        :data:`MIN_SAMPLES_SEEN` (5,000) samples.
    alpha : float, default=1e-4
        L2 regularisation strength.
    learning_rate : {'optimal', 'invscaling', 'constant'}, default='optimal'
        scikit-learn's schedules, counted in samples seen.
    eta0 : float, default=0.01
        Initial rate of 'invscaling' and 'constant'.
    power_t : float, default=0.5
        Exponent of 'invscaling'.
    batch_size : int, default=256
        Largest minibatch of the 'minibatch' solver; batches start at 16 rows and grow with
        the samples seen (see :mod:`rpicluster.models._sgd`). 1 gives per-sample SGD.
    average : bool, default=True
        Return the mean of the SGD iterates over the second half of the samples seen (both
        solvers). ``solver='sklearn', average=False`` is the paper's plain SGD.
    solver : {'minibatch', 'sklearn'}, default='minibatch'
        'minibatch': our vectorised kernel (:mod:`rpicluster.models._sgd`); 'sklearn': one
        ``SGDClassifier(loss='hinge', penalty='l2')`` per cluster, the paper's path.
    n_jobs : int, default=None
        Threads fitting clusters in parallel (None = 1, -1 = all cores).
    random_state : int, RandomState or None, default=None
        Seed; every task seed derives from it with :func:`task_seed`.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    n_iter_ : int
        ``max_iter`` (there is no early stopping; clusters under ``MIN_SAMPLES_SEEN / max_iter``
        rows run more epochs, see :func:`cluster_epochs`).
    cluster_centers_ : ndarray of shape (k, d), float32
        Centroids actually used (empty clusters dropped).
    local_classes_ : ndarray of shape (m,), int
        Class codes of every local model row, cluster after cluster.
    local_coef_ : ndarray of shape (m, d), float32
    local_intercept_ : ndarray of shape (m,), float32
    local_ptr_ : ndarray of shape (k + 1,), int
        Cluster ``j``'s rows of the three arrays above are ``local_ptr_[j]:local_ptr_[j + 1]``.
    proba_scale_ : float
        Temperature of :meth:`predict_proba`, fitted on training rows (1.0 for a model
        assembled with :meth:`from_parts`, e.g. an ensemble's block model).
    """

    def __init__(self, n_clusters=10, *, max_iter=5, alpha=1e-4, learning_rate="optimal",
                 eta0=0.01, power_t=0.5, batch_size=256, average=True, solver="minibatch",
                 n_jobs=None, random_state=None):
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

    def fit(self, X, y, sample_weight=None):
        """Fit k-means and one local model per cluster.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative row weights, scaling each row's SGD steps (as in ``SGDClassifier``);
            k-means places its cells unweighted.

        Returns
        -------
        self
        """
        params = self.get_params()
        check_params(params)
        with unchanged_on_error(self):
            X, y = validate_data(self, X, y, dtype=np.float32, order="C")
            check_classification_targets(y)
            check_enough_rows(X, self.n_clusters)
            sample_weight = check_weights(sample_weight, X)
        classes, codes = np.unique(y, return_inverse=True)
        fitted = fit_block(X, codes, classes, params,
                           random_state=resolve_random_state(self.random_state),
                           sample_weight=sample_weight)
        self._set_fitted(fitted)
        rows = np.linspace(0, X.shape[0] - 1, min(X.shape[0], CALIBRATION_ROWS)).astype(np.intp)
        self.proba_scale_ = fit_proba_scale(self.local_scores(X[rows]), codes[rows])
        return self

    @classmethod
    def from_parts(cls, classes, centers, local_models, params: dict):
        """Assemble a fitted estimator from a partition and its clusters' models.

        Parameters
        ----------
        classes : ndarray of shape (n_classes,)
            All classes; ``LocalModel.classes`` are codes into it.
        centers : ndarray of shape (k, d)
            From :func:`partition_block`.
        local_models : list of LocalModel
            ``local_models[j]`` from :func:`fit_cluster` on cluster ``j``'s rows.
        params : dict
            Estimator parameters; unknown keys (such as ``block_rows``) are ignored.

        Returns
        -------
        KSGDClassifier
        """
        est = cls(**{k: v for k, v in params.items() if k in cls._get_param_names()})
        centers = np.ascontiguousarray(centers, dtype=np.float32)
        if len(local_models) != centers.shape[0]:
            raise ValueError(f"got {len(local_models)} local models for "
                             f"{centers.shape[0]} cluster centers.")
        est.classes_ = np.asarray(classes)
        est.n_features_in_ = int(centers.shape[1])
        est.n_iter_ = int(est.max_iter)
        est.cluster_centers_ = centers
        est.local_classes_ = np.concatenate([np.asarray(m.classes, dtype=np.int64)
                                             for m in local_models])
        est.local_coef_ = np.ascontiguousarray(
            np.concatenate([m.coef for m in local_models]), dtype=np.float32)
        est.local_intercept_ = np.concatenate([m.intercept for m in local_models]).astype(
            np.float32)
        est.local_ptr_ = np.concatenate(
            [[0], np.cumsum([len(m.classes) for m in local_models])]).astype(np.int64)
        est.proba_scale_ = 1.0  # fit() calibrates; a block model of an ensemble is not
        return est

    def _set_fitted(self, other: KSGDClassifier) -> None:
        """Copy the learned attributes of ``other`` (an assembled estimator) onto self."""
        for name in ("classes_", "n_iter_", "cluster_centers_", "local_classes_", "local_coef_",
                     "local_intercept_", "local_ptr_"):
            setattr(self, name, getattr(other, name))

    def local_scores(self, X) -> np.ndarray:
        """Scores of validated float32 rows for every class, shape ``(n, n_classes)``.

        Each row is routed to its nearest centroid's local model (rows grouped by cluster, one
        matrix product per local model). A class the row's cell never saw scores one below the
        row's lowest local score (and below 0), so it never wins; a single-class cell scores its
        class 1.
        """
        labels = nearest_center(X, self.cluster_centers_)
        order, bounds = group_rows(labels, self.cluster_centers_.shape[0])
        # float64 products: float32 BLAS rounds differently with the number of rows, and a
        # row's score must not depend on which other rows are scored with it
        out = np.empty((X.shape[0], len(self.classes_)), dtype=np.float64)
        for j in range(self.cluster_centers_.shape[0]):
            rows = order[bounds[j]:bounds[j + 1]]
            if rows.shape[0] == 0:
                continue
            lo, hi = self.local_ptr_[j], self.local_ptr_[j + 1]
            if hi - lo == 1:
                scores = np.ones((rows.shape[0], 1))
            else:
                scores = X[rows].astype(np.float64) @ self.local_coef_[lo:hi].T.astype(np.float64)
                scores += self.local_intercept_[lo:hi]
            floor = np.minimum(scores.min(axis=1), 0.0) - 1.0
            block = np.repeat(floor[:, None], len(self.classes_), axis=1)
            block[:, self.local_classes_[lo:hi]] = scores
            out[rows] = block
        return out

    def predict_codes(self, X) -> np.ndarray:
        """Class codes (indices into ``classes_``) of validated float32 rows."""
        return self.local_scores(X).argmax(axis=1)

    def decision_function(self, X):
        """Scores of the local model of each row's cell.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes), or (n_samples,) with two classes
            With two classes, positive means ``classes_[1]`` (scikit-learn's convention).
            Classes absent from a row's cell score below every class present in it.
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32, order="C")
        scores = self.local_scores(X)
        return scores[:, 1] - scores[:, 0] if len(self.classes_) == 2 else scores

    def predict_proba(self, X):
        """Class probabilities: ``softmax(proba_scale_ * scores)`` of the row's cell's scores.

        ``scores`` are :meth:`decision_function`'s per-class scores (a class absent from the
        cell scores below every present one); ``proba_scale_`` is the temperature :meth:`fit`
        fitted by minimising the log loss on up to :data:`~rpicluster.models.proba.CALIBRATION_ROWS` training rows
        (:func:`~rpicluster.models.proba.fit_proba_scale`). The most probable class is the predicted one. Calibrated on
        training rows, the probabilities lean confident on new data; for a held-out
        calibration use ``sklearn.calibration.CalibratedClassifierCV``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32, order="C")
        return softmax_proba(self.local_scores(X), getattr(self, "proba_scale_", 1.0))

    def predict(self, X):
        """Predict class labels.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32, order="C")
        return self.classes_[self.predict_codes(X)]
