"""Both estimators pass scikit-learn's estimator checks.

The only expected failure is the sample-weight equivalence check, which scikit-learn's own
``SGDClassifier`` also fails: a weight of 2 is not the same SGD path as a repeated row (batches,
shuffles and averaging see a different number of rows), and k-means places its cells unweighted.
"""

from __future__ import annotations

from sklearn.utils.estimator_checks import parametrize_with_checks

from rpicluster.models.incremental import IncrementalKSGDClassifier
from rpicluster.models.ksgd import KSGDClassifier

_SGD_WEIGHTS = "a stochastic path: weights are not repeated rows (as SGDClassifier)"


def _expected_failures(estimator):
    return {"check_sample_weight_equivalence_on_dense_data": _SGD_WEIGHTS}


@parametrize_with_checks([
    KSGDClassifier(random_state=0),
    KSGDClassifier(n_clusters=3, solver="sklearn", random_state=0),
    IncrementalKSGDClassifier(random_state=0),
    IncrementalKSGDClassifier(block_rows=40, n_clusters=4, n_jobs=2, random_state=0),
    IncrementalKSGDClassifier(block_rows=40, n_clusters=2, vote="soft", random_state=0),
], expected_failed_checks=_expected_failures)
def test_sklearn_compatible(estimator, check):
    check(estimator)
