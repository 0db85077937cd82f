"""No silent waiting (issue 16, finding 4): a run with no worker stops within its bounded time in
one line; the progress line names workers paused for memory and workers that stopped
reporting; a memory limit that cannot hold a block is refused before anything is submitted,
with a limit that works; a lone worker killed by a poison block ends the run by name. Real
LocalClusters (nanny processes), real signals, real stores."""

from __future__ import annotations

import io
import os
import re
import signal
import sys
import threading

import cloudpickle
import dask
import numpy as np
import pytest
from click.testing import CliRunner
from distributed import Client, LocalCluster, get_task_stream

from rpicluster import IncrementalKSGDClassifier, open_dataset
from rpicluster import events as ev
from rpicluster.cli import main
from rpicluster.errors import ConfigError, TrainingError
from rpicluster.progress import Progress
from rpicluster.testing import DieOn, SlowTasks, wait_until
from rpicluster.train.job import train
from rpicluster.train.rundir import RunDir
from rpicluster.train.watch import measure_floors

cloudpickle.register_pickle_by_value(sys.modules[__name__])

PARAMS = dict(n_clusters=4, max_iter=5, random_state=7)
BLOCK_ROWS = 600
FLAGS = ["--clusters", "4", "--epochs", "5", "--seed", "7"]



def _estimator():
    return IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **PARAMS)


def _cluster(n_workers, **kwargs):
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                        dashboard_address=None, **kwargs)


def _error_line(output: str) -> str:
    [line] = [x for x in output.splitlines() if x.startswith("error: ")]
    return line


# --- no worker: a bounded wait, then one line ----------------------------------------------------

def test_no_worker_at_all_stops_train_within_the_bounded_time(store, tmp_path, monkeypatch):
    """Finding 4: with no worker connected, `train` printed nothing for 600 s."""
    monkeypatch.setenv("RPICLUSTER_NO_WORKER_TIMEOUT", "1")
    with _cluster(0) as cluster:
        res = CliRunner().invoke(main, ["train", str(store), "-o", str(tmp_path / "m.skops"),
                                        "--scheduler", cluster.scheduler_address, *FLAGS])
    assert res.exit_code == 1, res.output
    line = _error_line(res.output)
    assert line.startswith(f"error: no worker is connected to the scheduler "
                           f"{cluster.scheduler_address} (4 blocks to train); waited 1 s "
                           "(RPICLUSTER_NO_WORKER_TIMEOUT)"), line
    assert "rpicluster status" in line and "rpicluster up" in line
    assert "Traceback" not in res.output
    assert not (tmp_path / "m.skops").exists()


def test_a_worker_that_connects_during_the_wait_is_used(store, tmp_path, monkeypatch):
    """The wait is said on the progress line, and ends when a worker connects."""
    monkeypatch.setenv("RPICLUSTER_NO_WORKER_TIMEOUT", "120")
    out = io.StringIO()
    with _cluster(0) as cluster, Client(cluster) as client:
        def start_one():
            wait_until(lambda: "waiting for a worker" in out.getvalue(), 120,
                       what="the progress line to say the run waits for a worker")
            cluster.scale(1)

        helper = threading.Thread(target=start_one, daemon=True)
        helper.start()
        with Progress("train", total=4, unit="blocks", stream=out, interval=0.5) as progress:
            result = train(_estimator(), open_dataset(store), client, progress=progress)
        helper.join()
    assert sorted(result.trained_blocks) == [0, 1, 2, 3]
    assert f"-- waiting for a worker to connect to {cluster.scheduler_address}" in out.getvalue()


def test_workers_lost_mid_run_stop_it_with_the_resume_command(store, tmp_path, monkeypatch):
    """Every worker gone mid-run: the run stops after the bounded wait, saying what it kept and
    how to continue, instead of waiting for a worker forever."""
    monkeypatch.setenv("RPICLUSTER_NO_WORKER_TIMEOUT", "2")
    model = tmp_path / "m.skops"
    with _cluster(1) as cluster, Client(cluster) as client:
        client.register_plugin(SlowTasks(pattern=r"^(block|fit)-", seconds=0.5), name="slow")
        line = _train_cli_stopped_after_first_commit(cluster, store, model,
                                                     lambda: cluster.scale(0))
    assert line.startswith(f"error: no worker is connected to the scheduler "
                           f"{cluster.scheduler_address} ("), line


