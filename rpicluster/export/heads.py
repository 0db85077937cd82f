"""ONNX graphs of the models ``train`` and ``federate`` write, node for node as their ``predict``.

Every graph takes ``rows`` (float32, ``(N, n_features)``: what the estimators validate their input
to) and gives ``label`` (``(N,)``, the class) and ``scores`` (what the estimator's
``decision_function`` returns, or ``predict_proba`` for an MLP). The arithmetic is the
estimator's own, in its precision, so the labels are those of ``predict``:

* Inc-kSGD (and one kSGD): each block routes a row to its nearest centroid and scores the row
  with that cluster's model, over the classes the cluster holds only (the file keeps each
  cluster's own rows of coefficients, as the estimator does); classes the cluster never saw get
  the row's floor (one below its lowest score and below 0). Scores are float64, like
  ``local_scores``; routing is float64 too (``predict`` routes in float32 BLAS, whose summation
  order no other library reproduces: the two can differ only for a row equidistant to two
  centroids within float32 rounding). Blocks combine by ``vote``: 'majority' counts each block's
  argmax and breaks a tie by the summed scores; 'soft' takes the mean score. ArgMax/ArgMin pick the
  first index on ties, as numpy does.
* MLPClassifier: the forward pass in the weights' dtype, softmax (or logistic for two classes,
  a class 1 label when above 0.5) as scikit-learn computes it.
* SGDClassifier: ``rows @ coef.T + intercept`` in the coefficients' dtype; argmax, or ``> 0``
  for two classes.
"""

from __future__ import annotations

import numpy as np

from rpicluster.errors import ModelError

#: Opset of the graphs written here: 18 for ScatterElements' max reduction.
OPSET = 18
#: IR version written: the lowest that carries opset 18, so older ONNX Runtimes on a Pi load it.
IR_VERSION = 8
#: Graph input and outputs.
ROWS, LABEL, SCORES = "rows", "label", "scores"


class Builder:
    """Nodes and initializers of a graph under construction, with unique names."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.nodes, self.inits, self._n = [], [], 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}{hint}_{self._n}"

    def const(self, value, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        from onnx import helper

        out = out or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out


def labels_tensor(classes) -> tuple[np.ndarray, int]:
    """The classes as an ONNX-ready array and its tensor type (int64, double or string)."""
    from onnx import TensorProto

    classes = np.asarray(classes)
    if classes.dtype.kind in "iub":
        return classes.astype(np.int64), TensorProto.INT64
    if classes.dtype.kind == "f":
        return classes.astype(np.float64), TensorProto.DOUBLE
    if classes.dtype.kind in "UOS":
        return np.array([str(c) for c in classes], dtype=object), TensorProto.STRING
    raise ModelError(f"classes of dtype {classes.dtype} cannot be written to ONNX (int, float "
                     "or str classes only)")


def _ksgd_block(g: Builder, x64: str, est, n_classes: int) -> str:
    """One block model's ``(N, n_classes)`` float64 scores, as ``KSGDClassifier.local_scores``."""
    # The model's float32 arrays are stored as they are and cast in the graph (exactly): the
    # file stays the model's size, the arithmetic is float64.
    centers = est.cluster_centers_.astype(np.float32)
    c64 = centers.astype(np.float64)
    half_sq = 0.5 * np.einsum("ij,ij->i", c64, c64)
    dist = g.op("Sub", g.const(half_sq[None, :], "half_sq"),
                g.op("MatMul", x64, _as_double(g, centers.T.copy(), "centers_t")))
    cell = g.op("ArgMin", dist, axis=1, keepdims=1)  # (N, 1): first index on ties, as numpy
    ptr = est.local_ptr_
    sizes = np.diff(ptr)
    coef = est.local_coef_.astype(np.float32)  # a copy: single-class rows are rewritten
    intercept = est.local_intercept_.astype(np.float32)
    # A single-class cell scores its class 1 (coefficients 0, intercept 1: exactly 1.0).
    single = np.repeat(sizes == 1, sizes)
    coef[single] = 0.0
    intercept[single] = 1.0
    owner = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)[None, :]
    scores = g.op("Add", g.op("MatMul", x64, _as_double(g, coef.T.copy(), "local_coef_t")),
                  _as_double(g, intercept[None, :], "local_intercept"))
    mine = g.op("Equal", cell, g.const(owner, "owner"))
    lowest = g.op("ReduceMin", g.op("Where", mine, scores, g.const(np.inf)),
                  g.const(np.array([1], np.int64)), keepdims=1)
    floor = g.op("Sub", g.op("Min", lowest, g.const(0.0)), g.const(1.0))
    base = g.op("Expand", floor, g.const(np.array([1, n_classes], np.int64)))
    where = g.op("Expand", g.const(est.local_classes_.astype(np.int64)[None, :], "local_classes"),
                 g.op("Shape", scores))
    # Every class of the row's cell replaces the floor (its score is above it); other cells'
    # rows are -inf and leave it.
    return g.op("ScatterElements", base, where, g.op("Where", mine, scores, g.const(-np.inf)),
                axis=1, reduction="max")


