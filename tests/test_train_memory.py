"""Worker memory while training: blocks read straight into their arrays, sorted in place, pieces
as views; under a limit of baseline + 3 blocks the workers stay within 2.5 blocks above their
post-import baseline, no worker is restarted, and the model equals the in-process one."""

from __future__ import annotations

import dask
import numpy as np
import pytest

from rpicluster import IncrementalKSGDClassifier, ingest, open_dataset
from rpicluster.bench.memory import post_import_baseline, train_under_limit
from rpicluster.models.ksgd import group_rows, permute_rows
from rpicluster.train.placement import worker_slots
from rpicluster.train.tasks import cluster_piece, fit_groups, partition_task

MB = 2**20


def test_permute_rows_equals_fancy_indexing_without_a_copy():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1000, 7)).astype(np.float32)
    labels = rng.integers(0, 9, 1000)
    order, bounds = group_rows(labels, 9)
    expected = X[order]
    out = permute_rows(X, order)
    assert out is X
    np.testing.assert_array_equal(X, expected)
    np.testing.assert_array_equal(np.diff(bounds), np.bincount(labels, minlength=9))
    assert (labels[order][bounds[3]:bounds[4]] == 3).all()


def test_fit_groups_split_rows_evenly_and_cover_all():
    # 935 rows in 3 groups: the cuts nearest 312 and 623 rows are after 500 and after 530
    assert fit_groups([500, 10, 10, 10, 400, 5], 3) == [(0, 1), (1, 4), (4, 6)]
    assert fit_groups([30, 30, 30, 10], 2) == [(0, 2), (2, 4)]
    assert fit_groups([100] * 10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert fit_groups([50] * 4, 9) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # at most one per cluster
    assert fit_groups([1000, 1, 1, 1], 3) == [(0, 1), (1, 4)]  # a big cluster: fewer groups
    assert fit_groups([7], 3) == [(0, 1)]
    assert fit_groups([], 2) == []


def test_partition_pieces_are_views_of_the_sorted_block(tmp_path):
    ds = ingest("synthetic:rows=3000,features=16,classes=5,seed=1", tmp_path / "s.zarr",
                block_rows=1500)
    part = partition_task(ds, 1, {"n_clusters": 6}, 3)
    X0, _ = ds.block(1)
    assert part.X.shape == X0.shape
    for g in range(len(part.groups)):
        X, y, bounds, first = cluster_piece(part, g)
        assert first == part.groups[g][0]
        assert np.shares_memory(X, part.X), "a piece is a view, not a copy"
        assert bounds[0] == 0 and bounds[-1] == X.shape[0]
    X, y, bounds, first = cluster_piece(part, len(part.groups))
    assert X.shape[0] == 0 and first == len(part.bounds) - 1, "a missing group is empty"
    # every original row is in the sorted block exactly once
    np.testing.assert_array_equal(np.sort(part.X, axis=0), np.sort(X0, axis=0))


def test_worker_slots_follow_memory_limits_and_threads():
    mib = 2**20
    block = 100 * mib
    pause = 0.8  # Dask's default: a worker above 80 % of its limit takes no new task
    info = {"pi": {"memory_limit": (256 * mib + 3 * block) / pause,
                   "metrics": {"memory": 80 * mib}, "nthreads": 1},
            "big": {"memory_limit": (256 * mib + 5 * block) / pause, "nthreads": 4},
            "nolimit": {"memory_limit": 0, "nthreads": 2},
            # room for 3 blocks only above the pause threshold: one
            "paused-above": {"memory_limit": 256 * mib + 5 * block, "nthreads": 4},
            # a measured floor counts instead of the reported memory and the baseline
            "measured": {"memory_limit": (200 * mib + 5 * block) / pause, "floor": 200 * mib,
                         "nthreads": 4}}
    # baseline + 3 blocks below the pause threshold: one block at a time; + 5 blocks:
    # (5 - 0.5) // 1.5 = 3; no limit: one per thread and one queued ahead
    assert worker_slots(info, block) == {"pi": 1, "big": 3, "nolimit": 3, "paused-above": 1,
                                         "measured": 3}
    assert worker_slots({"tiny": {"memory_limit": mib, "nthreads": 1}}, block) == {"tiny": 1}


@pytest.fixture(scope="module")
def big_blocks(tmp_path_factory):
    """12 blocks of 48 MiB (49,152 x 256 float32): large against a worker's ~200 MiB
    baseline, so Dask's 95 % termination threshold of baseline + 3 blocks lies above
    baseline + 2.5 blocks; tall, so that the k-means sample is small beside the block."""
    root = tmp_path_factory.mktemp("memory")
    return ingest("synthetic:rows=589824,features=256,classes=10,seed=2", root / "big.zarr",
                  block_rows=49152)


def test_workers_stay_within_two_and_a_half_blocks_under_a_limit(big_blocks):
    ds = open_dataset(big_blocks.url)
    block = ds.block_rows * ds.n_features * 4
    baseline = post_import_baseline()
    limit = baseline + 3 * block
    params = dict(n_clusters=4, max_iter=1, random_state=5, block_rows=ds.block_rows)
    # Dask's spill (0.7) and pause (0.8) thresholds are fractions of the whole limit, baseline
    # included: at test-sized blocks they sit about one block above the baseline and would
    # spill and pause constantly. They are off here; the nanny's termination at 95 % stays,
    # and that is what a restart would come from. (benchmarks/train_memory.py keeps Dask's
    # defaults, with blocks of Pi size.)
    with dask.config.set({"distributed.worker.memory.spill": False,
                          "distributed.worker.memory.target": False,
                          "distributed.worker.memory.pause": False}):
        run = train_under_limit(ds, params, n_workers=2, limit=limit)
    assert run.restarts == 0
    above = run.above_baseline_blocks()
    assert len(above) == 2 and max(above.values()) <= 2.5, (
        f"peak above baseline, in blocks: {above} (baseline {baseline / MB:.0f} MiB)")
    reference = IncrementalKSGDClassifier(**params).fit(ds)
    X, _ = ds.block(3)
    np.testing.assert_array_equal(run.model.predict(X), reference.predict(X))
