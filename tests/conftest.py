"""Shared test fixtures: the sample corpus here; storage emulators come from tests/storage_fixtures.py."""

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
