"""Pytest fixtures serving real storage emulators on 127.0.0.1 and a fresh bucket per test.

Which emulator serves which provider name:
  "s3"         moto server (subprocess): every S3 test.
  "gcs"        gcp-storage-emulator on a threading server with XML multipart upload added (tests/gcs_emulator.py):
               round trips, faults, write checks, shard downloads. It ignores maxResults/pageToken, so
  "gcs-paged"  fake-gcs-server (subprocess) serves the GCS pagination test; it lacks XML multipart upload and
               answers a resumable-upload status query wrongly, so it serves nothing else.
  "azure"      Azurite (node; the test command installs it into .cache/node): every Azure test.
  "file"       a temp folder as file:///... (no emulator).

Fixtures:
  provider         parametrized over PROVIDERS: one test body runs once per store.
  bucket           fresh bucket of `provider`, this process's env pointed at it (monkeypatch): BucketEnv.
  activate         activate(bucket_env) points this process's env at a bucket from new_bucket (e.g. via a proxy).
  new_bucket       new_bucket(name, through=None) -> BucketEnv, env untouched; through=FaultProxy routes it via a proxy.
  storage_env      storage_env(name) -> (url, env): a fresh bucket plus a complete environment for a subprocess,
                   e.g. `url, env = storage_env("s3"); subprocess.run([..., "--data-bucket", url], env=env)`.
  fault_proxy      fault_proxy(name) -> FaultProxy in front of that provider's emulator, stopped at teardown.
  isolated_env     clears every storage-related variable (credentials, endpoints) for the test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from tests import emulators
from tests.fault_proxy import FaultProxy
from tests.gcs_emulator import GcsEmulator

T = TypeVar("T")

PROVIDERS = ("file", "s3", "gcs", "azure")
CLOUD_PROVIDERS = ("s3", "gcs", "azure")
PAGINATING_PROVIDERS = ("file", "s3", "gcs-paged", "azure")

# Variables that would point an SDK somewhere else or at real credentials; tests and subprocesses drop them.
STORAGE_ENV_VARS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION",
    "STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "API_ENDPOINT_OVERRIDE",
    "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_ACCOUNT_URL", "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
)
# Keeps the SDKs off a developer's real config files and the cloud metadata endpoints.
HERMETIC_ENV = {"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true", "NO_GCE_CHECK": "True"}

_EMULATOR_FIXTURE = {"s3": "s3_emulator", "gcs": "gcs_emulator", "gcs-paged": "fake_gcs_emulator",
                     "azure": "azurite_emulator"}
_SCHEME = {"s3": "s3", "gcs": "gs", "gcs-paged": "gs", "azure": "az"}
_ENV = {"s3": emulators.s3_env, "gcs": emulators.gcs_env, "gcs-paged": emulators.gcs_env, "azure": emulators.azure_env}
_CREATE = {"s3": emulators.create_s3_bucket, "gcs": emulators.create_gcs_bucket,
           "gcs-paged": emulators.create_gcs_bucket, "azure": emulators.create_azure_container}
ROOT_PREFIX = "root"


@dataclass(frozen=True)
class BucketEnv:
    provider: str
    url: str  # root URL with a prefix, e.g. "s3://test-1a2b3c/root"
    env: dict[str, str] = field(default_factory=dict)  # the provider's SDK variables only

    def subprocess_env(self) -> dict[str, str]:
        base = {name: value for name, value in os.environ.items() if name not in STORAGE_ENV_VARS}
        return {**base, **HERMETIC_ENV, **self.env}


def _emulator_or_fail(start: Callable[[], T]) -> T:
    try:
        return start()
    except (emulators.EmulatorError, ImportError) as error:
        pytest.fail(f"storage emulator unavailable: {error} (./run_tests.sh installs the test dependencies)",
                    pytrace=False)


@pytest.fixture(scope="session")
def s3_emulator() -> Iterator[emulators.ProcessEmulator]:
    server = _emulator_or_fail(emulators.start_moto)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    server = _emulator_or_fail(emulators.start_gcs_emulator)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_gcs_emulator() -> Iterator[emulators.ProcessEmulator]:
    server = _emulator_or_fail(emulators.start_fake_gcs_server)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[emulators.ProcessEmulator]:
    server = _emulator_or_fail(lambda: emulators.start_azurite(tmp_path_factory.mktemp("azurite")))
    yield server
    server.stop()


@pytest.fixture
def isolated_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in STORAGE_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in HERMETIC_ENV.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


@pytest.fixture
def new_bucket(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., BucketEnv]:
    def make(provider: str, *, through: FaultProxy | None = None) -> BucketEnv:
        name = f"test-{uuid.uuid4().hex[:12]}"
        if provider == "file":
            return BucketEnv(provider, (tmp_path / name / ROOT_PREFIX).as_uri())
        if provider not in _EMULATOR_FIXTURE:
            raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS + ('gcs-paged',)}")
        emulator = request.getfixturevalue(_EMULATOR_FIXTURE[provider])
        _CREATE[provider](emulator.endpoint, name)
        endpoint = through.endpoint if through is not None else emulator.endpoint
        return BucketEnv(provider, f"{_SCHEME[provider]}://{name}/{ROOT_PREFIX}", _ENV[provider](endpoint))

    return make


@pytest.fixture(params=PROVIDERS)
def provider(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def activate(isolated_env: pytest.MonkeyPatch) -> Callable[[BucketEnv], BucketEnv]:
    """activate(bucket_env) points this process's SDKs at that bucket's emulator for the rest of the test."""
    def point_env_at(created: BucketEnv) -> BucketEnv:
        for name, value in created.env.items():
            isolated_env.setenv(name, value)
        return created

    return point_env_at


@pytest.fixture
def bucket(provider: str, new_bucket: Callable[..., BucketEnv], activate: Callable[[BucketEnv], BucketEnv]) -> BucketEnv:
    return activate(new_bucket(provider))


@pytest.fixture
def storage_env(new_bucket: Callable[..., BucketEnv]) -> Callable[[str], tuple[str, dict[str, str]]]:
    def make(provider: str) -> tuple[str, dict[str, str]]:
        created = new_bucket(provider)
        return created.url, created.subprocess_env()

    return make


@pytest.fixture
def fault_proxy(request: pytest.FixtureRequest) -> Iterator[Callable[[str], FaultProxy]]:
    started: list[FaultProxy] = []

    def make(provider: str) -> FaultProxy:
        emulator = request.getfixturevalue(_EMULATOR_FIXTURE[provider])
        proxy = FaultProxy(emulator.port)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()
