"""Cluster commands: ``init``, ``doctor``, ``up``, ``status``, ``logs``, ``down``, ``dashboard``
and ``deploy systemd``."""

from __future__ import annotations

import sys

import click

from rpicluster.cli._common import (Group, announce, echo_report, echo_table, inventory_option,
                                    local_option, usage_errors)

_accept_option = click.option("--accept-new-hosts", is_flag=True,
                              help="Trust and record unknown host keys (changed keys are refused).")


@click.command()
@click.argument("path", default="cluster.toml", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path, force) -> None:
    """Write a commented example inventory to PATH (default cluster.toml)."""
    from rpicluster.inventory import write_example

    click.echo(f"wrote {write_example(path, overwrite=force)}: edit hosts, user and key, "
               "then run rpicluster doctor -c " + path)


@click.command()
@click.option("-c", "--inventory", required=True, type=click.Path(dir_okay=False),
              metavar="TOML", help="The cluster inventory (rpicluster init).")
@_accept_option
def doctor(inventory, accept_new_hosts) -> None:
    """Check every host: SSH, platform, versions against this machine, memory, disk, health."""
    from rpicluster.deploy.doctor import check_scheduler, doctor as run_doctor, table_rows

    checks = [check_scheduler(inventory, accept_new_hosts=accept_new_hosts),
              *run_doctor(inventory, accept_new_hosts=accept_new_hosts)]
    echo_table("rpicluster doctor", *table_rows(checks))
    if not all(c.ok for c in checks):
        sys.exit(1)


@click.command()
@inventory_option
@local_option("Start the embedded local cluster (N workers; default one per core) instead; "
              "a running one of another size is refused.")
@click.option("--threads-per-worker", type=click.IntRange(min=1), help="With --local.")
@click.option("--memory-limit", help="With --local: per-worker limit, e.g. 4GiB (default auto).")
@click.option("--dashboard-address", metavar="HOST:PORT",
              help="With --local: where the dashboard listens (default 127.0.0.1:8787, this "
                   "machine only; :8787 opens it to the network).")
@click.option("--open-dashboard", is_flag=True,
              help="With an inventory: let the dashboard listen on the scheduler's network "
                   "address (default: its 127.0.0.1 only; `rpicluster dashboard` prints the ssh "
                   "-L command that reaches it). Its pages show logs to anyone who reaches them.")
@_accept_option
@click.option("--insecure", is_flag=True, help="Plain TCP instead of TLS (not recommended).")
@click.option("--provision", is_flag=True,
              help="First install this machine's exact packages on every host (no internet needed).")
def up(inventory, local, threads_per_worker, memory_limit, dashboard_address, open_dashboard,
       accept_new_hosts, insecure, provision) -> None:
    """Start the cluster of an inventory (only what is missing), or the embedded local one."""
    import warnings

    from rpicluster.deploy.lifecycle import LocalCluster, up as start
    from rpicluster.errors import HostsFailedError

    # An SSH cluster's warnings are printed after its hosts' lines, the local one's as they come.
    ssh = inventory is not None
    with warnings.catch_warnings(record=ssh) as caught:
        if ssh:
            warnings.simplefilter("always", UserWarning)
        try:
            with usage_errors():
                result = start(inventory, local=local, threads_per_worker=threads_per_worker,
                               memory_limit=memory_limit, dashboard_address=dashboard_address,
                               open_dashboard=open_dashboard, accept_new_hosts=accept_new_hosts,
                               insecure=insecure, provision=provision)
        except HostsFailedError as exc:
            echo_report("rpicluster up", exc.report)
            raise
        finally:
            for w in caught or ():
                click.echo(f"warning: {w.message}", err=True)
    if isinstance(result, LocalCluster):
        info = result.info
        click.echo(f"local cluster{' already running' if info['already_running'] else ''}: "
                   f"{info['scheduler_address']} ({info.get('n_workers', '?')} workers) "
                   f"dashboard {info['dashboard_link']}")
        return
    echo_report("rpicluster up", result)
    click.echo(f"scheduler {result.address}, dashboard {result.dashboard}")


_ACT_LOCAL = "The embedded local cluster (`up --local`)."


def _nothing_running(inventory, local) -> bool:
    """True, after saying so, when nothing was chosen and no cluster is recorded or running:
    ``status`` and ``down`` then have nothing to act on, which is not an error."""
    from rpicluster.deploy.state import local_record, recorded_cluster

    if inventory is not None or local is not None:
        return False
    if recorded_cluster() is not None or local_record() is not None:
        return False
    click.echo("no cluster running (start one with rpicluster up --local N, or rpicluster up "
               "-c cluster.toml)")
    return True


@click.command()
@inventory_option
@local_option(_ACT_LOCAL)
def status(inventory, local) -> None:
    """Show the scheduler and every worker: state, threads, memory, tasks, temperature.

    A worker that is not running says why: never connected, up failed (the reason), rejoining
    (restarting by itself after its scheduler went away) or lost (run `rpicluster up`).

    Without -c or --local: the SSH cluster `up` last recorded, else the local cluster (and
    when neither runs, it says so: not an error).
    """
    from rpicluster.deploy.lifecycle import status as cluster_status

    if _nothing_running(inventory, local):
        return
    rows = cluster_status(inventory, local=local, announce=announce)
    echo_table("rpicluster status", ["host", "role", "state", "pid", "threads", "memory", "tasks",
                                     "temp", "detail"],
               [[r.host, r.role, r.state, r.pid, r.threads, r.memory, r.tasks,
                 "n/a" if r.temperature is None else f"{r.temperature:.1f} C", r.detail]
                for r in rows])


@click.command()
@click.argument("host", required=False)
@inventory_option
@local_option(_ACT_LOCAL)
@click.option("-n", "--lines", type=click.IntRange(min=1), default=100, show_default=True)
def logs(host, inventory, local, lines) -> None:
    """Print the end of the log of the worker on HOST (or of the scheduler: HOST = scheduler).

    The local cluster keeps one log for its scheduler and workers: HOST is not needed there.
    """
    from rpicluster.deploy.lifecycle import logs as log_tail

    with usage_errors():
        text = log_tail(host, inventory, local=local, lines=lines, announce=announce)
    click.echo(text, nl=False)


@click.command()
@inventory_option
@local_option(_ACT_LOCAL)
def down(inventory, local) -> None:
    """Stop exactly what up started (workers, then scheduler), verified by pid.

    Without -c or --local: the SSH cluster `up` last recorded, else the local cluster (and
    when neither runs, it says so: not an error).
    """
    from rpicluster.deploy.lifecycle import LocalCluster, down as stop
    from rpicluster.errors import HostsFailedError

    if _nothing_running(inventory, local):
        return
    try:
        result = stop(inventory, local=local, announce=announce)
    except HostsFailedError as exc:
        echo_report("rpicluster down", exc.report)
        raise
    if result is None:
        click.echo("no local cluster running")
    elif isinstance(result, LocalCluster):
        click.echo(f"stopped the local cluster (pid {result.info['pid']})")
    else:
        echo_report("rpicluster down", result)


@click.command()
@click.option("--scheduler", metavar="ADDR",
              help="Scheduler address (tcp://host:8786); default: the cluster `up` recorded.")
@inventory_option
@local_option("The embedded local cluster (`up --local`).")
def dashboard(scheduler, inventory, local) -> None:
    """Print the URLs of the Dask dashboard and its rpicluster training page."""
    from rpicluster.dashboard.links import dashboard_links

    for line in dashboard_links(scheduler, inventory=inventory, local=local,
                                announce=announce).lines():
        click.echo(line)


@click.group(cls=Group)
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
