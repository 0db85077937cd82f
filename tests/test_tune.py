"""rpicluster tune: search spaces, the halving schedule, and successive halving on a real Dask
cluster (digits), with a worker killed mid-rung and a search resumed without retraining."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from distributed.diagnostics.plugin import WorkerPlugin

from rpicluster import ingest, load_model, open_dataset
from rpicluster.cli import main
from rpicluster.errors import ConfigError, DataError
from rpicluster.tune import tune
from rpicluster.tune.halving import plan
from rpicluster.tune.space import DEFAULT_SPACES, check_space, load_space, sample


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn's digits as a 12-block store (blocks of 150 rows) and a 25 % test store."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("tune-data")
    X, y = load_digits(return_X_y=True)
    np.savez(root / "digits.npz", X=(X / 16.0).astype(np.float32), y=y)
    ingest(str(root / "digits.npz"), root / "train.zarr", block_rows=113, test_fraction=0.25,
           test_out=root / "test.zarr")
    return root


# --- spaces and schedules: pure ---

@pytest.mark.parametrize("model", sorted(DEFAULT_SPACES))
def test_default_spaces_are_valid_and_sampling_is_seeded(model):
    space = check_space(model, None)
    a, b = sample(space, 9, seed=4), sample(space, 9, seed=4)
    assert a == b and len({json.dumps(p, sort_keys=True) for p in a}) == 9
    assert sample(space, 9, seed=5) != a


def test_space_file_mistakes_are_one_line_errors(tmp_path):
    good = tmp_path / "space.toml"
    good.write_text('alpha = {loguniform = [1e-5, 1e-2]}\nn_clusters = [5, 10]\nvote = "soft"\n')
    assert check_space("ksgd", load_space(good)) == {
        "alpha": ("loguniform", [1e-5, 1e-2]), "n_clusters": ("choice", [5, 10]),
        "vote": ("choice", ["soft"])}
    cases = [
        ('clusters = [5, 10]\n', "ksgd", "IncrementalKSGDClassifier has no parameter 'clusters'"),
        ('alpha = {loguniform = [0, 1]}\n', "ksgd", "alpha.loguniform needs low > 0"),
        ('n_clusters = [0, 10]\n', "ksgd", "n_clusters = 0 is impossible"),
        ('alpha = {uniform = [-1.0, 1.0]}\n', "mlp", "alpha = -1.0 is impossible for "
                                                      "MLPClassifier"),
        ('loss = ["hinge", "nope"]\n', "sgd", "loss = 'nope' is impossible"),
        ('random_state = [1, 2]\n', "sgd", "random_state is set by tune itself"),
        ('alpha = {normal = [1, 2]}\n', "sgd", "expected one of choice, uniform"),
        ('alpha = [\n', "sgd", "is not valid TOML"),
    ]
    for i, (text, model, match) in enumerate(cases):
        path = tmp_path / f"bad{i}.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=match) as info:
            check_space(model, load_space(path), where=f"search space {path}")
        assert "\n" not in str(info.value)
    (tmp_path / "s.json").write_text('{"alpha": {"randint": [1.5, 3]}}')
    with pytest.raises(ConfigError, match="randint needs integer bounds"):
        check_space("sgd", load_space(tmp_path / "s.json"))


def test_plan_spends_the_budget_and_names_what_does_not_fit():
    p = plan(40, 13)  # 13 block models at most, 40 blocks of budget
    assert p.sizes == (9, 3, 1) and p.units[-1] == 13 and p.cost <= 40
    p = plan(1000, 270)
    assert p.sizes[0] == 81 and p.units[-1] == 270 and p.cost <= 1000
    assert plan(260, 650).sizes[0] >= 9  # a small budget still searches, with shorter rungs
    # Too few blocks to halve by 3 (2 training blocks): one rung of full trainings, as many as
    # the budget pays for (at most 9), not a "search" of one candidate; halving where it fits.
    assert (plan(6, 2).sizes, plan(6, 2).units) == ((3,), (2,))
    assert plan(100, 2).sizes == (9,) and plan(2, 2).sizes == (1,)
    assert plan(9, 3).sizes == (3, 1)
    with pytest.raises(ConfigError, match="smaller than one block"):
        plan(0.5, 13)
    with pytest.raises(ConfigError, match="too small for 4 rungs .* hold at most 3 rungs"):
        plan(1000, 13, n_candidates=27, where="the store")


# --- on the cluster ---

class DieOnce(WorkerPlugin):
    """Kills its worker (``os._exit``) as the first task whose key contains ``part`` ends,
    once for the whole cluster (a marker file says it happened)."""

    def __init__(self, part: str, marker: str):
        self.part, self.marker = part, marker

    def transition(self, key, start, finish, **kwargs):
        if start == "executing" and self.part in str(key) and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(key))
            os._exit(13)


#: A small Inc-kSGD space: each candidate's block models take a fraction of a second.
CHEAP = {"n_clusters": [5, 10], "alpha": {"loguniform": [1e-5, 1e-2]}, "max_iter": [2, 4],
         "vote": ["majority", "soft"]}


def _scores(result):
    return [(e["candidate"], e["rung"], e["score"]) for e in result.leaderboard]


@pytest.mark.timeout(900)
def test_tune_ksgd_resumes_without_retraining_and_survives_a_killed_worker(digits, client,
                                                                          tmp_path):
    """Inc-kSGD on digits: a search stopped after 5 results resumes, trains only the other 8
    and ends with the whole leaderboard; a search whose worker dies mid-rung (Dask runs the
    task again elsewhere) ends with the very same leaderboard."""
    data = str(digits / "train.zarr")
    kw = dict(model="ksgd", space=CHEAP, budget="3x", client=client, seed=1)

    class Killed(Exception):
        pass

    seen = []

    def stop_after_five(entry):
        seen.append(entry)
        if len(seen) == 5:
            raise Killed

    with pytest.raises(Killed):
        tune(data, **kw, tune_dir=tmp_path / "cut", on_result=stop_after_five)
    assert len(list((tmp_path / "cut" / "results").glob("*.json"))) == 5
    with pytest.raises(ConfigError, match="already holds 5 finished results; resume it"):
        tune(data, **kw, tune_dir=tmp_path / "cut")
    with pytest.raises(ConfigError, match="cannot resume .*seed was 1 in the tune, now 2"):
        tune(data, **{**kw, "seed": 2}, tune_dir=tmp_path / "cut", resume=True)
    again = tune(data, **kw, tune_dir=tmp_path / "cut", resume=True)
    assert again.plan.sizes == (9, 3, 1) and again.resumed == 5 and again.trained == 13 - 5
    assert again.leaderboard[0]["rung"] == 3 and again.best_score > 0.85
    # Survivors added blocks; the best then added one per held-out block (refit=True).
    assert again.refit == "continued on the 2 held-out blocks (partial_fit)"
    assert len(again.best_model.estimators_) == again.plan.units[-1] + 2
    searched = tune(data, **kw, tune_dir=tmp_path / "cut", resume=True, refit=False)
    assert searched.trained == 0 and searched.refit is None
    assert len(searched.best_model.estimators_) == again.plan.units[-1]
    X, _ = open_dataset(digits / "train.zarr").block(0)
    for kept, grown in zip(searched.best_model.estimators_, again.best_model.estimators_):
        assert np.array_equal(kept.predict(X), grown.predict(X))
    board = json.loads((tmp_path / "cut" / "leaderboard.json").read_text())
    assert [e["score"] for e in board] == [e["score"] for e in again.leaderboard]

    marker = tmp_path / "died"
    client.register_plugin(DieOnce("-c4-r1", str(marker)), name="die-once")
    try:
        hurt = tune(data, **kw, tune_dir=tmp_path / "hurt")
    finally:
        client.unregister_worker_plugin("die-once")
    assert marker.exists()
    assert hurt.trained == 13 and _scores(hurt) == _scores(again)
    X, _ = open_dataset(digits / "test.zarr").block(0)
    assert np.array_equal(again.best_model.predict(X), hurt.best_model.predict(X))


def test_sgd_best_is_refit_from_scratch_on_every_block(digits, client, tmp_path):
    """As HalvingRandomSearchCV(refit=True): the best SGD candidate is trained again with its
    parameters and seed over every block, held-out ones included, for the top rung's epochs;
    the same search gives the same refit model."""
    data = str(digits / "train.zarr")
    ds = open_dataset(data)
    kw = dict(model="sgd", budget="1x", client=client, seed=0, max_epochs=3, n_candidates=3)
    res = tune(data, **kw, tune_dir=tmp_path / "t")
    units = round(res.leaderboard[0]["units"] * 12 / 10)  # 10 training blocks of 12
    assert res.refit == (f"refit from scratch on all 12 blocks ({units / 12:g} epochs, as the "
                         "top rung)")
    rows = [np.subtract(*ds.block_slice(b)[::-1]) for b in range(12)]
    # SGDClassifier's t_ counts the rows it stepped on (+1): every block, held-out ones too.
    assert res.best_model.t_ - 1 == sum(rows[u % 12] for u in range(units))
    plain = tune(data, **kw, tune_dir=tmp_path / "t", resume=True, refit=False)
    assert plain.refit is None
    assert plain.best_model.t_ - 1 == sum(rows[u % 10] for u in range(res.leaderboard[0]["units"]))
    again = tune(data, **kw, tune_dir=tmp_path / "t", resume=True)
    np.testing.assert_array_equal(again.best_model.coef_, res.best_model.coef_)
    # With a validation store, the best model has seen all of the data: nothing to refit.
    assert tune(data, **kw, validation=str(digits / "test.zarr")).refit is None


def _fail_tasks(part: str | None) -> None:
    """On a worker: make ``train_candidate`` raise in every task whose key contains ``part``
    (None: undo)."""
    import rpicluster.tune.search as search
    from distributed import get_worker

    inner = getattr(search.train_candidate, "__wrapped__", search.train_candidate)
    if part is None:
        search.train_candidate = inner
        return

    def failing(*args, **kwargs):
        if part in str(get_worker().get_current_task()):
            raise ValueError("diverged")
        return inner(*args, **kwargs)

    failing.__wrapped__ = inner
    search.train_candidate = failing


def test_sgd_refit_runs_beside_the_top_rung_and_follows_the_best(digits, client, tmp_path):
    """An SGD refit starts from scratch, so it is submitted with the top rung's one candidate,
    not after it; if that candidate then fails, the best of the others is refit instead."""
    data = str(digits / "train.zarr")
    kw = dict(model="sgd", budget="1x", client=client, seed=0, max_epochs=3, n_candidates=3)
    refits_when_top_ended = []

    def on_result(entry):
        if entry["rung"] == 1:  # the top rung of (3, 1)
            refits_when_top_ended.extend(client.run_on_scheduler(lambda dask_scheduler: [
                str(k) for k in dask_scheduler.tasks if "-refit-" in str(k)]))

    res = tune(data, **kw, tune_dir=tmp_path / "t", on_result=on_result)
    top = res.leaderboard[0]["candidate"]
    assert [k.rsplit("-", 1)[1] for k in refits_when_top_ended] == [f"c{top}"]
    assert res.plan.sizes == (3, 1) and res.leaderboard[0]["rung"] == 2

    client.run(_fail_tasks, "-r2")
    try:
        hurt = tune(data, **kw, tune_dir=tmp_path / "hurt")
    finally:
        client.run(_fail_tasks, None)
    failed = [e for e in hurt.leaderboard if e["error"]]
    assert [e["candidate"] for e in failed] == [top] and "diverged" in failed[0]["error"]
    best = hurt.leaderboard[0]
    assert best["candidate"] != top and best["rung"] == 1 and hurt.best_score == best["score"]
    units = round(best["units"] * 12 / 10)
    assert hurt.refit == (f"refit from scratch on all 12 blocks ({units / 12:g} epochs, as the "
                          "top rung)")
    ds = open_dataset(data)
    rows = [np.subtract(*ds.block_slice(b)[::-1]) for b in range(12)]
    assert hurt.best_model.t_ - 1 == sum(rows[u % 12] for u in range(units))


def _slow_tasks(delays: dict | None) -> None:
    """On a worker: make tasks slow and record how each ``train_candidate`` ended.

    ``delays`` maps a part of a task key to seconds: a rung task whose key holds the part
    sleeps that long before it trains, a refit task sleeps that long before each block (so
    that it is still training when it is cancelled). Records ``(key, finished)`` in
    ``search.ENDED`` (finished False: the task returned early, cancelled). None: undo.
    """
    import time

    import rpicluster.tune.search as search
    from distributed import get_worker

    inner = getattr(search.train_candidate, "__wrapped__", search.train_candidate)
    rows = getattr(search._rows, "__wrapped__", search._rows)
    search.train_candidate, search._rows = inner, rows
    if delays is None:
        return
    search.ENDED = []

    def key() -> str:
        return str(get_worker().get_current_task())

    def slow(*args, **kwargs):
        time.sleep(sum(s for part, s in delays.items() if part in key() and "-refit-" not in part))
        out = inner(*args, **kwargs)
        search.ENDED.append((key(), out is not None))
        return out

    def slow_rows(*args, **kwargs):
        time.sleep(delays.get("-refit-", 0) if "-refit-" in key() else 0)
        return rows(*args, **kwargs)

    slow.__wrapped__, slow_rows.__wrapped__ = inner, rows
    search.train_candidate, search._rows = slow, slow_rows


def test_sgd_refit_starts_for_the_leader_before_the_top_rung_and_stops_when_it_loses(
        digits, client, tmp_path):
    """When a worker would idle at the end of the rung before the top one, the refit of the
    best candidate finished so far starts there; if a later candidate beats it, that refit is
    cancelled and stops at its next block, and the new leader's refit runs: the model is the
    one the search would refit anyway."""
    data = str(digits / "train.zarr")
    kw = dict(model="sgd", budget="1x", client=client, seed=0, max_epochs=3, n_candidates=9)
    plain = tune(data, **kw)
    assert plain.plan.sizes == (9, 3, 1)
    best = plain.leaderboard[0]["candidate"]
    second = next(e["candidate"] for e in plain.leaderboard  # ranked: the best of the rest
                  if e["rung"] == 2 and e["candidate"] != best)
    refits_then = {}  # candidate of rung 2 -> the refits on the scheduler when it came in

    def on_result(entry):
        if entry["rung"] == 1:  # 0-based: rung 2 of 3
            refits_then[entry["candidate"]] = client.run_on_scheduler(
                lambda dask_scheduler: [str(k).rsplit("-", 1)[1] for k in dask_scheduler.tasks
                                        if "-refit-" in str(k)])

    # The best candidate's task of rung 2 of 3 finishes last: the refit first goes to the best
    # of the other two, then follows the best.
    client.run(_slow_tasks, {f"-c{best}-r2": 1.5, "-refit-": 0.1})
    try:
        late = tune(data, **kw, on_result=on_result)
        ended = [e for w in client.run(lambda: __import__("rpicluster.tune.search").tune.search
                                       .ENDED).values() for e in w]
    finally:
        client.run(_slow_tasks, None)
    assert late.leaderboard == plain.leaderboard
    np.testing.assert_array_equal(late.best_model.coef_, plain.best_model.coef_)
    refits = {k.rsplit("-", 1)[1]: done for k, done in ended if "-refit-" in k}
    assert refits == {f"c{second}": False, f"c{best}": True}, ended
    # The second's refit was under way before the best's rung-2 result came in.
    assert refits_then[best] == [f"c{second}"], refits_then


def test_tune_budget_mistakes_are_one_line_before_any_cluster(digits, tmp_path):
    """rpicluster tune checks the budget and the rungs before it connects: with a scheduler
    that does not exist, the one-line budget error still comes (not a connection error)."""
    nowhere = ["--scheduler", "tcp://127.0.0.1:9"]
    base = ["tune", str(digits / "train.zarr"), "-o", str(tmp_path / "m.skops")]
    res = CliRunner().invoke(main, [*base, "--model", "mlp", "--budget", "10", "--no-refit",
                                    *nowhere])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert re.fullmatch(r"error: budget of 0.088 blocks is smaller than one block .*\n",
                        res.output), res.output
    res = CliRunner().invoke(main, [*base, "--model", "ksgd", "--candidates", "81", *nowhere])
    assert res.exit_code == 1 and "is too small for 5 rungs" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.skops").exists() and not (tmp_path / "m.skops.tune").exists()


def test_tune_bad_inputs_are_one_line_errors(digits, client, tmp_path):
    data = str(digits / "train.zarr")
    with pytest.raises(ConfigError, match="smaller than one block"):
        tune(data, model="sgd", budget=50, client=client)
    with pytest.raises(ConfigError, match="too small for 5 rungs"):
        tune(data, model="ksgd", n_candidates=81, client=client)
    with pytest.raises(ConfigError, match="n_clusters up to 500 but the smallest block"):
        tune(data, model="ksgd", space={"n_clusters": [10, 500]}, client=client)
    one = tmp_path / "one.zarr"
    ingest(str(digits / "digits.npz"), one, block_rows=4000)
    with pytest.raises(DataError, match="has 1 block: none can be held out"):
        tune(str(one), model="sgd", client=client)


def test_cli_tune_mlp_writes_a_model_that_score_reads(digits, cluster, tmp_path):
    model_path = tmp_path / "best.skops"
    args = ["tune", str(digits / "train.zarr"), "--model", "mlp", "--budget", "2x",
            "--validation", str(digits / "test.zarr"), "-o", str(model_path),
            "--scheduler", cluster.scheduler_address]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "leaderboard (held-out accuracy)" in res.output and "best: candidate" in res.output
    model = load_model(model_path)
    assert type(model).__name__ == "MLPClassifier"
    res = CliRunner().invoke(main, ["score", str(model_path), str(digits / "test.zarr"),
                                    "--scheduler", cluster.scheduler_address])
    assert res.exit_code == 0, res.output
    acc = float(re.search(r"accuracy: ([0-9.]+)", res.output).group(1))
    assert acc >= 0.93
    res = CliRunner().invoke(main, args)  # the model exists now
    assert res.exit_code != 0 and "already exists" in res.output
    res = CliRunner().invoke(main, [*args[:-2], "--budget", "10", "--overwrite", "--scheduler",
                                    cluster.scheduler_address])
    assert res.exit_code != 0
    assert "budget of 0.088 blocks is smaller than one block" in res.output
    assert "Traceback" not in res.output


def test_cli_tune_on_a_store_too_small_to_halve_trains_three_candidates_in_full(
        cluster, tmp_path, home, monkeypatch):
    """README's digits store (blocks of 600 rows: 2 training blocks and 1 held out) cannot be
    halved by 3: the default 3x budget trains 3 candidates in full, and the summary says why."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    np.savez(tmp_path / "digits.npz", X=(X / 16.0).astype(np.float32), y=y)
    ingest(str(tmp_path / "digits.npz"), tmp_path / "small.zarr", block_rows=600)
    monkeypatch.chdir(tmp_path)  # the store given as a relative path
    res = CliRunner().invoke(main, ["tune", "small.zarr", "-o",
                                    str(tmp_path / "best.skops"), "--scheduler",
                                    cluster.scheduler_address])
    assert res.exit_code == 0, res.output
    assert "tuned 3 candidates of ksgd in 1 rungs (units per rung 2)" in res.output
    assert "every candidate trained in full: 2 training block(s) are too few to halve by 3; " \
        "ingest with a smaller --block-rows for more blocks, or tune with --factor 2" in res.output
    board = json.loads((tmp_path / "best.skops.tune" / "leaderboard.json").read_text())
    entries = board if isinstance(board, list) else board["leaderboard"]
    assert sorted(e["candidate"] for e in entries) == [0, 1, 2]
    assert all(e["units"] == 2 and e["error"] is None for e in entries)
    # The history names the store as train does (its full path) and the best of the three.
    runs = CliRunner().invoke(main, ["runs"])
    row = runs.output.splitlines()[2].split()
    assert row[1] == "tune" and str(tmp_path / "small.zarr") in row, runs.output
    assert f"best {max(e['score'] for e in entries):.4f} of 3" in runs.output
    shown = json.loads(CliRunner().invoke(main, ["runs", "show", row[0], "--json"]).output)
    assert shown["fingerprint"] and shown["data"] == str(tmp_path / "small.zarr")