def _as_double(g: Builder, value: np.ndarray, hint: str) -> str:
    """A float32 constant, cast to float64 in the graph (half the bytes in the file)."""
    return g.op("Cast", g.const(value, hint), to=_tensor_type(np.float64))


def _ksgd_graph(g: Builder, model) -> tuple[str, str]:
    """(code, scores) of an IncrementalKSGDClassifier or a KSGDClassifier."""
    blocks = getattr(model, "estimators_", [model])
    vote = getattr(model, "vote", "majority")
    n_classes = len(model.classes_)
    x64 = g.op("Cast", ROWS, to=_tensor_type(np.float64))
    per_block = [_ksgd_block(g, x64, est, n_classes) for est in blocks]
    if not hasattr(model, "estimators_"):  # one kSGD: its local scores are its decision
        return g.op("ArgMax", per_block[0], axis=1, keepdims=0), per_block[0]
    summed = per_block[0]
    for s in per_block[1:]:  # in block order, as numpy's sum over axis 0
        summed = g.op("Add", summed, s)
    n = g.const(float(len(blocks)))
    if vote == "soft":
        mean = g.op("Div", summed, n)
        return g.op("ArgMax", mean, axis=1, keepdims=0), mean
    classes = g.const(np.arange(n_classes, dtype=np.int64)[None, :], "class_codes")
    counts = None
    for s in per_block:
        one = g.op("Cast", g.op("Equal", g.op("ArgMax", s, axis=1, keepdims=1), classes),
                   to=_tensor_type(np.float64))
        counts = one if counts is None else g.op("Add", counts, one)
    if len(blocks) == 1:
        code = g.op("ArgMax", per_block[0], axis=1, keepdims=0)
    else:
        leaders = g.op("Equal", counts, g.op("ReduceMax", counts,
                                              g.const(np.array([1], np.int64)), keepdims=1))
        code = g.op("ArgMax", g.op("Where", leaders, summed, g.const(-np.inf)),
                    axis=1, keepdims=0)
    # votes + 0.5 + arctan(summed / n_blocks) / pi; ONNX Runtime's Atan is float32 only, so
    # these scores match decision_function to float32 precision (the label does not use them).
    atan = g.op("Cast", g.op("Atan", g.op("Cast", g.op("Div", summed, n),
                                          to=_tensor_type(np.float32))),
                to=_tensor_type(np.float64))
    scores = g.op("Add", g.op("Add", counts, g.const(0.5)), g.op("Div", atan, g.const(np.pi)))
    return code, scores


def _mlp_graph(g: Builder, model) -> tuple[str, str]:
    """(code, predict_proba) of an MLPClassifier."""
    dtype = model.coefs_[0].dtype
    act = {"relu": "Relu", "tanh": "Tanh", "logistic": "Sigmoid", "identity": "Identity"}
    if model.activation not in act:
        raise ModelError(f"MLPClassifier activation {model.activation!r} has no ONNX export "
                         f"(known: {', '.join(act)})")
    h = g.op("Cast", ROWS, to=_tensor_type(dtype))
    last = len(model.coefs_) - 1
    for i, (w, b) in enumerate(zip(model.coefs_, model.intercepts_)):
        h = g.op("Add", g.op("MatMul", h, g.const(w.astype(dtype), f"coef{i}")), g.const(b.astype(dtype)[None, :], f"b{i}"))
        if i != last:
            h = g.op(act[model.activation], h)
    axis1 = g.const(np.array([1], np.int64))
    if model.out_activation_ == "softmax":
        shifted = g.op("Exp", g.op("Sub", h, g.op("ReduceMax", h, axis1, keepdims=1)))
        proba = g.op("Div", shifted, g.op("ReduceSum", shifted, axis1, keepdims=1))
        return g.op("ArgMax", proba, axis=1, keepdims=0), proba
    if model.out_activation_ == "logistic" and len(model.classes_) == 2:
        p = g.op("Sigmoid", h)  # (N, 1)
        proba = g.op("Concat", g.op("Sub", g.const(np.ones((1, 1), dtype)), p), p, axis=1)
        code = g.op("Cast", g.op("Greater", g.op("Squeeze", p, axis1),
                                 g.const(np.asarray(0.5, dtype))), to=_tensor_type(np.int64))
        return code, proba
    raise ModelError(f"MLPClassifier with output {model.out_activation_!r} over "
                     f"{len(model.classes_)} classes has no ONNX export (single-label "
                     "classifiers only)")


