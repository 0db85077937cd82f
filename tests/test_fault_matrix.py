"""The fault matrix: one fault per case, injected into a real cluster (nanny-backed
LocalClusters, a scheduler and workers in their own processes, the embedded local cluster), and
the guarantee it must keep. Each case's docstring names it; benchmarks/fault_matrix.py runs this
module and tabulates each case's result and the recovery time the ``recovery`` stopwatch took
(reported there, never asserted here). The README's "Fault tolerance: what survives what" states
these guarantees. The cases that cut a namespace host's link (mid-train, and mid-round of
federated and of model-averaged training: a Pi unplugged from the shelf's switch) build SSH hosts
and may wait out Dask's TCP timeout, so they are marked ``bench`` (the benchmark runs them;
``pytest -m bench`` does too).

Not repeated here: the store contract itself (every damaged, truncated, missing, swapped chunk
and impossible class code, read by key) is tested in test_data_store.py, where a damaged store
meets a training run; another local user against the embedded cluster (plain TCP refused, no
client code on the scheduler) is tested in test_deploy_security.py, and workers that `up`
started rejoining a restarted scheduler or a cut link by themselves in test_deploy_netns.py. The
benchmark lists those cases beside these.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from distributed import Client

from rpicluster import IncrementalKSGDClassifier, events as ev, open_dataset
from rpicluster.cli import main
from rpicluster.errors import ModelError
from rpicluster.testing import SlowTasks, cli_argv, reference_fit, same_model, wait_until
from rpicluster.train.job import train
from rpicluster.train.modelfile import load_model, save_model, trust_model
from rpicluster.train.rundir import RunDir

PARAMS = dict(n_clusters=4, max_iter=5, random_state=7)
BLOCK_ROWS = 600
FLAGS = ["--clusters", "4", "--epochs", "5"]



@pytest.fixture(scope="module")
def uninterrupted(store):
    """The uninterrupted run's model (seed 7) and the rows to compare predictions on."""
    return reference_fit(store, BLOCK_ROWS, **PARAMS)


@pytest.fixture
def recovery(record_property):
    """A stopwatch from the fault to the guarantee holding again: ``fault()`` when the fault
    lands, ``recovered(span)`` when the run has finished, refused or said what to do next.
    benchmarks/fault_matrix.py reports the seconds and ``span``; no test asserts on them."""

    class Stopwatch:
        t0: float | None = None

        def fault(self) -> None:
            self.t0 = time.monotonic()

        def recovered(self, span: str) -> None:
            record_property("recovery_s", round(time.monotonic() - self.t0, 2))
            record_property("span", span)

    return Stopwatch()


def _cli(*args, **kwargs):
    """``rpicluster ARGS`` in its own process (it can be killed), output merged."""
    return subprocess.Popen(cli_argv(*args),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _wait_for_commit(run_dir, proc, timeout=120):
    wait_until(lambda: (run_dir / "manifest.json").is_file() and RunDir(run_dir).committed(),
               timeout, what=f"a block committed in {run_dir}", process=proc)


def _resume_line(output: str) -> list[str]:
    m = re.search(r"continue with: (.*)$", output, re.M)
    assert m, output
    return shlex.split(m.group(1))


def _error_line(output: str) -> str:
    """The one ``error:`` line of a command's output; no traceback beside it."""
    assert "Traceback" not in output, output
    [line] = [x for x in output.splitlines() if x.startswith("error: ")]
    return line


@contextlib.contextmanager
def _slow_fits(client, seconds=1.0, pattern=None):
    """Fit tasks slowed so a fault lands between the first commit and the last."""
    client.register_plugin(SlowTasks(seconds=seconds, pattern=pattern or FITS),
                           name="slow")
    try:
        yield
    finally:
        client.unregister_worker_plugin("slow")


#: Keys of the tasks that fit a block's clusters: a fit group (``fit-RUN-BLOCK-GROUP``) or a
#: whole block (``block-RUN-BLOCK``), and their copies (``...-copy``).
FITS = r"^(block|fit)-"
#: The same, of every block but block 0: slowed, block 0 commits at once and the others are
#: still running when a test's fault lands, however fast the machine.
LATER_BLOCKS = r"^(block|fit)-\w+-[1-9][0-9]*(-[0-9]+)?(-copy)?$"


# --- workers ------------------------------------------------------------------------------------

def test_worker_sigkill_mid_train(store, uninterrupted, client, tmp_path, recovery):
    """worker SIGKILL mid-train: its nanny restarts it, the run finishes, the model is bitwise
    equal to an uninterrupted run"""
    pids = client.run(os.getpid)
    victim = sorted(pids)[0]
    victim_pid = pids[victim]

    def kill_after_first_partition(event):
        topic, msg = event
        if msg[ev.KIND] == ev.PARTITIONED and victim in pids:
            recovery.fault()
            os.kill(pids.pop(victim), signal.SIGKILL)

    client.subscribe_topic(ev.TOPIC, kill_after_first_partition)
    try:
        with _slow_fits(client, 0.1):
            est = IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, **PARAMS)
            train(est, open_dataset(store), client, run_dir=tmp_path / "run")
        recovery.recovered("kill -> run finished")
    finally:
        client.unsubscribe_topic(ev.TOPIC)
    assert victim not in pids, "the worker was killed during the run"
    same_model(est, *uninterrupted)
    client.wait_for_workers(2, timeout=60)
    now = client.run(os.getpid)
    assert len(now) == 2 and victim_pid not in now.values()  # the nanny started a fresh one


