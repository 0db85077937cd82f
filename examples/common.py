"""What every example shares: its command-line options for the cluster, seed and work folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def example_parser(doc: str, workdir: str) -> argparse.ArgumentParser:
    """A parser with ``--seed``, ``--workdir`` and the cluster choice every example takes.

    The cluster options are the CLI's (``--scheduler``, ``-c``, ``--local N``) and are resolved
    the same way (:func:`rpicluster.client`): with none of them an example uses the cluster
    ``rpicluster up`` recorded, else starts the embedded local cluster for the run.
    """
    p = argparse.ArgumentParser(description=doc.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path(workdir), help="where outputs go")
    p.add_argument("--scheduler", help="scheduler address, e.g. tls://192.168.1.10:8786")
    p.add_argument("-c", "--inventory", help="the cluster `rpicluster up` started from this file")
    p.add_argument("--local", type=int, metavar="N",
                   help="the embedded local cluster with N workers (started if none runs)")
    return p


def cluster(args: argparse.Namespace):
    """Context manager yielding a ``distributed.Client`` for the cluster ``args`` chose."""
    import rpicluster

    return rpicluster.client(args.scheduler, inventory=args.inventory, local=args.local)
