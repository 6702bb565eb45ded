"""The ``required`` marker: a test that must run wherever the suite runs.

A skipped required test is reported as a failure (with the skip reason), so a missing input
(e.g. the golden reference) cannot pass CI silently. Tests that use the ``golden_dir`` fixture
are required automatically. Loaded by ``tests/conftest.py`` (or ``pytest -p required_marker``
with ``tests/`` on the path).
"""
from __future__ import annotations

import pytest

REQUIRED_FIXTURES = ("golden_dir",)  # a test that uses one of these is required


def pytest_configure(config):
    config.addinivalue_line("markers", "required: must not be skipped (a skip fails the run)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in REQUIRED_FIXTURES):
            item.add_marker(pytest.mark.required)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("required") is not None and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"required test {item.nodeid} was skipped: {reason}"