def _train_cli_stopped_after_first_commit(cluster, store, model, fault) -> str:
    """``rpicluster train STORE -o MODEL`` on ``cluster``, calling ``fault()`` once a block is
    committed; the run must stop (exit 1) keeping some blocks, and its one error line must end
    with the command that continues it. Returns that line."""
    run_dir = model.parent / f"{model.name}.run"

    def after_first_commit():
        wait_until(lambda: (run_dir / "manifest.json").is_file() and RunDir(run_dir).committed(),
                   120, what=f"a block committed in {run_dir}")
        fault()

    helper = threading.Thread(target=after_first_commit, daemon=True)
    helper.start()
    res = CliRunner().invoke(main, ["train", str(store), "-o", str(model), "--scheduler",
                                    cluster.scheduler_address, *FLAGS])
    helper.join()
    assert res.exit_code == 1, res.output
    line = _error_line(res.output)
    kept = len(RunDir(run_dir).verified())
    assert 0 < kept < 4
    assert f"{kept} of 4 blocks are committed in {model}.run" in line
    assert line.endswith(f"continue with: rpicluster train {store} -o {model} --resume "
                         f"{model}.run --scheduler {cluster.scheduler_address}"), line
    return line


def _hold_memory(dask_worker, fraction):
    """Run on a worker (``client.run``): unmanaged memory (nothing Dask can spill) up to
    ``fraction`` of its limit, above the pause threshold (80 %) and below the nanny's
    termination (95 %) for a fraction between; 0 frees it."""
    import psutil

    dask_worker._rpicluster_ballast = None
    if fraction:
        n = int(dask_worker.memory_manager.memory_limit * fraction
                - psutil.Process().memory_info().rss)
        dask_worker._rpicluster_ballast = np.ones(max(n, 0), dtype=np.uint8)


def test_workers_paused_for_memory_too_long_stop_the_run_with_the_resume_command(store, tmp_path,
                                                                                  monkeypatch):
    """Every worker paused for memory the run cannot free (held by the worker process itself):
    Dask waits for a paused worker forever; the run stops after RPICLUSTER_PAUSED_TIMEOUT in one
    line naming the worker, with what it kept and how to continue."""
    monkeypatch.setenv("RPICLUSTER_PAUSED_TIMEOUT", "3")
    model = tmp_path / "m.skops"
    with _cluster(1, memory_limit="700MiB") as cluster, Client(cluster) as client:
        client.register_plugin(SlowTasks(pattern=r"^(block|fit)-", seconds=0.5), name="slow")
        [(address, w)] = client.scheduler_info()["workers"].items()
        line = _train_cli_stopped_after_first_commit(
            cluster, store, model, lambda: client.run(_hold_memory, fraction=0.87))
    assert re.match(rf"error: every worker of this run has been paused for memory for \d+ s "
                    rf"\(above 80% of its limit; RPICLUSTER_PAUSED_TIMEOUT\): "
                    rf"{w['name']} \({re.escape(address)}\) \(", line), line


# --- the progress line says what the run waits on -------------------------------------------------

def _train_while(client, store, tmp_path, during, *, watch_for: str):
    """Train with a plain progress line into a buffer; once a block is partitioned, call
    ``during()`` (which returns an undo), and undo it once ``watch_for`` is on the line (or the
    run ended)."""
    out = io.StringIO()
    progress = Progress("train", total=4, unit="blocks", stream=out, interval=0.5)
    ended = threading.Event()

    def wait_for(text):
        wait_until(lambda: ended.is_set() or text in out.getvalue(), 300,
                   what=f"{text!r} on the progress line, or the run's end")
        return not ended.is_set()

    def act():
        if wait_for("partitioned"):
            undo = during()
            wait_for(watch_for)
            undo()

    helper = threading.Thread(target=act, daemon=True)
    helper.start()
    try:
        with progress:
            result = train(_estimator(), open_dataset(store), client, run_dir=tmp_path / "run",
                           progress=progress)
    finally:
        ended.set()
        helper.join()
    return result, out.getvalue()