@pytest.mark.bench
@pytest.mark.netns
def test_worker_host_lost_mid_train(store, uninterrupted, tmp_path, home, recovery):
    """worker host lost mid-train (its link cut; namespace SSH hosts, TLS): the scheduler drops
    it after Dask's TCP timeout and the run finishes on the other worker, its block models
    scored (`--test`) as they commit, with a model bitwise equal to an uninterrupted run"""
    from rpicluster import connect
    from rpicluster.deploy import cluster as deploy
    from rpicluster.testing import NamespaceHosts, unavailable

    if unavailable():
        pytest.skip(unavailable())
    model = tmp_path / "m.skops"
    with NamespaceHosts(tmp_path / "netns", 2) as hosts:
        path = hosts.write_inventory(tmp_path / "cluster.toml", memory="1GiB",
                                     local_directory=tmp_path / "workers")
        try:
            deploy.up(path)
            with connect(inventory=path, timeout=30) as c:
                c.register_plugin(SlowTasks(pattern=FITS, seconds=0.5), name="slow")
            # --test: every block model is also scored as it commits, on the workers.
            proc = _cli("train", str(store), "-o", str(model), "-c", str(path), *FLAGS,
                        "--seed", "7", "--test", str(store))
            _wait_for_commit(tmp_path / "m.skops.run", proc)
            hosts.set_link("pi2", up=False)
            recovery.fault()
            kept = len(RunDir(tmp_path / "m.skops.run").verified())
            out, _ = proc.communicate(timeout=300)
            recovery.recovered("link cut -> run finished on the other worker")
            # The run needs nothing from the cut host, so it may end before the scheduler drops
            # that worker (Dask's TCP timeout, distributed.comm.timeouts.tcp): wait for the drop.
            with connect(inventory=path, timeout=30) as c:
                left = wait_until(
                    lambda: {w["name"] for w in c.scheduler_info()["workers"].values()}
                    == {hosts.hosts["pi1"].address} and {hosts.hosts["pi1"].address},
                    180, what="the scheduler dropping the cut host pi2", interval=1)
        finally:
            hosts.set_link("pi2", up=True)
            deploy.down(path)
    assert kept < 4, "the link should be cut mid-run"
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert left == {hosts.hosts["pi1"].address}, "the cut host is dropped"
    same_model(load_model(model), *uninterrupted)


