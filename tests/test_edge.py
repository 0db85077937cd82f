"""Photo in, label out: a frozen network and a head composed into one ONNX file, run by the edge
runner (``python -m rpicluster.edge``) with the labels of ``features`` + ``predict``: on the
feature job's own output, on scikit-image's photos, in int8, from a venv holding only
onnxruntime, numpy and Pillow; and the runner's one-line refusals."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rpicluster import IncrementalKSGDClassifier, extract_features, open_dataset
from rpicluster.edge import Classifier, main as edge_main
from rpicluster.errors import ModelError
from rpicluster.export import export_onnx
from rpicluster.features.images import write_image_store
from rpicluster.features.model import Extractor, load_network

SIZE = 64
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")


def photos():
    from skimage import data

    return {name: getattr(data, name)() for name in PHOTOS}


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """scikit-image's 200 faces / non-faces (25x25 grayscale): an image store, its features made
    by the feature job on a real (in-process) Dask cluster, a head trained on the first 150
    rows' features, and the head exported with the network."""
    from distributed import Client, LocalCluster
    from skimage.data import lfw_subset

    root = tmp_path_factory.mktemp("edge")
    images = (lfw_subset() * 255).round().astype(np.uint8)
    labels = np.repeat(["face", "other"], 100)
    order = np.random.default_rng(0).permutation(200)
    images, labels = images[order], labels[order]
    store = write_image_store(root / "faces.zarr", images, labels, block_rows=50)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        extract_features(store.url, str(root / "f.zarr"), model="efficientnet-lite0",
                         input_size=SIZE, client=client)
    feats = open_dataset(str(root / "f.zarr"))
    X = np.concatenate([feats.block(b)[0] for b in range(feats.n_blocks)])
    y = feats.classes[np.concatenate([feats.block(b)[1] for b in range(feats.n_blocks)])]
    model = IncrementalKSGDClassifier(75, n_clusters=3, random_state=0).fit(X[:150], y[:150])
    export_onnx(model, root / "m.onnx", features="efficientnet-lite0", input_size=SIZE)
    folder = root / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return dict(root=root, store=store, X=X, y=y, model=model, onnx=root / "m.onnx",
                folder=folder)


def classify(onnx, paths, threads=1, batch=16):
    return np.array([label for _, label in Classifier(onnx, threads).classify(paths, batch)])


def test_labels_of_features_and_predict(faces):
    """The feature job's rows through predict, and the image files through the one file."""
    paths = sorted(faces["folder"].iterdir())
    got = classify(faces["onnx"], paths, batch=7)
    expected = faces["model"].predict(faces["X"])
    assert np.count_nonzero(got != expected) == 0
    held_out = np.mean(got[150:] == faces["y"][150:])
    assert held_out > 0.8  # the head learned something: the check is not vacuous
    import onnx

    # IR 8 and opset 18: readable by the onnxruntime floor (1.19) a Pi may have
    model = onnx.load(faces["onnx"])
    assert model.ir_version == 8 and [(o.domain, o.version) for o in model.opset_import] == [
        ("", 18)]


def test_photos_any_size_and_threads(faces, tmp_path):
    """scikit-image's colour photos (300x451 .. 512x512) as JPEG files: the runner's labels and
    the head's scores equal Extractor (what the job runs) + predict, whatever the threads."""
    import onnxruntime as ort

    paths = []
    for name, image in photos().items():
        Image.fromarray(image).save(tmp_path / f"{name}.jpg", quality=90)
        paths.append(tmp_path / f"{name}.jpg")
    decoded = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    ex = Extractor(load_network("efficientnet-lite0"), input_size=SIZE)
    X = np.concatenate([ex.transform(img[None]) for img in decoded])
    model = faces["model"]
    for threads in (1, 2):
        np.testing.assert_array_equal(classify(faces["onnx"], paths, threads), model.predict(X))
    from rpicluster.edge import load_image

    crops = np.stack([load_image(p, SIZE) for p in paths])
    session = ort.InferenceSession(str(faces["onnx"]), providers=["CPUExecutionProvider"])
    (scores,) = session.run(["scores"], {"images": crops})
    np.testing.assert_allclose(scores, model.decision_function(X), rtol=1e-6)


