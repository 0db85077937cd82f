"""Minibatch SGD kernels for the L2-regularised hinge loss, one-vs-rest, all classes at once.

Per-sample SGD (scikit-learn's ``SGDClassifier``) spends its time in vector-vector products and
runs at a few GFLOP/s; here every minibatch costs two float32 matrix products (scores and
gradient) over all classes together, which BLAS runs near the machine's matmul rate.

The objective of class ``c`` is scikit-learn's::

    alpha / 2 * ||w_c||^2 + mean_i max(0, 1 - y_ic * (x_i . w_c + b_c)),   y_ic in {-1, +1}

and the learning-rate schedules are scikit-learn's, indexed by the number of samples seen, so a
minibatch step of ``B`` rows stands for ``B`` consecutive per-sample steps: the step size is the
per-sample rate at the middle of the batch applied to the *sum* of the batch's gradients, and the
L2 shrinkage is the product of the ``B`` per-sample shrink factors. With ``batch_size=1``,
``average=False`` and ``shuffle=False`` this is exactly scikit-learn's per-sample SGD.

Three measured choices make minibatches as accurate as per-sample steps (which a fixed batch of
256 rows is not: a cluster of a few thousand rows then gets too few steps and loses 10-20
accuracy points on ImageNet-like features):

* **Growing batches.** The batch starts at ``min(16, batch_size)`` rows and grows in proportion
  to ``t0 + t`` (``t0`` the 'optimal' schedule's offset) up to ``batch_size``: early, while the
  rate is large, steps are many and small; later, as the 1/t rate decays, fewer larger batches
  do the same work at matmul speed (Smith et al., "Don't decay the learning rate, increase the
  batch size", 2018).
* **Averaging** (``average=True``): the weights returned are the mean of the iterates over the
  second half of the samples seen (Polyak-Ruppert averaging, as scikit-learn's ``average``),
  which removes the noise the large 1/t steps leave.
* **Active-row means.** A column's step is the learning rate times the *mean* of the hinge
  gradients of the batch rows active for it (rows inside its margin), not their sum. With the
  'optimal' schedule one per-sample step moves a row's score far past its margin (``eta *
  ||x||^2`` is tens on pixels/255), so in per-sample SGD the rows that follow a similar one are
  no longer active and barely move the weights; a summed batch step applies all of them at once
  and overshoots by the number of active rows. Measured on Fashion-MNIST (60k/10k, pixels/255,
  ``KSGDClassifier()`` defaults, seeds 0-2, loaded machine): summed steps 0.844-0.847, active-row
  means 0.851-0.855, ``solver='sklearn'`` 0.855, at the same cost as summed steps. With one row
  per batch (``batch_size=1``) nothing changes: the kernel is still scikit-learn's per-sample SGD.

Two shortcuts skip work that cannot change the weights (they change results only by float
rounding: a product over fewer rows, or scores read from a larger product):

* **Inactive rows.** A row outside every column's margin has a zero hinge gradient, so the
  gradient products of a batch run over its active rows only, and not at all when it has none.
* **Idle epochs.** Once an epoch ends with no row active (a cell of a few hundred rows, with
  the paper's 50 epochs at a constant rate 0.001, fits its rows to the margin after 20-35
  epochs), the weights ``wscale * V`` change only by the scalar ``wscale``. Every row's raw
  score ``x . V`` is then computed once, and the next epochs' batches read their scores from
  it with no matrix product until a row turns active again (measured on the paper's block 0,
  k=300: 28 % of the batches, and 44 % less CPU with the inactive-row products).
* **The dual form** (:func:`_fit_dual`). A cell of a few hundred rows seeing 50 epochs is
  trained on its Gram matrix: the weights are a combination of its rows, so a step updates one
  coefficient per active row and column and every row's scores by ``K[:, active] @ step``,
  with no product over the 2,048 features per batch (the paper's block 0 at k=300: about a
  third less CPU than the primal loop with both shortcuts above).

Everything here is a pure function of its inputs (and the integer ``seed``).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.linalg.blas import sgemm as _sgemm

#: Learning-rate schedules (scikit-learn's names and formulas, ``t`` = samples seen, from 1).
LEARNING_RATES = ("optimal", "invscaling", "constant")

# Below this weight scale the scale is folded back into the weights, as scikit-learn does, so
# that float32 never underflows.
_MIN_WSCALE = 1e-6
# While averaging, rescale sooner: the averaged sum P * V - Q cancels digits in proportion to
# how far wscale fell since the last rescale.
_AVERAGING_MIN_WSCALE = 1e-2
# Fewest classes per thread worth a thread of their own (below, the per-batch Python work of a
# thread outweighs its share of the matrix products).
_MIN_CLASSES_PER_THREAD = 128
# First batch size of the growing-batch schedule (capped by ``batch_size``).
_FIRST_BATCH = 16


def optimal_eta0(alpha: float) -> float:
    """Initial step of scikit-learn's ``'optimal'`` schedule for the hinge loss.

    Bottou's heuristic: the step that would move a weight of typical size ``alpha ** -0.25`` in
    one update. ``'optimal'`` then decays as ``1 / (alpha * (t0 + t))`` with
    ``t0 = 1 / (alpha * optimal_eta0(alpha))``.
    """
    return math.sqrt(1.0 / math.sqrt(alpha))


def learning_rate_at(t: float, *, learning_rate: str, eta0: float, alpha: float,
                     power_t: float) -> float:
    """Per-sample learning rate after ``t`` samples (``t >= 1``), scikit-learn's formulas.

    Parameters
    ----------
    t : float
        Number of samples seen, counted from 1.
    learning_rate : {'optimal', 'invscaling', 'constant'}
        Schedule name.
    eta0 : float
        Initial rate of ``'invscaling'`` and ``'constant'`` (ignored by ``'optimal'``).
    alpha : float
        L2 regularisation strength.
    power_t : float
        Exponent of ``'invscaling'``.

    Returns
    -------
    float
    """
    if learning_rate == "optimal":
        t0 = 1.0 / (alpha * optimal_eta0(alpha))
        return 1.0 / (alpha * (t0 + t - 1.0))
    if learning_rate == "invscaling":
        return eta0 / t**power_t
    if learning_rate == "constant":
        return eta0
    raise ValueError(f"learning_rate must be one of {LEARNING_RATES}, got {learning_rate!r}.")


def sgd_flops(n_samples: int, n_features: int, n_classes: int, epochs: int) -> int:
    """Floating-point operations of :func:`sgd_ovr_fit`'s two matrix products.

    Each epoch computes scores ``X_b @ W.T`` and the gradient ``G.T @ X_b``: ``2 n d c`` each.
    Two classes need one binary model (``c = 1``), as in scikit-learn.

    Parameters
    ----------
    n_samples, n_features, n_classes, epochs : int

    Returns
    -------
    int
    """
    c = 1 if n_classes == 2 else n_classes
    return 4 * n_samples * n_features * c * epochs


def batch_sizes(n_samples: int, epochs: int, *, batch_size: int, alpha: float) -> np.ndarray:
    """Sizes of the successive minibatches of the growing-batch schedule.

    Batch ``i`` starting after ``t`` samples has ``clip((t0 + t) / t0, 16, batch_size)`` rows
    (``t0 = 1 / (alpha * optimal_eta0(alpha))``), never crossing an epoch boundary.

    Parameters
    ----------
    n_samples, epochs, batch_size : int
    alpha : float

    Returns
    -------
    ndarray of int
    """
    t0 = 1.0 / (alpha * optimal_eta0(alpha))
    first = min(_FIRST_BATCH, batch_size)
    sizes = []
    t = 0
    for _ in range(epochs):
        done = 0
        while done < n_samples:
            m = min(n_samples - done, batch_size, max(first, int((t0 + t) / t0)))
            sizes.append(m)
            done += m
            t += m
    return np.asarray(sizes, dtype=np.intp)


def float32_rows(X):
    """``X`` as an aligned, C-contiguous float32 array: itself when it already is, else one copy.

    Rows that arrive in a Dask message (a cluster piece fitted on another worker) can start at
    any byte, and numpy copies an unaligned operand again in every product that uses it: a
    piece's fit took 20x the CPU (10-12 s against 0.4-0.6 s, 2026-12-06, loaded).
    """
    return np.require(X, np.float32, ("C", "A"))


def sgd_ovr_fit(X, y_codes, n_classes: int, *, epochs: int = 5, alpha: float = 1e-4,
                learning_rate: str = "optimal", eta0: float = 0.01, power_t: float = 0.5,
                batch_size: int = 256, average: bool = True, shuffle: bool = True,
                seed: int = 0, rows=None, n_jobs: int = 1, sample_weight=None):
    """Fit one-vs-rest linear SVMs (hinge loss, L2) with minibatch SGD.

    Parameters
    ----------
    X : ndarray of shape (n, d), float32, C-contiguous
        Training rows (other dtypes/layouts, and unaligned rows, are converted once).
    y_codes : ndarray of shape (n,) or (len(rows),), int
        Class codes in ``[0, n_classes)`` of ``X``'s rows (of ``X[rows]`` when ``rows`` is given).
    n_classes : int
        Number of classes (>= 2). With 2 classes one binary model is trained (scikit-learn's
        convention) and returned as the two opposite rows ``[-w, w]``.
    epochs : int
        Passes over the data.
    alpha : float
        L2 regularisation strength.
    learning_rate, eta0, power_t
        Schedule, see :func:`learning_rate_at`.
    batch_size : int
        Largest minibatch; batches grow up to it (:func:`batch_sizes`).
    average : bool
        Return the mean iterate of the second half of the samples seen.
    shuffle : bool
        Reshuffle the rows every epoch.
    seed : int
        Seed of the shuffling RNG; the result is a pure function of the inputs and ``seed``.
    rows : ndarray of int, optional
        Train on ``X[rows]`` only, gathering the rows batch by batch instead of copying them out.
    n_jobs : int
        Threads, each training a contiguous group of classes (one-vs-rest models are
        independent and every group sees the same batches). Run with BLAS limited to one
        thread (``threadpoolctl``): the per-batch products are small, and BLAS threads
        competing with these (or with other processes) can slow them a hundredfold.
    sample_weight : ndarray of shape like ``y_codes``, optional
        Multiplies each row's hinge gradient (as scikit-learn's ``sample_weight`` multiplies
        its step); rows of weight 0 do not count as active.

    Returns
    -------
    coef : ndarray of shape (n_classes, d), float32
    intercept : ndarray of shape (n_classes,), float32
    """
    X = float32_rows(X)
    y_codes = np.require(y_codes, np.intp, "A")
    rows = None if rows is None else np.asarray(rows, dtype=np.intp)
    n = y_codes.shape[0]
    weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float32)
    sizes = batch_sizes(n, epochs, batch_size=batch_size, alpha=alpha)
    # Primal or dual is decided once for the whole cell, not per column group: a group's own
    # column count would make the choice, and so the float rounding, depend on n_jobs.
    dual = _dual_pays(n, X.shape[1], 1 if n_classes == 2 else n_classes, int(sizes.sum()))
    opts = dict(sizes=sizes, learning_rate=learning_rate, eta0=eta0, alpha=alpha,
                power_t=power_t, average=average, shuffle=shuffle, seed=seed, weights=weights,
                dual=dual)
    if n_classes == 2:
        # one binary model: the positive class is 1, as in scikit-learn
        coef, intercept = _fit_columns(X, rows, np.where(y_codes == 1, 0, -1), 1, **opts)
        return np.vstack([-coef, coef]), np.concatenate([-intercept, intercept])
    groups = np.array_split(np.arange(n_classes),
                            max(1, min(n_jobs, n_classes // _MIN_CLASSES_PER_THREAD)))
    if len(groups) == 1:
        return _fit_columns(X, rows, y_codes, n_classes, **opts)

    def group(cols):
        # rows of other groups' classes are negatives for every column of this group
        y_cols = np.where((y_codes >= cols[0]) & (y_codes <= cols[-1]), y_codes - cols[0], -1)
        return _fit_columns(X, rows, y_cols, len(cols), **opts)

    with ThreadPoolExecutor(len(groups)) as pool:
        parts = list(pool.map(group, groups))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _fit_columns(X, rows, y_cols, c: int, *, sizes, learning_rate, eta0, alpha, power_t,
                 average, shuffle, seed, weights=None, dual=False):
    """The minibatch loop for ``c`` one-vs-rest columns (in the dual form when ``dual``).

    ``y_cols[i]`` is the column whose positive class row ``i`` belongs to, or -1 when the row
    is a negative for every column.
    """
    n, d = y_cols.shape[0], X.shape[1]
    total = int(sizes.sum())
    if dual:
        return _fit_dual(X, rows, y_cols, c, sizes=sizes, learning_rate=learning_rate,
                         eta0=eta0, alpha=alpha, power_t=power_t, average=average,
                         shuffle=shuffle, seed=seed, weights=weights)
    average_from = total // 2 if average else total  # samples seen before averaging starts
    all_positive = bool(np.all(y_cols >= 0))
    # The weights are wscale * V, so the L2 shrinkage is one scalar product per batch. The
    # running sum of the averaged weights is A + P * V - Q with P the sum of their wscales and
    # Q the sum of P_before * dV (summation by parts), so averaging costs no pass over W; A
    # banks that sum whenever V is rescaled.
    V = np.zeros((c, d), dtype=np.float32)
    b = np.zeros(c, dtype=np.float32)
    wscale = 1.0
    Q = np.zeros((c, d), dtype=np.float32) if average else None
    A = None
    P = 0.0
    b_sum = np.zeros(c, dtype=np.float64)
    n_averaged = 0
    bmax = int(sizes.max())
    Xb = np.empty((bmax, d), dtype=np.float32)   # buffers reused by every batch
    S = np.empty(bmax * c, dtype=np.float32)
    colsum = np.empty(c, dtype=np.float32)
    scale = np.empty(c, dtype=np.float32)
    rng = np.random.default_rng(seed)

    rate = _batch_rate(learning_rate, eta0, alpha, power_t)

    # Raw scores X[rows] @ V.T of every row, kept while V does not change: once a cell's rows
    # all sit outside their margins (a small cell does after a few dozen of its 50 epochs),
    # an epoch's batches change only wscale, and the scores of a whole epoch are read from R
    # with no matrix product (see "Idle epochs" in the module docstring).
    R = None
    changed = True  # V changed during the previous epoch (or nothing was trained yet)
    at = np.arange(n) * c
    t = 0
    epoch_ends = np.flatnonzero(np.cumsum(sizes) % n == 0) + 1
    for epoch_sizes in np.split(sizes, epoch_ends[:-1]):
        # Each epoch's order is gathered once (rows, labels, weights and the flat position of
        # every row's positive score), so that a batch is slices of it: the batches of a small
        # cluster are small, and each numpy call costs about a microsecond whatever its size.
        perm = rng.permutation(n) if shuffle else np.arange(n)
        idx_e = perm if rows is None else rows[perm]
        y_e = y_cols[perm]
        flat_e = at + y_e  # row i's positive score is s.flat[i * c + y]
        positive_e = None if all_positive else y_e >= 0
        w_e = None if weights is None else weights[perm][:, None]
        epoch_sizes = epoch_sizes.tolist()
        first = 0
        if not changed:
            if R is None:
                R = _raw_scores(X, rows, n, V, Xb)
            first, wscale, P, n_idle = _idle_batches(
                R[perm], epoch_sizes, b, flat_e, positive_e, w_e, t=t, wscale=wscale, P=P,
                rate=rate, alpha=alpha, average_from=average_from)
            if n_idle:
                b_sum += n_idle * b.astype(np.float64)
                n_averaged += n_idle
            t += sum(epoch_sizes[:first])
        changed = False
        start = t % n
        for m in epoch_sizes[first:]:
            end = start + m
            xb, s = Xb[:m], S[:m * c].reshape(m, c)
            np.take(X, idx_e[start:end], axis=0, out=xb)
            np.matmul(xb, V.T, out=s)
            _hinge_derivative(s, wscale, b, flat_e, positive_e, w_e, start, end, c)
            eta = rate(t, m)
            # shrink first, then step, as scikit-learn orders a per-sample update
            wscale *= max(0.0, 1.0 - eta * alpha) ** m
            averaging = t + m > average_from
            if wscale < (_AVERAGING_MIN_WSCALE if averaging else _MIN_WSCALE):
                if P:  # bank the averaged sum so far: P * V - Q loses precision as V grows
                    A = P * V - Q if A is None else A + (P * V - Q)
                    P = 0.0
                    Q[:] = 0.0
                V *= wscale
                wscale = 1.0
                changed, R = True, None
            # only the rows active for some column take part in the step: once most rows sit
            # outside their margins, the gradient product shrinks with them (or is skipped)
            nz = s != 0
            act_rows = np.flatnonzero(np.logical_or.reduce(nz, axis=1))
            if act_rows.shape[0]:
                changed, R = True, None
                # each column takes the mean of its active rows' hinge gradients, not their
                # sum (see the module docstring: "Active-row means"); a column with at most
                # one scales by 1
                active = np.add.reduce(nz, axis=0)
                np.maximum(active, 1, out=active)
                np.divide(1.0, active, out=scale)
                if act_rows.shape[0] < m:
                    s, xb = s[act_rows], xb[act_rows]
                s *= scale
                np.add.reduce(s, axis=0, out=colsum)
                colsum *= eta
                b -= colsum
                # V += (-eta / wscale) * s.T @ xb, in place (V.T is Fortran-ordered for BLAS)
                _sgemm(-eta / wscale, xb.T, s.T, beta=1.0, c=V.T, trans_b=1, overwrite_c=1)
                if averaging and P:
                    _sgemm(-eta / wscale * P, xb.T, s.T, beta=1.0, c=Q.T, trans_b=1,
                           overwrite_c=1)
            if averaging:
                P += wscale
                b_sum += b
                n_averaged += 1
            t += m
            start = end
    if average:
        w_sum = P * V - Q if A is None else A + (P * V - Q)
        return (w_sum / n_averaged).astype(np.float32), (b_sum / n_averaged).astype(np.float32)
    return V * np.float32(wscale), b


def _batch_rate(learning_rate, eta0, alpha, power_t):
    """``rate(t, m)``: the per-sample rate at the middle of a batch of ``m`` rows after ``t``
    samples (a batch stands for ``m`` per-sample steps)."""
    def rate(t, m):
        return learning_rate_at(t + 1 + (m - 1) / 2.0, learning_rate=learning_rate, eta0=eta0,
                                alpha=alpha, power_t=power_t)
    return rate


def _hinge_derivative(s, wscale, b, flat, positive, w, start: int, end: int, c: int) -> None:
    """Turn a batch's raw scores ``s`` (rows ``start:end`` of the epoch's order, C-contiguous)
    into the hinge derivatives of its scores ``wscale * s + b``, in place: a negative is active
    above -1 (derivative +1), a positive below 1 (derivative -1); times the rows' weights."""
    s *= wscale
    s += b
    fi = flat[start:end] if positive is None else flat[start:end][positive[start:end]]
    fi = fi - start * c
    sf = s.reshape(-1)
    true_s = sf.take(fi)
    np.greater(s, -1.0, out=s)
    sf.put(fi, np.where(true_s < 1.0, -1.0, 0.0))
    if w is not None:
        s *= w[start:end]


