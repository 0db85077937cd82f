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
    "open_dataset": "rpicluster.data.reader",
    "ingest": "rpicluster.data.writer",
    "load_model": "rpicluster.train.modelfile",
    "save_model": "rpicluster.train.modelfile",
    "load_inventory": "rpicluster.inventory",
    "up": "rpicluster.deploy.lifecycle",
    "down": "rpicluster.deploy.lifecycle",
    "logs": "rpicluster.deploy.lifecycle",
    "status": "rpicluster.deploy.lifecycle",
    "connect": "rpicluster.deploy.resolve",
    "client": "rpicluster.deploy.resolve",
    "find_cluster": "rpicluster.deploy.resolve",
    "extract_features": "rpicluster.features.job",
    "export_onnx": "rpicluster.export.api",
    "tune": "rpicluster.tune.search",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


# The estimators fit a blocked dataset on the current Dask client through the job this package
# registers (models sit below train and never import it).
_WITH = {"IncrementalKSGDClassifier": "rpicluster.train.job"}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rpicluster' has no attribute {name!r}")
    if name in _WITH:
        importlib.import_module(_WITH[name])
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
