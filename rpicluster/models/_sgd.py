"""Minibatch SGD kernels for the L2-regularised hinge loss, one-vs-rest, all classes at once.

Per-sample SGD (scikit-learn's ``SGDClassifier``) spends its time in vector-vector products and
runs at a few GFLOP/s; here every minibatch costs two float32 matrix products (scores and
gradient) over all classes together, which BLAS runs near the machine's matmul rate.

The objective of class ``c`` is scikit-learn's::

    alpha / 2 * ||w_c||^2 + mean_i max(0, 1 - y_ic * (x_i . w_c + b_c)),   y_ic in {-1, +1}

and the learning-rate schedules are scikit-learn's, indexed by the number of samples seen, so a
minibatch step of ``B`` rows stands for ``B`` consecutive per-sample steps: the step size is the
per-sample rate at the middle of the batch applied to the *sum* of the batch's gradients, and the
L2 shrinkage is the product of the ``B`` per-sample shrink factors.

Everything here is a pure function of its inputs (and the integer ``seed``).
"""

from __future__ import annotations

import math

import numpy as np

#: Learning-rate schedules (scikit-learn's names and formulas, ``t`` = samples seen, from 1).
LEARNING_RATES = ("optimal", "invscaling", "constant")

# Below this weight scale the scale is folded back into the weights, as scikit-learn does, so
# that float32 never underflows.
_MIN_WSCALE = 1e-6


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


def sgd_ovr_fit(X, y_codes, n_classes: int, *, epochs: int = 5, alpha: float = 1e-4,
                learning_rate: str = "optimal", eta0: float = 0.01, power_t: float = 0.5,
                batch_size: int = 256, seed: int = 0, rows=None):
    """Fit one-vs-rest linear SVMs (hinge loss, L2) with minibatch SGD.

    Parameters
    ----------
    X : ndarray of shape (n, d), float32, C-contiguous
        Training rows (other dtypes/layouts are converted once).
    y_codes : ndarray of shape (n,) or (len(rows),), int
        Class codes in ``[0, n_classes)`` of ``X``'s rows (of ``X[rows]`` when ``rows`` is given).
    n_classes : int
        Number of classes (>= 2). With 2 classes one binary model is trained (scikit-learn's
        convention) and returned as the two opposite rows ``[-w, w]``.
    epochs : int
        Passes over the data; rows are reshuffled every epoch.
    alpha : float
        L2 regularisation strength.
    learning_rate, eta0, power_t
        Schedule, see :func:`learning_rate_at`.
    batch_size : int
        Rows per minibatch.
    seed : int
        Seed of the shuffling RNG; the result is a pure function of the inputs and ``seed``.
    rows : ndarray of int, optional
        Train on ``X[rows]`` only, gathering the rows batch by batch instead of copying them out.

    Returns
    -------
    coef : ndarray of shape (n_classes, d), float32
    intercept : ndarray of shape (n_classes,), float32
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    y_codes = np.asarray(y_codes)
    rows = None if rows is None else np.asarray(rows, dtype=np.intp)
    n, d = y_codes.shape[0], X.shape[1]
    binary = n_classes == 2
    c = 1 if binary else n_classes

    V = np.zeros((c, d), dtype=np.float32)     # weights are wscale * V (lazy L2 shrinkage)
    b = np.zeros(c, dtype=np.float32)
    wscale = 1.0
    bs = max(1, min(batch_size, n))
    Xb = np.empty((bs, d), dtype=np.float32)   # buffers reused by every batch
    S = np.empty((bs, c), dtype=np.float32)
    GW = np.empty((c, d), dtype=np.float32)
    arange = np.arange(bs)
    rng = np.random.default_rng(seed)
    t = 1.0
    for _ in range(epochs):
        perm = rng.permutation(n)
        for start in range(0, n, bs):
            pb = perm[start:start + bs]
            idx = pb if rows is None else rows[pb]
            m = idx.shape[0]
            xb, s, ar = Xb[:m], S[:m], arange[:m]
            np.take(X, idx, axis=0, out=xb)
            np.matmul(xb, V.T, out=s)
            s *= wscale
            s += b
            yb = y_codes[pb]
            if binary:
                # hinge derivative wrt the score: -y where y * s < 1, else 0
                ysign = np.where(yb == 1, 1.0, -1.0).astype(np.float32)
                g = np.where(ysign * s[:, 0] < 1.0, -ysign, 0.0).astype(np.float32)
                s[:, 0] = g
            else:
                true_s = s[ar, yb]
                # negatives are active above -1 (derivative +1), the true class below 1 (-1)
                np.greater(s, -1.0, out=s)
                s[ar, yb] = np.where(true_s < 1.0, -1.0, 0.0)
            eta = learning_rate_at(t + (m - 1) / 2.0, learning_rate=learning_rate, eta0=eta0,
                                   alpha=alpha, power_t=power_t)
            b -= eta * s.sum(axis=0)
            s *= -eta / wscale
            np.matmul(s.T, xb, out=GW)
            V += GW
            wscale *= max(0.0, 1.0 - eta * alpha) ** m
            t += m
            if wscale < _MIN_WSCALE:
                V *= wscale
                wscale = 1.0
    coef = V * np.float32(wscale)
    if binary:
        return np.vstack([-coef, coef]), np.concatenate([-b, b])
    return coef, b
