"""The store contract on real Zarr stores on disk: damaged chunks are reported by key, incomplete
stores are refused, resume equals a clean ingest, and a Dataset pickles as its URL."""

import json
import pickle

import functools

import numpy as np
import pytest

from rpicluster.data.sources import ArraySource, Source
from rpicluster.data.layout import FORMAT_VERSION
from rpicluster.data.reader import open_dataset
from rpicluster.data.writer import ingest as ingest_store

# These tests check sources and the layout row for row, so they keep the source order;
# tests/test_data_shuffle.py covers the (default) shuffled ingest.
ingest = functools.partial(ingest_store, shuffle=False)
from rpicluster.errors import DataError, StoreIncompleteError
from rpicluster.testing import cli_argv, wait_until


@pytest.fixture
def raw():
    """250 rows x 6 features with string labels; the first 40 rows all zero (an all-zero block
    must still be stored, not skipped as 'empty')."""
    rng = np.random.default_rng(2)
    X = rng.random((250, 6))
    y = rng.choice(["ant", "bee", "cow", "dog"], size=250)
    X[:40] = 0
    y[:40] = "ant"
    return X, y


@pytest.fixture
def source(raw):
    """``raw`` as a source."""
    return ArraySource("test:array", *raw)


@pytest.fixture
def store(tmp_path, source):
    """A complete store of ``source`` in blocks of 40 rows (7 blocks, the last of 10 rows)."""
    ingest(source, tmp_path / "d.zarr", block_rows=40)
    return tmp_path / "d.zarr"


class FailingSource(Source):
    """The blocks of ``inner``, then an error when block ``fail_at`` is due: an ingest that
    stops half-way (a source that went away, a full disk)."""

    def __init__(self, inner: Source, fail_at: int):
        super().__init__(inner.description, inner.n_rows, inner.n_features, inner.classes)
        self.inner, self.fail_at = inner, fail_at

    def _raw_blocks(self, block_rows, start_block):
        for i, block in enumerate(self.inner.blocks(block_rows, start_block), start_block):
            if i == self.fail_at:
                raise DataError("source went away")
            yield block


def test_all_zero_block_is_stored_and_read_back(store, source):
    ds = open_dataset(store)
    assert (store / "X" / "c" / "0" / "0").is_file() and (store / "y" / "c" / "0").is_file()
    X0, y0 = ds.block(0)
    assert not X0.any() and (ds.classes[y0] == "ant").all()


@pytest.mark.parametrize("array, key", [("X", "X/c/2/0"), ("y", "y/c/2")])
@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_damaged_chunk_is_reported_by_key(store, array, key, damage):
    path = store / key
    data = bytearray(path.read_bytes())
    if damage == "corrupt":
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.unlink()
    word = {"corrupt": "corrupted", "truncate": "corrupted or truncated", "delete": "missing"}
    ds = open_dataset(store)
    with pytest.raises(DataError, match=rf"array '{array}' chunk '{key}' \(block 2\) is "
                                        rf"{word[damage]}"):
        ds.block(2)
    # the dask arrays read through the same checks
    with pytest.raises(DataError, match=rf"chunk '{key}'"):
        getattr(ds, array).sum().compute(scheduler="sync")
    ds.block(1)  # other blocks still read


def rewrite_attrs(store, **changes):
    """Edit the group attributes of a store in place (as a foreign writer would)."""
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"].update(changes)
    (store / "zarr.json").write_text(json.dumps(meta))


def test_unknown_format_version_is_refused(store):
    rewrite_attrs(store, rpicluster_format=FORMAT_VERSION + 1)
    with pytest.raises(DataError, match=rf"unknown format version {FORMAT_VERSION + 1}"):
        open_dataset(store)


def test_store_without_completion_marker_is_refused(store):
    rewrite_attrs(store, complete=False)
    with pytest.raises(StoreIncompleteError, match="incomplete"):
        open_dataset(store)


