"""rpicluster.data: the Zarr dataset layer.

- :mod:`rpicluster.data.store`: the store layout contract, :func:`ingest`, :func:`open_dataset`.
- :mod:`rpicluster.data.sources`: readers for npz/npy/csv/svmlight/scikit-learn/synthetic sources.
- :mod:`rpicluster.data.serve`: read-only HTTP serving of a store (``rpicluster serve``).
- :mod:`rpicluster.data.synthetic`: the seeded ImageNet-like feature generator.

Submodules are imported on use, so workers that only read blocks do not import scikit-learn.
"""
