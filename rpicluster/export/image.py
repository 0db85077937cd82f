"""Photo in, label out: a frozen network and a trained head composed into one ONNX graph.

The composed graph takes uint8 images ``(N, size, size, C)``: the centre crops that
:func:`rpicluster.edge.fit_image` (Pillow: shorter side to ``size / 0.875``, bilinear, centre
crop; what ``rpicluster features`` does) makes of any photo. Inside the graph: pixels / 255,
minus the mean, over the std (float32, the operations and order of
:func:`rpicluster.features.model.preprocess`), NHWC to NCHW, the network, its features (a 4-d
output averaged over its spatial axes, as the feature job does) and the head. The resize stays
out of the graph: ONNX ``Resize`` does not reproduce Pillow's filter and rounding, and parity
with ``features`` + ``predict`` is the contract, so the runner resizes with the same Pillow call.

:func:`quantize_network` makes an int8 copy of the network with ONNX Runtime's static
quantization, calibrated on images of an image store.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from rpicluster.errors import DataError, ModelError
from rpicluster.export import heads

#: Name of the composed graph's input, and its metadata keys (read by the edge runner).
IMAGES = "images"
#: Images calibrating an int8 network (ONNX Runtime's static quantization: a few hundred are
#: its usual advice; 200 at 224 px take under a minute on one x86 core).
CALIBRATION_IMAGES = 200


def compose(head, frozen, size: int, *, network: bytes | None = None):
    """One graph: uint8 image crops ``(N, size, size, C)`` -> ``label``, ``scores``.

    Parameters
    ----------
    head : onnx.ModelProto
        From :func:`rpicluster.export.heads.head_graph`, over the network's features.
    frozen : FrozenModel
        The network (:func:`rpicluster.features.model.load_network`).
    size : int
        Input side, the ``--input-size`` the features were extracted at.
    network : bytes, optional
        A replacement for ``frozen.onnx`` with the same input and output (the int8 copy).

    Returns
    -------
    onnx.ModelProto
    """
    import onnx
    from onnx import TensorProto, compose as oc, helper, version_converter

    net = onnx.load_from_string(network if network is not None else frozen.onnx)
    opset = max(heads.OPSET, _opset(net))
    if _opset(net) < opset:
        try:
            net = version_converter.convert_version(net, opset)
        except Exception as exc:  # noqa: BLE001 - the converter raises many kinds
            raise ModelError(f"network {frozen.name} cannot be converted to ONNX opset {opset} "
                             f"({type(exc).__name__}: {str(exc)[:200]}); export a graph of "
                             f"opset {opset} or newer") from None
    c = frozen.channels
    g = heads.Builder("pre/")
    x = g.op("Cast", IMAGES, to=TensorProto.FLOAT)
    # the float32 operations of features.model.preprocess, in its order
    x = g.op("Div", x, g.const(np.float32(255.0)))
    x = g.op("Sub", x, g.const(np.asarray(frozen.mean[:c], np.float32)))
    x = g.op("Div", x, g.const(np.asarray(frozen.std[:c], np.float32)))
    g.op("Transpose", x, out="pixels", perm=[0, 3, 1, 2])
    pre = helper.make_graph(
        g.nodes, "preprocess",
        [helper.make_tensor_value_info(IMAGES, TensorProto.UINT8, ["N", size, size, c])],
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", c, size, size])],
        initializer=g.inits)
    post = heads.Builder("pool/")
    rank = _output_rank(net, frozen.output_name)
    feats = frozen.output_name
    if rank == 4:  # a feature map: the job's global average pool
        feats = post.op("ReduceMean", feats, post.const(np.array([2, 3], np.int64)), keepdims=0)
    post.op("Flatten", feats, out=heads.ROWS, axis=1)
    net.graph.node.extend(post.nodes)
    net.graph.initializer.extend(post.inits)
    del net.graph.output[:]
    net.graph.output.append(helper.make_tensor_value_info(heads.ROWS, TensorProto.FLOAT,
                                                          ["N", None]))
    pre = helper.make_model(pre)
    pre.ir_version = heads.IR_VERSION  # make_model writes the newest: older runtimes refuse it
    models = [_with_opset(pre, opset), _with_opset(net, opset), _with_opset(head, opset)]
    ir = max(m.ir_version for m in models)
    for m in models:
        m.ir_version = ir
    body = oc.merge_models(models[0], oc.add_prefix(models[1], "net/"),
                           io_map=[("pixels", f"net/{frozen.input_name}")])
    out = oc.merge_models(body, models[2], io_map=[(f"net/{heads.ROWS}", heads.ROWS)])
    # merge_models lists each part's opset again: one entry per domain
    opsets = {o.domain: o.version for o in out.opset_import}
    del out.opset_import[:]
    out.opset_import.extend(helper.make_opsetid(d, v) for d, v in opsets.items())
    out.producer_name = "rpicluster"
    return out


def _opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
               default=1)


def _with_opset(model, opset: int):
    """``model`` declaring the default-domain ``opset`` (its ops are unchanged up to it)."""
    from onnx import helper

    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = opset
            return model
    model.opset_import.append(helper.make_opsetid("", opset))
    return model


def _output_rank(net, name: str) -> int | None:
    for out in net.graph.output:
        if out.name == name:
            return len(out.type.tensor_type.shape.dim)
    return None


def feature_width(frozen, size: int) -> int:
    """Features the network gives per image at ``size`` (one blank image through it)."""
    from rpicluster.features.model import Extractor

    blank = np.zeros((1, size, size, 3), np.uint8)
    return int(Extractor(frozen, input_size=size).transform(blank).shape[1])


def quantize_network(frozen, size: int, calibration: str | os.PathLike, *,
                     n_images: int = CALIBRATION_IMAGES) -> bytes:
    """An int8 copy of ``frozen``'s graph, statically quantized on images of a store.

    QDQ format, int8 weights per output channel, uint8 activations whose ranges are the
    MinMax of ``n_images`` images of the image store ``calibration`` (the first ones, block
    by block), preprocessed as the feature job does at ``size``.

    Raises
    ------
    DataError
        ``calibration`` is not an image store, or holds no image.
    """
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    from rpicluster.features.images import open_images
    from rpicluster.features.model import preprocess

    store = open_images(calibration)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left, self.block = n_images, 0

        def get_next(self):
            while self.left > 0 and self.block < store.n_blocks:
                images, _ = store.block(self.block)
                self.block += 1
                images = images[:self.left]
                self.left -= len(images)
                if len(images):
                    return {frozen.input_name: preprocess(images, size, frozen)}
            return None

    if store.n_rows == 0:
        raise DataError(f"calibration store {store.url} holds no image; give an image store "
                        "of the images the model will see")
    with tempfile.TemporaryDirectory(prefix="rpicluster-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(frozen.onnx)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
        return dst.read_bytes()
