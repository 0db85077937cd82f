"""``rpicluster tune``: successive halving on the cluster, the best model written to a file."""

from __future__ import annotations

import click

from rpicluster.cli._common import (cluster_choice, cluster_options, echo_table, exit_stopped,
                                    quiet_dask_logs)
from rpicluster.cli._mlflow import mlflow_option


@click.command("tune")
@mlflow_option
@click.argument("data")
@click.option("-o", "--output", "model_path", required=True, type=click.Path(dir_okay=False),
              help="Where the best model is written (skops format, like train's).")
@click.option("--model", "kind", type=click.Choice(["ksgd", "mlp", "sgd"]), default="ksgd",
              show_default=True, help="ksgd: Inc-kSGD (block models are the resource); mlp / "
              "sgd: MLPClassifier / SGDClassifier (partial_fit passes are the resource).")
@click.option("--space", type=click.Path(dir_okay=False, exists=True), metavar="FILE",
              help="Search space, TOML or JSON (default: the model's own; see docs/tuning.md).")
@click.option("--budget", metavar="ROWS|Nx", help="Rows the whole search trains on (600k, 2M) "
              "or N full trainings of one candidate (3x).  [default: 3x]")
@click.option("--factor", type=click.IntRange(min=2), default=3, show_default=True,
              help="Keep the best 1/factor of each rung.")
@click.option("--candidates", "n_candidates", type=click.IntRange(min=1),
              help="Candidates in the first rung (default: chosen from the budget).")
@click.option("--validation", metavar="DATA", help="A store to score candidates on (default: "
              "the last tenth of DATA's blocks, then not trained on).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the draw of candidates and each one's random_state.")
@click.option("--tune-dir", type=click.Path(file_okay=False),
              help="Where results are recorded as they finish (default OUTPUT.tune).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True),
              help="Continue a killed tune from its directory (finished results are kept).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing model file (and start the tune directory afresh).")
@click.option("--no-refit", "refit", flag_value=False, default=True,
              help="Write the best model as searched (by default it is refit to see the "
              "held-out blocks too, as HalvingRandomSearchCV's refit=True).")
@cluster_options
def tune_cmd(data, model_path, kind, space, budget, factor, n_candidates, validation, seed,
             tune_dir, resume_dir, overwrite, refit, scheduler, inventory, local):
    """Search a model's parameters on the store DATA by successive halving on the cluster."""
    from rpicluster.errors import TrainingStopped
    from rpicluster.tune.search import tune_to_file

    if resume_dir and tune_dir and resume_dir != tune_dir:
        raise click.UsageError("give --resume TUNE_DIR or --tune-dir, not both")
    quiet_dask_logs()
    try:
        summary = tune_to_file(data, model_path, model=kind, space=space, budget=budget,
                               seed=seed, factor=factor, n_candidates=n_candidates,
                               validation=validation,
                               cluster=cluster_choice(scheduler, inventory, local),
                               tune_dir=resume_dir or tune_dir, resume=resume_dir is not None,
                               overwrite=overwrite, refit=refit)
    except TrainingStopped as exc:
        exit_stopped(exc, ["tune", data, "-o", model_path],
                     (("--model", kind), ("--space", space), ("--budget", budget),
                      ("--factor", factor), ("--candidates", n_candidates),
                      ("--validation", validation), ("--seed", seed),
                      ("--no-refit", not refit),
                      ("--scheduler", scheduler), ("-c", inventory), ("--local", local)))
    r = summary.result
    p = r.plan
    click.echo(f"tuned {len(r.leaderboard)} candidates of {kind} in {len(p.sizes)} rungs "
               f"(units per rung {', '.join(map(str, p.units))}) on {summary.n_workers} workers "
               f"in {r.seconds:.1f} s: {r.trained} trained"
               + (f", {r.resumed} resumed" if r.resumed else ""))
    if len(p.sizes) == 1 and p.sizes[0] > 1:
        factor_2 = p.units[0] >= 2 and p.factor > 2
        click.echo(f"  every candidate trained in full: {p.units[0]} training block(s) are "
                   f"too few to halve by {p.factor}; ingest with a smaller --block-rows for more "
                   "blocks" + (", or tune with --factor 2" if factor_2 else ""))
    table = r.table()
    echo_table("leaderboard (held-out accuracy)", table[0], table[1:])
    click.echo(f"best: candidate {r.leaderboard[0]['candidate']}, held-out accuracy "
               f"{r.best_score:.4f}")
    if r.refit:
        click.echo(f"best model {r.refit}, so it has seen the held-out blocks too")
    click.echo(f"leaderboard: {r.tune_dir / 'leaderboard.json'}")
    click.echo(f"model: {summary.model_path} (sha256 {summary.sha256[:16]}...)")
