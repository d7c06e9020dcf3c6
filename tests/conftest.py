"""Shared test fixtures: the sample corpus here; storage emulators come from tests/storage_fixtures.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["tests.storage_fixtures"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """The synthetic corpus the `test` config trains on, generated once per session and only read by tests."""
    data_dir = tmp_path_factory.mktemp("sample-data")
    subprocess.run([sys.executable, "-m", "pretrain.sample_data", "--out", str(data_dir)], cwd=REPO, check=True,
                   capture_output=True)
    return data_dir


# Fixtures that start a storage emulator (directly, or for any provider but "file"); their tests are beyond the fast loop.
EMULATOR_FIXTURES = {"s3_emulator", "gcs_emulator", "fake_gcs_emulator", "azurite_emulator", "storage_env",
                     "fault_proxy", "new_bucket"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        provider = getattr(getattr(item, "callspec", None), "params", {}).get("provider")
        if names & EMULATOR_FIXTURES and provider != "file":
            item.add_marker(pytest.mark.slow)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker and everything it starts runs on a core of its own: two workers' training
    threads on the same cores would spin against each other."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker.startswith("gw") and len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[int(worker[2:]) % len(cpus)]})
