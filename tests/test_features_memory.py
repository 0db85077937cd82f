"""features under memory pressure (issue 29 finding 2): bounded session caches released after a
run, and a run whose workers restart stops in one line with the blocks kept and the --resume
command, which then finishes on the restarted workers. Real nanny-backed workers, real ONNX
Runtime sessions, the scikit-image faces store."""

from __future__ import annotations

import re
import shlex

import numpy as np
import pytest
from click.testing import CliRunner

from rpicluster import extract_features, open_dataset
from rpicluster.cli import main
from rpicluster.features import model as fmodel
from rpicluster.features.job import release_worker_sessions
from rpicluster.features.model import Extractor, load_network
from rpicluster.testing import SlowTasks, features_after_a_block, wait_until

from test_features_job import client, images, tiny  # noqa: F401 - fixtures


def _cached(dask_worker=None) -> list:
    return [list(k[1:]) for k in fmodel._SESSIONS]


def test_sessions_are_a_small_lru_by_input_size_and_released(tiny):
    """Sessions were kept by model alone, first in first out, for the worker's life (608-749
    MiB after one 224 px run): now the two most recently used (model, threads, input size)
    stay, and release_sessions drops them all."""
    frozen = load_network(str(tiny))
    fmodel.release_sessions()
    blank = np.zeros((2, 25, 25), np.uint8)
    for size in (16, 24, 16, 32):
        Extractor(frozen, input_size=size, threads=1).transform(blank)
    assert _cached() == [[1, 16], [1, 32]]          # 24 was least recently used
    assert release_worker_sessions() == 2 and _cached() == []


def test_a_run_whose_workers_restart_prints_the_resume_command(images, client, tiny,
                                                               tmp_path):
    """Workers restarted under a features run (all at once, as a memory limit does): it ended
    in a `FutureCancelledError ... already forgotten` traceback with no --resume command. Now:
    one line, the blocks kept, the command; that command finishes on the restarted workers and
    its features equal an uninterrupted run's. No worker keeps a session after a run."""
    out = tmp_path / "f.zarr"
    addr = client.scheduler.address
    client.register_plugin(SlowTasks(prefix="rpicluster-features-", seconds=0.5), name="slow")
    try:
        proc = features_after_a_block([images.url, "-o", str(out), "--model", str(tiny),
                                       "--input-size", "16", "--scheduler", addr], out)
        client.restart()
        output, _ = proc.communicate(timeout=120)
    finally:
        client.unregister_worker_plugin("slow")
    assert proc.returncode == 1, output
    assert "Traceback" not in output, output
    m = re.search(rf"^error: the features run stopped: the workers restarted or left \(\w+\); "
                  rf"{re.escape(str(out))} keeps (\d+) of 13 blocks and is marked incomplete; "
                  r"continue with: (.*)$", output, re.M)
    assert m and 1 <= int(m.group(1)) < 13, output
    again = shlex.split(m.group(2))
    assert again[:5] == ["rpicluster", "features", images.url, "-o", str(out)]
    assert again[-1] == "--resume"
    res = CliRunner().invoke(main, again[1:])
    assert res.exit_code == 0, res.output
    assert f"(+{m.group(1)} resumed)" in res.output
    whole = extract_features(images.url, str(tmp_path / "whole.zarr"), model=str(tiny),
                             input_size=16, client=client)
    np.testing.assert_array_equal(np.asarray(open_dataset(out).X.compute()),
                                  np.asarray(whole.store.X.compute()))
    assert all(v == [] for v in client.run(_cached).values())


def test_a_worker_near_its_memory_target_drops_its_sessions(tiny):
    """The check a features task makes after writing its block (and then drops the worker's
    cached sessions): a worker above Dask's target fraction of its memory limit is under
    pressure (a target below what any worker uses), one far below it is not."""
    import dask
    from distributed import Client, LocalCluster

    from rpicluster.features.job import _memory_pressure

    for target, pressed in ((0.001, True), (0.99, False)):
        with dask.config.set({"distributed.worker.memory.target": target}), \
                LocalCluster(n_workers=1, processes=False, memory_limit="4GiB",
                             dashboard_address=None) as cluster, Client(cluster) as c:
            assert c.submit(_memory_pressure, pure=False).result(timeout=60) is pressed


def test_a_run_whose_workers_all_stay_paused_stops_with_the_blocks_kept(images, tiny, tmp_path,
                                                                        monkeypatch):
    """A 224 px run hung 9.5 minutes at 13/18 blocks with both workers paused for memory, and
    said nothing. Now the run watches its workers: once every one has been paused for
    RPICLUSTER_PAUSED_TIMEOUT it stops in one line naming them, with what is kept."""
    import dask
    from distributed import Client, LocalCluster

    from rpicluster.errors import TrainingStopped

    monkeypatch.setenv("RPICLUSTER_PAUSED_TIMEOUT", "3")
    # A pause fraction below what any worker uses: paused from the start, as a worker whose
    # memory is held elsewhere is.
    with dask.config.set({"distributed.worker.memory.pause": 0.001,
                          "distributed.worker.memory.terminate": False}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                         memory_limit="4GiB", dashboard_address=None) as cluster, \
            Client(cluster) as c:
        wait_until(lambda: any(w["status"] == "paused"
                               for w in c.scheduler_info()["workers"].values()),
                   60, what="the worker to pause for memory", interval=0.1)
        with pytest.raises(TrainingStopped, match=r"the features run stopped: every worker of "
                                                  r"this run has been paused for memory .* "
                                                  r"keeps 0 of 13 blocks and is marked "
                                                  r"incomplete") as stopped:
            extract_features(images.url, str(tmp_path / "f.zarr"), model=str(tiny),
                             input_size=16, client=c)
    assert stopped.value.run_dir.endswith("f.zarr")