@pytest.mark.bench
@pytest.mark.netns
def test_host_link_cut_mid_federated_round(tmp_path, home, recovery):
    """a host's link cut mid-round of federated training (namespace SSH hosts, TLS): the round
    completes without it, naming it (missed the deadline, or lost), later rounds go on without
    it and the run writes its model; nothing waits on the cut host"""
    from sklearn.datasets import load_digits

    from rpicluster import ingest
    from rpicluster.deploy import cluster as deploy
    from rpicluster.testing import NamespaceHosts, unavailable
    from rpicluster.train.federated import federate

    if unavailable():
        pytest.skip(unavailable())
    X, y = load_digits(return_X_y=True)
    stores = {}
    for name, lo, hi in (("pi1", 0, 750), ("pi2", 750, 1500), ("validation", 1500, 1797)):
        np.savez(tmp_path / f"{name}.npz", X=(X[lo:hi] / 16.0).astype(np.float32), y=y[lo:hi])
        stores[name] = tmp_path / name / "local.zarr"
        stores[name].parent.mkdir()
        ingest(str(tmp_path / f"{name}.npz"), stores[name], block_rows=250)
    with NamespaceHosts(tmp_path / "netns", 2) as hosts:
        addr = {n: h.address for n, h in hosts.hosts.items()}
        path = hosts.write_inventory(tmp_path / "cluster.toml", memory="1GiB",
                                     local_directory=tmp_path / "workers",
                                     data=lambda n: stores[n])

        def cut_in_round_2(r, participants):
            if r == 2:
                assert addr["pi2"] in participants
                hosts.set_link("pi2", up=False)
                recovery.fault()

        try:
            deploy.up(path)
            result, _ = federate(path, tmp_path / "fed.skops", model="mlp",
                                 params={"hidden_layer_sizes": (16,), "random_state": 0,
                                         "learning_rate_init": 0.01},
                                 rounds=4, local_epochs=5, round_timeout=10, tol=None,
                                 validation=str(stores["validation"]), show_progress=False,
                                 on_round_start=cut_in_round_2)
            recovery.recovered("link cut -> model written without the host")
        finally:
            hosts.set_link("pi2", up=True)
            deploy.down(path)
    r1, r2, r3, r4 = result.rounds
    assert r1["participants"] == sorted(addr.values())
    assert r2["participants"] == [addr["pi1"]]
    assert re.match(r"missed the 10 s round deadline|lost during the round",
                    r2["left_out"][addr["pi2"]]), r2["left_out"]
    assert r3["participants"] == r4["participants"] == [addr["pi1"]]
    assert r4["accuracy"] is not None and r4["accuracy"] > 0.5
    np.testing.assert_array_equal(load_model(tmp_path / "fed.skops").coefs_[0],
                                  result.model.coefs_[0])


@pytest.mark.bench
@pytest.mark.netns
def test_host_link_cut_mid_averaged_round(tmp_path, home, recovery):
    """a host's link cut mid-round of model-averaged training (`train --model mlp`; namespace
    SSH hosts, TLS): once the scheduler drops it (Dask's TCP timeout), its shard runs on the
    other host and the run finishes its rounds and writes the model; nothing waits on it for
    good"""
    from sklearn.datasets import load_digits

    from rpicluster import ingest
    from rpicluster.deploy import cluster as deploy
    from rpicluster.testing import NamespaceHosts, unavailable
    from rpicluster.train.rounds import RoundDir

    if unavailable():
        pytest.skip(unavailable())
    X, y = load_digits(return_X_y=True)
    np.savez(tmp_path / "digits.npz", X=(X[:1400] / 16.0).astype(np.float32), y=y[:1400])
    ingest(str(tmp_path / "digits.npz"), tmp_path / "digits.zarr", block_rows=350)
    model, run_dir = tmp_path / "mlp.skops", tmp_path / "run"
    with NamespaceHosts(tmp_path / "netns", 2) as hosts:
        path = hosts.write_inventory(tmp_path / "cluster.toml", memory="1GiB",
                                     local_directory=tmp_path / "workers")
        proc = None
        try:
            deploy.up(path)
            proc = _cli("train", str(tmp_path / "digits.zarr"), "-o", str(model), "--model",
                        "mlp", "--hidden", "16", "--rounds", "6", "--tol", "none", "--seed",
                        "3", "--run-dir", str(run_dir), "-c", str(path))
            wait_until(lambda: len(RoundDir(run_dir).history()) >= 2, 300,
                       what=f"two rounds checkpointed in {run_dir}", process=proc,
                       ignore=(OSError, ValueError))
            hosts.set_link("pi2", up=False)
            recovery.fault()
            cut_after = len(RoundDir(run_dir).history())
            out, _ = proc.communicate(timeout=400)
            recovery.recovered("link cut -> model written")
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            hosts.set_link("pi2", up=True)
            deploy.down(path)
    assert cut_after < 6, "the link should be cut mid-run"
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert [r["round"] for r in RoundDir(run_dir).history()] == [1, 2, 3, 4, 5, 6]
    assert load_model(model).coefs_[0].shape == (64, 16)


