"""Reading stores over real HTTP from a server on loopback, and the `ingest` / `serve` commands."""

import http.client
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from rpicluster.cli import main
from rpicluster.data.serve import StoreServer
from rpicluster.data.reader import open_dataset
from rpicluster.data.writer import ingest
from rpicluster.errors import DataError, StoreIncompleteError


@pytest.fixture
def store(tmp_path):
    """The digits data set in blocks of 500 rows (4 blocks)."""
    ingest("sklearn:digits", tmp_path / "digits.zarr", block_rows=500)
    return tmp_path / "digits.zarr"


@pytest.fixture
def server(store):
    """A read-only HTTP server for ``store`` on a free loopback port."""
    with StoreServer(store, host="127.0.0.1", port=0) as s:
        yield s


def request(server, method, path):
    """One raw HTTP request (no client-side path normalisation); returns (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request(method, path, body=b"data" if method in ("PUT", "POST") else None)
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_every_block_reads_the_same_over_http(store, server):
    local, remote = open_dataset(store), open_dataset(server.url)
    assert remote.url == server.url and remote.n_blocks == 4
    np.testing.assert_array_equal(remote.classes, local.classes)
    for i in range(4):
        for a, b in zip(remote.block(i), local.block(i)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(remote.X.compute(scheduler="sync"), local.X.compute())


def test_missing_and_corrupted_chunks_over_http(store, server):
    (store / "X" / "c" / "1" / "0").unlink()
    data = bytearray((store / "y" / "c" / "3").read_bytes())
    data[5] ^= 1
    (store / "y" / "c" / "3").write_bytes(bytes(data))
    ds = open_dataset(server.url)
    with pytest.raises(DataError, match=r"array 'X' chunk 'X/c/1/0' \(block 1\) is missing"):
        ds.block(1)
    with pytest.raises(DataError, match=r"array 'y' chunk 'y/c/3' \(block 3\) is corrupted"):
        ds.block(3)


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
def test_writes_are_refused(store, server, method):
    before = (store / "zarr.json").read_bytes()
    assert request(server, method, "/zarr.json")[0] == 405
    assert (store / "zarr.json").read_bytes() == before


@pytest.mark.parametrize("path", ["/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
                                  "/X/..%2f..%2f..%2fetc%2fpasswd", "/", "/X/"])
def test_no_traversal_or_listing(tmp_path, server, path):
    (tmp_path / "secret.txt").write_text("outside the store")
    status, body = request(server, "GET", path.replace("etc/passwd", "secret.txt")
                           .replace("etc%2fpasswd", "secret.txt"))
    assert status in (403, 404) and b"outside" not in body


def test_incomplete_store_is_not_served(tmp_path, store):
    meta = (store / "zarr.json").read_text().replace('"complete": true', '"complete": false')
    (store / "zarr.json").write_text(meta)
    with pytest.raises(StoreIncompleteError):
        StoreServer(store, host="127.0.0.1", port=0).start()


def test_cli_ingest_prints_progress_and_summary(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.arange(60.0).reshape(20, 3), y=np.arange(20) % 4)
    runner = CliRunner()
    args = ["ingest", str(tmp_path / "d.npz"), str(tmp_path / "d.zarr"), "--block-rows", "6"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"ingest: 4/4 blocks", result.output)
    assert re.search(r"20 rows, 3 features, 4 classes, 4 blocks, \d+ bytes, [\d.]+ s",
                     result.output)
    again = runner.invoke(main, args)
    assert again.exit_code == 1
    assert "error: " in again.output and "--overwrite" in again.output
    assert runner.invoke(main, args + ["--overwrite"]).exit_code == 0


def test_cli_serve_in_a_subprocess(store):
    proc = subprocess.Popen([sys.executable, "-m", "rpicluster.cli", "serve", str(store),
                             "--host", "127.0.0.1", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        X, y = open_dataset(url).block(2)
        assert X.shape == (500, 64) and y.shape == (500,)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("path", ["/.env", "/notes.txt", "/X/notes.txt", "/X/c/1/0.bak",
                                  "/X/c/.hidden", "/link/zarr.json", "/X/c/2/link",
                                  "/other/zarr.json", "/other/c/0", "/X/X/zarr.json",
                                  "/X/X/c/1/0", "/backup/X/c/1/0"])
def test_only_the_stores_own_files_are_served(store, server, path):
    """Finding 8: `serve` served any file placed in the store folder (/.env -> 200). Issue 29
    finding 9: it served any ``*/c/N`` and nested ``zarr.json`` too (another store copied
    inside, a backup folder): only X's and y's metadata and chunks are served now."""
    for extra in ("other/c", "X/X/c/1", "backup/X/c/1"):
        (store / extra).mkdir(parents=True, exist_ok=True)
    for extra in ("other/zarr.json", "other/c/0", "X/X/zarr.json", "X/X/c/1/0",
                  "backup/X/c/1/0"):
        (store / extra).write_text("secret")
    (store / ".env").write_text("AWS_SECRET_ACCESS_KEY=hunter2")
    (store / "notes.txt").write_text("secret")
    (store / "X" / "notes.txt").write_text("secret")
    (store / "X" / "c" / "1" / "0.bak").write_text("secret")
    (store / "X" / "c" / ".hidden").write_text("secret")
    (store / "link").symlink_to(store / "X")
    (store / "X" / "c" / "2" / "link").symlink_to(store / ".env")
    status, body = request(server, "GET", path)
    assert status == 404 and b"secret" not in body and b"hunter2" not in body
    assert request(server, "GET", "/X/c/1/0")[0] == 200
    assert request(server, "HEAD", "/y/zarr.json")[0] == 200


def test_serve_binds_loopback_unless_told(store):
    """Finding 8: `serve` bound 0.0.0.0 by default."""
    with StoreServer(store, port=0) as s:
        assert s.url.startswith("http://127.0.0.1:")
        assert [a[0] for a in s._runner.addresses] == ["127.0.0.1"]


def test_a_damaged_zarr_json_is_one_line(store, home):
    """Issue 29 finding 6: a damaged zarr.json was a JSONDecodeError traceback in train, score
    and serve. Each now says which file is damaged and what to do, in one line."""
    from rpicluster import IncrementalKSGDClassifier, save_model

    X, y = open_dataset(store).block(0)
    model = store.parent / "m.skops"
    save_model(IncrementalKSGDClassifier(n_clusters=2, random_state=0).fit(X, y), model)
    for meta in (store / "zarr.json", store / "X" / "zarr.json"):
        good = meta.read_bytes()
        meta.write_bytes(good[:60])
        for args in (["serve", str(store), "--port", "0"],
                     ["train", str(store), "-o", str(store.parent / "new.skops")],
                     ["score", str(model), str(store)]):
            res = CliRunner().invoke(main, args)
            assert res.exit_code == 1, res.output
            assert re.fullmatch(
                rf"error: {re.escape(str(meta))} is damaged \(JSONDecodeError: [^\n]+\); "
                r"restore it from a copy, or re-ingest the store \(rpicluster ingest SOURCE "
                r"OUT.zarr --overwrite\)", res.output.strip()), res.output
        with pytest.raises(DataError, match=rf"{re.escape(str(meta))} is damaged"):
            open_dataset(store)
        meta.write_bytes(good)
