"""``rpicluster runs``: the run history (:mod:`rpicluster.history`)."""

from __future__ import annotations

import json
import time

import click

from rpicluster.cli._common import echo_table


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def _took(run: dict) -> str:
    from rpicluster.progress import format_duration

    return format_duration(run["ended"] - run["started"]) if run["ended"] else "running"


def _figure(run: dict) -> str:
    res = run["results"]
    for key in ("test_accuracy", "accuracy"):
        if isinstance(res.get(key), (int, float)):
            return f"{key.replace('_', ' ')} {res[key]:.4f}"
    if isinstance(res.get("best_score"), (int, float)):  # tune: the best held-out accuracy
        return f"best {res['best_score']:.4f} of {res.get('candidates', '?')}"
    return ""


def _outcome(run: dict) -> str:
    return run["outcome"] + (f": {run['reason']}" if run["reason"] else "")


@click.group("runs", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
@click.option("-n", "--limit", type=click.IntRange(1), default=20, show_default=True,
              help="How many of the newest runs to list.")
@click.pass_context
def runs(ctx, as_json: bool, limit: int) -> None:
    """List the recorded train, federate, features, tune and bench runs, newest first."""
    if ctx.invoked_subcommand is not None:
        return
    from rpicluster import history

    found = history.list_runs(limit)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    echo_table(f"runs in {history.path()}", ["id", "kind", "started", "took", "outcome", "data",
                                             "result", "model"],
               [[r["id"], r["kind"], _when(r["started"]), _took(r), _outcome(r), r["data"],
                 _figure(r), r["model_path"]] for r in found])


@runs.command("show")
@click.argument("run_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
def show(run_id: int, as_json: bool) -> None:
    """Everything recorded about run RUN_ID (see `rpicluster runs`)."""
    from rpicluster import history

    run = history.get_run(run_id)
    if as_json:
        click.echo(json.dumps(run, indent=2))
        return
    lines = [("run", run["id"]), ("kind", run["kind"]), ("outcome", _outcome(run)),
             ("started", _when(run["started"])), ("ended", _when(run["ended"])),
             ("took", _took(run)), ("data", run["data"]), ("fingerprint", run["fingerprint"]),
             ("cluster", run["cluster"]), ("workers", ", ".join(run["workers"])),
             ("model", run["model_path"]), ("host", f"{run['host']} (pid {run['pid']})")]
    for key, value in lines:
        if value not in (None, ""):
            click.echo(f"{key + ':':<12} {value}")
    for title, values in (("parameters", run["params"]), ("results", run["results"]),
                          ("phases (s)", run["phases"])):
        if values:
            click.echo(f"{title}:")
            for key in sorted(values):
                value = values[key]
                shown = f"{value:.4g}" if isinstance(value, float) else value
                click.echo(f"  {key:<22} {shown}")
