"""The workers of a scaling benchmark and its steps: which workers each step runs on."""

from __future__ import annotations

import re

from rpicluster.errors import ConfigError

def worker_table(client) -> dict[str, dict]:
    """Connected workers by name: address, threads, memory limit, tags, host and hardware.

    ``hardware`` is the rpicluster dashboard's health metric (arch, cores, memory, temperature,
    throttling) where the worker reports it, else None.
    """
    from rpicluster.events import HEALTH_METRIC

    out = {}
    for addr, w in client.scheduler_info(n_workers=-1)["workers"].items():
        out[str(w.get("name", addr))] = {
            "address": addr, "threads": int(w["nthreads"]),
            "memory": int(w.get("memory_limit") or 0), "host": w.get("host"),
            "tags": sorted((w.get("resources") or {}).keys()),
            "hardware": (w.get("metrics") or {}).get(HEALTH_METRIC)}
    return out


def natural(name: str):
    """Sort key of worker names: ``pi2`` before ``pi10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def worker_order(workers: dict[str, dict], inventory=None) -> list[str]:
    """Names in inventory order (default steps add one worker each), then the rest by name."""
    first: list[str] = []
    if inventory is not None:
        from rpicluster.inventory import load_inventory

        first = [n.name for n in load_inventory(inventory).workers if n.name in workers]
    return first + sorted((n for n in workers if n not in first), key=natural)


def parse_steps(text: str | None, workers: dict[str, dict], order: list[str]) -> list[list[str]]:
    """Worker sets of the steps: ``"pi01; pi01,desktop"`` or, when ``text`` is None, one more
    worker per step in ``order``.

    Names are worker names or addresses; the result holds names.

    Raises
    ------
    ConfigError
        An empty step, an unknown worker (the message lists the known ones) or a worker twice
        in one step.
    """
    if text is None:
        return [order[:i] for i in range(1, len(order) + 1)]
    by_address = {w["address"]: n for n, w in workers.items()}
    steps = []
    for s, chunk in enumerate(text.split(";"), start=1):
        names = [n.strip() for n in chunk.split(",")]
        if not all(names):
            raise ConfigError(f"--steps {text!r}: step {s} is empty or has an empty name; "
                              f"expected names like '{', '.join(order[:2])}'")
        step = []
        for n in names:
            name = n if n in workers else by_address.get(n)
            if name is None:
                raise ConfigError(f"--steps: step {s} names unknown worker {n!r} "
                                  f"(workers: {', '.join(order)})")
            if name in step:
                raise ConfigError(f"--steps: step {s} names worker {n!r} twice")
            step.append(name)
        steps.append(step)
    return steps
