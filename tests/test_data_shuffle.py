"""Shuffled ingest, held-out splits, class spread, and the real-data sources (IDX, Fashion-MNIST,
image folders), each written to a real Zarr store and read back."""

from __future__ import annotations

import gzip
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_iris

from rpicluster.data.sources import FASHION_MNIST_DIR, ArraySource, open_source
from rpicluster.data.reader import open_dataset, skewed_blocks
from rpicluster.data.writer import ingest
from rpicluster.errors import DataError, DataWarning


def check_dataset_blocks(ds, n_clusters, **kw):
    """What `train` checks before it contacts the cluster."""
    ds.check_trainable(n_clusters, **kw)


def rows_of(ds):
    """All (X, labels) of a store in store order."""
    parts = [ds.block(i) for i in range(ds.n_blocks)]
    return (np.concatenate([p[0] for p in parts]),
            ds.classes[np.concatenate([p[1] for p in parts])])


def sorted_rows(X, y):
    """Rows with their label as a set-comparable, sorted array."""
    both = np.column_stack([X.astype(np.float64), y.astype(np.float64)])
    return both[np.lexsort(both.T[::-1])]


def test_default_ingest_shuffles_sorted_iris_into_mixed_blocks(tmp_path):
    X, y = load_iris(return_X_y=True)
    ds = ingest("sklearn:iris", tmp_path / "a.zarr", block_rows=50)
    assert ds.attrs["shuffle"] == {"seed": 0}
    assert ds.attrs["block_classes"] == [3, 3, 3]
    assert ds.attrs["class_counts"] == [50, 50, 50]
    Xs, ys = rows_of(ds)
    assert not np.array_equal(ys, y)  # reordered ...
    np.testing.assert_array_equal(sorted_rows(Xs, ys), sorted_rows(X.astype(np.float32), y))
    again = ingest("sklearn:iris", tmp_path / "b.zarr", block_rows=50)
    np.testing.assert_array_equal(rows_of(again)[0], Xs)  # ... the same way for the same seed
    other = ingest("sklearn:iris", tmp_path / "c.zarr", block_rows=50, seed=1)
    assert not np.array_equal(rows_of(other)[0], Xs)


def test_no_shuffle_warns_naming_blocks_and_train_refuses(tmp_path):
    with pytest.warns(DataWarning, match=r"block 0 holds 1 .*without --no-shuffle"):
        ds = ingest("sklearn:iris", tmp_path / "a.zarr", block_rows=50, shuffle=False)
    assert ds.attrs["shuffle"] is False and ds.attrs["block_classes"] == [1, 1, 1]
    assert [b for b, _, _ in skewed_blocks(ds)] == [0, 1, 2]
    with pytest.raises(DataError, match=r"--no-shuffle: ingest it again"):
        check_dataset_blocks(ds, 2)
    with pytest.warns(DataWarning, match="class-skewed"):
        check_dataset_blocks(ds, 2, allow_skewed=True)


def test_blocks_too_small_for_the_clusters_are_refused_naming_the_block(tmp_path):
    ds = ingest("sklearn:iris", tmp_path / "a.zarr", block_rows=37)  # last block: 2 rows
    with pytest.raises(DataError, match=r"block 4 holds 2 rows, fewer than n_clusters=3.*"
                                        r"--block-rows"):
        check_dataset_blocks(ds, 3)
    check_dataset_blocks(ds, 2)


def test_disk_scatter_equals_in_memory_shuffle_and_split(tmp_path):
    """A streamed source (scattered through bucket files) lands exactly as an in-memory one."""
    spec = "rows=5000,features=8,classes=5,seed=1"
    streamed = ingest(f"synthetic:{spec}", tmp_path / "s.zarr", block_rows=700,
                      test_fraction=0.2, test_out=tmp_path / "st.zarr", seed=4)
    from rpicluster.data.synthetic import SyntheticSpec

    X, y = SyntheticSpec.from_string(spec).make()
    memory = ingest(ArraySource("m", X, y), tmp_path / "m.zarr", block_rows=700,
                    test_fraction=0.2, test_out=tmp_path / "mt.zarr", seed=4)
    for a, b in ((streamed, memory), (open_dataset(tmp_path / "st.zarr"),
                                      open_dataset(tmp_path / "mt.zarr"))):
        np.testing.assert_array_equal(rows_of(a)[0], rows_of(b)[0])
        np.testing.assert_array_equal(rows_of(a)[1], rows_of(b)[1])
    assert not list(tmp_path.glob(".rpicluster-ingest-*"))  # bucket files are removed