# --- the client ---------------------------------------------------------------------------------

def test_client_sigkill_then_resume(store, uninterrupted, cluster, client, tmp_path, recovery):
    """client SIGKILL mid-run, then `train --resume`: committed blocks are kept, the model is
    bitwise equal to an uninterrupted run"""
    model, run_dir = tmp_path / "m.skops", tmp_path / "m.skops.run"
    with _slow_fits(client, 2.0, LATER_BLOCKS):
        proc = _cli("train", str(store), "-o", str(model), "--scheduler",
                    cluster.scheduler_address, *FLAGS, "--seed", "7")
        _wait_for_commit(run_dir, proc)
        proc.send_signal(signal.SIGKILL)
        recovery.fault()
        proc.wait()
    committed = sorted(RunDir(run_dir).verified())
    assert 1 <= len(committed) < 4, "the kill should land mid-run"
    assert not model.exists(), "a killed run must not leave a model file"
    res = CliRunner().invoke(main, ["train", str(store), "-o", str(model), "--resume",
                                    str(run_dir), "--scheduler", cluster.scheduler_address])
    recovery.recovered("kill -> resumed model written")
    assert res.exit_code == 0, res.output
    assert f"(+{len(committed)} resumed)" in res.output
    same_model(load_model(model), *uninterrupted)


def test_client_interrupted_says_what_was_kept_and_how_to_resume(store, uninterrupted, cluster,
                                                                  client, tmp_path, recovery):
    """client interrupted (Ctrl-C): one line with the blocks kept and the exact `--resume`
    command, which gives a model equal to an uninterrupted run"""
    model = tmp_path / "m.skops"
    with _slow_fits(client, 2.0, LATER_BLOCKS):
        proc = _cli("train", str(store), "-o", str(model), "--scheduler",
                    cluster.scheduler_address, *FLAGS, "--seed", "7")
        _wait_for_commit(tmp_path / "m.skops.run", proc)
        proc.send_signal(signal.SIGINT)
        recovery.fault()
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "Aborted!" not in out
    kept = len(RunDir(tmp_path / "m.skops.run").verified())
    assert re.search(rf"error: interrupted: {kept} of 4 blocks are committed in "
                     rf"{re.escape(str(model))}\.run; continue with: ", _error_line(out)), out
    again = _resume_line(out)
    assert again == ["rpicluster", "train", str(store), "-o", str(model), "--resume",
                     f"{model}.run", "--scheduler", cluster.scheduler_address]
    res = CliRunner().invoke(main, again[1:])
    recovery.recovered("Ctrl-C -> resumed model written")
    assert res.exit_code == 0, res.output
    assert f"(+{kept} resumed)" in res.output
    same_model(load_model(model), *uninterrupted)


# --- the scheduler ------------------------------------------------------------------------------

def _scheduler(tmp_path, env, port=0):
    """A scheduler process; returns it and its address (from its scheduler file)."""
    sfile = tmp_path / f"s-{time.monotonic_ns()}.json"
    proc = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--port",
                             str(port), "--no-dashboard", "--scheduler-file", str(sfile)],
                            stderr=subprocess.DEVNULL, env=env)
    try:  # the file appears before its contents: OSError, then ValueError
        address = wait_until(lambda: json.loads(sfile.read_text())["address"], 120,
                             what=f"the scheduler's address in {sfile}", process=proc,
                             ignore=(OSError, ValueError), interval=0.1)
    except AssertionError:
        proc.kill()
        raise
    return proc, address


def _workers(address, tmp_path, env):
    """Two nanny-backed worker processes for ``address``."""
    return subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                             "--nworkers", "2", "--nthreads", "1", "--no-dashboard",
                             "--local-directory", str(tmp_path / "w")],
                            stderr=subprocess.DEVNULL, env=env)


