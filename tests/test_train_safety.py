"""A run directory has one owner, resume trusts only the run's own blocks, impossible parameters
and labels end in one line. Real LocalClusters, real stores. The faults (killed or interrupted
client, lost scheduler, second writer, full disk, tampered model) are in test_fault_matrix.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from rpicluster import IncrementalKSGDClassifier, ingest, open_dataset
from rpicluster.cli import main
from rpicluster.data.synthetic import make_imagenet_like
from rpicluster.errors import ConfigError, RPiClusterWarning
from rpicluster.train.job import train
from rpicluster.train.modelfile import load_model
from rpicluster.testing import reference_fit, same_model
from rpicluster.train.rundir import RunDir

PARAMS = dict(n_clusters=4, max_iter=5, random_state=7)
BLOCK_ROWS = 600
FLAGS = ["--clusters", "4", "--epochs", "5"]



def _reference(store, seed=7):
    return reference_fit(store, BLOCK_ROWS, **{**PARAMS, "random_state": seed})


# --- one owner per run directory --------------------------------------------------------------

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


def test_the_manifest_holds_one_line_per_committed_block_in_block_order(store, tmp_path):
    """Each commit encodes its own entry only (re-encoding every committed entry, indented, on
    each commit cost the driver 31 ms a block at 150 blocks); the manifest stays JSON with one
    block per line, in block order, across owners (a resumed run appends to what it found)."""
    from sklearn.linear_model import SGDClassifier

    ds = open_dataset(store)
    X, y = ds.block(0)
    model = SGDClassifier(max_iter=5, tol=None, random_state=0).fit(X, y)
    run = tmp_path / "run"
    with RunDir(run) as rd:
        rd.begin(PARAMS, ds)
        for b in (2, 0, 3):
            rd.commit_block(b, model, {"rows": 600})
    with RunDir(run) as rd:
        rd.begin(PARAMS, ds, resume=True)
        rd.commit_block(1, model, {"rows": 600})
    text = (run / "manifest.json").read_text()
    blocks = json.loads(text)["blocks"]
    assert sorted(blocks) == ["0", "1", "2", "3"]
    lines = text.splitlines()
    assert lines[0] == '{"blocks": {' and lines[-1] == "}}"
    assert [re.match(r'  "(\d+)": \{', line).group(1) for line in lines[1:-1]] == \
        ["0", "1", "2", "3"]
    entries = RunDir(run).committed()
    assert all(e["params"] == PARAMS and e["rows"] == 600 for e in entries.values())
    assert set(RunDir(run).verified()) == {0, 1, 2, 3}


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
    same_model(est, reference, X)
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
    same_model(load_model(model), reference, X)


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
