"""Tests of the ImageNet-like synthetic feature generator (rpicluster.data.synthetic)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import MiniBatchKMeans

from rpicluster.data.synthetic import (CHUNK_ROWS, SyntheticSpec, iter_blocks,
                                       make_imagenet_like)
from rpicluster.errors import ConfigError


def test_deterministic_and_seed_dependent():
    X1, y1 = make_imagenet_like(3000, 32, 12, seed=5)
    X2, y2 = make_imagenet_like(3000, 32, 12, seed=5)
    X3, _ = make_imagenet_like(3000, 32, 12, seed=6)
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(X1, X3)


def test_dtype_shape_non_negative_and_labels():
    X, y = make_imagenet_like(2500, 48, 15, seed=1)
    assert X.shape == (2500, 48) and X.dtype == np.float32 and X.flags.c_contiguous
    assert y.shape == (2500,) and y.dtype == np.int64
    assert np.isfinite(X).all() and (X >= 0).all()
    # post-ReLU: a real share of exact zeros, but not a degenerate all-zero matrix
    assert 0.2 < np.mean(X == 0) < 0.8
    assert set(np.unique(y)) == set(range(15))


@pytest.mark.parametrize("block_rows", [1, 999, CHUNK_ROWS, CHUNK_ROWS + 1, 20_000])
def test_blocks_equal_whole_whatever_block_rows(block_rows):
    n = 2 * CHUNK_ROWS + 123
    X, y = make_imagenet_like(n, 16, 7, seed=2, modes=2)
    blocks = list(iter_blocks(n, block_rows, 16, 7, seed=2, modes=2))
    assert all(len(bx) == len(by) <= block_rows for bx, by in blocks)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), X[:n])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), y[:n])


def test_prefix_stability():
    """The first rows do not depend on how many rows are asked for (a longer data set extends a
    shorter one)."""
    X_small, y_small = make_imagenet_like(1000, 16, 5, seed=4)
    X_big, y_big = make_imagenet_like(CHUNK_ROWS + 10, 16, 5, seed=4)
    np.testing.assert_array_equal(X_small, X_big[:1000])
    np.testing.assert_array_equal(y_small, y_big[:1000])


def test_spec_from_string_roundtrip():
    spec = SyntheticSpec.from_string(" rows=1_000, features=8,classes=3,seed=2,spread=0.25 ")
    assert (spec.rows, spec.features, spec.classes, spec.seed, spec.spread) == (
        1000, 8, 3, 2, 0.25)
    X, y = spec.make()
    X2, y2 = make_imagenet_like(1000, 8, 3, seed=2, spread=0.25)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)


@pytest.mark.parametrize("text, fragment", [
    ("rows=10,colour=3", "unknown key 'colour'"),
    ("rows=10,features", "expected key=value"),
    ("rows=ten", "rows must be an integer"),
    ("rows=10,spread=wide", "spread must be a number"),
    ("rows=0", "rows must be >= 1"),
    ("rows=10,mode_jump=2", "mode_jump must be in [0, 1]"),
])
def test_spec_from_string_errors(text, fragment):
    with pytest.raises(ConfigError) as info:
        SyntheticSpec.from_string(text)
    assert fragment in str(info.value)


def test_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError) as info:
        SyntheticSpec.from_string("rows=10,colour=3")
    assert "known keys:" in str(info.value) and "superclasses" in str(info.value)


def test_unknown_knob_in_function_call():
    with pytest.raises(ConfigError, match="unknown knob 'colour'"):
        make_imagenet_like(10, 4, 2, colour=1)


def test_kmeans_cells_hold_few_classes():
    """The property Inc-kSGD relies on: k-means cells (k = number of super-classes) are dominated
    by a few classes, unlike isotropic overlap where a cell held most of the classes."""
    n_classes, n_super = 60, 6
    X, y = make_imagenet_like(12_000, 64, n_classes, seed=0, superclasses=n_super)
    labels = MiniBatchKMeans(n_super, n_init=3, random_state=0).fit_predict(X)
    top = []
    for cell in range(n_super):
        counts = np.sort(np.bincount(y[labels == cell], minlength=n_classes))[::-1]
        if counts.sum():
            # classes needed to cover 90 % of the cell's rows
            top.append(int(np.searchsorted(np.cumsum(counts), 0.9 * counts.sum()) + 1))
    # A cell of one super-class holds its 10 classes plus the foreign modes that jumped in.
    assert np.mean(top) < 0.4 * n_classes
