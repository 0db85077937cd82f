"""``export_onnx``: a model file (or a fitted estimator) to one ONNX file for the edge runner."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from rpicluster.errors import ConfigError, ModelError
from rpicluster.export import heads

#: ``quantize`` values: int8 static quantization of the network (the head stays float).
QUANTIZE = ("int8",)


@dataclasses.dataclass(frozen=True)
class Exported:
    """What :func:`export_onnx` wrote.

    Attributes
    ----------
    path : Path
    size_bytes : int
    model : str
        The estimator's class name.
    input : str
        ``"rows"`` (float32 feature rows) or ``"images"`` (uint8 crops, see ``input_shape``).
    input_shape : tuple
        ``("N", n_features)`` or ``("N", size, size, channels)``.
    features : str or None
    quantize : str or None
    """

    path: Path
    size_bytes: int
    model: str
    input: str
    input_shape: tuple
    features: str | None = None
    quantize: str | None = None


def export_onnx(model, path: str | os.PathLike, features: str | os.PathLike | None = None,
                quantize: str | None = None, *, input_size: int | None = None,
                image_size: int | None = None, calibration: str | os.PathLike | None = None,
                calibration_images: int | None = None) -> Exported:
    """Write a fitted classifier as one ONNX file: rows (or photos) in, ``label`` out.

    Parameters
    ----------
    model : estimator or path
        A fitted IncrementalKSGDClassifier, KSGDClassifier, MLPClassifier or SGDClassifier, or
        the model file ``train`` / ``federate`` wrote (loaded with
        :func:`rpicluster.load_model`, its digest checked).
    path : path
        The ``.onnx`` file to write (atomically).
    features : str or path, optional
        ``"efficientnet-lite0"`` or an ``.onnx`` network: the model was trained on its
        features, and the file then takes uint8 images ``(N, size, size, C)`` (see
        :mod:`rpicluster.export.image`).
    quantize : {'int8'}, optional
        Quantize the network (static, calibrated on ``calibration``); needs ``features``.
    input_size : int, optional
        The side the features were extracted at (``rpicluster features --input-size``);
        default the network's (224 for EfficientNet-Lite0).
    image_size : int, optional
        The ``ingest images: --image-size`` the training photos were stored at: recorded in
        the file, the runner fits each photo to it first (as ingest did) so that the network
        sees the crop it saw in training. Needs ``features``.
    calibration : str or path, optional
        Image store whose first images calibrate ``quantize``.
    calibration_images : int, optional
        How many (default :data:`rpicluster.export.image.CALIBRATION_IMAGES`).

    Returns
    -------
    Exported

    Raises
    ------
    ModelError
        A model file of a kind export does not know, a damaged or tampered one, a network that
        is not an image model, or a model not trained on that network's features.
    ConfigError
        A ``quantize`` value not known, or one given without ``features`` or ``calibration``.
    """
    from rpicluster.export import image

    if quantize is not None and quantize not in QUANTIZE:
        raise ConfigError(f"unknown quantize {quantize!r} (known: {', '.join(QUANTIZE)})")
    if quantize is not None and features is None:
        raise ConfigError("quantize int8 quantizes the image network: give features too "
                          "(--features efficientnet-lite0 or FILE.onnx)")
    if quantize is not None and calibration is None:
        raise ConfigError("quantize int8 is calibrated on images: give calibration (--calibration "
                          "IMAGES.zarr, an image store of the images the model will see)")
    if image_size is not None and features is None:
        raise ConfigError("image_size says how the runner fits photos: give features too")
    estimator = _load(model)
    source = model if isinstance(model, (str, os.PathLike)) else type(estimator).__name__
    onnx_model = heads.head_graph(estimator)
    meta = {"rpicluster.model": type(estimator).__name__, "rpicluster.input": "rows"}
    shape = ("N", int(estimator.n_features_in_))
    if features is not None:
        from rpicluster.features.model import load_network

        frozen = load_network(features)
        size = frozen.size(input_size)
        width = image.feature_width(frozen, size)
        if width != estimator.n_features_in_:
            raise ModelError(f"model {source} takes {estimator.n_features_in_} features, but "
                             f"{frozen.name} gives {width} per image at input size {size}: "
                             "give the network and --input-size its feature store was made "
                             "with, or export without --features")
        network = None
        if quantize == "int8":
            network = image.quantize_network(
                frozen, size, calibration,
                n_images=calibration_images or image.CALIBRATION_IMAGES)
        onnx_model = image.compose(onnx_model, frozen, size, network=network)
        shape = ("N", size, size, frozen.channels)
        meta.update({"rpicluster.input": "images", "rpicluster.features": str(frozen.name),
                     "rpicluster.input_size": str(size)})
        if quantize:
            meta["rpicluster.quantize"] = quantize
        if image_size:
            meta["rpicluster.image_size"] = str(int(image_size))
    for key, value in meta.items():
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = key, value
    data = onnx_model.SerializeToString()
    from rpicluster.train.modelfile import atomic_write_bytes

    atomic_write_bytes(path, data)
    return Exported(Path(path), len(data), type(estimator).__name__, meta["rpicluster.input"],
                    shape, None if features is None else str(features), quantize)


def _load(model):
    """The estimator itself, or the one in a model file (of a kind export knows)."""
    if not isinstance(model, (str, os.PathLike)):
        if heads.head_kind(model) is None:
            raise ModelError(f"a {type(model).__name__} has no ONNX export (known: "
                             f"{heads.KNOWN})")
        return model
    path = Path(model)
    if path.suffix == ".onnx":
        raise ModelError(f"{path} is an ONNX file already: give the model file `rpicluster "
                         "train` or `federate` wrote (MODEL.skops)")
    from sklearn.linear_model import SGDClassifier
    from sklearn.neural_network import MLPClassifier

    from rpicluster.models.incremental import IncrementalKSGDClassifier
    from rpicluster.models.ksgd import KSGDClassifier
    from rpicluster.train.modelfile import load_model

    return load_model(path, expected=(IncrementalKSGDClassifier, KSGDClassifier, MLPClassifier,
                                      SGDClassifier))