def test_not_a_store(tmp_path):
    with pytest.raises(DataError, match="no Zarr store at"):
        open_dataset(tmp_path / "nothing.zarr")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a Zarr store; refusing"):
        ingest("sklearn:iris", tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_metadata_that_disagrees_with_the_arrays(store):
    rewrite_attrs(store, n_features=7)
    with pytest.raises(DataError, match=r"array 'X' has shape \(250, 6\)"):
        open_dataset(store)


def chunk_bytes(store):
    """Every chunk file of a store, by key."""
    return {p.relative_to(store).as_posix(): p.read_bytes()
            for p in store.rglob("*") if p.is_file() and "/c/" in p.as_posix()}


def test_resume_continues_and_equals_a_clean_ingest(tmp_path, source, store):
    out = tmp_path / "resumed.zarr"
    with pytest.raises(DataError, match=r"source went away .*holds 4 of 7 blocks"):
        ingest(FailingSource(source, fail_at=4), out, block_rows=40)
    with pytest.raises(StoreIncompleteError, match="4 of 7 blocks"):
        open_dataset(out)
    # a torn write of the block that was in flight is rewritten, not trusted
    (out / "X" / "c" / "4").mkdir()
    (out / "X" / "c" / "4" / "0").write_bytes(b"torn")
    with pytest.raises(DataError, match=r"incomplete rpicluster store .*add --resume"):
        ingest(source, out, block_rows=40)
    with pytest.raises(DataError, match=r"cannot resume .*block_rows is 40, this ingest's is 50"):
        ingest(source, out, block_rows=50, resume=True)

    class Counting(Source):
        """``source``, counting the blocks it is asked for."""

        def __init__(self):
            super().__init__(source.description, source.n_rows, source.n_features,
                             source.classes)
            self.read = 0

        def _raw_blocks(self, block_rows, start_block):
            for block in source.blocks(block_rows, start_block):
                self.read += 1
                yield block

    counting = Counting()
    ds = ingest(counting, out, block_rows=40, resume=True)
    assert counting.read == 3
    assert chunk_bytes(out) == chunk_bytes(store)
    clean = open_dataset(store)
    assert {k: v for k, v in ds.attrs.items() if k != "created"} == {
        k: v for k, v in clean.attrs.items() if k != "created"}
    # resuming a finished ingest changes nothing
    assert ingest(source, out, block_rows=40, resume=True).n_rows == 250


def test_existing_complete_store_needs_overwrite(tmp_path, store):
    with pytest.raises(DataError, match=r"already holds a complete rpicluster store "
                                        r"\(test:array\); add --overwrite to replace it"):
        ingest("sklearn:iris", store)
    ds = ingest("sklearn:iris", store, overwrite=True, block_rows=100)
    assert (ds.n_rows, ds.n_blocks) == (150, 2)
    assert not (store / "X" / "c" / "2").exists()  # the old store's chunks are gone


def test_dataset_pickles_as_its_url_and_reads_through_dask(store, raw):
    ds = open_dataset(store)
    blob = pickle.dumps(ds)
    assert len(blob) < 300
    remote = pickle.loads(blob)
    assert remote.url == str(store) and remote.n_blocks == 7
    assert remote.X.chunks[0] == (40,) * 6 + (10,)
    X, y = remote.X.compute(scheduler="sync"), remote.y.compute(scheduler="sync")
    np.testing.assert_array_equal(X, raw[0].astype(np.float32))
    np.testing.assert_array_equal(remote.classes[y], raw[1])
    with pytest.raises(DataError, match=r"block 7 does not exist \(blocks 0..6\)"):
        ds.block(7)


def test_ingest_records_a_checksum_per_chunk_position(store):
    sums = open_dataset(store).attrs["chunk_crc32c"]
    assert len(sums["X"]) == len(sums["y"]) == 7
    assert len(set(sums["X"])) == 7  # every block's rows differ, so do their checksums


@pytest.mark.parametrize("array, key, other", [("X", "X/c/{}/0", 3), ("y", "y/c/{}", 3)])
def test_a_chunk_swapped_for_another_blocks_is_refused_by_name(store, array, key, other):
    """Finding 7: a chunk replaced by another block's chunk (valid crc32c) was read as block 2."""
    (store / key.format(2)).write_bytes((store / key.format(other)).read_bytes())
    ds = open_dataset(store)
    with pytest.raises(DataError, match=rf"array '{array}' chunk '{key.format(2)}' \(block 2\) "
                                        rf"does not hold block 2's data \(it holds block "
                                        rf"{other}'s data.*re-ingest"):
        ds.block(2)
    ds.block(other)


def _set_codes(store, block, codes):
    """Write class codes into ``block`` through zarr (valid crc32c), as a foreign writer would,
    and record their checksum as if ingest had written them."""
    import zarr

    from rpicluster.data.layout import crc as _crc

    group = zarr.open_group(store, mode="r+")
    group["y"][block * 40:(block + 1) * 40] = codes
    sums = dict(group.attrs["chunk_crc32c"])
    sums["y"] = list(sums["y"])
    sums["y"][block] = _crc(np.asarray(codes, dtype=np.int32))
    group.attrs["chunk_crc32c"] = sums


def test_impossible_class_codes_are_refused_by_name(store):
    """Finding 7: out-of-range class codes were accepted (4 classes, code 9 read as data)."""
    codes = np.zeros(40, dtype=np.int32)
    codes[5:8] = 9
    _set_codes(store, 2, codes)
    ds = open_dataset(store)
    with pytest.raises(DataError, match=r"array 'y' chunk 'y/c/2' \(block 2\) holds class code 9 "
                                        r"\(3 rows with impossible codes\), but the store has 4 "
                                        r"classes \(codes 0..3\)"):
        ds.block(2)


def test_a_format_1_store_is_still_read_with_its_class_codes_checked(store):
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["chunk_crc32c"]
    meta["attributes"]["rpicluster_format"] = 1
    (store / "zarr.json").write_text(json.dumps(meta))
    ds = open_dataset(store)
    X, y = ds.block(2)
    assert X.shape == (40, 6) and y.max() < 4
    import zarr

    zarr.open_group(store, mode="r+")["y"][80:120] = 7
    with pytest.raises(DataError, match=r"chunk 'y/c/2' \(block 2\) holds class code 7"):
        open_dataset(store).block(2)


def test_a_format_2_store_without_its_checksums_says_re_ingest(store):
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["chunk_crc32c"]
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"'chunk_crc32c' is missing.*re-ingest"):
        open_dataset(store)