def test_scheduler_sigkill_mid_run(store, uninterrupted, tmp_path, recovery):
    """scheduler SIGKILL mid-run: one line with the blocks kept and the exact `--resume`
    command; once a scheduler answers there again, that command gives a model equal to an
    uninterrupted run"""
    # The client waits RPICLUSTER_CONNECT_TIMEOUT (default 30 s) for its scheduler to come back
    # before it gives up; 5 s keeps the case short.
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "10s",
           "RPICLUSTER_CONNECT_TIMEOUT": "5"}
    procs = []
    try:
        sched, address = _scheduler(tmp_path, env)
        procs += [sched, _workers(address, tmp_path, env)]
        with Client(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=120)
            # 3 s a block: the kill must land before the last commit even when this test's
            # process is descheduled for a second or two on a loaded machine.
            c.register_plugin(SlowTasks(pattern=FITS, seconds=3.0), name="slow")
        model = tmp_path / "m.skops"
        proc = _cli("train", str(store), "-o", str(model), "--scheduler", address, *FLAGS,
                    "--seed", "7", env=env)
        _wait_for_commit(tmp_path / "m.skops.run", proc)
        sched.send_signal(signal.SIGKILL)
        recovery.fault()
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 1, out
        line = _error_line(out)
        kept = len(RunDir(tmp_path / "m.skops.run").verified())
        assert kept < 4, "the kill should land mid-run"
        assert f"error: lost the scheduler {address} during training (" in line
        assert f"{kept} of 4 blocks are committed in {model}.run" in line
        assert "Timed out trying to connect" not in line, "the cleanup's timeout hid the cause"
        again = _resume_line(line)
        assert again == ["rpicluster", "train", str(store), "-o", str(model), "--resume",
                         f"{model}.run", "--scheduler", address]
        # The scheduler comes back at the same address, with workers of its own.
        procs[1].kill()
        sched, _ = _scheduler(tmp_path, env, port=address.rsplit(":", 1)[1])
        procs += [sched, _workers(address, tmp_path, env)]
        with Client(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=120)
        res = CliRunner().invoke(main, again[1:])
        recovery.recovered("kill -> one line -> scheduler back -> resumed model written")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert res.exit_code == 0, res.output
    assert f"(+{kept} resumed)" in res.output
    same_model(load_model(model), *uninterrupted)


# --- the run directory --------------------------------------------------------------------------

def test_second_concurrent_writer_is_refused(store, uninterrupted, cluster, client, tmp_path,
                                             recovery):
    """second concurrent writer of a run directory: refused in one line naming the first run
    (pid, host, start); the first run's model is untouched"""
    model = tmp_path / "mix.skops"
    with _slow_fits(client, 2.0, LATER_BLOCKS):
        first = _cli("train", str(store), "-o", str(model), "--scheduler",
                     cluster.scheduler_address, *FLAGS, "--seed", "7")
        _wait_for_commit(tmp_path / "mix.skops.run", first)
        recovery.fault()
        res = CliRunner().invoke(main, ["train", str(store), "-o", str(model), "--scheduler",
                                        cluster.scheduler_address, *FLAGS, "--seed", "8"])
        recovery.recovered("second start -> refused")
        out, _ = first.communicate(timeout=300)
    assert res.exit_code == 1, res.output
    assert re.search(rf"run directory {re.escape(str(model))}\.run is in use by another training "
                     rf"run \(pid {first.pid} on host \S+, started", _error_line(res.output))
    assert first.returncode == 0, out
    same_model(load_model(model), *uninterrupted)


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs: a real filesystem that fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                                            str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_on_the_run_directory(store, cluster, tmp_path, full_disk, recovery):
    """full disk on the run directory: one line naming the path, with the `--resume` command;
    no model file"""
    (full_disk / "ballast").write_bytes(b"\0" * 200_000)
    model = tmp_path / "m.skops"
    recovery.fault()
    res = CliRunner().invoke(main, ["train", str(store), "-o", str(model), "--run-dir",
                                    str(full_disk / "run"), "--scheduler",
                                    cluster.scheduler_address, *FLAGS, "--seed", "7"])
    recovery.recovered("start on a full disk -> one line")
    assert res.exit_code == 1, res.output
    line = _error_line(res.output)
    assert re.search(rf"cannot write {re.escape(str(full_disk / 'run'))}/\S+: No space left on "
                     r"device", line), line
    assert "continue with: rpicluster train" in line and f"--resume {full_disk}/run" in line
    assert not model.exists()


