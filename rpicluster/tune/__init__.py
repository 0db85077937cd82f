"""Hyper-parameter search on the cluster: successive halving over blocks and epochs.

``rpicluster.tune(data, model="ksgd" | "mlp" | "sgd", space=None, budget=..., client=...,
seed=...)`` (:func:`rpicluster.tune.search.tune`); ``rpicluster tune DATA -o BEST_MODEL`` on the
command line.

``rpicluster.tune`` names both this package and the function it exports, so the package itself
is callable: once ``import rpicluster.tune.space`` (say) has bound the package to the name, a
call still runs the search.
"""

import sys
import types

from rpicluster.tune.search import TuneResult, tune

__all__ = ["TuneResult", "tune"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
