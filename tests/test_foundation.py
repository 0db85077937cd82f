"""The package skeleton: public names, error hierarchy, CLI entry point, progress output."""

import io
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import rpicluster
from rpicluster import errors
from rpicluster.cli import main
from rpicluster.progress import Progress


def test_every_error_is_an_rpicluster_error():
    classes = [c for c in vars(errors).values() if isinstance(c, type)
               and issubclass(c, Exception) and not issubclass(c, Warning)]
    assert len(classes) > 5
    for cls in classes:
        assert issubclass(cls, errors.RPiClusterError)
    # warnings are UserWarnings, so the CLI prints them as `warning: ...` lines
    assert issubclass(errors.DataWarning, UserWarning)


def test_data_and_config_errors_are_value_errors():
    # scikit-learn style callers catch ValueError for bad input.
    assert issubclass(errors.DataError, ValueError)
    assert issubclass(errors.ConfigError, ValueError)


def test_unknown_public_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rpicluster.nope  # noqa: B018


def test_cli_help_and_version():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "Inc-kSGD" in result.output
    result = runner.invoke(main, ["--version"])
    assert rpicluster.__version__ in result.output


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "rpicluster.cli", "--help"],
                         capture_output=True, text=True, check=True)
    assert "Usage" in out.stdout


def test_progress_degrades_to_plain_lines_when_not_a_terminal():
    buf = io.StringIO()
    with Progress("ingest", total=3, unit="blocks", stream=buf, interval=0) as p:
        for _ in range(3):
            p.advance()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("ingest: 1/3 blocks")
    assert "3/3" in lines[-1] and "done" in lines[-1]
    assert "\x1b[" not in buf.getvalue()  # no terminal escape codes in logs


def test_progress_null_prints_nothing(capsys):
    with Progress.null() as p:
        p.advance(5)
    assert capsys.readouterr().err == ""
    assert p.completed == 5


def test_progress_is_reentrant_and_prints_one_final_line():
    buf = io.StringIO()
    p = Progress("train", total=2, unit="blocks", stream=buf, interval=60)
    with p:
        with p:  # a library call entering the caller's progress again
            p.advance(2)
    assert buf.getvalue().count("done") == 1


def test_progress_eta_uses_the_recent_rate_and_ignores_skipped_work(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("rpicluster.progress.time.time", lambda: now[0])
    p = Progress("train", total=10, enabled=False)
    with p:
        p.skip(4)  # resumed blocks: no rate can be told from them
        assert p.eta() is None
        now[0] = 60.0  # a slow first item (workers starting) ...
        p.advance()
        for _ in range(3):  # ... then one item every 2 s
            now[0] += 2.0
            p.advance()
        # 3 items in the last 6 s of 66 s elapsed (the second half: since t=33 s, 3 items and
        # the one at t=60 s), 2 items left: about 4-5 s, far from the 66/4*2 = 33 s average.
        assert p.eta() < 10


def test_dask_defaults_keep_what_the_user_set():
    """config.DASK_DEFAULTS replace Dask's own defaults in a process that starts a cluster, but
    not a value the user's environment sets, even one equal to Dask's default."""
    code = ("import dask; from rpicluster import config; config.apply_dask_defaults(); "
            "print(dask.config.get('distributed.worker.profile.interval'), "
            "dask.config.get('distributed.admin.tick.interval'))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["100ms", "100ms"]
    env["DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL"] = "10ms"  # Dask's own default
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["10ms", "100ms"]
    from rpicluster import config

    assert config.dask_environ({"DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "20ms"}) == {
        "DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL": "100ms"}