def test_photos_as_ingest_stores_them(faces, tmp_path):
    """Photos ingested with `ingest images: --image-size 112` (EXIF orientation applied, fitted
    to 112 x 112), then `features --input-size 64`: the runner, told the image size by the file,
    gives the network the same pixels and the labels of features + predict."""
    from rpicluster.data.sources import load_image as ingest_image
    from rpicluster.edge import fit_image, load_image

    paths = []
    for name, image in photos().items():
        for i, flip in enumerate((False, True)):
            paths.append(tmp_path / f"{name}-{i}.jpg")
            Image.fromarray(image[:, ::-1] if flip else image).save(paths[-1], quality=85)
    stored = np.stack([ingest_image(p, 112) for p in paths])  # what the image store holds
    for p, img in zip(paths, stored):
        np.testing.assert_array_equal(load_image(p, SIZE, 3, image_size=112),
                                      fit_image(Image.fromarray(img), SIZE))
    export_onnx(faces["model"], tmp_path / "m.onnx", features="efficientnet-lite0",
                input_size=SIZE, image_size=112)
    X = Extractor(load_network("efficientnet-lite0"), input_size=SIZE).transform(stored)
    assert Classifier(tmp_path / "m.onnx").image_size == 112
    np.testing.assert_array_equal(classify(tmp_path / "m.onnx", paths), faces["model"].predict(X))