def test_store_writer_and_check_output_make_a_readable_store_in_any_block_order(tmp_path):
    """The public writer API (ingest's and rpicluster features'): one existing-output check,
    create, blocks written out of order with their checksums recorded, finish."""
    from rpicluster.data.layout import CHECKSUMS_KEY
    from rpicluster.data.writer import StoreWriter, check_output

    rng = np.random.default_rng(0)
    X, y = rng.random((100, 3)).astype(np.float32), rng.integers(0, 2, 100).astype(np.int32)
    url = str(tmp_path / "w.zarr")
    layout = {"rpicluster_format": FORMAT_VERSION, "classes": [0, 1], "n_rows": 100,
              "n_features": 3, "block_rows": 40, "n_blocks": 3, "source": "test:writer"}
    assert check_output(url, layout, resume=False, overwrite=False) is None  # nothing there
    writer = StoreWriter.create(url, layout, dtype=np.float32)
    with pytest.raises(StoreIncompleteError):
        open_dataset(url)
    sums = {"X": [None] * 3, "y": [None] * 3}
    for b in (2, 0, 1):
        rows = slice(b * 40, (b + 1) * 40)
        crc = StoreWriter.reopen(url).write_block(b, X[rows], y[rows])
        sums["X"][b], sums["y"][b] = crc["X"], crc["y"]
        writer.record(blocks_written=sum(s is not None for s in sums["X"]),
                      **{CHECKSUMS_KEY: sums})
    with pytest.raises(DataError, match=r"already holds an incomplete rpicluster store "
                                        r"\(test:writer\); add --resume to continue it"):
        check_output(url, layout, resume=False, overwrite=False)
    writer.finish()
    ds = open_dataset(url)
    for b in range(3):  # every chunk checked against the recorded checksum on read
        Xb, yb = ds.block(b)
        np.testing.assert_array_equal(Xb, X[b * 40:(b + 1) * 40])
        np.testing.assert_array_equal(yb, y[b * 40:(b + 1) * 40])

    with pytest.raises(DataError, match=r"already holds a complete rpicluster store "
                                        r"\(test:writer\); add --overwrite to replace it"):
        check_output(url, layout, resume=False, overwrite=False)
    assert check_output(url, layout, resume=True, overwrite=False)["complete"] is True
    # The specific key is named, not "source" (which may repeat it).
    other = {**layout, "block_rows": 50, "source": "test:writer,50"}
    with pytest.raises(DataError, match=r"cannot resume .*block_rows is 40, this run's is 50"):
        check_output(url, other, resume=True, overwrite=False, writer="run")
    assert check_output(url, other, resume=False, overwrite=True) is None
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"not a store")
    with pytest.raises(DataError, match="not a Zarr store; refusing to write there"):
        check_output(str(foreign), layout, resume=False, overwrite=True)


# --- outputs in folders that do not exist yet; Ctrl-C ------------------------------------------

