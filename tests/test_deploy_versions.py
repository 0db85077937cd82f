"""Version noise and real mismatches between the desktop and its workers (deploy/versions.py),
on Dask's own version records and its own warning text."""

from __future__ import annotations

import copy

import distributed.versions as dv
from distributed import Client, LocalCluster

from rpicluster.deploy import versions
from rpicluster.deploy.health import versions as local_versions


def _pi(desktop: dict) -> dict:
    """A Pi provisioned from this desktop: its Python patch level differs, it has no pandas."""
    pi = copy.deepcopy(desktop)
    major, minor, *_ = pi["packages"]["python"].split(".")
    pi["packages"]["python"] = f"{major}.{minor}.2.final.0"
    pi["packages"]["pandas"] = None
    return pi


def test_noise_is_left_out_and_a_real_difference_kept():
    desktop = dv.get_versions()
    desktop["packages"]["pandas"] = "2.2.3"     # the desktop has pandas (the test extra)
    pi = _pi(desktop)
    # Dask's own check warns about both.
    noisy = dv.error_message(desktop, {"pi1": pi}, desktop)["warning"]
    assert "python" in noisy and "pandas" in noisy
    quiet = dv.error_message(*versions.without_noise(desktop, {"pi1": pi}, desktop))["warning"]
    assert quiet == ""
    pi["packages"]["numpy"] = "1.26.0"
    real = dv.error_message(*versions.without_noise(desktop, {"pi1": pi}, desktop))["warning"]
    assert "numpy" in real and "1.26.0" in real and "pandas" not in real
    # The same optional package at two versions is a real difference.
    pi["packages"]["pandas"] = "2.1.0"
    assert "pandas" in dv.error_message(*versions.without_noise(desktop, {"pi1": pi}, desktop)
                                        )["warning"]


def test_mismatches_name_worker_package_and_both_versions():
    here = local_versions()
    there = {"pi1": {"packages": {**here, "scikit-learn": "1.5.0"}},
             "pi2": {"packages": dict(here)}}
    assert versions.mismatches(here, there) == [
        f"pi1: scikit-learn 1.5.0 there, {here['scikit-learn']} here"]


def test_scheduler_preload_patches_the_scheduler_check():
    original = dv.error_message
    try:
        with LocalCluster(n_workers=1, processes=False, dashboard_address=None,
                          scheduler_kwargs={"preload": [versions.PRELOAD],
                                            "dashboard_address": ":0"}) as c, \
                Client(c) as client:
            assert getattr(dv.error_message, "rpicluster", False)
            assert versions.report_mismatches(client, "here") == []
    finally:
        dv.error_message = original   # the scheduler ran in this process
