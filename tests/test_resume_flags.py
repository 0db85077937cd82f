"""Resuming with the flags given again (issue 29 finding 8): `train --model mlp --hidden 512
--resume RUN` and `federate --hidden 256 --resume RUN` were always refused ([512] recorded in
JSON against (512,) given). Real CLI runs on a real cluster, real run directories."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from distributed import LocalCluster
from sklearn.datasets import load_digits

from rpicluster import ingest
from rpicluster.cli import main
from rpicluster.errors import ConfigError


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    X, y = load_digits(return_X_y=True)
    np.savez(root / "d.npz", X=X.astype(np.float32), y=y)
    ingest(str(root / "d.npz"), root / "d.zarr", block_rows=600)
    return root / "d.zarr"


def test_mlp_resume_with_its_hidden_flag_again(digits, tmp_path, home):
    """`train --model mlp --hidden 8 ... --resume RUN` continues the run (it said "cannot
    resume: hidden_layer_sizes was [8] in the run, now (8,)"); another --hidden is refused."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        base = ["train", str(digits), "--model", "mlp", "--hidden", "8", "--seed", "3",
                "--scheduler", cluster.scheduler_address]
        run = tmp_path / "run"
        res = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "a.skops"), "--rounds", "1",
                                        "--run-dir", str(run)])
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "b.skops"), "--rounds", "2",
                                        "--resume", str(run)])
        assert res.exit_code == 0, res.output
        assert "+1 resumed" in res.output, res.output
        res = CliRunner().invoke(main, [*base[:5], "9", *base[6:], "-o",
                                        str(tmp_path / "c.skops"), "--rounds", "3",
                                        "--resume", str(run)])
        assert res.exit_code == 1
        assert ("params was {'random_state': 3, 'hidden_layer_sizes': [8]} in the run, now "
                "{'random_state': 3, 'hidden_layer_sizes': [9]}") in res.output, res.output


def test_federated_meta_compares_as_recorded(tmp_path):
    """`federate --hidden 256 --resume RUN`: the run description is compared as it is recorded
    (JSON), so a tuple given again matches its list; a real difference is still named."""
    from rpicluster.train.rounds import RoundDir

    meta = {"model": "mlp", "params": {"hidden_layer_sizes": (256,), "alpha": 1e-4}}
    rounds = RoundDir(tmp_path / "run")
    rounds.begin(meta, resume=False)
    rounds.release()
    rounds.check_resumable(meta)
    with pytest.raises(ConfigError, match=r"params was .*\[256\].* now .*\[128\]"):
        rounds.check_resumable({**meta, "params": {"hidden_layer_sizes": (128,),
                                                   "alpha": 1e-4}})
