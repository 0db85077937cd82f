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


@bench.command("algorithms")
@click.option("--sizes", default=",".join(("200k", "100k")), show_default=True,
              help="Comma-separated presets: quick, 200k (200k x 512, 200 classes), "
                   "100k (100k x 2048, 1000 classes), 1m (1M x 2048, 1000 classes).")
@click.option("--quick", is_flag=True, help="Smoke run: the tiny 'quick' preset only.")
@click.option("--algorithms", "algos", metavar="A,B,...",
              help="Subset of rows: inc-ksgd, inc-ksgd-sklearn, minibatch-sgd, sgd, liblinear, "
                   "dask-ml (default: all).")
@click.option("--time-cap", type=click.FloatRange(min=0, min_open=True),
              default=config.BENCH_TIME_CAP_S, show_default=True,
              help="Seconds after which a row is stopped and reported as not finished.")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True,
              help="SGD epochs for every row.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data and models.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False),
              default=str(config.BENCH_OUT / "algorithms"), show_default=True,
              help="Folder for algorithms.md and algorithms.json.")
def bench_algorithms(sizes, quick, algos, time_cap, epochs, seed, out_dir) -> None:
    """Inc-kSGD against SGDClassifier, LIBLINEAR and dask-ml on the same data (Table 1)."""
    from rpicluster.bench.algorithms import ALGORITHMS, run_algorithms, to_markdown
    from rpicluster.progress import Progress

    names = ["quick"] if quick else [s.strip() for s in sizes.split(",") if s.strip()]
    chosen = [a.strip() for a in algos.split(",")] if algos else list(ALGORITHMS)
    with Progress("bench algorithms", total=len(names) * len(chosen), unit="rows",
                  interval=0) as progress:
        doc = run_algorithms(names, algorithms=chosen, out_dir=out_dir, time_cap=time_cap,
                             epochs=epochs, seed=seed, progress=progress)
    click.echo(to_markdown(doc))
    click.echo(f"wrote {out_dir}/algorithms.md and algorithms.json")


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


# --- cluster bring-up: init / doctor / up / status / logs / down (rpicluster.deploy) ---

_inventory_option = click.option("-c", "--inventory", type=click.Path(dir_okay=False),
                                 metavar="TOML", help="The cluster inventory (rpicluster init).")
_accept_option = click.option("--accept-new-hosts", is_flag=True,
                              help="Trust and record unknown host keys (changed keys are refused).")


@main.command()
@click.argument("path", default="cluster.toml", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path, force) -> None:
    """Write a commented example inventory to PATH (default cluster.toml)."""
    from rpicluster.inventory import write_example

    click.echo(f"wrote {write_example(path, overwrite=force)}: edit hosts, user and key, "
               "then run rpicluster doctor -c " + path)


@main.command()
@click.option("-c", "--inventory", required=True, type=click.Path(dir_okay=False),
              metavar="TOML", help="The cluster inventory (rpicluster init).")
@_accept_option
def doctor(inventory, accept_new_hosts) -> None:
    """Check every host: SSH, platform, versions against this machine, memory, disk, health."""
    from rpicluster.deploy.doctor import doctor as run_doctor, table_rows

    checks = run_doctor(inventory, accept_new_hosts=accept_new_hosts)
    echo_table("rpicluster doctor", *table_rows(checks))
    if not all(c.ok for c in checks):
        sys.exit(1)


def _echo_report(title, report) -> None:
    echo_table(title, ["host", "role", "state", "pid", "detail"],
               [[r.host, r.role, r.state, r.pid, r.detail] for r in report.rows])


@main.command()
@_inventory_option
@click.option("--local", type=click.IntRange(min=1), metavar="N",
              help="Start the embedded local cluster with N workers instead.")
@click.option("--threads-per-worker", type=click.IntRange(min=1), help="With --local.")
@click.option("--memory-limit", help="With --local: per-worker limit, e.g. 4GiB.")
@_accept_option
@click.option("--insecure", is_flag=True, help="Plain TCP instead of TLS (not recommended).")
@click.option("--provision", is_flag=True,
              help="First install this machine's exact packages on every host (no internet needed).")
