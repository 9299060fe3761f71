"""pytest configuration: hypothesis profiles and the device/dtype parametrisation.

Profiles (pick with HYPOTHESIS_PROFILE):
  ci        the default: derandomized, few examples per test, so CI is reproducible and
            the CPU suite stays well inside its time budget.
  thorough  200+ random examples per test, for local bug hunting and GPU runs.
  dev       random (not derandomized) with the ci example count.

Any test taking a `device` argument runs once per available device ("cpu", plus "cuda"
when a GPU is present); one taking `device` and `dtype` runs for every dtype that device
supports (helpers.dtypes_for). Parametrising, rather than a function-scoped fixture, keeps
hypothesis happy and puts the device and dtype into the test id.
"""
import os
import sys

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py importable as `helpers`

import helpers  # noqa: E402

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=10, derandomize=True, **_common)
settings.register_profile("dev", max_examples=10, **_common)
settings.register_profile("thorough", max_examples=250, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "ci")


def pytest_generate_tests(metafunc):
    names = metafunc.fixturenames
    if "device" in names and "dtype" in names:
        metafunc.parametrize(
            ("device", "dtype"), helpers.DEVICE_DTYPES,
            ids=[f"{d}-{helpers.dtype_id(t)}" for d, t in helpers.DEVICE_DTYPES])
    elif "device" in names:
        metafunc.parametrize("device", helpers.DEVICES)


def pytest_report_header(config):
    import torch
    prof = os.environ.get("HYPOTHESIS_PROFILE") or "ci"
    return (f"blossom_ops tests: devices {helpers.DEVICES}, torch {torch.__version__}, "
            f"hypothesis profile {prof!r}")


def pytest_sessionfinish(session, exitstatus):
    """BLOSSOM_NO_SKIP=1 turns any skip into a failure. scripts/test.sh sets it where a
    skip would mean a missing environment (the RecBole run), so a skipped suite is never
    counted as passing."""
    if os.environ.get("BLOSSOM_NO_SKIP") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        print(f"\nBLOSSOM_NO_SKIP=1: {len(skipped)} test(s) skipped -> failing the run")
        session.exitstatus = 1
