"""rpicluster.models: the kSGD and Inc-kSGD estimators and their SGD kernel."""

#: Types a fitted estimator's skops file holds beyond skops' defaults (numpy arrays, builtins):
#: pass as ``skops.io.load(path, trusted=TRUSTED_TYPES)``.
TRUSTED_TYPES = [
    "rpicluster.models.ksgd.KSGDClassifier",
    "rpicluster.models.incremental.IncrementalKSGDClassifier",
    # Model averaging and federated rounds (rpicluster.train.averaging): the estimators and the
    # optimizer state an MLP keeps between partial_fit calls (a resumed run continues it).
    "sklearn.neural_network._multilayer_perceptron.MLPClassifier",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.linear_model._stochastic_gradient.SGDClassifier",
]
