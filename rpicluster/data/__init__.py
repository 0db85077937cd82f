"""rpicluster.data: the Zarr dataset layer.

- :mod:`rpicluster.data.layout`: the store layout contract (format, attributes, checksums).
- :mod:`rpicluster.data.reader`: :func:`open_dataset`, :class:`Dataset`, the per-block checks.
- :mod:`rpicluster.data.writer`: :func:`ingest`, :class:`StoreWriter`.
- :mod:`rpicluster.data.source`: the block source contract (:class:`Source`, :class:`ArraySource`).
- :mod:`rpicluster.data.sources`: readers for npz/npy/csv/svmlight/scikit-learn/synthetic sources.
- :mod:`rpicluster.data.serve`: read-only HTTP serving of a store (``rpicluster serve``).
- :mod:`rpicluster.data.synthetic`: the seeded ImageNet-like feature generator.

Submodules are imported on use, so workers that only read blocks do not import scikit-learn.
"""
