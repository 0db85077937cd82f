"""The ``rpicluster`` command: a thin click layer.

Each command parses its options, calls one library function, and prints the result. No SSH, Dask or
Zarr logic lives here. Library errors (:class:`~rpicluster.errors.RPiClusterError`) are printed as
one clear line and exit with status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import click

from rpicluster import __version__
from rpicluster.errors import RPiClusterError


class _Group(click.Group):
    """A click group that turns rpicluster errors into one-line messages."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RPiClusterError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rpicluster")
def main() -> None:
    """Train Inc-kSGD classifiers on a Dask cluster of Raspberry Pis and spare x86 boxes."""


@main.group(cls=_Group)
def bench() -> None:
    """Benchmarks: algorithm comparison and cluster scaling."""


def echo_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    """Print a table with rich (plain text when not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r))
    Console().print(table)




@main.command()
@click.option("--scheduler", "address", metavar="ADDR",
              help="Scheduler address (tcp://host:8786); default: the cluster `up` recorded.")
def dashboard(address: str | None) -> None:
    """Print the URLs of the Dask dashboard and its rpicluster training page."""
    from rpicluster.dashboard.links import dashboard_links

    for line in dashboard_links(address).lines():
        click.echo(line)


if __name__ == "__main__":  # pragma: no cover
    main()
