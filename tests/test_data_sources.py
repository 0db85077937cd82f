"""Every source kind ingested into a real Zarr store on disk and read back, and the validation
errors for bad input (each naming the row, array or option at fault)."""

import functools
import re

import numpy as np
import pytest
from sklearn.datasets import dump_svmlight_file, load_svmlight_file

from rpicluster.data.sources import SKLEARN_DATASETS
from rpicluster.data.reader import open_dataset
from rpicluster.data.writer import ingest as ingest_store

# These tests check sources and the layout row for row, so they keep the source order;
# tests/test_data_shuffle.py covers the (default) shuffled ingest.
ingest = functools.partial(ingest_store, shuffle=False)
from rpicluster.data.synthetic import make_imagenet_like
from rpicluster.errors import ConfigError, DataError, StoreIncompleteError


@pytest.fixture
def arrays():
    """A small float64 X (103 rows, 5 features) with int labels drawn from {3, 7, 11}."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((103, 5))
    y = rng.choice([3, 7, 11], size=103)
    return X, y


def read_all(ds):
    """All blocks of a store, concatenated: (X, original labels)."""
    parts = [ds.block(i) for i in range(ds.n_blocks)]
    X = np.concatenate([p[0] for p in parts])
    return X, ds.classes[np.concatenate([p[1] for p in parts])]


def test_npz_roundtrip_with_a_partial_last_block(tmp_path, arrays):
    X, y = arrays
    np.savez_compressed(tmp_path / "d.npz", X=X, y=y)
    ds = ingest(tmp_path / "d.npz", tmp_path / "d.zarr", block_rows=25)
    assert (ds.n_rows, ds.n_features, ds.n_blocks, ds.block_rows) == (103, 5, 5, 25)
    assert ds.block_slice(4) == (100, 103)
    assert ds.classes.tolist() == [3, 7, 11]
    Xr, yr = read_all(ds)
    np.testing.assert_array_equal(Xr, X.astype(np.float32))
    np.testing.assert_array_equal(yr, y)
    assert ds.attrs["source"] == f"npz:{tmp_path / 'd.npz'}"


@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_with_string_labels(tmp_path, arrays, order):
    X, y = arrays
    names = np.array(["cat", "dog", "emu"])[np.searchsorted([3, 7, 11], y)]
    np.save(tmp_path / "X.npy", np.asarray(X, order=order))
    np.save(tmp_path / "y.npy", names)
    ds = ingest(tmp_path / "X.npy", tmp_path / "d.zarr", labels=tmp_path / "y.npy",
                block_rows=40)
    assert ds.classes.tolist() == ["cat", "dog", "emu"]
    Xr, yr = read_all(ds)
    np.testing.assert_array_equal(Xr, X.astype(np.float32))
    np.testing.assert_array_equal(yr, names)


def write_csv(path, header, rows):
    """Write a CSV file with a header row."""
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


@pytest.mark.parametrize("label_column, header, expected_label", [
    (None, ["a", "target", "b", "c"], 1),       # a conventional name, wherever it is
    (None, ["a", "b", "c", "klass"], 3),        # no conventional name: the last column
    ("b", ["a", "b", "c", "klass"], 1),         # named explicitly
])
def test_csv_label_column(tmp_path, label_column, header, expected_label):
    rng = np.random.default_rng(1)
    values = rng.integers(0, 50, size=(57, 4)).astype(float) / 4
    values[:, expected_label] = rng.integers(0, 3, size=57)
    path = write_csv(tmp_path / "d.csv", header, values.tolist())
    ds = ingest(path, tmp_path / "d.zarr", block_rows=10, label_column=label_column)
    Xr, yr = read_all(ds)
    np.testing.assert_array_equal(Xr, np.delete(values, expected_label, axis=1).astype(np.float32))
    np.testing.assert_array_equal(yr, values[:, expected_label].astype(int))
    assert ds.classes.dtype.kind == "i"


def test_csv_string_labels_and_quotes(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('x1,x2,label\n1,"2.5",bird\n3,4,"cat, black"\n5,6,bird\n')
    ds = ingest(path, tmp_path / "d.zarr", block_rows=2)
    Xr, yr = read_all(ds)
    assert yr.tolist() == ["bird", "cat, black", "bird"]
    np.testing.assert_array_equal(Xr, [[1, 2.5], [3, 4], [5, 6]])


@pytest.mark.parametrize("body, match", [
    ("a,label\n1,0\n2,1\n3,1\n4,2.5\n", r"label '2.5' at data row 3"),
    ("a,b,label\n1,2,0\n3,oops,1\n", r"data row 1 \(line 3\), column 'b'"),
    ("a,b,label\n1,2,0\n3,1\n", r"line 3 has 2 fields"),
    ("a,b,label\n1,2,0\n1,nan,1\n", r"row 1 column 1 is nan"),
    ("label\n1\n2\n", r"no features"),
    ("a,label\n", r"no rows"),
    # Issue 29 finding 7: an empty label became a class "".
    ("a,label\n1,0\n2, \n", r"data row 1 \(line 3\) has an empty label in column 'label'; "
                           r"fill it in or remove the row"),
])
def test_csv_errors_name_the_row(tmp_path, body, match):
    (tmp_path / "d.csv").write_text(body)
    with pytest.raises(DataError, match=match):
        ingest(tmp_path / "d.csv", tmp_path / "d.zarr", block_rows=1)


def test_csv_unknown_label_column(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["a", "b"], [[1, 2]])
    with pytest.raises(ConfigError, match=r"no column 'z' \(columns: a, b\)"):
        ingest(path, tmp_path / "d.zarr", label_column="z")


def test_svmlight_is_densified_per_block(tmp_path, arrays):
    X, y = arrays
    X[X < 0.5] = 0
    dump_svmlight_file(X, y, str(tmp_path / "d.svm"))
    ds = ingest(tmp_path / "d.svm", tmp_path / "d.zarr", block_rows=30)
    Xs, ys = load_svmlight_file(str(tmp_path / "d.svm"))
    Xr, yr = read_all(ds)
    np.testing.assert_array_equal(Xr, Xs.toarray().astype(np.float32))
    np.testing.assert_array_equal(yr, ys.astype(int))
    # the scheme form works for any file name
    ds2 = ingest(f"libsvm:{tmp_path / 'd.svm'}", tmp_path / "e.zarr", block_rows=30)
    assert ds2.n_rows == 103


@pytest.mark.parametrize("name", SKLEARN_DATASETS)
def test_sklearn_datasets(tmp_path, name):
    import sklearn.datasets

    X, y = getattr(sklearn.datasets, f"load_{name}")(return_X_y=True)
    ds = ingest(f"sklearn:{name}", tmp_path / "d.zarr", block_rows=128)
    Xr, yr = read_all(ds)
    np.testing.assert_array_equal(Xr, X.astype(np.float32))
    np.testing.assert_array_equal(yr, y)


def test_synthetic_equals_the_generator(tmp_path):
    ds = ingest("synthetic:rows=300,features=16,classes=7,seed=5", tmp_path / "d.zarr",
                block_rows=64)
    X, y = make_imagenet_like(300, 16, 7, seed=5)
    Xr, yr = read_all(ds)
    np.testing.assert_array_equal(Xr, X)
    np.testing.assert_array_equal(yr, y)
    assert ds.classes.tolist() == list(range(7))


@pytest.mark.parametrize("source, kwargs, error, match", [
    ("ftp:x", {}, ConfigError, r"unknown source scheme 'ftp' \(known schemes: sklearn:, "
                               r"synthetic:, svmlight:"),
    ("sklearn:mnist", {}, ConfigError, r"unknown scikit-learn data set 'mnist' \(known: "),
    ("synthetic:rows=10,colour=3", {}, ConfigError, r"unknown key 'colour'"),
    ("data.parquet", {}, ConfigError, r"unknown source file type '.parquet'"),
    ("missing.npz", {}, DataError, r"missing.npz does not exist"),
    ("sklearn:iris", {"label_column": "y"}, ConfigError, r"only applies to .csv"),
    ("sklearn:iris", {"labels": "y.npy"}, ConfigError, r"only applies to a .npy"),
])
def test_bad_source_strings(tmp_path, monkeypatch, source, kwargs, error, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        ingest(source, tmp_path / "d.zarr", **kwargs)
    assert not (tmp_path / "d.zarr").exists()


def test_npy_needs_labels(tmp_path):
    np.save(tmp_path / "X.npy", np.zeros((3, 2)))
    with pytest.raises(ConfigError, match=r"needs labels \(--labels labels.npy\)"):
        ingest(tmp_path / "X.npy", tmp_path / "d.zarr")


@pytest.mark.parametrize("X, y, match", [
    (np.ones((10, 3)), np.arange(9), r"X has 10 rows but y has 9"),
    (np.ones((0, 3)), np.arange(0), r"no rows"),
    (np.ones((4, 0)), np.arange(4), r"no features"),
    (np.ones(4), np.arange(4), r"X must be 2-D"),
    (np.ones((4, 2)), np.array([0, 1, 1.5, 2]), r"label at row 2 is .*1.5.*whole numbers"),
    (np.ones((4, 2)), np.array([0, 1, np.nan, 2]), r"label at row 2 is .*nan"),
])
def test_invalid_arrays_are_refused_before_anything_is_written(tmp_path, X, y, match):
    np.savez(tmp_path / "d.npz", X=X, y=y)
    with pytest.raises(DataError, match=match):
        ingest(tmp_path / "d.npz", tmp_path / "d.zarr")
    assert not (tmp_path / "d.zarr").exists()


def test_npz_without_y(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.ones((3, 2)), labels=np.arange(3))
    with pytest.raises(DataError, match=r"no array 'y' \(arrays in the file: X, labels"):
        ingest(tmp_path / "d.npz", tmp_path / "d.zarr")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_value_names_the_row_and_leaves_the_store_incomplete(tmp_path, arrays, bad):
    X, y = arrays
    X[77, 2] = bad
    np.savez(tmp_path / "d.npz", X=X, y=y)
    with pytest.raises(DataError, match=r"X row 77 column 2 is .*(nan|inf).*holds 3 of 6 blocks"):
        ingest(tmp_path / "d.npz", tmp_path / "d.zarr", block_rows=20)
    with pytest.raises(StoreIncompleteError, match=r"incomplete .*3 of 6 blocks"):
        open_dataset(tmp_path / "d.zarr")


def test_a_csv_field_over_the_csv_modules_limit_is_one_line(tmp_path):
    """Finding 6: a CSV field over csv.field_size_limit() raised `_csv.Error` with a traceback."""
    import csv

    path = tmp_path / "big.csv"
    path.write_text(f"a,label\n1,0\n{'1' * (csv.field_size_limit() + 1)},1\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: line 3: field larger than "
                                        r"field limit .*unbalanced quote"):
        ingest(str(path), tmp_path / "big.zarr")


def test_a_csv_line_of_hundreds_of_megabytes_is_refused_early(tmp_path):
    """Issue 29 finding 9: a 2.2 GB CSV field cost 4.3 GB of memory before its one-line error
    (Python read the whole line into one string first). Lines are read at most
    MAX_CSV_LINE characters at a time: a 600 MB line is refused with far less memory than it
    holds (measured in a fresh process: its peak RSS before and after)."""
    import subprocess
    import sys

    from rpicluster.data.sources import MAX_CSV_LINE

    path = tmp_path / "huge.csv"
    with open(path, "w") as f:
        f.write("a,label\n1,0\n")
        chunk = "1" * (64 << 20)
        for _ in range(9):
            f.write(chunk)
        f.write(",1\n")
    code = ("import resource; from rpicluster.data.writer import ingest; "
            "from rpicluster.errors import DataError\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"try: ingest({str(path)!r}, {str(tmp_path / 'h.zarr')!r})\n"
            "except DataError as exc: print(exc)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    message, grew_mib = res.stdout.strip().splitlines()
    assert message == (f"{path}: line 3 is longer than {MAX_CSV_LINE:,} characters; a row of "
                       "numbers is never that long: check that line for an unbalanced quote or "
                       "a field that is not a number")
    assert int(grew_mib) < 400, grew_mib       # the line is 576 MiB


def test_one_truncated_jpeg_is_skipped_not_fatal(tmp_path):
    """Issue 29 finding 7: one truncated JPEG aborted a whole `images:` ingest under the default
    --bad-images skip (Pillow's verify() passes it; decoding fails half-way through a block).
    It is skipped with the warning, and every good image is ingested."""
    from PIL import Image
    from skimage import data as samples

    from rpicluster.errors import DataWarning

    for cls, names in {"cat": ("chelsea", "cat"), "cup": ("coffee", "rocket")}.items():
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for name in names:
            path = tmp_path / "photos" / cls / f"{name}.jpg"
            Image.fromarray(getattr(samples, name)()).save(path)
    whole = (tmp_path / "photos" / "cup" / "rocket.jpg").read_bytes()
    (tmp_path / "photos" / "cup" / "rocket.jpg").write_bytes(whole[:len(whole) // 2])
    with pytest.warns(DataWarning, match=r"skipped 1 unreadable image file: cup/rocket.jpg"):
        ingest(f"images:{tmp_path / 'photos'}", tmp_path / "p.zarr",
               source_options={"image_size": 32})
    ds = open_dataset(tmp_path / "p.zarr")
    assert ds.n_rows == 3 and list(ds.classes) == ["cat", "cup"]