def test_cli_prints_labels_and_rate(faces, capsys):
    paths = sorted(faces["folder"].iterdir())[:10]
    assert edge_main([str(faces["onnx"]), *map(str, paths), "--threads", "1",
                      "--batch", "4"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == [str(p) for p in paths]
    assert {ln.split("\t")[1] for ln in lines} <= {"face", "other"}
    assert "10 images in" in err and "images/s (1 threads, batch 4)" in err


def _edge_error(argv, capsys) -> str:
    assert edge_main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_runner_refusals(faces, tmp_path, capsys):
    """A feature model fed images, an .onnx that takes no image batch, a corrupt image, a
    missing file, an empty folder, a file that is no ONNX model: one line each."""
    rows_model = tmp_path / "rows.onnx"
    export_onnx(faces["model"], rows_model)
    img = next(faces["folder"].iterdir())
    err = _edge_error([rows_model, img], capsys)
    assert f"model {rows_model} takes feature rows (1280 features), not images" in err
    assert "--features efficientnet-lite0" in err

    from test_features_model import _tiny_onnx

    _tiny_onnx(tmp_path / "nchw.onnx")
    err = _edge_error([tmp_path / "nchw.onnx", img], capsys)
    assert "not a batch of uint8 images" in err and "nchw.onnx" in err

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    err = _edge_error([faces["onnx"], img, bad], capsys)
    assert f"cannot read image {bad}" in err and "remove or replace it" in err

    assert "does not exist" in _edge_error([faces["onnx"], tmp_path / "nope.png"], capsys)
    (tmp_path / "empty").mkdir()
    assert "holds no image" in _edge_error([faces["onnx"], tmp_path / "empty"], capsys)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert "not a valid ONNX model" in _edge_error([tmp_path / "junk.onnx", img], capsys)


def test_export_refuses_a_network_that_is_not_an_image_model(faces, tmp_path):
    """--features FILE.onnx whose input is no image batch; a head of another feature width."""
    with pytest.raises(ModelError, match=r"rows\.onnx takes input 'rows'.*image batches"):
        export_onnx(faces["model"], tmp_path / "a.onnx", features=faces["onnx"].parent /
                    _rows_onnx(faces, tmp_path))
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    digits = IncrementalKSGDClassifier(1797, n_clusters=2, random_state=0).fit(X, y)
    with pytest.raises(ModelError, match="takes 64 features, but efficientnet-lite0 gives 1280"):
        export_onnx(digits, tmp_path / "b.onnx", features="efficientnet-lite0")


def _rows_onnx(faces, tmp_path) -> Path:
    path = tmp_path / "rows.onnx"
    export_onnx(faces["model"], path)
    return path


def test_int8_network(faces, tmp_path):
    """int8 static quantization calibrated on the store: labels mostly those of float32."""
    path = tmp_path / "int8.onnx"
    r = export_onnx(faces["model"], path, features="efficientnet-lite0", input_size=SIZE,
                    quantize="int8", calibration=faces["store"].url, calibration_images=40)
    assert r.quantize == "int8" and r.size_bytes < 0.5 * faces["onnx"].stat().st_size
    paths = sorted(faces["folder"].iterdir())[150:]
    agree = np.mean(classify(path, paths) == classify(faces["onnx"], paths))
    assert agree >= 0.9


def test_runner_in_a_venv_of_only_its_three_packages(faces, tmp_path):
    """A venv holding onnxruntime, numpy and Pillow only (linked from this environment, with
    their own dependencies' wheels absent) runs the copied module file alone."""
    import numpy
    import onnxruntime
    import PIL

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    installed = Path(numpy.__file__).parent.parent
    for mod in (numpy, onnxruntime, PIL):
        assert Path(mod.__file__).parent.parent == installed
    for name in ("numpy", "numpy.libs", "onnxruntime", "PIL", "pillow.libs"):
        if (installed / name).is_dir():  # the .libs folders hold the wheels' shared libraries
            os.symlink(installed / name, shelf / name)
    (site / "shelf.pth").write_text(f"{shelf}\n")
    work = tmp_path / "pi"
    work.mkdir()
    (work / "edge.py").write_text(Path(sys.modules["rpicluster.edge"].__file__).read_text())
    python = venv / "bin" / "python"
    probe = subprocess.run([python, "-I", "-c", "import sklearn"], capture_output=True, cwd=work)
    assert probe.returncode != 0  # nothing else is importable there
    res = subprocess.run([python, "-I", "edge.py", str(faces["onnx"]), str(faces["folder"]),
                          "--threads", "1"], capture_output=True, text=True, cwd=work,
                         env={"PATH": os.environ["PATH"]}, timeout=300)
    assert res.returncode == 0, res.stderr
    labels = np.array([ln.split("\t")[1] for ln in res.stdout.splitlines()])
    np.testing.assert_array_equal(labels, faces["model"].predict(faces["X"]))
    assert "200 images in" in res.stderr


@pytest.mark.arm64
@pytest.mark.netns
@pytest.mark.timeout(2400)
def test_runner_on_an_emulated_arm64_pi(faces, tmp_path):
    """On the shelf's emulated Pi 4 (arm64 bookworm root, Cortex-A72 under qemu): a bare venv
    of onnxruntime, numpy and Pillow from an aarch64 wheelhouse (pip --no-index), the copied
    module file, the same labels as predict on x86."""
    from rpicluster.deploy.provision import build_wheelhouse, pinned_requirements
    from rpicluster.testing_arm64 import QEMU_CPU, Arm64Hosts, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(f"no emulated arm64 host: {reason}")
    wheels = tmp_path / "wheels"
    requirements = sorted({*pinned_requirements("onnxruntime"), *pinned_requirements("pillow")})
    facts = {"python": "3.11.2", "arch": "aarch64", "glibc": "2.36", "python_tag": "cp311"}
    build_wheelhouse(facts, wheels, requirements)
    work = tmp_path / "pi"
    work.mkdir()
    (work / "edge.py").write_text(Path(sys.modules["rpicluster.edge"].__file__).read_text())
    paths = sorted(faces["folder"].iterdir())[:24]
    with Arm64Hosts(tmp_path / "hosts", 1) as hosts:
        for shared in (tmp_path, faces["root"]):
            hosts.share(shared)

        def chroot(*cmd, timeout=1200):
            # In a mount namespace of its own, an empty /sys: the fixture's sysfs is this x86
            # machine's, and ONNX Runtime's cpuinfo segfaults under qemu parsing its CPU list
            # (a Pi's own sysfs is arm64's).
            script = (f"mount -t tmpfs tmpfs {hosts.root}/sys && exec chroot {hosts.root} "
                      + " ".join(shlex.quote(str(c)) for c in cmd))
            return subprocess.run(["unshare", "--mount", "sh", "-c", script],
                                  capture_output=True, text=True, timeout=timeout,
                                  env={"PATH": os.environ["PATH"], "QEMU_CPU": QEMU_CPU})

        venv = "/tmp/edge-venv"
        assert chroot("uname", "-m").stdout.strip() == "aarch64"
        made = chroot("/usr/bin/python3", "-m", "venv", "--without-pip", venv)
        assert made.returncode == 0, made.stderr
        # pip runs from its wheel (ensurepip alone takes minutes under emulation)
        pip_wheel = next(wheels.glob("pip-*.whl"))
        pip = chroot(f"{venv}/bin/python", f"{pip_wheel}/pip", "install", "--no-index",
                     "--find-links", wheels, "onnxruntime", "numpy", "pillow")
        assert pip.returncode == 0, pip.stderr[-2000:]
        res = chroot(f"{venv}/bin/python", "-I", work / "edge.py", faces["onnx"], *paths,
                     "--threads", "1", "--batch", "8")
    assert res.returncode == 0, res.stderr[-2000:]
    labels = np.array([ln.split("\t")[1] for ln in res.stdout.splitlines()])
    np.testing.assert_array_equal(labels, faces["model"].predict(faces["X"][:24]))
    assert "24 images in" in res.stderr