SHUFFLED = "synthetic:rows=5000,features=8,classes=3,seed=0"  # > 2 blocks: the scatter pass


def test_ingest_creates_missing_parent_folders(tmp_path):
    """A shuffled ingest of a big source into new/dir/ failed with FileNotFoundError: its bucket
    folder goes beside the store before the store (and its folder) exists."""
    from click.testing import CliRunner

    from rpicluster.cli import main

    out, test_out = tmp_path / "new" / "dir" / "data.zarr", tmp_path / "other" / "t.zarr"
    res = CliRunner().invoke(main, ["ingest", SHUFFLED, str(out), "--block-rows", "1000",
                                    "--test-fraction", "0.2", "--test-out", str(test_out)])
    assert res.exit_code == 0, res.output
    assert open_dataset(out).n_rows == 4000 and open_dataset(test_out).n_rows == 1000
    assert [p.name for p in out.parent.iterdir()] == ["data.zarr"], "bucket folder left behind"


@pytest.mark.parametrize("args", [
    ["ingest", SHUFFLED, "{f}/x.zarr", "--block-rows", "1000"],
    ["ingest", "sklearn:iris", "{f}/sub/x.zarr"],
    ["ingest", "sklearn:iris", "{tmp}/ok.zarr", "--test-fraction", "0.2", "--test-out",
     "{f}/t.zarr"],
    ["bench", "algorithms", "--quick", "-o", "{f}/out"],
])
def test_a_file_where_an_output_folder_should_be_is_one_line(tmp_path, args):
    from click.testing import CliRunner

    from rpicluster.cli import main

    f = tmp_path / "afile"
    f.write_text("not a folder")
    argv = [a.format(f=f, tmp=tmp_path) for a in args]
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines()[-1].startswith("error: cannot "), res.output
    assert f"{f} is a file, not a folder" in res.output or "Not a directory" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"], "nothing else written"


def test_ctrl_c_during_ingest_leaves_an_incomplete_store_and_prints_the_resume_command(
        tmp_path):
    import os
    import re
    import shlex
    import signal
    import subprocess

    from click.testing import CliRunner

    from rpicluster.cli import main

    out = tmp_path / "a" / "x.zarr"
    src = "synthetic:rows=600000,features=16,classes=4,seed=1"
    proc = subprocess.Popen(cli_argv("ingest", src, str(out), "--block-rows", "1000",
                                     "--no-shuffle"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    meta = out / "zarr.json"
    # Stop it once a block or more is written, then Ctrl-C (600 blocks: about 3 s of work, so
    # that a test process starved for a second still stops it mid-way). Not written yet, or
    # caught mid-write: OSError, ValueError, KeyError.
    wait_until(lambda: json.loads(meta.read_text())["attributes"]["blocks_written"] >= 1, 120,
               what=f"a block written to {out}", process=proc,
               ignore=(OSError, ValueError, KeyError), interval=0.005)

    def stopped_with_a_whole_record():
        proc.send_signal(signal.SIGSTOP)
        try:
            return json.loads(meta.read_text())["attributes"]["blocks_written"]
        except ValueError:  # stopped between zarr.json's truncation and its write: go on a bit
            proc.send_signal(signal.SIGCONT)
            return None

    written = wait_until(stopped_with_a_whole_record, 30, interval=0.002,
                         what=f"the ingest stopped with {meta} whole")
    assert written < 600
    proc.send_signal(signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "Aborted!" not in output, output
    m = re.search(rf"^interrupted \(Ctrl-C\): {re.escape(str(out))} holds (\d+) of 600 blocks "
                  r"and is marked incomplete; continue with: (.*)$", output, re.M)
    assert m, output
    with pytest.raises(StoreIncompleteError):
        open_dataset(out)
    again = shlex.split(m.group(2))
    assert again == ["rpicluster", "ingest", src, str(out), "--block-rows", "1000", "--seed",
                     "0", "--no-shuffle", "--resume"]
    res = CliRunner().invoke(main, again[1:])
    assert res.exit_code == 0, res.output
    whole = tmp_path / "whole.zarr"
    assert CliRunner().invoke(main, ["ingest", src, str(whole), "--block-rows", "1000",
                                     "--no-shuffle"]).exit_code == 0
    a, b = open_dataset(out), open_dataset(whole)
    for i in (0, int(m.group(1)), 599):
        np.testing.assert_array_equal(a.block(i)[0], b.block(i)[0])
        np.testing.assert_array_equal(a.block(i)[1], b.block(i)[1])
