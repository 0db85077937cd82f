"""Both estimators pass scikit-learn's estimator checks (no expected failures)."""

from __future__ import annotations

from sklearn.utils.estimator_checks import parametrize_with_checks

from rpicluster.models.incremental import IncrementalKSGDClassifier
from rpicluster.models.ksgd import KSGDClassifier


@parametrize_with_checks([
    KSGDClassifier(random_state=0),
    KSGDClassifier(n_clusters=3, solver="sklearn", random_state=0),
    IncrementalKSGDClassifier(random_state=0),
    IncrementalKSGDClassifier(block_rows=40, n_clusters=4, n_jobs=2, random_state=0),
])
def test_sklearn_compatible(estimator, check):
    check(estimator)