def test_a_stopped_worker_is_named_on_the_progress_line(store, tmp_path, monkeypatch):
    """Finding 4: a worker stopped with SIGSTOP left `train` silent. Its heartbeats stop; the
    progress line (and a ``stalled`` event) names it until it is continued (or the run ends:
    its late tasks may be copied to the other worker)."""
    monkeypatch.setenv("RPICLUSTER_SILENT_WORKER_TIMEOUT", "2")
    with _cluster(2) as cluster, Client(cluster) as client:
        client.register_plugin(SlowTasks(pattern=r"^(block|fit)-", seconds=1.0), name="slow")
        pids = client.run(os.getpid)
        victim = sorted(pids)[0]
        name = client.scheduler_info()["workers"][victim]["name"]

        def stop():
            os.kill(pids[victim], signal.SIGSTOP)
            return lambda: os.kill(pids[victim], signal.SIGCONT)

        try:
            result, lines = _train_while(client, store, tmp_path, stop,
                                         watch_for="has not reported")
        finally:
            os.kill(pids[victim], signal.SIGCONT)
        events = [m for _, m in client.get_events(ev.TOPIC) if m.get(ev.KIND) == ev.STALLED]
    assert sorted(result.trained_blocks) == [0, 1, 2, 3]
    assert re.search(rf"-- worker {name} \({re.escape(victim)}\) has not reported for \d+ s",
                     lines), lines
    assert any(e[ev.WORKER] == f"{name} ({victim})" for e in events), events


def test_a_worker_paused_for_memory_is_named_on_the_progress_line(store, tmp_path):
    """Finding 4: workers paused at Dask's 80 % threshold left `train` silent. One worker is
    pushed over it by a real allocation (ballast held in the worker process), then freed."""
    with _cluster(2, memory_limit="700MiB") as cluster, Client(cluster) as client:
        client.register_plugin(SlowTasks(pattern=r"^(block|fit)-", seconds=0.3), name="slow")
        victim = sorted(client.scheduler_info()["workers"])[0]
        name = client.scheduler_info()["workers"][victim]["name"]

        def ballast():
            client.run(_hold_memory, fraction=0.87, workers=[victim])
            return lambda: client.run(_hold_memory, fraction=0, workers=[victim])

        result, lines = _train_while(client, store, tmp_path, ballast,
                                     watch_for="paused for memory")
    assert sorted(result.trained_blocks) == [0, 1, 2, 3]
    assert re.search(rf"-- 1 worker\(s\) paused for memory \(above 80% of their limit\): "
                     rf"{name} \({re.escape(victim)}\)", lines), lines


# --- a memory limit that cannot hold a block is refused, with one that can ------------------------

def test_a_memory_limit_below_floor_and_block_is_refused_with_one_that_works(store, tmp_path):
    """Finding 4: `--memory-limit 300MB` hung at Dask's pause threshold (the post-import floor
    is ~200 MiB). The job measures the floor, refuses before submitting, and names a limit;
    that limit then trains."""
    with _cluster(1, memory_limit="300MB") as cluster, Client(cluster) as client:
        with pytest.raises(ConfigError) as refused:
            train(_estimator(), open_dataset(store), client, run_dir=tmp_path / "run")
    msg = str(refused.value)
    assert re.match(r"worker 0 \(tcp://[\d.:]+\) has a memory limit of 286\.10 MiB and pauses "
                    r"at 80% \(228\.88 MiB\), but needs [\d.]+ MiB: [\d.]+ MiB after imports \+ "
                    r"2 x 77\.34 kiB for 1 block\(s\) of 77\.34 kiB: it would wait forever; "
                    r"restart the workers with --memory-limit \d+MiB or more", msg), msg
    assert not (tmp_path / "run").exists(), "refused before the run began"
    fix = re.search(r"--memory-limit (\d+)MiB", msg).group(1)
    with _cluster(1, memory_limit=f"{fix}MiB") as cluster, Client(cluster) as client:
        result = train(_estimator(), open_dataset(store), client, run_dir=tmp_path / "run")
    assert sorted(result.trained_blocks) == [0, 1, 2, 3]