# Rows per product when computing every row's raw scores (bounds the gathered rows' memory).
_RAW_CHUNK = 1024


def _raw_scores(X, rows, n: int, V, buf) -> np.ndarray:
    """``X[rows] @ V.T`` (``X[:n]`` without ``rows``), in chunks gathered into ``buf``'s kind of
    buffer, so the same rows give the same scores whether they come as a slice or as ``rows``."""
    R = np.empty((n, V.shape[0]), dtype=np.float32)
    chunk = np.empty((min(n, _RAW_CHUNK), X.shape[1]), dtype=np.float32)
    for a in range(0, n, _RAW_CHUNK):
        z = min(n, a + _RAW_CHUNK)
        idx = np.arange(a, z) if rows is None else rows[a:z]
        np.take(X, idx, axis=0, out=chunk[:z - a])
        np.matmul(chunk[:z - a], V.T, out=R[a:z])
    return R


def _idle_batches(raw, sizes, b, flat, positive, w, *, t, wscale, P, rate, alpha, average_from):
    """Run an epoch's leading batches in which no row is active, from the raw scores ``raw``
    (``X[idx] @ V.T`` in the epoch's order): only wscale shrinks and the averages advance.

    Returns ``(first, wscale, P, n_idle)``: the first batch to run in full (one with an
    active row, or one that must rescale V), and the state after the idle batches, of which
    ``n_idle`` were averaged (each adds the unchanged ``b`` to the bias sum).
    """
    before, after, averaged = [], [], []
    for m in sizes:
        new = wscale * max(0.0, 1.0 - rate(t, m) * alpha) ** m
        averaging = t + m > average_from
        if new < (_AVERAGING_MIN_WSCALE if averaging else _MIN_WSCALE):
            break  # the full path rescales V
        before.append(wscale)
        after.append(new)
        averaged.append(averaging)
        wscale, t = new, t + m
    k = len(before)
    if k == 0:
        return 0, wscale, P, 0
    ends = np.cumsum(sizes[:k])
    n_rows = int(ends[-1])
    # the scores each row gets in its batch, computed as the full path computes them
    s = raw[:n_rows] * np.repeat(np.asarray(before, dtype=np.float32), sizes[:k])[:, None]
    s += b
    act = s > -1.0
    fi = flat[:n_rows] if positive is None else flat[:n_rows][positive[:n_rows]]
    act.flat[fi] = s.flat[fi] < 1.0
    if w is not None:
        act &= w[:n_rows] != 0
    rows_active = np.flatnonzero(np.logical_or.reduce(act, axis=1))
    first = k if rows_active.shape[0] == 0 else int(np.searchsorted(ends, rows_active[0],
                                                                     side="right"))
    n_idle = 0
    for i in range(first):
        if averaged[i]:
            P += after[i]
            n_idle += 1
    return first, (after[first - 1] if first else before[0]), P, n_idle