def up(inventory, local, threads_per_worker, memory_limit, accept_new_hosts, insecure,
       provision) -> None:
    """Start the cluster of an inventory (only what is missing), or the embedded local one."""
    if inventory is None:
        from rpicluster.deploy.local import start_local

        info = start_local(local, threads_per_worker=threads_per_worker,
                           memory_limit=memory_limit or "auto")
        click.echo(f"local cluster: {info['scheduler_address']} "
                   f"dashboard {info['dashboard_link']}")
        return
    import warnings

    from rpicluster.deploy.cluster import up as cluster_up
    from rpicluster.errors import HostsFailedError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            report = cluster_up(inventory, accept_new_hosts=accept_new_hosts, insecure=insecure,
                                provision=provision)
        except HostsFailedError as exc:
            _echo_report("rpicluster up", exc.report)
            raise
        finally:
            for w in caught:
                click.echo(f"warning: {w.message}", err=True)
    _echo_report("rpicluster up", report)
    click.echo(f"scheduler {report.address}, dashboard {report.dashboard}")


@main.command()
@_inventory_option
@click.option("--local", is_flag=True, help="The embedded local cluster.")
def status(inventory, local) -> None:
    """Show scheduler and workers: state, threads, memory, tasks, temperature."""
    if local:
        from rpicluster.deploy.local import local_status

        info = local_status()
        click.echo("no local cluster running" if info is None else
                   f"local cluster: {info['scheduler_address']}, {info['n_workers']} workers, "
                   f"dashboard {info['dashboard_link']}")
        return
    from rpicluster.deploy.cluster import status as cluster_status

    rows = cluster_status(inventory)
    echo_table("rpicluster status", ["host", "role", "state", "pid", "threads", "memory", "tasks",
                                     "temp"],
               [[r.host, r.role, r.state, r.pid, r.threads, r.memory, r.tasks,
                 "n/a" if r.temperature is None else f"{r.temperature:.1f} C"] for r in rows])


@main.command()
@click.argument("host")
@_inventory_option
@click.option("-n", "--lines", type=click.IntRange(min=1), default=100, show_default=True)
def logs(host, inventory, lines) -> None:
    """Print the end of the log of the worker on HOST (or of the scheduler: HOST = scheduler)."""
    from rpicluster.deploy.cluster import logs as cluster_logs

    click.echo(cluster_logs(host, inventory, lines=lines), nl=False)


@main.command()
@_inventory_option
@click.option("--local", is_flag=True, help="Stop the embedded local cluster.")
def down(inventory, local) -> None:
    """Stop exactly what up started (workers, then scheduler), verified by pid."""
    if local:
        from rpicluster.deploy.local import stop_local

        info = stop_local()
        click.echo("no local cluster running" if info is None else
                   f"stopped the local cluster (pid {info['pid']})")
        return
    from rpicluster.deploy.cluster import down as cluster_down
    from rpicluster.errors import HostsFailedError

    try:
        report = cluster_down(inventory)
    except HostsFailedError as exc:
        _echo_report("rpicluster down", exc.report)
        raise
    _echo_report("rpicluster down", report)


@main.group(cls=_Group)
def deploy() -> None:
    """Run the cluster under each host's service manager instead of `up`."""


@deploy.command("systemd")
@click.option("-c", "--inventory", required=True, type=click.Path(dir_okay=False),
              metavar="TOML", help="The cluster inventory (rpicluster init).")
@click.option("-o", "--out", "out_dir", default="rpicluster-units", show_default=True,
              type=click.Path(file_okay=False), help="Folder for the units, certificates and "
              "install.sh.")
@click.option("--insecure", is_flag=True, help="Plain TCP units, no certificates (as up --insecure).")
def deploy_systemd(inventory, out_dir, insecure) -> None:
    """Render a systemd unit per host (scheduler, workers) and an install script."""
    from rpicluster.deploy.systemd import write_units

    kit = write_units(inventory, out_dir, insecure=insecure)
    for unit in kit.units:
        click.echo(f"{unit.host}: {kit.out_dir / unit.host / unit.filename} ({unit.role}, "
                   f"User={unit.node.user})")
    click.echo(f"install: review {kit.install_script}, then run: sh {kit.install_script}")
    if kit.client_env is not None:
        click.echo(f"then, before rpicluster train ... --scheduler ADDR: . {kit.client_env}")


if __name__ == "__main__":  # pragma: no cover
    main()
