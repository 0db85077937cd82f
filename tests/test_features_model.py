"""Frozen networks without torch: the allow-list unpickler, the EfficientNet-Lite0 graph built
from the real weights package (ImageNet classes of scikit-image's sample photos), user-supplied
ONNX models and their errors."""

from __future__ import annotations

import collections
import io
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest

from rpicluster.errors import ConfigError, ModelError
from rpicluster.features.model import Extractor, load_network, preprocess
from rpicluster.features.weights import load_state_dict


# --- crafted .pth files ---------------------------------------------------------------------

class _Storage:
    def __init__(self, key, array):
        self.key, self.array = key, array


def _write_zip_pth(path, tensors: dict, storages: list[_Storage]):
    """Write a torch-style zip state dict without torch: fake ``torch`` modules supply the
    global names the pickle refers to, for the duration of the dump."""
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
        raise AssertionError

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", \
        "_rebuild_tensor_v2"
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    FloatStorage = type("FloatStorage", (), {"__module__": "torch"})
    torch_mod.FloatStorage, torch_mod._utils = FloatStorage, utils_mod

    class Tensor:
        def __init__(self, storage, offset, size, stride):
            self.args = (storage, offset, size, stride, False, collections.OrderedDict())

        def __reduce__(self):
            return _rebuild_tensor_v2, self.args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", FloatStorage, obj.key, "cpu", obj.array.size)
            return None

    state = collections.OrderedDict((k, Tensor(*v)) for k, v in tensors.items())
    saved = {m: sys.modules.get(m) for m in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch_mod, "torch._utils": utils_mod})
    try:
        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(state)
    finally:
        for m, v in saved.items():
            if v is None:
                sys.modules.pop(m)
            else:
                sys.modules[m] = v
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        for s in storages:
            z.writestr(f"archive/data/{s.key}", s.array.astype("<f4").tobytes())


def test_zip_state_dict_round_trip_with_strides_and_shared_storage(tmp_path):
    """Tensors come back with their strides applied (a transposed view) and offsets honoured."""
    base = np.arange(12, dtype=np.float32)
    s0 = _Storage("0", base)
    path = tmp_path / "w.pth"
    _write_zip_pth(path, {"a.weight": (s0, 0, (3, 4), (4, 1)),
                          "a.weight_t": (s0, 0, (4, 3), (1, 4)),
                          "b.bias": (s0, 8, (4,), (1,))}, [s0])
    sd = load_state_dict(path)
    assert list(sd) == ["a.weight", "a.weight_t", "b.bias"]
    np.testing.assert_array_equal(sd["a.weight"], base.reshape(3, 4))
    np.testing.assert_array_equal(sd["a.weight_t"], base.reshape(3, 4).T)
    np.testing.assert_array_equal(sd["b.bias"], base[8:])
    assert sd["a.weight_t"].flags.c_contiguous and sd["a.weight"].flags.writeable


def test_malicious_global_is_refused(tmp_path, capfd):
    """A pickle that calls os.system is refused by name before anything runs."""
    marker = tmp_path / "pwned"
    payload = (b"\x80\x02cos\nsystem\nX" + len(f"touch {marker}").to_bytes(4, "little")
               + f"touch {marker}".encode() + b"\x85R.")
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
    with pytest.raises(ModelError, match=r"refused to load global os\.system") as info:
        load_state_dict(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()
    # The same payload as a legacy (non-zip) file, hidden after a valid header.
    legacy = tmp_path / "evil-legacy.pth"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2)
                       + pickle.dumps({"little_endian": True}, 2) + payload)
    with pytest.raises(ModelError, match=r"global os\.system"):
        load_state_dict(legacy)
    assert not marker.exists()


