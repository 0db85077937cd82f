"""The feature job on a real Dask cluster: image store -> ONNX Runtime on the workers -> feature
store under the layout contract; equality with in-process extraction, resume after a failed run,
clear errors, the CLI, and features that train an Inc-kSGD model."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from click.testing import CliRunner
from distributed import Client, LocalCluster

from rpicluster import IncrementalKSGDClassifier, extract_features, open_dataset
from rpicluster.cli import main
from rpicluster import events as ev
from rpicluster.errors import DataError, ModelError
from rpicluster.features.images import write_image_store
from rpicluster.features.model import Extractor, load_network

from test_features_model import _tiny_onnx

BLOCK_ROWS = 16


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """scikit-image's 200 faces / non-faces (25x25 grayscale) as a 13-block image store."""
    from skimage.data import lfw_subset

    root = tmp_path_factory.mktemp("features-data")
    faces = (lfw_subset() * 255).round().astype(np.uint8)
    y = np.repeat(["face", "other"], 100)  # the first 100 are faces
    order = np.random.default_rng(0).permutation(200)
    store = write_image_store(root / "faces.zarr", faces[order], y[order],
                              block_rows=BLOCK_ROWS)
    return store


@pytest.fixture(scope="module")
def client():
    """Two worker processes (like two Pis), one thread each."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    _tiny_onnx(path)
    return path


def _all_images(store):
    parts = [store.block(b) for b in range(store.n_blocks)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_features_equal_in_process_and_follow_the_layout(images, client, tmp_path):
    out = tmp_path / "feats.zarr"
    r = extract_features(images.url, str(out), model="efficientnet-lite0", input_size=64,
                         batch_size=7, client=client)
    ds = open_dataset(out)  # the ordinary dataset reader accepts it
    assert (ds.n_rows, ds.n_features, ds.block_rows, ds.n_blocks) == (200, 1280, 16, 13)
    assert list(ds.classes) == ["face", "other"]
    assert ds.attrs["complete"] is True and ds.attrs["blocks_done"] == list(range(13))
    assert ds.attrs["features_input_size"] == 64 and ds.attrs["features_model_sha256"] == r.sha256
    imgs, y = _all_images(images)
    X = np.asarray(ds.X.compute())
    np.testing.assert_array_equal(np.asarray(ds.y.compute()), y)
    reference = Extractor(load_network("efficientnet-lite0"), input_size=64).transform(imgs)
    np.testing.assert_allclose(X, reference, rtol=1e-4, atol=1e-4)
    assert sorted(r.extracted_blocks) == list(range(13)) and r.resumed_blocks == []
    assert sum(r.images_per_worker.values()) == 200
    assert set(r.images_per_second()) == set(r.images_per_worker)
    # Every block is one chunk with a checksum.
    assert os.path.exists(out / "X" / "c" / "12" / "0")
    # Events for the /rpicluster page: one per block, with the worker and its images.
    events = [e for _, e in client.get_events(ev.FEATURES_TOPIC)]
    extracted = [e for e in events if e[ev.KIND] == ev.EXTRACTED
                 and e[ev.RUN_ID] == events[-1][ev.RUN_ID]]
    assert sorted(e[ev.BLOCK] for e in extracted) == list(range(13))
    assert sum(e[ev.ROWS] for e in extracted) == 200
    # The features are good for something: faces vs non-faces on a held-out quarter.
    clf = IncrementalKSGDClassifier(n_clusters=1, block_rows=150, random_state=0)
    clf.fit(X[:150], ds.classes[y[:150]])
    assert clf.score(X[150:], ds.classes[y[150:]]) > 0.8


def test_resume_after_a_failed_run(images, client, tiny, tmp_path):
    """A block whose image chunk is corrupted fails the run (naming the block); the store stays
    incomplete; once repaired, --resume extracts only the blocks not yet done."""
    import shutil

    src = tmp_path / "img.zarr"
    shutil.copytree(images.url, src)
    chunk = src / "X" / "c" / "5" / "0"
    good = chunk.read_bytes()
    chunk.write_bytes(good[:-7] + b"garbage")
    out = tmp_path / "f.zarr"
    with pytest.raises(DataError, match=r"chunk 'X/c/5/0' \(block 5\) is corrupted"):
        extract_features(str(src), str(out), model=str(tiny), input_size=16, client=client)
    with pytest.raises(DataError, match="incomplete"):
        open_dataset(out)
    import zarr

    blocks_done = zarr.open_group(str(out), mode="r").attrs["blocks_done"]
    assert 5 not in blocks_done
    with pytest.raises(DataError, match=r"already holds an incomplete.*--resume"):
        extract_features(str(src), str(out), model=str(tiny), input_size=16, client=client)
    chunk.write_bytes(good)
    with pytest.raises(DataError, match=r"cannot resume .*features_input_size"):
        extract_features(str(src), str(out), model=str(tiny), input_size=20, client=client,
                         resume=True)
    r = extract_features(str(src), str(out), model=str(tiny), input_size=16, client=client,
                         resume=True)
    assert r.resumed_blocks == sorted(blocks_done)
    assert sorted(r.extracted_blocks) == sorted(set(range(13)) - set(blocks_done))
    clean = extract_features(str(src), str(tmp_path / "clean.zarr"), model=str(tiny),
                             input_size=16, client=client)
    np.testing.assert_array_equal(np.asarray(r.store.X.compute()),
                                  np.asarray(clean.store.X.compute()))


def test_errors_before_any_work(images, client, tmp_path):
    """Wrong input size for a fixed-size model, an unreadable model, not an image store."""
    _tiny_onnx(tmp_path / "fixed.onnx", size=24)
    with pytest.raises(ModelError, match=r"takes 24x24 images; input size 32"):
        extract_features(images.url, str(tmp_path / "a.zarr"), model=str(tmp_path / "fixed.onnx"),
                         input_size=32, client=client)
    (tmp_path / "broken.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelError, match=r"broken\.onnx: not a valid ONNX model"):
        extract_features(images.url, str(tmp_path / "b.zarr"),
                         model=str(tmp_path / "broken.onnx"), client=client)
    from rpicluster import ingest

    feats = ingest("sklearn:iris", tmp_path / "iris.zarr", block_rows=50)
    with pytest.raises(DataError, match=r"not an image store: it has no image_shape"):
        extract_features(feats.url, str(tmp_path / "c.zarr"), model="efficientnet-lite0",
                         client=client)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "c.zarr").exists()


def test_cli_features(images, client, tiny, tmp_path):
    addr = client.scheduler.address
    out = tmp_path / "cli.zarr"
    res = CliRunner().invoke(main, ["features", images.url, "-o", str(out), "--model", str(tiny),
                                    "--input-size", "16", "--batch-size", "5", "--threads", "1",
                                    "--scheduler", addr])
    assert res.exit_code == 0, res.output
    assert "extracted 13 blocks" in res.output and "200 images -> 4 features" in res.output
    assert "images/s" in res.output
    # one total: the summary's is the progress line's last figure (it was the job's own, shorter
    # time, unexplained), and the job's part is named
    shown = float(re.findall(r"blocks \[(\d+\.\d) s", res.output)[-1])
    total = float(re.search(r"extracted 13 blocks in (\d+\.\d) s \(\d+\.\d s of it "
                            r"extracting\)", res.output).group(1))
    assert shown <= total <= shown + 1.0, res.output
    assert open_dataset(out).n_features == 4
    # Feature blocks of two image blocks each: 7 blocks (the last one holds 8 rows).
    res = CliRunner().invoke(main, ["features", images.url, "-o", str(tmp_path / "big.zarr"),
                                    "--model", str(tiny), "--input-size", "16",
                                    "--block-rows", "32", "--scheduler", addr])
    assert res.exit_code == 0, res.output
    big = open_dataset(tmp_path / "big.zarr")
    assert (big.block_rows, big.n_blocks) == (32, 7)
    np.testing.assert_array_equal(np.asarray(big.X.compute()),
                                  np.asarray(open_dataset(out).X.compute()))
    np.testing.assert_array_equal(np.asarray(big.y.compute()), _all_images(images)[1])
    res = CliRunner().invoke(main, ["features", images.url, "-o", str(tmp_path / "odd.zarr"),
                                    "--model", str(tiny), "--block-rows", "20",
                                    "--scheduler", addr])
    assert res.exit_code == 1 and "multiple of the image store's block rows (16)" in res.output
    res = CliRunner().invoke(main, ["features", images.url, "-o", str(out), "--model",
                                    str(tmp_path / "missing.onnx"), "--scheduler", addr])
    assert res.exit_code == 1
    assert res.output.startswith("error: cannot read model file") and "Traceback" not in res.output


def test_ctrl_c_keeps_finished_blocks_and_prints_the_resume_command(images, client, tiny,
                                                                    tmp_path):
    """Ctrl-C said "nothing half-written was left under a final name" while the feature store
    was there, incomplete, with no --resume command."""
    import re
    import shlex
    import signal

    from rpicluster.errors import StoreIncompleteError
    from rpicluster.testing import SlowTasks, features_after_a_block

    out = tmp_path / "f.zarr"
    addr = client.scheduler.address
    client.register_plugin(SlowTasks(prefix="rpicluster-features-", seconds=0.5), name="slow")
    try:
        proc = features_after_a_block([images.url, "-o", str(out), "--model", str(tiny),
                                       "--input-size", "16", "--scheduler", addr], out)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        client.unregister_worker_plugin("slow")
    assert proc.returncode == 130, output
    assert "Traceback" not in output, output
    m = re.search(rf"^interrupted \(Ctrl-C\): {re.escape(str(out))} holds (\d+) of 13 blocks "
                  r"and is marked incomplete; continue with: (.*)$", output, re.M)
    assert m and int(m.group(1)) < 13, output
    with pytest.raises(StoreIncompleteError):
        open_dataset(out)
    again = shlex.split(m.group(2))
    assert again[:5] == ["rpicluster", "features", images.url, "-o", str(out)]
    assert again[-1] == "--resume" and ["--scheduler", addr] == again[-3:-1]
    res = CliRunner().invoke(main, again[1:])
    assert res.exit_code == 0, res.output
    assert f"(+{m.group(1)} resumed)" in res.output
    assert open_dataset(out).n_rows == 200


def test_readme_photos_pipeline(client, tmp_path):
    """README's path on a user's photos: ingest images:DIR -> features -> train -> score."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(0)
    photos = {"cat": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket()}
    for label, photo in photos.items():
        (tmp_path / "photos" / label).mkdir(parents=True)
        h, w = photo.shape[:2]
        for i in range(20):  # random crops and flips of one photo per class
            side = int(rng.integers(min(h, w) // 2, min(h, w)))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = photo[top:top + side, left:left + side]
            Image.fromarray(crop[:, ::-1] if i % 2 else crop).save(
                tmp_path / "photos" / label / f"{i}.png")
    addr = ["--scheduler", client.scheduler.address]
    run = CliRunner().invoke
    steps = [
        ["ingest", f"images:{tmp_path / 'photos'}", str(tmp_path / "photos.zarr"),
         "--block-rows", "15", "--image-size", "112", "--test-fraction", "0.25",
         "--test-out", str(tmp_path / "test.zarr")],
        ["features", str(tmp_path / "photos.zarr"), "-o", str(tmp_path / "f.zarr"),
         "--input-size", "96", "--block-rows", "45", *addr],
        ["features", str(tmp_path / "test.zarr"), "-o", str(tmp_path / "ft.zarr"),
         "--input-size", "96", *addr],
        ["train", str(tmp_path / "f.zarr"), "-o", str(tmp_path / "m.skops"), "--clusters", "1",
         *addr],
        ["score", str(tmp_path / "m.skops"), str(tmp_path / "ft.zarr"), *addr],
    ]
    for argv in steps:
        res = run(main, argv)
        assert res.exit_code == 0, (argv, res.output)
    import re

    accuracy = float(re.search(r"accuracy:? ([0-9.]+)", res.output).group(1))
    assert accuracy > 0.9, res.output