# Most rows of a cluster trained in the dual form (its Gram matrix in float64: 32 MiB).
_DUAL_MAX_ROWS = 2048


def _dual_pays(n: int, d: int, c: int, samples: int) -> bool:
    """Whether ``n`` rows of ``d`` features and ``c`` columns seeing ``samples`` samples train
    faster in the dual form (:func:`_fit_dual`): its Gram matrix costs ``n^2 d`` once and a
    sample's step ``n c`` (in float64), against the primal loop's products, about ``2 c d`` per
    sample in float32 (the paper's k=300 cells: a few hundred rows of 2,048 features, about 12
    classes, 50 epochs)."""
    return n <= min(d, _DUAL_MAX_ROWS) and n * n < 2 * c * samples


def _fit_dual(X, rows, y_cols, c: int, *, sizes, learning_rate, eta0, alpha, power_t,
              average, shuffle, seed, weights=None):
    """:func:`_fit_columns`' minibatch loop in the dual form, for a cluster of few rows.

    Every step adds rows of the cluster to the weights, so ``V = A.T @ Xc`` (``Xc`` the
    cluster's rows) with one coefficient per row and column, and a row's raw scores are
    ``R = K @ A`` with ``K = Xc @ Xc.T``: a step updates ``A`` at its active rows and ``R`` by
    ``K[:, active] @ step``, with no product over the features. The same steps as the primal
    loop, in another order of float operations (float64 here); see :func:`_dual_pays`.
    """
    n = y_cols.shape[0]
    Xc = np.ascontiguousarray(X[:n] if rows is None else X[rows], dtype=np.float32)
    K = np.matmul(Xc, Xc.T).astype(np.float64)
    total = int(sizes.sum())
    average_from = total // 2 if average else total
    all_positive = bool(np.all(y_cols >= 0))
    A = np.zeros((n, c))            # V = A.T @ Xc (wscale apart), as in the primal loop
    R = np.zeros((n, c))            # Xc @ V.T = K @ A
    B = np.zeros((n, c)) if average else None  # Q = B.T @ Xc (summation by parts)
    bank = None                     # the averaged sum banked at rescales, as coefficients
    b = np.zeros(c)
    wscale, P = 1.0, 0.0
    b_sum = np.zeros(c)
    n_averaged = 0
    rng = np.random.default_rng(seed)
    rate = _batch_rate(learning_rate, eta0, alpha, power_t)

    at = np.arange(n) * c
    t = 0
    idle = False  # the last batch had no active row: scan ahead for the next one that has
    epoch_ends = np.flatnonzero(np.cumsum(sizes) % n == 0) + 1
    for epoch_sizes in np.split(sizes, epoch_ends[:-1]):
        perm = rng.permutation(n) if shuffle else np.arange(n)
        y_e = y_cols[perm]
        flat_e = at + y_e
        positive_e = None if all_positive else y_e >= 0
        w_e = None if weights is None else weights[perm][:, None]
        epoch_sizes = epoch_sizes.tolist()
        start = i = 0
        while i < len(epoch_sizes):
            if idle:  # R holds every row's scores: idle batches need no step (_idle_batches)
                first, wscale, P, n_idle = _idle_batches(
                    R[perm[start:]], epoch_sizes[i:], b, flat_e[start:] - start * c,
                    None if positive_e is None else positive_e[start:],
                    None if w_e is None else w_e[start:], t=t, wscale=wscale, P=P, rate=rate,
                    alpha=alpha, average_from=average_from)
                b_sum += n_idle * b
                n_averaged += n_idle
                skipped = sum(epoch_sizes[i:i + first])
                t, start, i = t + skipped, start + skipped, i + first
                idle = False
                if i == len(epoch_sizes):
                    idle = True
                    break
            m = epoch_sizes[i]
            end = start + m
            idx = perm[start:end]
            s = R.take(idx, axis=0)
            _hinge_derivative(s, wscale, b, flat_e, positive_e, w_e, start, end, c)
            eta = rate(t, m)
            wscale *= max(0.0, 1.0 - eta * alpha) ** m
            averaging = t + m > average_from
            if wscale < (_AVERAGING_MIN_WSCALE if averaging else _MIN_WSCALE):
                if P:
                    bank = P * A - B if bank is None else bank + (P * A - B)
                    P = 0.0
                    B[:] = 0.0
                A *= wscale
                R *= wscale
                wscale = 1.0
            nz = s != 0
            act = np.flatnonzero(np.logical_or.reduce(nz, axis=1))
            idle = act.shape[0] == 0
            if not idle:
                active = np.add.reduce(nz, axis=0)
                np.maximum(active, 1, out=active)
                s = s[act] if act.shape[0] < m else s
                s /= active
                b -= eta * np.add.reduce(s, axis=0)
                step = (-eta / wscale) * s
                ia = idx[act]
                A[ia] += step  # a batch's rows are distinct
                R += K.take(ia, axis=0).T @ step  # K is symmetric: its rows are its columns
                if averaging and P:
                    B[ia] += P * step
            if averaging:
                P += wscale
                b_sum += b
                n_averaged += 1
            t, start, i = t + m, end, i + 1
    if average:
        coef = P * A - B if bank is None else bank + (P * A - B)
        coef /= n_averaged
        intercept = b_sum / n_averaged
    else:
        coef, intercept = A * wscale, b
    return np.matmul(coef.T.astype(np.float32), Xc), intercept.astype(np.float32)
