"""Transient faults (503s, connection resets) injected between the SDKs and real emulators are retried away."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from pretrain.storage import StorageError, StorageOptions, open_storage
from tests.fault_proxy import CONNECTION_RESET, SERVICE_UNAVAILABLE
from tests.storage_fixtures import CLOUD_PROVIDERS

MiB = 1024 * 1024
SHORT_RETRIES = StorageOptions(multipart_chunk_bytes=5 * MiB, max_concurrency=4, max_retries=4,
                               retry_backoff_seconds=0.05)

# (method, regex on path+query) of the requests that faults are aimed at, per store.
PART_UPLOAD = {"s3": ("PUT", r"partNumber="), "gcs": ("PUT", r"partNumber="), "azure": ("PUT", r"comp=block&")}
SMALL_UPLOAD = {"s3": ("PUT", r"small\.txt($|\?)"), "gcs": ("POST", r"uploadType=multipart"),
                "azure": ("PUT", r"small\.txt($|\?)")}
BIG_DOWNLOAD = {"s3": ("GET", r"big\.bin($|\?)"), "gcs": ("GET", r"alt=media"), "azure": ("GET", r"big\.bin($|\?)")}
LISTING = {"s3": ("GET", r"list-type=2"), "gcs": ("GET", r"/o\?"), "azure": ("GET", r"comp=list")}


@pytest.mark.parametrize("provider", CLOUD_PROVIDERS)
def test_transfers_complete_through_503s_and_resets(provider, new_bucket, activate, fault_proxy, tmp_path: Path):
    proxy = fault_proxy(provider)
    storage = open_storage(activate(new_bucket(provider, through=proxy)).url, SHORT_RETRIES)
    data = os.urandom(12 * MiB + 777)
    (tmp_path / "big.bin").write_bytes(data)
    (tmp_path / "small.txt").write_bytes(b"small object")
    for fault in (SERVICE_UNAVAILABLE, CONNECTION_RESET):
        for method, regex in (PART_UPLOAD[provider], SMALL_UPLOAD[provider], BIG_DOWNLOAD[provider], LISTING[provider]):
            proxy.inject(fault, method=method, path_regex=regex)

    storage.upload(tmp_path / "big.bin", "big.bin")
    storage.upload(tmp_path / "small.txt", "small.txt")
    storage.download("big.bin", tmp_path / "back" / "big.bin")
    listed = {info.key: info.size for info in storage.list()}

    assert (tmp_path / "back" / "big.bin").read_bytes() == data
    assert listed == {"big.bin": len(data), "small.txt": len(b"small object")}
    assert proxy.pending_faults() == 0, "some injected faults never met a request"
    assert proxy.count(faulted=True) == 8


@pytest.mark.parametrize("provider", CLOUD_PROVIDERS)
def test_persistent_failure_gives_up_with_storage_error(provider, new_bucket, activate, fault_proxy, tmp_path: Path):
    proxy = fault_proxy(provider)
    storage = open_storage(activate(new_bucket(provider, through=proxy)).url,
                           StorageOptions(multipart_chunk_bytes=5 * MiB, max_retries=2, retry_backoff_seconds=0.05))
    (tmp_path / "big.bin").write_bytes(os.urandom(11 * MiB))
    method, regex = PART_UPLOAD[provider]
    proxy.inject(SERVICE_UNAVAILABLE, method=method, path_regex=regex, times=1000)

    started = time.monotonic()
    with pytest.raises(StorageError) as raised:
        storage.upload(tmp_path / "big.bin", "big.bin")

    assert time.monotonic() - started < 20
    assert f"{storage.url}/big.bin" in str(raised.value)
    assert "\n" not in str(raised.value)
    # Retries are bounded by the options: 3 parts, each tried a few times, not a retry storm.
    assert 3 <= proxy.count(faulted=True) <= 3 * 12


@pytest.mark.parametrize("provider", CLOUD_PROVIDERS)
def test_download_many_fails_fast_on_a_cut_object_and_names_it(provider, new_bucket, activate, fault_proxy,
                                                               tmp_path: Path):
    """The network to one object is cut (every request reset): that object's error is raised within the retry
    bounds, the others still come down whole, and no partial file is left."""
    proxy = fault_proxy(provider)
    storage = open_storage(activate(new_bucket(provider, through=proxy)).url,
                           StorageOptions(multipart_chunk_bytes=5 * MiB, max_concurrency=4, max_retries=1,
                                          retry_backoff_seconds=0.05))
    sources = {"ckpt/big.bin": os.urandom(11 * MiB), "ckpt/cut/broken.bin": os.urandom(6 * MiB),
               "ckpt/state.json": b"{}"}
    for index, data in enumerate(sources.values()):
        (tmp_path / f"src{index}").write_bytes(data)
    storage.upload_many([(tmp_path / f"src{index}", key) for index, key in enumerate(sources)])
    proxy.inject(CONNECTION_RESET, path_regex=r"broken\.bin", times=10_000)

    started = time.monotonic()
    with pytest.raises(StorageError) as raised:
        storage.download_many([(key, tmp_path / "out" / key) for key in sources], max_workers=3)

    assert time.monotonic() - started < 30
    assert f"{storage.url}/ckpt/cut/broken.bin" in str(raised.value)
    assert "cannot reach" in str(raised.value) or "reset" in str(raised.value).lower()
    assert "\n" not in str(raised.value)
    assert proxy.count(path_regex=r"broken\.bin", faulted=True) >= 1
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("storage-download")]
    assert not list((tmp_path / "out").rglob("*.partial")), "temp file left behind"
    assert not (tmp_path / "out" / "ckpt" / "cut" / "broken.bin").exists()
    for key in ("ckpt/big.bin", "ckpt/state.json"):  # were running in parallel: they finish whole, or not at all
        path = tmp_path / "out" / key
        assert not path.exists() or path.read_bytes() == sources[key]
