"""A cluster piece fitted on another worker arrives in a Dask message at any byte offset: the SGD
kernel copies unaligned rows once (numpy would copy them again in every product, 20x the CPU of
the fit, benchmarks/results/train_profile_cpu.md) and trains the same model as on aligned rows."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from rpicluster import IncrementalKSGDClassifier, open_dataset
from rpicluster.models._sgd import float32_rows, sgd_ovr_fit
from rpicluster.train.tasks import cluster_piece, fit_task, partition_task


def _unaligned(a):
    """A copy of ``a`` starting 2 bytes into its buffer, as a message's frame can."""
    out = np.frombuffer(bytearray(a.nbytes + 2), dtype=a.dtype, count=a.size,
                        offset=2).reshape(a.shape)
    out[...] = a
    return out


def test_float32_rows_copies_only_unaligned_or_other_rows():
    X = load_digits().data.astype(np.float32)
    assert float32_rows(X) is X
    U = _unaligned(X)
    assert not U.flags.aligned
    A = float32_rows(U)
    assert A.flags.aligned and A.flags.c_contiguous and A.dtype == np.float32
    np.testing.assert_array_equal(A, X)
    assert float32_rows(X[:, ::2]).flags.c_contiguous


def test_unaligned_rows_train_the_same_model():
    digits = load_digits()
    X, y = digits.data.astype(np.float32), digits.target.astype(np.intp)
    ref = sgd_ovr_fit(X, y, 10, epochs=3, seed=0)
    got = sgd_ovr_fit(_unaligned(X), _unaligned(y), 10, epochs=3, seed=0)
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(r, g)


def test_a_piece_fitted_on_the_other_worker_gives_the_same_models(client, store):
    """The real path: partition and piece on one worker process, the fit on the other."""
    a, b = sorted(client.scheduler_info()["workers"])
    params = IncrementalKSGDClassifier(n_clusters=4, max_iter=3, random_state=0,
                                       block_rows=600).get_params()
    ds = open_dataset(store)
    part = client.submit(partition_task, ds, 3, params, 0, 2, workers=[a], pure=False)
    piece = client.submit(cluster_piece, part, 1, workers=[a], pure=False)
    here, there = (client.submit(fit_task, piece, 3, 1, params, 0, workers=[w],
                                 pure=False).result() for w in (a, b))
    assert here.worker != there.worker
    assert here.sizes == there.sizes and len(here.models) == len(there.models) > 0
    for m, n in zip(here.models, there.models):
        np.testing.assert_array_equal(m.classes, n.classes)
        np.testing.assert_array_equal(m.coef, n.coef)
        np.testing.assert_array_equal(m.intercept, n.intercept)
