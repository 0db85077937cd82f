"""Training on a real Dask cluster from a real Zarr store: equality with the in-process fit,
commits and resume, a block that keeps killing its worker, uneven workers. Killed workers and
clients are in test_fault_matrix.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import cloudpickle
import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream

from rpicluster import IncrementalKSGDClassifier, ingest, open_dataset
from rpicluster import events as ev
from rpicluster.data.synthetic import make_imagenet_like
from rpicluster.errors import ConfigError, TrainingError
from rpicluster.train.failures import raise_task_error, task_failure
from rpicluster.train.job import TrainingRun, _Block, train
from rpicluster.train.mapping import predict_dataset, score_dataset
from rpicluster.train.placement import ahead_pays, fit_groups_per_block, free_worker
from rpicluster.train.speculate import Pace, behind, worth_a_block
from rpicluster.train.modelfile import load_model
from rpicluster.testing import (DieOn, SlowTasks, all_rows, reference_fit, same_model,
                                wait_until)
from rpicluster.train.rundir import RunDir

# Plugins defined here run inside worker processes that cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PARAMS = dict(n_clusters=4, max_iter=5, random_state=7)
BLOCK_ROWS = 600


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A 4-block synthetic store (2,400 rows x 32 features, 12 classes) and a held-out store."""
    root = tmp_path_factory.mktemp("train-data")
    X, y = make_imagenet_like(3000, n_features=32, n_classes=12, seed=3)
    np.savez(root / "train.npz", X=X[:2400], y=y[:2400])
    np.savez(root / "test.npz", X=X[2400:], y=y[2400:])
    ingest(str(root / "train.npz"), root / "train.zarr", block_rows=BLOCK_ROWS)
    ingest(str(root / "test.npz"), root / "test.zarr", block_rows=BLOCK_ROWS)
    return root


@pytest.fixture
def client(cluster):
    """A client of the module's cluster (conftest), restored to 2 workers afterwards."""
    with Client(cluster) as c:
        yield c
        cluster.scale(2)
        c.wait_for_workers(2, timeout=60)


def _in_process(store):
    return reference_fit(store / "train.zarr", BLOCK_ROWS, **PARAMS)[0]


def test_distributed_fit_equals_in_process_fit(store, client, tmp_path):
    ds = open_dataset(store / "train.zarr")
    reference = _in_process(store)
    est = IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **PARAMS)
    # Without speculation: on a loaded machine a worker's late task may rightly be copied to
    # the other and the copy taken, and then one worker can hold every result taken. Copies
    # have their own test (test_a_late_task_is_run_again_on_an_idle_worker...).
    with get_task_stream(client) as stream:
        result = train(est, ds, client, run_dir=tmp_path / "run", speculate=False)
    X, _ = all_rows(ds)
    same_model(est, reference, X)
    assert result.trained_blocks == [0, 1, 2, 3]
    assert sorted(RunDir(tmp_path / "run").verified()) == [0, 1, 2, 3]
    # Blocks 0 and 1 are one task each (more blocks were left than the 2 worker threads); the
    # last two, one per thread, a partition and 2 fit groups each, shared by the workers.
    tasks = {(key.split("-")[0], int(key.split("-")[2]))
             for key in (str(t["key"]) for t in stream.data)
             if key.split("-")[0] in ("block", "partition", "fit")}
    assert sorted(tasks) == [("block", 0), ("block", 1), ("fit", 2), ("fit", 3),
                             ("partition", 2), ("partition", 3)]
    # Counted as the partition and the fit they are, 2 x 2, then 2 partitions and 2 x 2 fits.
    assert sum(result.tasks_per_worker.values()) == 4 + 2 + 4
    assert len(result.tasks_per_worker) == 2, result.tasks_per_worker
    assert result.speculation["copies"] == 0


def test_estimator_fit_on_dataset_uses_the_current_client(store, client):
    ds = open_dataset(store / "train.zarr")
    est = IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **PARAMS).fit(ds)
    same_model(est, _in_process(store), all_rows(ds)[0])
    # The run announced itself on the scheduler (what the dashboard page reads).
    kinds = [e[1][ev.KIND] for e in client.get_events(ev.TOPIC)]
    assert ev.RUN_START in kinds and kinds.count(ev.COMMITTED) >= 4


