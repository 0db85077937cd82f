"""A run directory has one owner, resume trusts only the run's own blocks, and every way a run can
stop (Ctrl-C, a lost scheduler, a full disk, impossible parameters) ends in one line that says what
was kept and the exact command that continues it. Real LocalClusters, real stores."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import cloudpickle
import numpy as np
import pytest
from click.testing import CliRunner
from distributed import Client, LocalCluster

from rpicluster import IncrementalKSGDClassifier, ingest, open_dataset
from rpicluster.cli import main
from rpicluster.data.synthetic import make_imagenet_like
from rpicluster.errors import ConfigError, RPiClusterWarning
from rpicluster.train.job import train
from rpicluster.train.modelfile import load_model
from rpicluster.testing import SlowTasks
from rpicluster.train.rundir import RunDir

cloudpickle.register_pickle_by_value(sys.modules[__name__])

PARAMS = dict(n_clusters=4, max_iter=5, random_state=7)
BLOCK_ROWS = 600
FLAGS = ["--clusters", "4", "--epochs", "5"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A 4-block synthetic store (2,400 rows x 32 features, 12 classes)."""
    root = tmp_path_factory.mktemp("safety-data")
    X, y = make_imagenet_like(2400, n_features=32, n_classes=12, seed=3)
    np.savez(root / "train.npz", X=X, y=y)
    ingest(str(root / "train.npz"), root / "train.zarr", block_rows=BLOCK_ROWS)
    return root / "train.zarr"




def _reference(store, seed=7):
    ds = open_dataset(store)
    X, y = zip(*(ds.block(b) for b in range(ds.n_blocks)))
    X, y = np.concatenate(X), np.asarray(ds.classes)[np.concatenate(y)]
    est = IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **{**PARAMS, "random_state": seed})
    return est.fit(X, y), X


def _same_model(a, b, X):
    assert len(a.estimators_) == len(b.estimators_)
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    for ea, eb in zip(a.estimators_, b.estimators_):
        np.testing.assert_array_equal(ea.cluster_centers_, eb.cluster_centers_)


def _wait_for_commit(run_dir, proc, timeout=400):
    deadline = time.monotonic() + timeout
    while not (run_dir / "manifest.json").is_file() or not RunDir(run_dir).committed():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no block was committed in time"
        time.sleep(0.05)


def _cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "rpicluster.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


# --- one owner per run directory --------------------------------------------------------------

def test_a_second_run_into_the_same_model_is_refused_naming_the_first(store, cluster, client,
                                                                       tmp_path):
    """Finding 1: two `train -o mix.skops` at once both exited 0 and mixed their blocks."""
    model = tmp_path / "mix.skops"
    client.register_plugin(SlowTasks(prefix="fit", seconds=1.0), name="slow")
    try:
        first = _cli("train", str(store), "-o", str(model), "--scheduler",
                     cluster.scheduler_address, *FLAGS, "--seed", "7")
        _wait_for_commit(tmp_path / "mix.skops.run", first)
        res = CliRunner().invoke(main, ["train", str(store), "-o", str(model), "--scheduler",
                                        cluster.scheduler_address, *FLAGS, "--seed", "8"])
        out, _ = first.communicate(timeout=300)
    finally:
        client.unregister_worker_plugin("slow")
    assert res.exit_code == 1, res.output
    assert re.search(rf"run directory {re.escape(str(model))}\.run is in use by another training "
                     rf"run \(pid {first.pid} on host \S+, started", res.output), res.output
    assert first.returncode == 0, out
    reference, X = _reference(store, seed=7)
    _same_model(load_model(model), reference, X)  # the first run's model, untouched


