"""``predict_proba`` of the kSGD estimators: a softmax of the decision scores at a temperature
fitted on training rows (:func:`fit_proba_scale`)."""

from __future__ import annotations

import numpy as np

#: Rows a fit scores to calibrate ``predict_proba`` (spread over at most
#: :data:`CALIBRATION_BLOCKS` blocks of an ensemble).
CALIBRATION_ROWS = 2048
CALIBRATION_BLOCKS = 4


def softmax_proba(scores, scale: float) -> np.ndarray:
    """Row-wise softmax of ``scale * scores``: the probabilities of ``predict_proba``.

    Monotone in each row's scores, so the most probable class is the predicted one.
    """
    z = np.asarray(scores, dtype=np.float64) * float(scale)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def fit_proba_scale(scores, codes) -> float:
    """The temperature ``s`` minimising the log loss of ``softmax(s * scores)`` on ``codes``.

    One parameter fitted by bounded Brent search over ``log s`` (the loss is convex in ``s``),
    deterministic; the Platt/temperature scaling of Guo et al. (2017) on decision scores.

    Parameters
    ----------
    scores : ndarray of shape (n, n_classes)
        Decision scores of labelled rows.
    codes : ndarray of shape (n,), int
        Their true class codes.

    Returns
    -------
    float
        In ``[exp(-8), exp(8)]``; 1.0 without rows.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    scores = np.asarray(scores, dtype=np.float64)
    codes = np.asarray(codes, dtype=np.intp)
    if scores.shape[0] == 0:
        return 1.0
    true = scores[np.arange(scores.shape[0]), codes]

    def log_loss(log_s):
        s = np.exp(log_s)
        return float(np.mean(logsumexp(s * scores, axis=1) - s * true))

    found = minimize_scalar(log_loss, bounds=(-8.0, 8.0), method="bounded",
                            options={"xatol": 1e-4})
    return float(np.exp(found.x))