def test_a_workers_floor_is_measured_once_and_kept():
    with _cluster(1, memory_limit="2GiB") as cluster, Client(cluster) as client:
        info = client.scheduler_info()["workers"]
        [address] = info
        with get_task_stream(client) as first:
            a = measure_floors(client, info, key="warm-up-a", timeout=60)
        with get_task_stream(client) as again:
            b = measure_floors(client, info, key="warm-up-b", timeout=60)
        cluster.scale(0)
        wait_until(lambda: not client.scheduler_info()["workers"], 60,
                   what="the scheduler to drop the scaled-down worker")
        cluster.scale(1)
        client.wait_for_workers(1, timeout=60)
        info = client.scheduler_info()["workers"]
        [restarted] = info
        with get_task_stream(client) as new:
            c = measure_floors(client, info, key="warm-up-c", timeout=60)
    assert a[address]["floor"] == b[address]["floor"] > 100 * 2**20
    assert [t["key"] for t in first.data] == ["warm-up-a-0"]
    assert not again.data, "measured once per worker"
    assert restarted != address and c[restarted]["floor"] > 100 * 2**20
    assert [t["key"] for t in new.data] == ["warm-up-c-0"], "a new worker is measured"


def test_a_worker_that_stops_after_its_warm_up_keeps_its_reported_memory():
    """The floor's result is fetched within the bound too: a worker that ran the warm-up and
    then stopped (SIGSTOP, a hung Pi) cannot send it, and the task, pinned there, is never run
    elsewhere. The warm-up is run first under the key measure_floors will use, so its result is
    ready on the scheduler when the worker stops."""
    from rpicluster.train import tasks

    with _cluster(1, memory_limit="2GiB") as cluster, Client(cluster) as client:
        info = client.scheduler_info()["workers"]
        [(address, w)] = info.items()
        pid = client.run(os.getpid)[address]
        done = client.submit(tasks.warm_up, key="warm-up-stopped-0", workers=[address],
                             allow_other_workers=False, pure=False)
        done.result(timeout=60)
        os.kill(pid, signal.SIGSTOP)
        got = {}
        try:
            measuring = threading.Thread(target=lambda: got.update(measure_floors(
                client, info, key="warm-up-stopped", timeout=2)), daemon=True)
            measuring.start()
            measuring.join(120)
            assert not measuring.is_alive(), "measure_floors waited past its timeout"
        finally:
            os.kill(pid, signal.SIGCONT)
    assert "floor" not in got[address] and got[address]["memory_limit"] == w["memory_limit"]


# --- a lone worker that keeps dying --------------------------------------------------------------

def test_a_poison_block_on_a_lone_worker_ends_the_run_naming_it(store, tmp_path):
    """With the window left to the job (slots), a block whose partition kills the only worker
    used to wait forever: its tasks were pinned (loosely) to the dead worker's address, and
    Dask leaves such no-worker tasks waiting when the nanny's restarted worker joins."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        with _cluster(1) as cluster, Client(cluster) as client:
            client.register_plugin(DieOn(key_re=r"^(block|partition)-\w+-2$"), name="die")
            with pytest.raises(TrainingError,
                               match=r"block 2(, cluster \d+)? failed: the task killed its worker"):
                train(_estimator(), open_dataset(store), client, run_dir=tmp_path / "run")
    assert 2 not in RunDir(tmp_path / "run").committed()


def test_averaging_with_no_worker_stops_within_the_bounded_time(store, monkeypatch):
    """`train --model mlp|sgd` waits through the same watch: no worker, one bounded wait."""
    from rpicluster.train.averaging import train_averaged

    monkeypatch.setenv("RPICLUSTER_NO_WORKER_TIMEOUT", "1")
    with _cluster(0) as cluster, Client(cluster) as client:
        with pytest.raises(TrainingError, match=rf"^no worker is connected to the scheduler "
                                                rf"{re.escape(cluster.scheduler_address)} \(3 "
                                                rf"rounds to train\); waited 1 s"):
            train_averaged(open_dataset(store), client, model="sgd", rounds=3)
