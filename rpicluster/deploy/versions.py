"""Which version differences between the desktop and its workers matter, and which are noise.

Dask compares every process's Python and its required and optional packages, and the scheduler
sends each client a ``VersionMismatchWarning`` table for any difference: on a shelf provisioned
from the desktop that is every command, for pandas present on the desktop only (through the test
extra) and for Python 3.11.7 against 3.11.2. Neither matters: tasks and models cross as pickles,
which need the same packages (:data:`rpicluster.deploy.health.PACKAGES`) and the same Python
minor version. ``doctor`` and ``up`` report those, once, naming host, package and both versions.

The schedulers rpicluster starts preload this module (:data:`PRELOAD`): Dask's table then leaves
out Python's patch level and an optional package (pandas, lz4) that some processes lack; a real
difference is still in it.
"""

from __future__ import annotations

#: The scheduler preload (a module name: the scheduler process imports it).
PRELOAD = "rpicluster.deploy.versions"

#: Dask's optional packages: one present where another process lacks it is not a mismatch.
OPTIONAL = ("pandas", "lz4")


def _packages(side):
    return side.get("packages") if isinstance(side, dict) else None


def without_noise(scheduler, workers: dict, source) -> tuple:
    """Copies of Dask's version dicts (``{"host": ..., "packages": ...}`` or None) with Python
    cut to major.minor, and each :data:`OPTIONAL` package some process lacks left out."""
    sides = [scheduler, source, *workers.values()]
    lacking = {name for name in OPTIONAL for side in sides
               if (p := _packages(side)) is not None and p.get(name) is None}

    def clean(side):
        packages = _packages(side)
        if packages is None:
            return side
        packages = {k: v for k, v in packages.items() if k not in lacking}
        if packages.get("python"):
            packages["python"] = ".".join(str(packages["python"]).split(".")[:2])
        return {**side, "packages": packages}

    return clean(scheduler), {w: clean(v) for w, v in workers.items()}, clean(source)


def mismatches(desktop: dict, versions: dict) -> list[str]:
    """One line per worker and package whose version differs from this machine's.

    ``desktop``: :func:`rpicluster.deploy.health.versions` here; ``versions``: Dask's
    ``client.get_versions(packages=PACKAGES)["workers"]`` (``{worker: {"packages": ...}}``).
    """
    from rpicluster.deploy.health import PACKAGES

    return [f"{worker}: {name} {have or 'missing'} there, {desktop.get(name) or 'missing'} here"
            for worker, info in versions.items()
            for name in PACKAGES
            if (have := (_packages(info) or {}).get(name)) != desktop.get(name)]


def report_mismatches(client, where: str) -> list[str]:
    """Warn once per worker and package whose version differs from this machine's (``up`` calls
    it when its workers are in); the lines, ``[]`` when all match or the workers do not answer."""
    import warnings

    from rpicluster.deploy.health import PACKAGES, versions

    try:
        info = client.get_versions(packages=list(PACKAGES))["workers"]
        names = {a: str(w.get("name", a)) for a, w in
                 client.scheduler_info(n_workers=-1)["workers"].items()}
    except (OSError, TimeoutError):
        return []
    lines = mismatches(versions(), {names.get(a, a): v for a, v in info.items()})
    for line in lines:
        warnings.warn(f"{where}: {line}: tasks and models may not load across them; run "
                      "rpicluster up --provision to install this machine's versions there",
                      UserWarning, stacklevel=3)
    return lines


def dask_setup(scheduler) -> None:
    """Scheduler preload: Dask's version warnings without the noise (see the module text)."""
    import distributed.versions as dv

    original = dv.error_message
    if getattr(original, "rpicluster", False):
        return

    def error_message(scheduler, workers, source, source_name="Client"):
        return original(*without_noise(scheduler, workers, source), source_name=source_name)

    error_message.rpicluster = True
    dv.error_message = error_message
