"""Tests of the algorithm comparison harness (rpicluster.bench.algorithms, `bench algorithms`)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rpicluster.bench.algorithms import ALGORITHMS, PRESETS, run_algorithms, to_markdown
from rpicluster.cli import main
from rpicluster.errors import ConfigError


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One real run of every row on the tiny 'quick' preset, through the CLI (each row in its
    own process, as in a real bench)."""
    out = tmp_path_factory.mktemp("bench")
    result = CliRunner().invoke(main, ["bench", "algorithms", "--quick", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out, result


def test_writes_markdown_and_json_with_every_row(quick_run):
    out, result = quick_run
    doc = json.loads((out / "algorithms.json").read_text())
    (entry,) = doc["sizes"]
    assert entry["size"]["name"] == "quick"
    assert [r["algo"] for r in entry["rows"]] == list(ALGORITHMS)
    md = (out / "algorithms.md").read_text()
    assert md == to_markdown(doc)
    for name in ALGORITHMS.values():
        assert name in md and name in result.output
    assert not list(out.glob("data-*")), "the saved split is removed after the run"


def test_rows_have_sane_numbers(quick_run):
    out, _ = quick_run
    (entry,) = json.loads((out / "algorithms.json").read_text())["sizes"]
    chance = 1 / PRESETS["quick"].classes
    for r in entry["rows"]:
        assert r["status"] == "ok", r
        assert r["train_s"] > 0
        assert 2 * chance < r["accuracy"] <= 1, r
        # peak RSS is the row's own process: at least the loaded data, far below the machine
        assert r["data_rss_mib"] <= r["peak_rss_mib"] < 4096
        assert r["speedup_vs_sgd"] > 0 and r["accuracy_vs_sgd"] > 0
    (sgd,) = [r for r in entry["rows"] if r["algo"] == "sgd"]
    assert sgd["speedup_vs_sgd"] == 1 and sgd["accuracy_vs_sgd"] == 1


def test_time_cap_reports_not_finished(tmp_path):
    doc = run_algorithms(["quick"], algorithms=["liblinear", "sgd"], out_dir=tmp_path,
                         time_cap=0.01)
    rows = doc["sizes"][0]["rows"]
    assert [r["status"] for r in rows] == ["timeout", "timeout"]
    assert all(r["speedup_vs_sgd"] is None for r in rows)
    assert "not finished in 0 s" in (tmp_path / "algorithms.md").read_text()


@pytest.mark.parametrize("kwargs, fragment", [
    ({"sizes": ["huge"]}, "unknown size 'huge'"),
    ({"algorithms": ["xgboost"]}, "unknown algorithm 'xgboost'"),
    ({"time_cap": 0}, "time cap must be > 0"),
])
def test_bad_arguments(tmp_path, kwargs, fragment):
    kwargs = {"sizes": ["quick"], **kwargs}
    with pytest.raises(ConfigError, match=fragment):
        run_algorithms(out_dir=tmp_path, **kwargs)


def test_cli_unknown_size_is_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["bench", "algorithms", "--sizes", "huge",
                                       "-o", str(tmp_path)])
    assert result.exit_code == 1
    assert "error: unknown size 'huge'" in result.output
