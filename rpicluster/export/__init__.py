"""ONNX export: a trained model (and optionally its frozen image network) as one ONNX file.

``heads`` writes the classifiers' graphs, ``image`` composes a network and a head (and makes an
int8 network), ``api`` is :func:`export_onnx`. The file runs with ONNX Runtime alone:
``python -m rpicluster.edge MODEL.onnx IMAGES...`` on a Pi (see docs/edge.md).
"""

from rpicluster.export.api import QUANTIZE, Exported, export_onnx

__all__ = ["QUANTIZE", "Exported", "export_onnx"]
