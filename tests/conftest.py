"""The suite's setup: eight fake CPU devices before JAX starts, and the ``slow`` mark on the
tests of experiments/ (``pytest -m "not slow"`` runs the library's tests alone)."""

import os
import pathlib

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

EXPERIMENTS = pathlib.Path(__file__).parent / "experiments"


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.is_relative_to(EXPERIMENTS):
            item.add_marker(pytest.mark.slow)