def test_full_disk_at_the_model_file(store, cluster, uninterrupted, tmp_path, full_disk,
                                    recovery):
    """full disk at the model file: one line naming it, with the `--resume` command, which
    writes the model once space is freed (every block is committed; none is trained again)"""
    probe = tmp_path / "probe.skops"
    save_model(uninterrupted[0], probe)
    (full_disk / "ballast").write_bytes(b"\0" * (256 * 1024 - probe.stat().st_size // 2))
    model = full_disk / "m.skops"
    recovery.fault()
    res = CliRunner().invoke(main, ["train", str(store), "-o", str(model), "--run-dir",
                                    str(tmp_path / "run"), "--scheduler",
                                    cluster.scheduler_address, *FLAGS, "--seed", "7"])
    recovery.recovered("model file on a full disk -> one line")
    assert res.exit_code == 1, res.output
    line = _error_line(res.output)
    assert re.search(rf"cannot write {re.escape(str(model))}: No space left on device .*; "
                     rf"\d+ of \d+ blocks are committed in {re.escape(str(tmp_path / 'run'))}; "
                     r"continue with: rpicluster train", line), line
    assert not model.exists()
    (full_disk / "ballast").unlink()
    again = shlex.split(line.split("continue with: ", 1)[1])
    res = CliRunner().invoke(main, again[1:])
    assert res.exit_code == 0, res.output
    same_model(load_model(model), *uninterrupted)


# --- the data -----------------------------------------------------------------------------------

@pytest.mark.parametrize("damage, key, says", [
    ("corrupted", "X/c/2/0", r"array 'X' chunk 'X/c/2/0' \(block 2\) is corrupted"),
    ("swapped", "y/c/2", r"array 'y' chunk 'y/c/2' \(block 2\) does not hold block 2's data "
                         r"\(it holds block 3's data.*re-ingest")], ids=["corrupted", "swapped"])
def test_damaged_chunk_is_refused_by_name(store, cluster, tmp_path, recovery, damage, key, says):
    """damaged chunk (corrupted, or swapped for another block's): training refuses it in one
    line naming the store, chunk and block; no model file"""
    copy = tmp_path / "d.zarr"
    shutil.copytree(store, copy)
    chunk = copy / key
    if damage == "corrupted":
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x10
        chunk.write_bytes(bytes(data))
    else:  # another block's chunk: a valid crc32c, at the wrong position
        chunk.write_bytes((copy / key.replace("/2", "/3", 1)).read_bytes())
    recovery.fault()
    res = CliRunner().invoke(main, ["train", str(copy), "-o", str(tmp_path / "m.skops"),
                                    "--scheduler", cluster.scheduler_address, *FLAGS])
    recovery.recovered("start -> one line")
    assert res.exit_code == 1, res.output
    line = _error_line(res.output)
    assert re.search(rf"{re.escape(str(copy))}: {says}", line), line
    assert not (tmp_path / "m.skops").exists()


# --- the model file -----------------------------------------------------------------------------

def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _replace_first_npy(path, data: bytes | None = None, write=None):
    """Rewrite the archive with its first .npy member replaced by ``data`` (or written by
    ``write(zip, name)``), the others kept."""
    with zipfile.ZipFile(path) as src:
        first = next(n for n in src.namelist() if n.endswith(".npy"))
        members = {n: src.read(n) for n in src.namelist() if n != first}
    with zipfile.ZipFile(path, "w") as dst:
        for n, member in members.items():
            dst.writestr(n, member)
        if write is None:
            dst.writestr(first, data)
        else:
            write(dst, first)


def _pickle_an_npy_member(path):
    """Replace the first .npy member by a pickled object array, drop the recorded digest and
    sign it as the user would with `rpicluster trust` (trusting a file never unpickles it)."""
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"run": "code"}], dtype=object), allow_pickle=True)
    _replace_first_npy(path, pickled.getvalue())
    os.unlink(f"{path}.sha256")
    trust_model(path)