def _sgd_graph(g: Builder, model) -> tuple[str, str]:
    """(code, decision_function) of an SGDClassifier."""
    dtype = model.coef_.dtype
    x = g.op("Cast", ROWS, to=_tensor_type(dtype))
    scores = g.op("Add", g.op("MatMul", x, g.const(model.coef_.T.copy(), "coef_t")),
                  g.const(model.intercept_.astype(dtype)[None, :], "intercept"))
    if model.coef_.shape[0] == 1:
        flat = g.op("Squeeze", scores, g.const(np.array([1], np.int64)))
        code = g.op("Cast", g.op("Greater", flat, g.const(np.asarray(0, dtype))),
                    to=_tensor_type(np.int64))
        return code, flat
    return g.op("ArgMax", scores, axis=1, keepdims=0), scores


def _tensor_type(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def head_kind(model) -> str | None:
    """'ksgd', 'mlp' or 'sgd' for a model export knows, else None."""
    from sklearn.linear_model import SGDClassifier
    from sklearn.neural_network import MLPClassifier

    from rpicluster.models.incremental import IncrementalKSGDClassifier
    from rpicluster.models.ksgd import KSGDClassifier

    if isinstance(model, (IncrementalKSGDClassifier, KSGDClassifier)):
        return "ksgd"
    if isinstance(model, MLPClassifier):
        return "mlp"
    if isinstance(model, SGDClassifier):
        return "sgd"
    return None


#: Model types :func:`head_graph` writes (for messages).
KNOWN = "IncrementalKSGDClassifier, KSGDClassifier, MLPClassifier, SGDClassifier"


def head_graph(model, *, name: str = "rpicluster-head"):
    """The ONNX model of a fitted classifier: ``rows`` float32 in, ``label`` and ``scores`` out.

    Parameters
    ----------
    model : IncrementalKSGDClassifier, KSGDClassifier, MLPClassifier or SGDClassifier
        Fitted.
    name : str
        Graph name.

    Returns
    -------
    onnx.ModelProto

    Raises
    ------
    ModelError
        Another kind of model, an unfitted one, or one whose classes or layers ONNX cannot hold.
    """
    from onnx import TensorProto, helper
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    kind = head_kind(model)
    if kind is None:
        raise ModelError(f"a {type(model).__name__} has no ONNX export (known: {KNOWN})")
    try:
        check_is_fitted(model)
    except NotFittedError:
        raise ModelError(f"the {type(model).__name__} is not fitted: train it first") from None
    g = Builder()
    code, scores = {"ksgd": _ksgd_graph, "mlp": _mlp_graph, "sgd": _sgd_graph}[kind](g, model)
    classes, label_type = labels_tensor(model.classes_)
    g.op("Gather", g.const(classes, "classes"), code, out=LABEL, axis=0)
    n_classes = len(model.classes_)
    if kind == "ksgd" and n_classes == 2:  # decision_function's two-class form: col 1 - col 0
        cols = [g.op("Gather", scores, g.const(np.asarray(i, np.int64)), axis=1) for i in (0, 1)]
        scores = g.op("Sub", cols[1], cols[0])
    g.op("Identity", scores, out=SCORES)
    two_d = not (n_classes == 2 and kind in ("ksgd", "sgd"))
    score_type = TensorProto.DOUBLE if kind == "ksgd" else _tensor_type(_weights_dtype(model))
    graph = helper.make_graph(
        g.nodes, name,
        [helper.make_tensor_value_info(ROWS, TensorProto.FLOAT, ["N", int(model.n_features_in_)])],
        [helper.make_tensor_value_info(LABEL, label_type, ["N"]),
         helper.make_tensor_value_info(SCORES, score_type,
                                       ["N", n_classes] if two_d else ["N"])],
        initializer=g.inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                   producer_name="rpicluster")
    onnx_model.ir_version = IR_VERSION
    return onnx_model


def _weights_dtype(model):
    return model.coefs_[0].dtype if hasattr(model, "coefs_") else model.coef_.dtype
