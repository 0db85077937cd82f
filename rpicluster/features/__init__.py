"""Frozen-network feature extraction: images -> ONNX Runtime on the workers -> feature store.

``weights`` reads torch state dicts through an allow-list unpickler, ``efficientnet`` builds the
EfficientNet-Lite0 ONNX graph from them, ``model`` resolves models and runs them, ``images``
reads image stores and ``job`` maps a model over an image store's blocks on a Dask cluster
(:func:`rpicluster.extract_features`).
"""