def test_validation_scores_and_worker_restriction(store, client):
    ds, test = open_dataset(store / "train.zarr"), open_dataset(store / "test.zarr")
    one = sorted(client.scheduler_info()["workers"])[0]
    est = IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **PARAMS)
    result = train(est, ds, client, validation=test, workers=[one])
    assert len(result.tasks_per_worker) == 1, "every task ran on the one worker allowed"
    X, y = all_rows(test)
    scores = {e[1][ev.BLOCK]: e[1][ev.ACCURACY] for e in client.get_events(ev.TOPIC)
              if e[1][ev.KIND] == ev.VALIDATION and e[1][ev.T] >= result_start(client)}
    for b, block_model in enumerate(est.estimators_):
        assert scores[b] == pytest.approx(block_model.score(X, y))


class _SlowBlocksOn:
    """A dataset whose blocks take ``seconds`` longer to read on the workers named (in the
    task's thread, so the worker still answers the scheduler meanwhile)."""

    def __init__(self, dataset, names, seconds):
        self._ds, self._names, self._seconds = dataset, list(names), seconds

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._ds, name)

    def block(self, b):
        from distributed import get_worker

        if get_worker().name in self._names:
            time.sleep(self._seconds)
        return self._ds.block(b)


def test_a_shared_blocks_fits_are_kept_off_the_workers_measured_slow(store, client):
    ds = open_dataset(store / "train.zarr")
    est = IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **PARAMS)
    for workers in (None, ["a", "b", "c"]):
        run = TrainingRun(est, ds, client, workers=workers)
        run.slots = {"a": 2, "b": 2, "c": 2}
        run.pace.slowness_obs = {"a": [4.0, 3.5], "b": [1.0]}  # c: not measured yet
        shared, whole = _Block(5, "b"), _Block(4, "b")
        whole.whole = True
        assert run._fit_where(whole) == run.where
        assert run._fit_where(shared) == {"workers": ["b", "c"],
                                          "allow_other_workers": workers is None}
        # pinned in a restricted run only: _check_planned watches the pinned workers
        assert shared.fit_pinned == (set() if workers is None else {"b", "c"})
        run.pace.slowness_obs = {"a": [1.4], "b": [1.0]}  # nobody slow: anywhere, as Dask likes
        assert run._fit_where(_Block(6, "b")) == run.where


def test_the_last_blocks_fits_stay_off_a_worker_measured_slow(client, tmp_path):
    info = client.scheduler_info()["workers"]
    address = {w["name"]: a for a, w in info.items()}
    slow, fast = sorted(address, key=str)
    many = ingest("synthetic:rows=3600,features=16,classes=6,seed=2", tmp_path / "many.zarr",
                  block_rows=150)
    # Blocks read 0.3 s slower on one worker: its first block measures it slow long before
    # the last two blocks (one per thread) are shared out. A restricted run pins their fits to
    # the other worker (strictly: _check_planned stops the run if it leaves).
    ds = _SlowBlocksOn(many, [slow], 0.3)
    with get_task_stream(client) as stream:
        result = train(IncrementalKSGDClassifier(block_rows=150, **PARAMS), ds, client,
                       workers=list(info))
    ran = {str(t["key"]): t["worker"] for t in stream.data}
    fits = {k: w for k, w in ran.items() if k.startswith("fit-")}
    assert fits and set(fits.values()) == {address[fast]}, fits
    assert any(k.startswith("block-") and w == address[slow] for k, w in ran.items()), \
        "the slow worker trained blocks of its own"
    same_model(result.model, reference_fit(tmp_path / "many.zarr", 150, **PARAMS)[0],
               all_rows(many)[0])


def test_a_run_restricted_to_some_workers_never_uses_another(client, cluster, tmp_path):
    cluster.scale(3)
    client.wait_for_workers(3, timeout=60)
    by_name = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
    allowed = sorted(by_name, key=str)[:2]
    # Blocks read slowly on one allowed worker, which then holds its block queued ahead while
    # the third worker idles: under a loose pin, Dask's work stealing hands such a block to it.
    many = ingest("synthetic:rows=3600,features=16,classes=6,seed=2", tmp_path / "many.zarr",
                  block_rows=300)
    ds = _SlowBlocksOn(many, allowed[:1], 0.5)
    est = IncrementalKSGDClassifier(block_rows=300, **PARAMS)
    result = train(est, ds, client, workers=[by_name[n] for n in allowed])
    assert set(result.tasks_per_worker) <= {str(n) for n in allowed}, result.tasks_per_worker
    same_model(est, reference_fit(tmp_path / "many.zarr", 300, **PARAMS)[0], all_rows(many)[0])


