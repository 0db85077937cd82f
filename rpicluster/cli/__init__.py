"""The ``rpicluster`` command: a thin click layer.

Each command parses its options, calls one library function, and prints the result. No SSH, Dask or
Zarr logic lives here. Library errors (:class:`~rpicluster.errors.RPiClusterError`) are printed as
one clear line and exit with status 1; anything else is a bug and keeps its traceback.

One module per area holds its commands (:mod:`._common` what they share); a command joins the
group by one ``main.add_command`` line below.
"""

from __future__ import annotations

import click

from rpicluster import __version__
from rpicluster.cli import bench, cluster, data, export, runs, train, trust, tune
from rpicluster.cli._common import Group


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rpicluster")
def main() -> None:
    """Train Inc-kSGD classifiers on a Dask cluster of Raspberry Pis and spare x86 boxes."""


main.add_command(data.ingest)
main.add_command(data.serve)
main.add_command(data.features_cmd)
main.add_command(train.train_cmd)
main.add_command(train.federate_cmd)
main.add_command(train.score_cmd)
main.add_command(train.predict_cmd)
main.add_command(train.demo_cmd)
main.add_command(cluster.init)
main.add_command(cluster.doctor)
main.add_command(cluster.up)
main.add_command(cluster.status)
main.add_command(cluster.logs)
main.add_command(cluster.down)
main.add_command(cluster.dashboard)
main.add_command(cluster.deploy)
main.add_command(bench.bench)
main.add_command(tune.tune_cmd)
main.add_command(runs.runs)
main.add_command(trust.trust_cmd)
main.add_command(export.export_cmd)
