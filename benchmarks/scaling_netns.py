"""The cluster paper's scaling table on SSH hosts: a slow "Pi" first, then two fast hosts.

Builds three sshd hosts in network namespaces (:class:`rpicluster.testing.NamespaceHosts`), the
first one CPU-capped like a Pi, writes an inventory for them, brings the cluster up with the
project's own ``up``, runs ``rpicluster bench scaling -c`` (default steps: pi1; pi1,pi2;
pi1,pi2,pi3), then takes everything down again. Needs root, iproute2 and openssh-server.

    python benchmarks/scaling_netns.py [-o bench-out/scaling-netns] [--job inc-ksgd]
        [--rows 24000] [--quota 0.25] [--repeats 3]

The hosts share this machine's cores, so a worker of one thread per host keeps the fast hosts
from competing for more than the two cores there are. Prints the report and the load average.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--out", default="bench-out/scaling-netns")
    parser.add_argument("--job", default="inc-ksgd", choices=["inc-ksgd", "random-forest"])
    parser.add_argument("--rows", type=int, default=24_000)
    parser.add_argument("--block-rows", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quota", type=float, default=0.25,
                        help="CPU share of the capped 'Pi' host (of one core)")
    parser.add_argument("--simulate", default="16x slowpi, 2x fast")
    args = parser.parse_args(argv)

    from rpicluster.testing import NamespaceHosts, cpu_cgroup_unavailable, unavailable

    reason = unavailable() or cpu_cgroup_unavailable()
    if reason:
        print(f"cannot build capped namespace hosts here: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="rpicluster-scaling-") as tmp:
        tmp = Path(tmp)
        os.environ["RPICLUSTER_HOME"] = str(tmp / "home")  # state and certificates stay here
        from rpicluster.deploy import cluster

        with NamespaceHosts(tmp / "hosts", 3, cpu_capped="pi1", cpu_quota=args.quota) as hosts:
            inventory = hosts.write_inventory(
                tmp / "cluster.toml", local_directory=tmp / "workers", nthreads=1,
                tags=lambda name, capped: ["slowpi" if capped else "fast"])
            report = cluster.up(inventory)
            print(f"up: {report.address} "
                  + ", ".join(f"{r.host} {r.state}" for r in report.rows), flush=True)
            if hosts.cgroup is not None:
                capped = (hosts.cgroup / "cgroup.procs").read_text().split()
                print(f"{hosts.capped} capped at {args.quota:.0%} of a core: "
                      f"{len(capped)} processes in its cgroup", flush=True)
            try:
                print("uptime before:", os.getloadavg(), flush=True)
                cmd = [sys.executable, "-m", "rpicluster.cli", "bench", "scaling", "-c",
                       str(inventory), "--job", args.job, "--rows", str(args.rows),
                       "--block-rows", str(args.block_rows), "--repeats", str(args.repeats),
                       "--simulate", args.simulate, "-o", args.out]
                rc = subprocess.run(cmd).returncode
                print("uptime after:", os.getloadavg(), flush=True)
            finally:
                cluster.down(inventory)
    return rc


if __name__ == "__main__":
    sys.exit(main())
