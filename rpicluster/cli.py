"""The ``rpicluster`` command: a thin click layer.

Each command parses its options, calls one library function, and prints the result. No SSH, Dask or
Zarr logic lives here. Library errors (:class:`~rpicluster.errors.RPiClusterError`) are printed as
one clear line and exit with status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import click

from rpicluster import __version__, config
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


@main.command()
@click.argument("source")
@click.argument("out", metavar="OUT.zarr", type=click.Path())
@click.option("--block-rows", type=click.IntRange(min=1), default=config.BLOCK_ROWS,
              show_default=True, metavar="N", help="Rows per training block (one Zarr chunk row).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False),
              help="Labels .npy for a .npy features file.")
@click.option("--label-column", metavar="NAME",
              help="CSV label column (default: label, y or target, else the last column).")
@click.option("--resume", is_flag=True, help="Continue an interrupted ingest of the same source.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at OUT.zarr.")
def ingest(source, out, block_rows, labels, label_column, resume, overwrite) -> None:
    """Write SOURCE into the Zarr store OUT.zarr, block by block.

    SOURCE is a file (data.npz with X and y; features.npy with --labels; data.csv; svmlight
    .svm/.svmlight/.libsvm), sklearn:digits (iris, wine, breast_cancer), or
    synthetic:rows=..,features=..,classes=..,seed=..
    """
    import time

    from rpicluster.data.store import ingest as ingest_store
    from rpicluster.progress import Progress

    t0 = time.perf_counter()
    ds = ingest_store(source, out, block_rows=block_rows, labels=labels,
                      label_column=label_column, resume=resume, overwrite=overwrite,
                      progress=Progress("ingest", unit="blocks"))
    click.echo(f"ingested {ds.url}: {ds.n_rows} rows, {ds.n_features} features, "
               f"{len(ds.classes)} classes, {ds.n_blocks} blocks, {ds.nbytes} bytes, "
               f"{time.perf_counter() - t0:.1f} s")


@main.command()
@click.argument("store", metavar="DATA.zarr", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default=config.SERVE_HOST, show_default=True,
              help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=config.SERVE_PORT,
              show_default=True, help="Port (0 picks a free one).")
def serve(store, host, port) -> None:
    """Serve DATA.zarr read-only over HTTP; workers open http://THIS-HOST:PORT."""
    from rpicluster.data.serve import serve as serve_store

    serve_store(store, host, port, on_ready=lambda url: click.echo(
        f"serving {store} read-only at {url} (Ctrl-C stops)"))


if __name__ == "__main__":  # pragma: no cover
    main()