def test_unreadable_weights_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_state_dict(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a pickle at all")
    with pytest.raises(ModelError, match="junk.pth"):
        load_state_dict(junk)


def test_real_weights_file_loads_296_tensors():
    from rpicluster.features.model import efficientnet_lite0_weights

    sd = load_state_dict(efficientnet_lite0_weights())
    assert len(sd) == 296
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.weight"].dtype == np.float32
    assert sd["_bn0.num_batches_tracked"].dtype == np.int64
    params = sum(v.size for k, v in sd.items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert params == 4_652_008
    assert np.isfinite(sd["_fc.weight"]).all() and sd["_fc.weight"].std() > 0


# --- EfficientNet-Lite0 ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    """A fresh graph cache folder."""
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def lite0(onnx_cache):
    """The EfficientNet-Lite0 graph built from the installed weights into a fresh cache."""
    return load_network("efficientnet-lite0", cache=onnx_cache)


def _top(extractor, image, k=3):
    logits = extractor.transform(image[None], output="logits")[0].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p)[:k]
    return [(int(i), float(p[i])) for i in order]


def test_lite0_imagenet_classes_of_sample_photos(lite0):
    """chelsea is a cat (ImageNet 281-285), coffee an espresso (967), rocket a missile (657)."""
    from skimage import data

    ex = Extractor(lite0, threads=2)
    cat = _top(ex, data.chelsea())
    assert 281 <= cat[0][0] <= 285, cat
    assert sum(p for c, p in cat if 281 <= c <= 285) > 0.8, cat
    coffee = _top(ex, data.coffee())
    assert coffee[0][0] == 967 and coffee[0][1] > 0.7, coffee
    assert _top(ex, data.rocket())[0][0] == 657


def test_lite0_features_and_cache(lite0, onnx_cache):
    from skimage import data

    ex = Extractor(lite0, batch_size=2)
    imgs = np.stack([data.chelsea()[:300, :400], data.coffee()[:300, :400],
                     data.astronaut()[:300, :400]])
    feats = ex.transform(imgs)
    assert feats.shape == (3, 1280) and feats.dtype == np.float32
    assert (feats >= 0).all()  # pooled ReLU6 outputs
    # Batching does not change the result.
    np.testing.assert_allclose(Extractor(lite0, batch_size=3).transform(imgs), feats,
                               rtol=1e-4, atol=1e-5)
    # Grayscale and small inputs: replicated to 3 channels, any input size.
    gray = (data.camera()[::8, ::8]).astype(np.uint8)
    assert Extractor(lite0, input_size=64).transform(gray[None]).shape == (1, 1280)
    with pytest.raises(ConfigError, match=r"input size 32 is too small for model "
                                          r"efficientnet-lite0 \(at least 48 pixels\)"):
        Extractor(lite0, input_size=32)
    # The cached graph is reused, and named after the weights' digest.
    import hashlib

    from rpicluster.features.model import efficientnet_lite0_weights

    [cached] = onnx_cache.glob("*.onnx")
    digest = hashlib.sha256(efficientnet_lite0_weights().read_bytes()).hexdigest()
    assert cached.name.startswith(f"efficientnet-lite0-{digest[:16]}-")
    stamp = cached.stat().st_mtime_ns
    assert load_network("efficientnet-lite0", cache=onnx_cache).sha256 == lite0.sha256
    assert cached.stat().st_mtime_ns == stamp


def test_lite0_graph_refuses_a_different_checkpoint():
    from rpicluster.features.efficientnet import build_graph
    from rpicluster.features.model import efficientnet_lite0_weights

    sd = load_state_dict(efficientnet_lite0_weights())
    sd["_blocks.3._depthwise_conv.weight"] = np.zeros((144, 1, 3, 3), np.float32)
    with pytest.raises(ModelError, match=r"_blocks\.3\._depthwise_conv\.weight.*\(144, 1, 5, 5\)"):
        build_graph(sd)


# --- user-supplied ONNX models -----------------------------------------------------------------

def _tiny_onnx(path, *, channels=3, size=None, flat=False):
    """A 1x1 conv to 4 channels + global average pool (fixed or free spatial size)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(4 * channels, dtype=np.float32).reshape(4, channels, 1, 1) / 10
    dims, out = ["N", channels, size or "H", size or "W"], ["N", 4, 1, 1]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("GlobalAveragePool", ["c"], ["out"])]
    if flat:  # a classifier on flattened 28x28 pixels: not an image model
        w = np.ones((784, 4), np.float32)
        dims, out, nodes = ["N", 784], ["N", 4], [helper.make_node("MatMul", ["x", "w"], ["out"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, dims)], [helper.make_tensor_value_info(
            "out", TensorProto.FLOAT, out)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return w


def test_user_onnx_model_matches_numpy(tmp_path):
    w = _tiny_onnx(tmp_path / "tiny.onnx")
    model = load_network(tmp_path / "tiny.onnx")
    assert (model.channels, model.input_size, model.output_name) == (3, None, "out")
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 20, 30, 3), dtype=np.uint8)
    feats = Extractor(model, input_size=16, batch_size=2).transform(imgs)
    x = preprocess(imgs, 16, model)
    expected = np.einsum("oc,nchw->no", w[:, :, 0, 0], x) / (16 * 16)
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)


def test_user_onnx_fixed_size_and_grayscale(tmp_path):
    _tiny_onnx(tmp_path / "g.onnx", channels=1, size=24)
    model = load_network(str(tmp_path / "g.onnx"))
    assert (model.channels, model.size(None)) == (1, 24)
    rgb = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert Extractor(model).transform(rgb).shape == (2, 4)
    with pytest.raises(ModelError, match=r"takes 24x24 images; input size 32 does not fit"):
        Extractor(model, input_size=32)


def test_user_onnx_errors(tmp_path):
    with pytest.raises(ModelError, match=r"cannot read model file .*nope\.onnx"):
        load_network(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelError, match=r"cannot load model .*bad\.onnx: not a valid ONNX"):
        load_network(bad)
    _tiny_onnx(tmp_path / "flat.onnx", flat=True)
    with pytest.raises(ModelError, match=r"shape \['N', 784\].*\(N, C, H, W\)"):
        load_network(tmp_path / "flat.onnx")
    with pytest.raises(ModelError, match=r"unknown model 'resnet'.*efficientnet-lite0"):
        load_network("resnet")
    with pytest.raises(ConfigError, match="too small"):
        load_network(_path_of_tiny(tmp_path)).size(4)


def _path_of_tiny(tmp_path):
    _tiny_onnx(tmp_path / "t2.onnx")
    return tmp_path / "t2.onnx"


def test_crafted_pth_files_are_the_loaders_one_line(tmp_path):
    """Issue 29 finding 6: a crafted .pth made the loader raise TypeError (an admitted rebuild
    function called with a size that is not a shape) or MemoryError (a legacy storage claiming
    10^15 elements) instead of its one line; no code ran either way."""
    s0 = _Storage("0", np.arange(4, dtype=np.float32))
    bad_shape = tmp_path / "bad-shape.pth"
    _write_zip_pth(bad_shape, {"w": (s0, 0, 5, (1,))}, [s0])
    with pytest.raises(ModelError, match=r"bad-shape.pth is not a readable torch state dict "
                                         r"\(TypeError: ") as info:
        load_state_dict(bad_shape)
    assert "\n" not in str(info.value)

    storage = type("FloatStorage", (), {"__module__": "torch"})
    torch_mod = types.ModuleType("torch")
    torch_mod.FloatStorage = storage

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", storage, "0", "cpu", 10**15) if obj is s0 else None

    saved = sys.modules.get("torch")
    sys.modules["torch"] = torch_mod
    try:
        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(collections.OrderedDict(w=s0))
    finally:
        if saved is None:
            sys.modules.pop("torch")
        else:
            sys.modules["torch"] = saved
    huge = tmp_path / "huge.pth"
    huge.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2)
                     + pickle.dumps({"little_endian": True}, 2) + buf.getvalue()
                     + pickle.dumps(["0"], 2))
    with pytest.raises(ModelError, match=r"huge.pth: storage 0 claims 1,000,000,000,000,000 "
                                         r"elements, more than the file's \d+ bytes hold"):
        load_state_dict(huge)
