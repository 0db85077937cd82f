"""``bench paper``: the paper's preset and a whole small run on a real cluster and store."""

from __future__ import annotations

import json

from rpicluster import history
from rpicluster.bench.paper import PAPER_CONFIG, paper_params, run_paper, to_markdown


def test_paper_config_is_the_papers_and_given_values_win():
    assert paper_params() == {"n_clusters": 20, "max_iter": 5}
    assert paper_params(paper_config=True) == {
        "n_clusters": 300, "max_iter": 50, "learning_rate": "constant", "eta0": 0.001}
    assert paper_params(paper_config=True, n_clusters=4)["n_clusters"] == 4
    assert paper_params(eta0=0.01) == {"n_clusters": 20, "max_iter": 5, "eta0": 0.01,
                                       "learning_rate": "constant"}


def test_small_paper_run_with_the_papers_settings(cluster, tmp_path, home):
    """The whole path, small: ingest, Inc-kSGD with the paper's schedule on the cluster,
    held-out accuracy, per-worker memory, and two full SGDClassifier fits beside it."""
    params = paper_params(paper_config=True, n_clusters=4, max_iter=3)
    doc = run_paper(tmp_path / "paper", rows=1200, features=16, classes=5, blocks=2,
                    test_rows=300, sgd_rows=400, scheduler=cluster.scheduler.address,
                    show_progress=False, **params)
    assert doc["params"] == {**PAPER_CONFIG, "n_clusters": 4, "max_iter": 3, "seed": 0}
    assert 0.0 <= doc["test_accuracy"] <= 1.0 and doc["train_seconds"] > 0
    assert [f["rows"] for f in doc["sgd"]["fits"]] == [100, 400]
    assert all(0.0 <= f["accuracy"] <= 1.0 and f["epochs"] >= 1 for f in doc["sgd"]["fits"])
    assert doc["sgd"]["extrapolated_seconds"] == doc["sgd"]["fits"][-1]["seconds"] * 1200 / 400
    written = json.loads((tmp_path / "paper" / "paper.json").read_text())
    assert written["params"]["learning_rate"] == "constant"
    md = to_markdown(doc)
    assert "learning rate constant 0.001" in md and "**extrapolated**" in md
    run = history.get_run(history.list_runs()[0]["id"])  # `rpicluster runs` lists it
    assert run["kind"] == "bench" and run["outcome"] == "done"
    assert run["params"]["bench"] == "paper" and run["params"]["eta0"] == 0.001
    assert run["results"]["accuracy"] == doc["test_accuracy"] and run["phases"]["train"] > 0
