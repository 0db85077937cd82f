"""rpicluster: Inc-kSGD classifiers on a Dask cluster of Raspberry Pis and spare x86 boxes.

The public names are imported lazily so that ``rpicluster --help`` and the remote entry point on a
Pi start fast (importing scikit-learn and dask takes seconds on a Pi).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "KSGDClassifier": "rpicluster.models.ksgd",
    "IncrementalKSGDClassifier": "rpicluster.models.incremental",
    "open_dataset": "rpicluster.data.store",
    "ingest": "rpicluster.data.store",
    "load_inventory": "rpicluster.inventory",
    "up": "rpicluster.deploy.cluster",
    "down": "rpicluster.deploy.cluster",
    "status": "rpicluster.deploy.cluster",
    "connect": "rpicluster.deploy.cluster",
    "extract_features": "rpicluster.features.job",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rpicluster' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