def _edit_and_rewrite_sha256(path):
    """Edit the weights (the first array, plus one) in a valid archive and write the matching
    digest to MODEL.sha256, as anyone can."""
    with zipfile.ZipFile(path) as src:
        first = next(n for n in src.namelist() if n.endswith(".npy"))
        array = np.load(io.BytesIO(src.read(first)), allow_pickle=False)
    edited = io.BytesIO()
    np.save(edited, array + 1, allow_pickle=False)
    _replace_first_npy(path, edited.getvalue())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")


def _zip_bomb(path):
    """Replace the first .npy member by one of 8.3 MB that inflates to 8 GiB of zeros (a real
    deflate stream: 128 copies of one fully flushed 64 MiB block), digest rewritten."""
    import zlib

    chunk = bytes(64 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)

    class Repeat:  # zipfile's compressor, fed the same block every time: seconds, not minutes
        def compress(self, data):
            return piece

        def flush(self):
            return zlib.compressobj(9, zlib.DEFLATED, -15).flush()

    def write(dst, name):
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        with dst.open(info, "w", force_zip64=True) as out:
            out._compressor = Repeat()
            for _ in range(128):
                out.write(chunk)

    _replace_first_npy(path, write=write)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")


def _another_estimator(path):
    """Write a KNeighborsClassifier there with skops (a type skops trusts, rpicluster never
    writes) and sign it as the user would with `rpicluster trust`... which refuses it."""
    import skops.io as sio
    from sklearn.neighbors import KNeighborsClassifier

    sio.dump(KNeighborsClassifier(1).fit([[0.0], [1.0]], [0, 1]), path)
    os.unlink(f"{path}.sha256")
    with pytest.raises(ModelError, match="KNeighborsClassifier, which rpicluster does not"):
        trust_model(path)


@pytest.mark.parametrize("tamper, says", [
    (_flip_a_byte, r"is corrupted: sha256 [0-9a-f]{64} does not match the recorded [0-9a-f]{64}"),
    (_pickle_an_npy_member, r"holds a pickled array \(a \.npy member with Python objects\), "
                            r"which rpicluster never loads: refusing it; use a model file "
                            r"written by rpicluster"),
    (_edit_and_rewrite_sha256, r"has a signature that does not match by this user's rpicluster "
                               r"key \(\S+model.key\): it was written elsewhere or changed "
                               r"since; if you trust it, run `rpicluster trust \S+m.skops`"),
    (_zip_bomb, r"holds a member '\d+\.npy' that inflates 8,3\d\d,\d{3} bytes to "
                r"8,589,934,\d{3} \(\d+x; rpicluster writes at most 20x\): a zip bomb, not an "
                r"rpicluster model; refusing to load it"),
    (_another_estimator, r"holds a sklearn.neighbors._classification.KNeighborsClassifier, "
                         r"which rpicluster does not write \(it writes KSGDClassifier, .*\); "
                         r"refusing to load it")],
    ids=["byte-flipped", "pickled-npy", "sha256-rewritten", "zip-bomb", "other-estimator"])
def test_tampered_model_file_is_refused(store, uninterrupted, cluster, tmp_path, recovery,
                                        tamper, says, home):
    """tampered model file: `score` refuses it in one line naming the file, before any of it
    is unpickled or inflated (a flipped byte breaks its recorded sha256, a rewritten sha256
    the signature; a pickled .npy member is never loaded, even from a trusted file; a member
    inflating to 8 GiB and a type rpicluster does not write are refused from the archive's
    directory and schema)"""
    import resource

    model = tmp_path / "m.skops"
    save_model(uninterrupted[0], model)
    tamper(model)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    recovery.fault()
    res = CliRunner().invoke(main, ["score", str(model), str(store), "--scheduler",
                                    cluster.scheduler_address])
    recovery.recovered("score -> one line")
    assert res.exit_code == 1
    assert re.fullmatch(rf"error: model file {re.escape(str(model))} {says}",
                        res.output.strip()), res.output
    # Nothing was inflated: the peak memory (kB) grew by far less than the 8 GiB a bomb holds.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 512 << 10


# --- no silent waiting (issue 16 item 3) --------------------------------------------------------