def test_a_restricted_run_whose_worker_leaves_before_partitioning_stops_naming_it(store,
                                                                                client):
    # The worker given block 1 dies as it starts partitioning it; the block is pinned there.
    client.register_plugin(DieOn(r"^(block|partition)-\w+-1$"), name="die-on-block-1")
    try:
        with pytest.raises(TrainingError, match=r"worker tcp://\S+ left before partitioning "
                                                r"block 1, and this run is restricted"):
            train(IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **PARAMS),
                  open_dataset(store / "train.zarr"), client,
                  workers=list(client.scheduler_info()["workers"]))
    finally:
        client.unregister_worker_plugin("die-on-block-1")


def result_start(client):
    """Time of the latest run-start event."""
    return max(e[1][ev.T] for e in client.get_events(ev.TOPIC) if e[1][ev.KIND] == ev.RUN_START)


def test_score_and_predict_on_the_cluster_match_local(store, client):
    model = _in_process(store)
    test = open_dataset(store / "test.zarr")
    X, y = all_rows(test)
    np.testing.assert_array_equal(predict_dataset(model, test, client), model.predict(X))
    assert score_dataset(model, test, client) == pytest.approx(model.score(X, y))


def test_resume_refuses_changed_parameters(store, client, tmp_path):
    ds = open_dataset(store / "train.zarr")
    train(IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **PARAMS), ds, client,
          run_dir=tmp_path / "run")
    other = IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **{**PARAMS, "n_clusters": 3})
    with pytest.raises(ConfigError, match="n_clusters"):
        train(other, ds, client, run_dir=tmp_path / "run", resume=True)


def test_a_block_that_keeps_killing_its_worker_fails_the_job_naming_it(store, tmp_path):
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            client.register_plugin(DieOn(key_re=r"^(block|partition)-\w+-2$"), name="die")
            est = IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **PARAMS)
            # One block in flight: a dying worker takes down every task queued on it, and Dask
            # counts the death against each of them, so with two blocks in flight either could
            # reach allowed-failures first.
            with pytest.raises(TrainingError, match="block 2"):
                train(est, open_dataset(store / "train.zarr"), client, run_dir=tmp_path / "run",
                      max_blocks_in_flight=1)
    assert 2 not in RunDir(tmp_path / "run").committed()


def test_a_result_in_hand_stays_a_result_when_its_worker_dies_before_it_is_read(client):
    """A run reads the entries of ``as_completed(with_results=True)``: a result gathered is in
    hand even when its worker dies before the run reads it (the future then reads ``lost``: the
    fault matrix's SIGKILL case once failed a finished block so); a failed task's entry carries
    its exception, a cancelled task's its CancelledError, and neither is taken for a result."""
    from distributed import CancelledError, as_completed

    pids = client.run(os.getpid)
    holder = min(pids)
    # Pinned: once its worker is gone the task cannot be recomputed, and stays lost.
    done = client.submit(dict, rows=600, key="held-result", workers=[holder],
                         allow_other_workers=False)
    [(future, result)] = list(as_completed([done], with_results=True, raise_errors=False))
    os.kill(pids[holder], signal.SIGKILL)
    wait_until(lambda: future.status != "finished", 30,
               what="the scheduler to see the result's worker die")
    assert future.status != "finished" and result == {"rows": 600}
    assert task_failure(result) is None
    client.cancel([done])

    failed = client.submit(int, "not a number", key="failed-task")
    # Waiting for a worker that does not exist (no thread of the module's workers is held).
    waiting = client.submit(dict, key="cancelled-task", workers=["tcp://127.0.0.1:9"],
                            allow_other_workers=False)
    client.cancel([waiting])
    entries = {f.key: r for f, r in as_completed([failed, waiting], with_results=True,
                                                 raise_errors=False)}
    assert isinstance(task_failure(entries["failed-task"]), ValueError)
    cancelled = task_failure(entries["cancelled-task"])
    assert isinstance(cancelled, CancelledError)
    with pytest.raises(TrainingError, match=r"^block 3: its task was cancelled on the scheduler"):
        raise_task_error(cancelled, 3, None)
    with pytest.raises(TrainingError, match="^block 3, cluster 1 failed on a worker: ValueError"):
        raise_task_error(task_failure(entries["failed-task"]), 3, 1)


def test_faster_workers_take_more_tasks(store, tmp_path):
    with LocalCluster(n_workers=0, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            # One "desktop" with 3 threads and one "Pi" whose tasks each take 0.2 s longer.
            procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker",
                                       cluster.scheduler_address, "--name", name,
                                       "--nthreads", str(n), "--no-dashboard",
                                       "--local-directory", str(tmp_path / name)])
                     for name, n in (("desktop", 3), ("pi", 1))]
            try:
                client.wait_for_workers(2, timeout=60)
                client.register_plugin(SlowTasks(prefix="", seconds=0.2, only="pi"),
                                       name="slow-pi")
                est = IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **PARAMS)
                result = train(est, open_dataset(store / "train.zarr"), client)
            finally:
                for p in procs:
                    p.terminate()
                for p in procs:
                    p.wait(30)
    counts = result.tasks_per_worker
    assert counts["desktop"] > counts["pi"] > 0, counts