def test_test_split_is_stratified_disjoint_and_shares_classes(tmp_path):
    X, y = load_iris(return_X_y=True)
    y = np.where(y == 2, 1, y)[:120]  # classes of 50 and 70 rows
    X = X[:120]
    train = ingest(ArraySource("iris2", X, y), tmp_path / "tr.zarr", block_rows=40,
                   test_fraction=0.25, test_out=tmp_path / "te.zarr", seed=3)
    test = open_dataset(tmp_path / "te.zarr")
    assert sum(test.attrs["class_counts"]) == 30  # exactly a quarter of the rows ...
    assert test.attrs["class_counts"] in ([12, 18], [13, 17])  # ... a quarter of each class
    assert np.add(train.attrs["class_counts"], test.attrs["class_counts"]).tolist() == [50, 70]
    assert train.classes.tolist() == test.classes.tolist() == [0, 1]
    assert test.attrs["split"] == {"part": "test", "fraction": 0.25, "seed": 3}
    both = np.concatenate([rows_of(train)[0], rows_of(test)[0]])
    np.testing.assert_array_equal(sorted_rows(both, np.zeros(len(both))),
                                  sorted_rows(X.astype(np.float32), np.zeros(len(X))))


def test_single_class_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(DataError, match="at least 2 classes"):
        ingest(ArraySource("one", np.ones((10, 2)), np.zeros(10)), tmp_path / "a.zarr")
    assert not (tmp_path / "a.zarr").exists()


def test_bad_row_found_while_shuffling_leaves_nothing(tmp_path):
    X = np.ones((30, 2))
    X[17, 1] = np.nan
    (tmp_path / "d.csv").write_text("a,b,label\n" + "".join(
        f"{a},{b},{i % 2}\n" for i, (a, b) in enumerate(X)))
    with pytest.raises(DataError, match="row 17 column 1"):
        ingest(tmp_path / "d.csv", tmp_path / "a.zarr", block_rows=10)
    assert not (tmp_path / "a.zarr").exists()


def write_idx(path, arr, gz):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    head = bytes([0, 0, codes[arr.dtype.type], arr.ndim]) + np.asarray(
        arr.shape, dtype=">u4").tobytes()
    body = head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(body)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_images_are_pixels_over_255(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 30).astype(np.uint8)
    write_idx(tmp_path / "i.idx", images, gz)
    write_idx(tmp_path / "l.idx", labels, gz)
    ds = ingest(f"idx:{tmp_path / 'i.idx'},{tmp_path / 'l.idx'}", tmp_path / "a.zarr",
                block_rows=8, shuffle=False)
    assert ds.attrs["image_shape"] == [4, 3]
    Xs, ys = rows_of(ds)
    np.testing.assert_allclose(Xs, images.reshape(30, 12) / 255, rtol=1e-6)
    np.testing.assert_array_equal(ys, labels)
    with pytest.raises(DataError, match="swapped"):
        open_source(f"idx:{tmp_path / 'l.idx'},{tmp_path / 'i.idx'}")


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="needs the Debian package dataset-fashion-mnist")
def test_fashion_mnist_test_split_from_the_debian_package():
    src = open_source("fashion-mnist:test")
    assert (src.n_rows, src.n_features, len(src.classes)) == (10_000, 784, 10)
    X, y = next(src.blocks(500))
    assert X.dtype == np.float32 and 0 <= X.min() and X.max() <= 1 and X.max() > 0.9
    assert open_source("fashion-mnist").n_rows == 60_000


def make_image_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, mode, size in (("cat", "RGB", (40, 30)), ("cat", "L", (16, 16)),
                            ("dog", "RGBA", (20, 50)), ("dog", "P", (33, 33)),
                            ("dog", "RGB", (64, 64))):
        (root / cls).mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        im = Image.fromarray(arr).convert(mode)
        n = len(list((root / cls).iterdir()))
        im.save(root / cls / f"{n}.{'jpg' if mode in ('RGB', 'L') else 'png'}")
    (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "dog" / "notes.txt").write_text("ignored: not an image suffix")


def test_image_folder_converts_sizes_and_modes_to_uint8_and_names_bad_files(tmp_path):
    make_image_folder(tmp_path / "imgs")
    with pytest.warns(DataWarning, match=r"skipped 1 unreadable image file: dog/broken.jpg"):
        ds = ingest(f"images:{tmp_path / 'imgs'}", tmp_path / "a.zarr", block_rows=3,
                    source_options={"image_size": 8})
    assert ds.classes.tolist() == ["cat", "dog"]
    assert ds.attrs["image_shape"] == [8, 8, 3] and ds.n_features == 192
    X0, _ = ds.block(0)
    assert X0.dtype == np.uint8 and ds.n_rows == 5
    assert ds.nbytes == 5 * (192 + 4)


