"""What the command modules share: the error-printing group, tables, cluster options, the lines
a stopped or interrupted run ends with."""

from __future__ import annotations

import contextlib
import shlex
import sys

import click

from rpicluster.errors import OptionsError, RPiClusterError


class Group(click.Group):
    """A click group that turns rpicluster errors, warnings and Ctrl-C into one-line messages."""

    def invoke(self, ctx):
        import warnings

        from rpicluster.errors import RPiClusterWarning

        def show(message, category, *args, **kwargs):
            if issubclass(category, RPiClusterWarning):
                click.echo(f"warning: {message}", err=True)
            else:
                default(message, category, *args, **kwargs)

        with warnings.catch_warnings():
            default = warnings.showwarning
            warnings.showwarning = show
            try:
                return super().invoke(ctx)
            except RPiClusterError as exc:
                click.echo(f"error: {exc}", err=True)
                sys.exit(1)
            except KeyboardInterrupt:
                click.echo("interrupted (Ctrl-C); nothing half-written was left under a final "
                           "name", err=True)
                sys.exit(130)


@contextlib.contextmanager
def usage_errors():
    """Options that do not go together (:class:`~rpicluster.errors.OptionsError`) as click's
    usage error: the command's usage line and exit status 2."""
    try:
        yield
    except OptionsError as exc:
        raise click.UsageError(str(exc)) from None


def echo_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    """Print a table: rich on a terminal, plain aligned lines otherwise; never truncated.

    Host names and key fingerprints are compared by eye, so a narrow terminal folds a long cell
    onto more lines rather than cutting it, and piped output has no width limit at all.
    """
    cells = [["" if v is None else str(v) for v in r] for r in rows]
    if not sys.stdout.isatty():
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        click.echo(title)
        for r in [columns, *cells]:
            click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in cells:
        table.add_row(*r)
    Console().print(table)


def echo_report(title, report) -> None:
    """The per-host table of ``up`` and ``down``."""
    echo_table(title, ["host", "role", "state", "pid", "detail"],
               [[r.host, r.role, r.state, r.pid, r.reason] for r in report.rows])


# --- which cluster a command runs on (rpicluster.deploy.resolve) ---

class _LocalWorkers(click.ParamType):
    """``--local [N]``: the embedded local cluster, with N workers when N is given."""

    name = "N"

    def convert(self, value, param, ctx):
        if value is True:  # the bare flag
            return True
        try:
            n = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of workers", param, ctx)
        if n < 1:
            self.fail(f"needs at least 1 worker, got {n}", param, ctx)
        return n


def local_option(help_text: str):
    """``--local [N]`` with ``help_text``."""
    # flag_value=True: a bare --local means "the local cluster, whatever its size".
    return click.option("--local", "local", type=_LocalWorkers(), is_flag=False,
                        flag_value=True, default=None, metavar="[N]", help=help_text)


_LOCAL_HELP = ("The embedded local cluster (with N workers: a running one of another size is "
               "refused; started for this command if none runs).")
inventory_option = click.option("-c", "--inventory", type=click.Path(dir_okay=False),
                                metavar="TOML", help="The SSH cluster `up` started from this "
                                "inventory (rpicluster init writes one).")


def cluster_options(f):
    """--scheduler / -c / --local: which cluster a command runs on (rpicluster.deploy.resolve)."""
    f = local_option(_LOCAL_HELP)(f)
    f = inventory_option(f)
    f = click.option("--scheduler", metavar="ADDR",
                     help="Scheduler address, e.g. tls://192.168.1.10:8786.")(f)
    return f


def announce(ref) -> None:
    """Say which cluster a command acts on (stderr, beside the progress lines)."""
    click.echo(f"cluster: {ref.describe()}", err=True)


def cluster_choice(scheduler, inventory, local):
    """The cluster the options name, announced when it is resolved (and Dask's logs quieted
    then, when the command asked: :func:`quiet_dask_logs`)."""
    from rpicluster.train.api import ClusterChoice

    def resolved(ref) -> None:
        if _quiet_logs:
            _quiet_dask_logs_now()
        announce(ref)

    return ClusterChoice(scheduler=scheduler, inventory=inventory, local=local,
                         announce=resolved)


# --- how a stopped run ends ---

def exit_stopped(exc, command: list[str], options) -> None:
    """Print a stopped run's one line with the exact command that resumes it, and exit.

    ``command`` is the command's name and arguments; ``options`` the ``(flag, value)`` pairs
    to repeat (a True value is a bare flag; None and False are left out).
    """
    again = command_line([*command, "--resume", exc.run_dir], options)
    click.echo(f"error: {exc}; continue with: {again}", err=True)
    sys.exit(130 if exc.interrupted else 1)


def command_line(command: list, options) -> str:
    """``rpicluster COMMAND...`` with the ``(flag, value)`` options that are set, quoted for a
    shell (a True value is a bare flag; None and False are left out)."""
    words = ["rpicluster", *map(str, command)]
    for flag, value in options:
        if value is True:
            words.append(flag)
        elif value is not None and value is not False:
            words += [flag, str(value)]
    return shlex.join(words)


def _settled_state(url, wait: float = 2.0):
    """:func:`~rpicluster.data.writer.written_blocks` of ``url`` once its record is readable:
    Ctrl-C stops this thread, not zarr's I/O thread, which may be rewriting ``zarr.json`` at
    that moment (read then, the store looked absent: "nothing was written"). A local path
    that does not exist is absent at once."""
    import os
    import time

    from rpicluster.data.writer import written_blocks

    deadline = time.monotonic() + wait
    while True:
        state = written_blocks(url)
        if state is not None or time.monotonic() > deadline or (
                "://" not in str(url) and not os.path.exists(url)):
            return state
        time.sleep(0.05)


def exit_interrupted(command: list[str], options, stores: list[str]) -> None:
    """Ctrl-C during a store writer (ingest, features): one line saying what each store holds
    (an incomplete one is refused by readers) and the exact command that resumes, then exit."""
    said, resumable = [], False
    for url in stores:
        state = _settled_state(url)
        if state is None:
            continue
        done, total, complete = state
        if complete:
            said.append(f"{url} is complete")
        else:
            said.append(f"{url} holds {done} of {total} blocks and is marked incomplete")
            resumable = True
    if not resumable:
        click.echo("interrupted (Ctrl-C) before any store was started; nothing was written",
                   err=True)
        sys.exit(130)
    click.echo(f"interrupted (Ctrl-C): {'; '.join(said)}; continue with: "
               f"{command_line(command, [*options, ('--resume', True)])}", err=True)
    sys.exit(130)


_quiet_logs = False


def quiet_dask_logs() -> None:
    """A run that stops (Ctrl-C, lost scheduler) makes Dask's client log its own reconnect
    attempts and callback tracebacks while it cleans up; the one line of
    :func:`exit_stopped` says it all.

    Quiets them now if distributed is imported, else once the command reaches a cluster
    (:func:`cluster_choice`): a small store runs in this process without importing it (a
    second of a cold ``train``)."""
    global _quiet_logs
    _quiet_logs = True
    if "distributed" in sys.modules:
        _quiet_dask_logs_now()


def _quiet_dask_logs_now() -> None:
    import logging

    import distributed  # noqa: F401 - configures its loggers on import; ours must come after

    for name in ("distributed.client", "distributed.batched", "tornado.application", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
