"""The skops archives rpicluster writes for its own estimators, read and written without
importing skops.

``import skops.io`` imports every scikit-learn estimator module (its default trusted list is
built from ``sklearn.utils.all_estimators()``), scipy.stats, pandas and dask.array among them:
0.8 s of CPU before a model of a few arrays is read or written, most of a small ``rpicluster
score`` and a fifth of a small ``train``. The Inc-kSGD and kSGD model files hold only the node
kinds below (containers, JSON scalars, plain numpy arrays and the two rpicluster estimator
classes), so they are built here exactly as skops builds them: read with ``cls.__new__`` then
``__setstate__`` and ``np.load(allow_pickle=False)``; written as skops' ``dumps`` writes them
(the same schema, ``__id__`` and member names, so
:func:`~rpicluster.train.modelfile.deterministic_archive` makes the same bytes of both). Any
other node, class, value or protocol returns None and
:func:`~rpicluster.train.modelfile.load_model` / ``save_model`` hand the model to skops.
Callers check sizes, types, digest and signature before reading.
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
    """The archive or the model holds something only skops reads or writes."""


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


def dumps(model) -> bytes | None:
    """The skops archive of ``model`` (as ``skops.io.dumps`` writes it, its schema unindented:
    :func:`~rpicluster.train.modelfile.deterministic_archive` dumps it again as skops does) when
    it is an rpicluster estimator made only of what :func:`read_model` reads back; None
    otherwise (skops must write it)."""
    if f"{type(model).__module__}.{type(model).__qualname__}" not in CLASSES:
        return None
    writer = _Writer()
    try:
        state = writer.state(model)
    except _Other:
        return None
    import skops  # its version only (``skops.io`` is the slow import)

    state["protocol"] = PROTOCOL
    state["_skops_version"] = skops.__version__
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
        for name, payload in writer.files.items():
            z.writestr(name, payload)
        z.writestr("schema.json", json.dumps(state))
    return out.getvalue()


class _Writer:
    def __init__(self):
        self.alive: dict[int, object] = {}  # as skops' memo: no id is reused during a save
        self.files: dict[str, bytes] = {}

    def state(self, obj) -> dict:
        self.alive.setdefault(id(obj), obj)
        state = self._state(obj)
        state["__id__"] = id(obj)
        return state

    def _state(self, obj) -> dict:
        kind = type(obj)
        if kind in (str, int, float, bool, type(None)):
            return {"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode",
                    "content": json.dumps(obj), "is_json": True}
        if kind is dict:
            if any(type(k) is not str for k in obj) or any(isinstance(v, property)
                                                           for v in obj.values()):
                raise _Other
            key_types = [str] * len(obj)
            self.alive[id(key_types)] = key_types
            return {"__class__": "dict", "__module__": "builtins", "__loader__": "DictNode",
                    "content": {k: self.state(v) for k, v in obj.items()},
                    "key_types": self.state(key_types)}
        if kind in (list, tuple):
            return {"__class__": kind.__name__, "__module__": "builtins",
                    "__loader__": "ListNode" if kind is list else "TupleNode",
                    "content": [self.state(v) for v in obj]}
        if obj is str:  # a dict's key type
            return {"__class__": "str", "__module__": "builtins", "__loader__": "TypeNode"}
        if kind is np.ndarray and obj.dtype != object:
            name = f"{id(obj)}.npy"
            if name not in self.files:
                buf = io.BytesIO()
                np.save(buf, obj, allow_pickle=False)
                self.files[name] = buf.getvalue()
            return {"__class__": "ndarray", "__module__": "numpy", "__loader__": "NdArrayNode",
                    "type": "numpy", "file": name}
        if f"{kind.__module__}.{kind.__qualname__}" in CLASSES:
            attrs = obj.__getstate__()
            self.alive[id(attrs)] = attrs
            return {"__class__": kind.__name__, "__module__": kind.__module__,
                    "__loader__": "ObjectNode", "content": self.state(attrs)}
        raise _Other
