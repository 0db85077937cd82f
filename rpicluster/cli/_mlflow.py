"""``--mlflow [URI]``: the option that logs a training command's runs to MLflow as well."""

from __future__ import annotations

import functools

import click


def mlflow_option(command):
    """Add ``--mlflow [URI]`` to ``command``: its runs are logged to MLflow at URI as they go
    (:class:`rpicluster.mlflow_logger.MLflowLogger`), besides the run history; without URI, to
    the file store ``mlruns`` in the rpicluster home."""
    @functools.wraps(command)
    def run(*args, mlflow_uri=None, **kwargs):
        if mlflow_uri is None:
            return command(*args, **kwargs)
        from rpicluster.mlflow_logger import MLflowLogger, default_uri

        with MLflowLogger(mlflow_uri or default_uri()):
            return command(*args, **kwargs)

    return click.option(
        "--mlflow", "mlflow_uri", is_flag=False, flag_value="", default=None,
        metavar="[URI]",
        help="Also log the run to MLflow at URI: a folder (a file store; the default is mlruns "
        "in the rpicluster home), http(s)://HOST:PORT (a tracking server) or any MLflow "
        "tracking URI (pip install -e \".[mlflow]\").")(run)