def test_image_folder_refuses_bad_files_on_request_before_writing(tmp_path):
    make_image_folder(tmp_path / "imgs")
    with pytest.raises(DataError, match=r"broken.jpg: not a readable image"):
        ingest(f"images:{tmp_path / 'imgs'}", tmp_path / "a.zarr",
               source_options={"bad_images": "error"})
    assert not (tmp_path / "a.zarr").exists()


def test_missing_uint8_chunk_is_reported(tmp_path):
    make_image_folder(tmp_path / "imgs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        ds = ingest(f"images:{tmp_path / 'imgs'}", tmp_path / "a.zarr", block_rows=3,
                    source_options={"image_size": 4, "image_mode": "L"})
    assert ds.attrs["image_shape"] == [4, 4, 1]
    (tmp_path / "a.zarr" / "X" / "c" / "1" / "0").unlink()
    with pytest.raises(DataError, match=r"chunk 'X/c/1/0' \(block 1\) is missing"):
        open_dataset(tmp_path / "a.zarr").block(1)


def test_cli_ingest_reports_spread_split_and_warnings_and_train_refuses(tmp_path):
    from click.testing import CliRunner

    from rpicluster.cli import main

    run = CliRunner()
    res = run.invoke(main, ["ingest", "sklearn:iris", str(tmp_path / "a.zarr"), "--block-rows",
                            "40", "--test-fraction", "0.2", "--test-out",
                            str(tmp_path / "t.zarr")])
    assert res.exit_code == 0, res.output
    assert "ingested" in res.output and "classes per block: min 3" in res.output
    assert open_dataset(tmp_path / "t.zarr").n_rows == 30
    res = run.invoke(main, ["ingest", "sklearn:iris", str(tmp_path / "s.zarr"), "--block-rows",
                            "50", "--no-shuffle"])
    assert res.exit_code == 0 and "warning:" in res.output and "block 0 holds 1" in res.output
    res = run.invoke(main, ["train", str(tmp_path / "s.zarr"), "-o", str(tmp_path / "m.skops"),
                            "--clusters", "2"])
    assert res.exit_code == 1 and "error:" in res.output and "--no-shuffle" in res.output
    assert not (tmp_path / "m.skops").exists()
    res = run.invoke(main, ["ingest", "sklearn:iris", str(tmp_path / "x.zarr"),
                            "--test-fraction", "0.2"])
    assert res.exit_code != 0 and "go together" in res.output


def test_cli_train_allow_skewed_trains_and_prints_the_warning(tmp_path, cluster):
    """train --allow-skewed on a skewed --no-shuffle store died with NameError
    (RPiClusterWarning not imported) as soon as the skew warning was caught."""
    from click.testing import CliRunner

    from rpicluster.cli import main

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 100)  # sorted by label: 2 classes in each block of 200
    X = (rng.normal(size=(1000, 8)) + y[:, None]).astype(np.float32)
    np.savez(tmp_path / "sorted.npz", X=X, y=y)
    run = CliRunner()
    res = run.invoke(main, ["ingest", str(tmp_path / "sorted.npz"), str(tmp_path / "s.zarr"),
                            "--block-rows", "200", "--no-shuffle"])
    assert res.exit_code == 0, res.output
    res = run.invoke(main, ["train", str(tmp_path / "s.zarr"), "-o", str(tmp_path / "m.skops"),
                            "--clusters", "2", "--allow-skewed", "--scheduler",
                            cluster.scheduler_address])
    assert res.exit_code == 0, res.output
    assert "warning: " in res.output and "5 of 5 blocks are class-skewed" in res.output
    assert (tmp_path / "m.skops").is_file()


def test_test_quotas_hit_the_exact_total():
    from rpicluster.data.writer import split_quotas

    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(1, 400, rng.integers(2, 60))
        f = float(rng.uniform(0.05, 0.5))
        q = split_quotas(counts, f)
        assert q.sum() == round(f * counts[counts >= 2].sum())
        assert np.all(q[counts == 1] == 0) and np.all(q[counts >= 2] >= 1)
        assert np.all(q <= np.maximum(counts - 1, 0))
        assert np.all(np.abs(q - f * counts)[counts >= 2] < 2)
