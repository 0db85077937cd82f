"""rpicluster.models: the kSGD and Inc-kSGD estimators and their SGD kernel."""

#: Types a fitted estimator's skops file holds beyond skops' defaults (numpy arrays, builtins):
#: pass as ``skops.io.load(path, trusted=TRUSTED_TYPES)``.
TRUSTED_TYPES = [
    "rpicluster.models.ksgd.KSGDClassifier",
    "rpicluster.models.incremental.IncrementalKSGDClassifier",
]