#: Seconds `train` waits for a first worker before failing (issue 16 item 3).
NO_WORKERS_ENV = {"RPICLUSTER_NO_WORKER_TIMEOUT": "5"}
#: Seconds of silence after which the progress line names a worker (issue 16 item 3).
SILENT_WORKER_ENV = {"RPICLUSTER_SILENT_WORKER_TIMEOUT": "3"}


class _Output:
    """A process's merged output, read by a thread that tells a waiting test of every piece."""

    def __init__(self, proc):
        import threading

        self.proc, self.text, self.ended = proc, "", False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for piece in iter(lambda: self.proc.stdout.read(1), ""):
            with self.changed:
                self.text += piece
                self.changed.notify_all()
        with self.changed:
            self.ended = True       # end of output: the process has closed it (or exited)
            self.changed.notify_all()

    def wait_for(self, pattern, timeout):
        """The first match of ``pattern`` once printed, or None when the output ends or
        ``timeout`` passes first (the caller asserts, quoting the whole output)."""
        with self.changed:
            self.changed.wait_for(lambda: self.ended or re.search(pattern, self.text, re.M),
                                  timeout)
            return re.search(pattern, self.text, re.M)

    def rest(self, timeout):
        self.proc.wait(timeout)
        self.thread.join(10)
        return self.text


def test_no_workers_fails_within_a_bounded_time(store, tmp_path, recovery):
    """no workers: `train` fails within a bounded, configurable time, in one line naming the
    scheduler"""
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=True, dashboard_address=":0") as empty:
        recovery.fault()
        proc = _cli("train", str(store), "-o", str(tmp_path / "m.skops"), "--scheduler",
                    empty.scheduler_address, *FLAGS, env={**os.environ, **NO_WORKERS_ENV})
        try:
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        recovery.recovered("start -> one line")
    assert proc.returncode == 1, out
    line = _error_line(out)
    assert re.search(r"no worker", line, re.I) and empty.scheduler_address in line, line


def test_sigstopped_worker_is_named(store, uninterrupted, cluster, client, tmp_path, recovery):
    """SIGSTOP worker: the progress line names a silent worker within seconds; once it is
    continued, the run finishes with a model equal to an uninterrupted run"""
    # Every worker stopped: with one left running, the run may finish without the other.
    pids = client.run(os.getpid)
    for pid in pids.values():
        os.kill(pid, signal.SIGSTOP)
    recovery.fault()
    try:
        proc = _cli("train", str(store), "-o", str(tmp_path / "m.skops"), "--scheduler",
                    cluster.scheduler_address, *FLAGS, "--seed", "7",
                    env={**os.environ, **SILENT_WORKER_ENV})
        output = _Output(proc)
        named = output.wait_for(rf"({'|'.join(map(re.escape, pids))}).*has not reported for "
                                r"\d+", timeout=20)
        if named:
            recovery.recovered("stop -> worker named")
    finally:
        for pid in pids.values():
            os.kill(pid, signal.SIGCONT)
    out = output.rest(timeout=120)
    assert named, out
    assert proc.returncode == 0, out
    same_model(load_model(tmp_path / "m.skops"), *uninterrupted)


def test_a_lost_scheduler_is_named_by_its_cause_not_a_reconnect_timeout(tmp_path):
    """The one line for a lost scheduler quotes the connection error that stopped the run,
    but not a timed-out connect (the client's own reconnecting, which the run may meet first):
    that one says no more than "the client gave up reconnecting"."""
    from distributed.comm import CommClosedError

    from rpicluster.train.api import _stopped

    closed = _stopped(CommClosedError("in <TCP (closed)>: Stream is closed"), "2 of 4 blocks",
                      tmp_path, "tcp://192.0.2.2:1")
    assert "(CommClosedError: in <TCP (closed)>: Stream is closed): 2 of 4 blocks" in str(closed)
    timed_out = _stopped(OSError("Timed out trying to connect to tcp://192.0.2.2:1 after 5 s"),
                         "2 of 4 blocks", tmp_path, "tcp://192.0.2.2:1")
    assert ("lost the scheduler tcp://192.0.2.2:1 during training (it stopped answering and "
            "the client gave up reconnecting): 2 of 4 blocks") in str(timed_out)