def test_a_late_task_is_run_again_on_an_idle_worker_and_the_model_is_unchanged(store, client):
    ds = open_dataset(store / "train.zarr")
    plain = IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **PARAMS)
    train(plain, ds, client)  # also warms both workers
    names = sorted(str(w["name"]) for w in client.scheduler_info()["workers"].values())
    slow, fast = names
    # The slow worker's partitions (and whole-block tasks) stall: it gets one of the first two
    # blocks, the fast worker trains the rest and then idles while that one is still running.
    client.register_plugin(SlowTasks(pattern=r"^(block|partition)-", seconds=4.0,
                                     only=int(slow)), name="slow")
    got = []
    client.subscribe_topic(ev.TOPIC, lambda e: got.append(e[1]))
    try:
        est = IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **PARAMS)
        result = train(est, ds, client)
        parts = [m for m in got if m.get(ev.KIND) == ev.PARTITIONED]
        got.clear()
        # The same stall with speculate=False: nothing is copied, the fast worker waits.
        unspeculated = train(IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **PARAMS), ds,
                             client, speculate=False)
    finally:
        client.unsubscribe_topic(ev.TOPIC)
        client.unregister_worker_plugin("slow")
    assert result.speculation["copies"] >= 1 and result.speculation["won"] >= 1, \
        result.speculation
    # The stalled partition's copy was taken: every block was partitioned by the fast worker.
    assert sorted(m["block"] for m in parts) == [0, 1, 2, 3]
    assert {str(m["worker"]) for m in parts} == {fast}
    X, _ = all_rows(ds)
    same_model(est, plain, X)
    same_model(est, _in_process(store), X)
    assert unspeculated.speculation["copies"] == 0
    assert unspeculated.tasks_per_worker[slow] > 0, unspeculated.tasks_per_worker
    same_model(unspeculated.model, plain, X)


def _slow_fits(name: str | None, seconds: float = 0.0, dask_worker=None) -> list:
    """On a worker: make every cluster fit on the worker named ``name`` take ``seconds`` more,
    and count each task's cluster fits (``(task key, clusters fitted)`` in ``ksgd.FITS``, in
    order). ``name`` None: undo, and return what was counted."""
    import rpicluster.models.ksgd as ksgd

    inner = getattr(ksgd.fit_cluster, "__wrapped__", ksgd.fit_cluster)
    counted = list(getattr(ksgd, "FITS", []))
    ksgd.fit_cluster = inner
    if name is None:
        return counted
    worker = dask_worker
    ksgd.FITS = []

    def slow(*args, **kwargs):
        ksgd.FITS.append(str(worker.get_current_task()))
        if str(worker.name) == name:
            time.sleep(seconds)
        return inner(*args, **kwargs)

    slow.__wrapped__ = inner
    ksgd.fit_cluster = slow
    return []


def _executing(dask_worker) -> int:
    return len(dask_worker.state.executing)


def test_a_late_fit_that_lost_to_its_copy_stops_at_its_next_cluster(store, client):
    """The slow worker's cluster fits take 1.5 s each: its late fits are copied to the idle
    worker, the copies win, and each cancelled original frees its thread after the cluster it
    was fitting, not after the rest of its group."""
    ds = open_dataset(store / "train.zarr")
    plain = IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **PARAMS)
    train(plain, ds, client)  # also warms both workers
    names = sorted(str(w["name"]) for w in client.scheduler_info()["workers"].values())
    slow = names[0]
    client.run(_slow_fits, slow, 1.5)
    try:
        est = IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **PARAMS)
        result = train(est, ds, client)
        # a cancelled task leaves its worker's thread when it returns
        wait_until(lambda: not any(client.run(_executing).values()), 30,
                   what="the cancelled tasks to return")
    finally:
        fits = client.run(_slow_fits, None)
    assert result.speculation["won"] >= 1, result.speculation
    same_model(est, plain, all_rows(ds)[0])
    workers = client.scheduler_info()["workers"]
    slow_fits = Counter(next(f for a, f in fits.items() if str(workers[a]["name"]) == slow))
    # The slow worker's tasks whose copy won: one or more fitted fewer clusters than their
    # group has (4 clusters in 1 or 2 groups: 2 or 4 a task).
    losers = {k: n for k, n in slow_fits.items() if "copy" not in k and n < 2}
    assert losers, (fits, slow, result.speculation)


