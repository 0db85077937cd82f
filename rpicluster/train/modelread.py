"""Read the skops archives rpicluster writes for its own estimators without importing skops.

``import skops.io`` imports every scikit-learn estimator module (its default trusted list is
built from ``sklearn.utils.all_estimators()``), scipy.stats, pandas and dask.array among them:
0.8 s of CPU before a model of a few arrays is read, most of a small ``rpicluster score``. The
Inc-kSGD and kSGD model files hold only the node kinds below (containers, JSON scalars, plain
numpy arrays and the two rpicluster estimator classes), so they are rebuilt here exactly as
skops builds them (``cls.__new__`` then ``__setstate__``; ``np.load(allow_pickle=False)``).
Any other node, class or protocol returns None and :func:`~rpicluster.train.modelfile.load_model`
hands the file to skops. Callers check sizes, types, digest and signature first.
"""

from __future__ import annotations

import importlib
import io
import json
import zipfile

import numpy as np

#: The skops schema protocol these rules were checked against (skops 0.16 writes 2).
PROTOCOL = 2
#: The estimator classes rebuilt here (the rpicluster ones; scikit-learn's go through skops).
CLASSES = frozenset({"rpicluster.models.ksgd.KSGDClassifier",
                     "rpicluster.models.incremental.IncrementalKSGDClassifier"})
#: Types a ``TypeNode`` may name (the key types of a dict).
KEY_TYPES = {"builtins.str": str, "builtins.int": int}
_CONTAINERS = {"DictNode": "builtins.dict", "ListNode": "builtins.list",
               "TupleNode": "builtins.tuple"}


class _Other(Exception):
    """The archive holds something only skops reads."""


def read_model(path) -> object | None:
    """The estimator in the skops archive ``path`` when it holds only what rpicluster writes for
    its own estimators; None when it holds anything else (skops must read it)."""
    with zipfile.ZipFile(path) as z:
        schema = json.loads(z.read("schema.json"))
        if not isinstance(schema, dict) or schema.get("protocol") != PROTOCOL:
            return None
        try:
            return _Reader(z).build(schema)
        except Exception:  # noqa: BLE001 - anything unexpected: skops reads it and says why
            return None


class _Reader:
    def __init__(self, archive: zipfile.ZipFile):
        self.archive = archive
        self.memo: dict[int, object] = {}  # skops' __id__: one object referenced twice

    def build(self, node):
        if not isinstance(node, dict):
            raise _Other
        loader, name = node.get("__loader__"), f"{node.get('__module__')}.{node.get('__class__')}"
        key = node.get("__id__")
        if key in self.memo:  # as skops: a repeated id is the object built first
            return self.memo[key]
        if loader == "CachedNode":
            raise _Other
        value = self._make(loader, name, node)
        if key:
            self.memo[key] = value
        return value

    def _make(self, loader, name: str, node: dict):
        content = node.get("content")
        if loader == "JsonNode":
            return json.loads(content)
        if _CONTAINERS.get(loader) != name:
            if loader == "ObjectNode" and name in CLASSES:
                module, _, cls_name = name.rpartition(".")
                cls = getattr(importlib.import_module(module), cls_name)
                instance = cls.__new__(cls)
                if content is not None:
                    instance.__setstate__(self.build(content))
                return instance
            if loader == "NdArrayNode" and name == "numpy.ndarray" and node.get("type") == "numpy":
                return np.load(io.BytesIO(self.archive.read(node["file"])), allow_pickle=False)
            if loader == "TypeNode" and name in KEY_TYPES:
                return KEY_TYPES[name]
            raise _Other
        if loader == "DictNode":
            key_types = self.build(node["key_types"])
            if len(key_types) != len(content):
                raise _Other
            return {k_type(k): self.build(v) for k_type, (k, v) in zip(key_types,
                                                                         content.items())}
        items = [self.build(v) for v in content]
        return items if loader == "ListNode" else tuple(items)
