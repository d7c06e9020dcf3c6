"""Shared test fixtures: storage emulators come from tests/storage_fixtures.py."""

pytest_plugins = ["tests.storage_fixtures"]