def test_a_block_has_one_fit_task_per_worker_thread_at_most_one_per_cluster():
    two = {"a": {"nthreads": 1}, "b": {"nthreads": 1}}
    assert fit_groups_per_block(10, two) == 2
    assert fit_groups_per_block(10, {**two, "c": {"nthreads": 4}}) == 6
    assert fit_groups_per_block(3, {"a": {"nthreads": 8}}) == 3
    assert fit_groups_per_block(10, {}) == 1


def test_a_slow_workers_task_is_copied_while_an_idle_one_would_end_it_first():
    # 5x slow, a 0.1 s task (0.5 s there): 0.3 s in, 0.2 s are left against 0.1 s elsewhere
    assert behind(5.0, 1.0, expected=0.1, elapsed=0.3)
    assert not behind(5.0, 1.0, expected=0.1, elapsed=0.45)  # 0.05 s left
    assert not behind(5.0, 3.0, expected=0.1, elapsed=0.25)  # the idle one takes 0.3 s
    assert not behind(1.2, 1.0, expected=10.0, elapsed=0.0)  # usual speed: only when late
    assert not behind(None, 1.0, expected=10.0, elapsed=0.0)  # not measured yet


def test_a_block_is_queued_ahead_only_while_blocks_are_short():
    measured = {"partition": [1e-5, 2e-5, 3e-5], "fit": [4e-5, 5e-5]}  # medians 2e-5 + 4.5e-5
    assert ahead_pays(measured, block_rows=4_000)  # 0.26 s a block
    assert not ahead_pays(measured, block_rows=126_141)  # 8.2 s a block
    assert not ahead_pays({"partition": [1e-5], "fit": []}, block_rows=10)  # not measured yet


def test_no_block_is_queued_ahead_on_a_worker_yet_to_return_anything():
    # Blocks measured short on "fast": it gets a block queued ahead; "silent" (an emulated Pi
    # still on its first block) does not until it has returned one, then it does too.
    pace = Pace()
    pace.start()
    for _ in range(3):
        pace.observe("fast", "partition", 100, 0.01)
        pace.observe("fast", "fit", 100, 0.02)
    slots, threads = {"silent": 2, "fast": 2}, {"silent": 1, "fast": 1}
    assert free_worker(slots, threads, Counter(silent=1, fast=1), pace, 10, 100) == "fast"
    assert free_worker(slots, threads, Counter(silent=1, fast=2), pace, 10, 100) is None
    pace.observe("silent", "partition", 100, 0.012)
    pace.observe("silent", "fit", 100, 0.02)
    assert free_worker(slots, threads, Counter(silent=1, fast=2), pace, 10, 100) == "silent"


def test_a_slow_worker_gets_no_block_near_the_end():
    # 4x slower than the two others: worth it while the others have more than 2 x 3 blocks
    # left, not near the end; a worker of usual speed (or unmeasured) always is.
    assert worth_a_block(4.0, remaining=7, faster=2)
    assert not worth_a_block(4.0, remaining=6, faster=2)
    assert not worth_a_block(4.0, remaining=1, faster=2)
    assert worth_a_block(4.0, remaining=1, faster=0)  # no one else to take it
    assert worth_a_block(1.2, remaining=1, faster=2)
    assert worth_a_block(None, remaining=1, faster=2)


def test_model_file_round_trip_and_cli(store, cluster, tmp_path):
    from click.testing import CliRunner

    from rpicluster.cli import main

    model_path = tmp_path / "m.skops"
    runner = CliRunner()
    res = runner.invoke(main, ["train", str(store / "train.zarr"), "-o", str(model_path),
                               "--scheduler", cluster.scheduler_address, "--clusters", "4",
                               "--epochs", "5", "--seed", "7",
                               "--test", str(store / "test.zarr")])
    assert res.exit_code == 0, res.output
    assert "test accuracy" in res.output and "tasks per worker" in res.output
    model = load_model(model_path)
    X, y = all_rows(open_dataset(store / "test.zarr"))
    same_model(model, _in_process(store), X)
    res = runner.invoke(main, ["score", str(model_path), str(store / "test.zarr"),
                               "--scheduler", cluster.scheduler_address])
    assert res.exit_code == 0, res.output
    assert f"{model.score(X, y):.4f}" in res.output
    out = tmp_path / "pred.npy"
    res = runner.invoke(main, ["predict", str(model_path), str(store / "test.zarr"), "-o",
                               str(out), "--scheduler", cluster.scheduler_address])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(np.load(out), model.predict(X))