def test_a_killed_owner_leaves_no_lock_in_the_way(tmp_path):
    """A lock held by a live process refuses; once that process is killed (-9, no cleanup) the
    next owner takes the directory."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from rpicluster.train.rundir import RunDir; "
         f"r = RunDir({str(tmp_path / 'run')!r}).acquire(); print('held', flush=True); "
         "time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"in use by another training run \(pid {holder.pid}"):
            RunDir(tmp_path / "run").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert RunDir(tmp_path / "run").holder()["pid"] == holder.pid  # the stale record is there
    with RunDir(tmp_path / "run") as run:
        assert run.holder()["pid"] == os.getpid()
    assert RunDir(tmp_path / "run").holder() is None  # released: the lock file names nobody


def test_resume_retrains_blocks_another_run_wrote(store, client, tmp_path):
    """Finding 1: a resume after mixed writers built a hybrid model equal to neither run. Each
    block now records its parameters and data; resume trains a foreign block again."""
    ds = open_dataset(store)
    seven, eight = tmp_path / "seven", tmp_path / "eight"
    train(IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **PARAMS), ds, client, run_dir=seven)
    train(IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **{**PARAMS, "random_state": 8}), ds,
          client, run_dir=eight)
    # What two concurrent writers left behind: block 1 is run 8's.
    manifest = json.loads((seven / "manifest.json").read_text())
    manifest["blocks"]["1"] = json.loads((eight / "manifest.json").read_text())["blocks"]["1"]
    shutil.copy(eight / "blocks" / "block-000001.skops", seven / "blocks" / "block-000001.skops")
    (seven / "manifest.json").write_text(json.dumps(manifest))
    est = IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **PARAMS)
    with pytest.warns(RPiClusterWarning, match=r"1 committed block\(s\) \(1\) were not trained "
                                               r"with this run's parameters.*random_state=8"):
        result = train(est, ds, client, run_dir=seven, resume=True)
    assert result.trained_blocks == [1] and result.resumed_blocks == [0, 2, 3]
    reference, X = _reference(store)
    _same_model(est, reference, X)
    assert json.loads((seven / "manifest.json").read_text())["blocks"]["1"]["params"][
        "random_state"] == 7


def test_train_refuses_to_overwrite_a_model_without_overwrite(store, cluster, tmp_path):
    """Finding 8: `train -o` silently replaced an existing model (ingest refuses)."""
    model = tmp_path / "m.skops"
    model.write_bytes(b"precious")
    args = ["train", str(store), "-o", str(model), "--scheduler", cluster.scheduler_address,
            *FLAGS, "--seed", "7"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "already exists" in res.output and "--overwrite" in res.output
    assert model.read_bytes() == b"precious"
    assert CliRunner().invoke(main, args + ["--overwrite"]).exit_code == 0
    # Again with --overwrite: the old run directory (all blocks committed) is started afresh.
    res = CliRunner().invoke(main, args + ["--overwrite", "--seed", "8"])
    assert res.exit_code == 0, res.output
    reference, X = _reference(store, seed=8)
    _same_model(load_model(model), reference, X)


# --- parameters and stores that cannot train ----------------------------------------------------

def test_more_clusters_than_block_rows_is_one_line(store, cluster):
    """Finding 6: `--clusters 150` on 100-row blocks printed 34 lines."""
    res = CliRunner().invoke(main, ["train", str(store), "-o", "/nonexistent/m.skops",
                                    "--scheduler", cluster.scheduler_address,
                                    "--clusters", "601"])
    assert res.exit_code == 1
    [line] = res.output.strip().splitlines()
    assert line.startswith(f"error: {store}: block 3 holds 600 rows, fewer than n_clusters=601")
    assert "--block-rows" in line and "--clusters" in line


def test_a_single_class_label_column_is_refused_at_ingest(tmp_path):
    """Finding 7: a single-class store trained a constant model without a word; now ingest
    refuses it in one line naming the source, before any store exists."""
    X, _ = make_imagenet_like(400, n_features=8, n_classes=2, seed=1)
    np.savez(tmp_path / "one.npz", X=X, y=np.full(400, 5))
    res = CliRunner().invoke(main, ["ingest", str(tmp_path / "one.npz"),
                                    str(tmp_path / "one.zarr"), "--block-rows", "200"])
    assert res.exit_code == 1
    [line] = res.output.strip().splitlines()
    assert line.startswith("error: npz:") and "every row has the label 5" in line
    assert not (tmp_path / "one.zarr").exists()


# --- scoring labels the model cannot predict ------------------------------------------------------

def test_scoring_refuses_or_warns_on_labels_the_model_never_saw(store, cluster, tmp_path):
    """Finding 7: 25 % never-seen labels printed `accuracy: 0.6070`, exit 0, without a word; a
    string-labelled store against an int-label model printed 0.0000."""
    from rpicluster.train.modelfile import save_model

    model, _ = _reference(store)
    save_model(model, tmp_path / "m.skops")
    X, y = make_imagenet_like(400, n_features=32, n_classes=12, seed=5)
    stores = {"unseen": (X, np.where(np.arange(400) % 4 == 0, 99, y)),
              "strings": (X, np.array([f"c{v}" for v in y])),
              "all-unseen": (X, y + 100)}
    out = {}
    for name, (Xs, ys) in stores.items():
        np.savez(tmp_path / f"{name}.npz", X=Xs, y=ys)
        ingest(str(tmp_path / f"{name}.npz"), tmp_path / f"{name}.zarr", block_rows=200)
        out[name] = CliRunner().invoke(main, ["score", str(tmp_path / "m.skops"),
                                              str(tmp_path / f"{name}.zarr"), "--scheduler",
                                              cluster.scheduler_address])
    assert out["unseen"].exit_code == 0, out["unseen"].output
    assert re.search(r"warning: 100 of 400 rows of \S+unseen.zarr have labels \S+m.skops never "
                     r"saw in training \(1 labels: 99\); they count as errors \(25.0% of the "
                     r"rows\)", out["unseen"].output), out["unseen"].output
    assert "accuracy: " in out["unseen"].output
    assert out["strings"].exit_code == 1
    assert re.search(r"error: \S+m.skops was trained on numeric labels \(e.g. 0, 1, 2, 3, 4, "
                     r"\.\.\.\), \S+strings.zarr holds string labels \(e.g. 'c0', ",
                     out["strings"].output), out["strings"].output
    assert out["all-unseen"].exit_code == 1
    assert "error: 400 of 400 rows" in out["all-unseen"].output
    assert "accuracy would be 0" in out["all-unseen"].output


# --- a run that stops says what it kept and how to continue ------------------------------------

def _resume_line(output: str) -> list[str]:
    m = re.search(r"continue with: (.*)$", output, re.M)
    assert m, output
    import shlex

    return shlex.split(m.group(1))


def test_ctrl_c_says_what_was_kept_and_the_resume_command(store, cluster, client, tmp_path):
    """Finding 8: Ctrl-C printed only `Aborted!`."""
    model = tmp_path / "m.skops"
    client.register_plugin(SlowTasks(prefix="fit", seconds=1.0), name="slow")
    try:
        proc = _cli("train", str(store), "-o", str(model), "--scheduler",
                    cluster.scheduler_address, *FLAGS, "--seed", "7")
        _wait_for_commit(tmp_path / "m.skops.run", proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        client.unregister_worker_plugin("slow")
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "Aborted!" not in out
    kept = len(RunDir(tmp_path / "m.skops.run").verified())
    assert re.search(rf"error: interrupted: {kept} of 4 blocks are committed in "
                     rf"{re.escape(str(model))}\.run; continue with: ", out), out
    again = _resume_line(out)
    assert again == ["rpicluster", "train", str(store), "-o", str(model), "--resume",
                     f"{model}.run", "--scheduler", cluster.scheduler_address]
    res = CliRunner().invoke(main, again[1:])
    assert res.exit_code == 0, res.output
    assert f"(+{kept} resumed)" in res.output
    reference, X = _reference(store)
    _same_model(load_model(model), reference, X)


def test_a_killed_scheduler_is_one_line_with_the_resume_command(store, tmp_path):
    """Finding 6: a scheduler killed mid-run gave 111 lines, the cleanup's own timeout hid the
    cause, and there was no --resume hint."""
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "10s"}
    sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--port",
                              "0", "--no-dashboard", "--scheduler-file",
                              str(tmp_path / "s.json")], stderr=subprocess.DEVNULL, env=env)
    workers = None
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "s.json").is_file():
            assert time.monotonic() < deadline and sched.poll() is None
            time.sleep(0.1)
        address = json.loads((tmp_path / "s.json").read_text())["address"]
        workers = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                    "--nworkers", "2", "--nthreads", "1", "--no-dashboard",
                                    "--local-directory", str(tmp_path / "w")],
                                   stderr=subprocess.DEVNULL, env=env)
        with Client(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=120)
            c.register_plugin(SlowTasks(prefix="fit", seconds=0.3), name="slow")
        model = tmp_path / "m.skops"
        proc = _cli("train", str(store), "-o", str(model), "--scheduler", address, *FLAGS,
                    "--seed", "7", env=env)
        _wait_for_commit(tmp_path / "m.skops.run", proc)
        sched.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
    finally:
        for p in (sched, workers):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert proc.returncode == 1, out
    assert "Traceback" not in out, out
    [line] = [x for x in out.splitlines() if x.startswith("error: ")]
    kept = len(RunDir(tmp_path / "m.skops.run").verified())
    assert f"error: lost the scheduler {address} during training (" in line
    assert f"{kept} of 4 blocks are committed in {model}.run" in line
    assert "Timed out trying to connect" not in line, "the cleanup's timeout hid the cause"
    assert _resume_line(line) == ["rpicluster", "train", str(store), "-o", str(model),
                                  "--resume", f"{model}.run", "--scheduler", address]


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs: a real filesystem that fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                                            str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_on_the_run_directory_is_one_line(store, cluster, tmp_path, full_disk):
    """Finding 6: a full run-directory disk gave 40 lines and no path."""
    (full_disk / "ballast").write_bytes(b"\0" * 200_000)
    model = tmp_path / "m.skops"
    res = CliRunner().invoke(main, ["train", str(store), "-o", str(model), "--run-dir",
                                    str(full_disk / "run"), "--scheduler",
                                    cluster.scheduler_address, *FLAGS, "--seed", "7"])
    assert res.exit_code == 1, res.output
    [line] = [x for x in res.output.splitlines() if x.startswith("error: ")]
    assert re.search(rf"cannot write {re.escape(str(full_disk / 'run'))}/\S+: No space left on "
                     r"device", line), line
    assert "continue with: rpicluster train" in line and f"--resume {full_disk}/run" in line
    assert not model.exists()



def test_a_model_file_with_a_pickled_npy_member_is_refused_in_one_line(store, tmp_path):
    """Finding 6: a skops file whose .npy member holds pickled objects was refused with a
    79-line traceback."""
    import io
    import zipfile

    from rpicluster.train.modelfile import save_model

    model, _ = _reference(store)
    save_model(model, tmp_path / "good.skops")
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"run": "code"}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp_path / "good.skops") as src, \
            zipfile.ZipFile(tmp_path / "bad.skops", "w") as dst:
        first = next(n for n in src.namelist() if n.endswith(".npy"))
        for n in src.namelist():
            dst.writestr(n, pickled.getvalue() if n == first else src.read(n))
    res = CliRunner().invoke(main, ["score", str(tmp_path / "bad.skops"), str(store),
                                    "--local", "1"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        f"error: model file {tmp_path / 'bad.skops'} holds a pickled array (a .npy member with "
        "Python objects), which rpicluster never loads: refusing it; use a model file written "
        "by rpicluster"]
