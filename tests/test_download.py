"""Shard download: nested keys kept, intact local files skipped, damaged ones fetched again, CLI summary and errors."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pretrain.data.download import download_shards, fetch_shards
from pretrain.storage import open_storage
from tests.emulators import REPO_ROOT

SHARD_KEYS = ["a/b/shard_000.npz", "a/b/shard_001.npz", "a/c/shard_002.npz", "d/shard_003.npz", "shard_004.npz"]


def upload_shards(storage, scratch: Path) -> dict[str, bytes]:
    contents = {}
    for index, key in enumerate(SHARD_KEYS):
        contents[key] = os.urandom(4096 + 97 * index)
        (scratch / "shard").write_bytes(contents[key])
        storage.upload(scratch / "shard", key)
    (scratch / "shard").write_bytes(b"not a shard")
    storage.upload(scratch / "shard", "a/b/README.txt")
    return contents


def file_identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def test_download_skips_intact_and_refetches_damaged(bucket, tmp_path):
    storage = open_storage(bucket.url)
    contents = upload_shards(storage, tmp_path)
    data_dir = tmp_path / "data"

    first = fetch_shards(storage, data_dir, workers=3, progress=False)

    assert first.paths == [data_dir / key for key in SHARD_KEYS]
    assert (first.downloaded, first.skipped) == (5, 0)
    assert all((data_dir / key).read_bytes() == data for key, data in contents.items())
    assert not (data_dir / "a" / "b" / "README.txt").exists()

    truncated, corrupted, untouched = data_dir / SHARD_KEYS[0], data_dir / SHARD_KEYS[2], data_dir / SHARD_KEYS[4]
    truncated.write_bytes(contents[SHARD_KEYS[0]][:1000])  # as left by a download cut half-way
    corrupted.write_bytes(bytes(byte ^ 0xFF for byte in contents[SHARD_KEYS[2]]))  # right size, wrong bytes
    before = file_identity(untouched)
    store_has_checksums = all(info.checksum for info in storage.list())

    second = fetch_shards(storage, data_dir, workers=3, progress=False)

    assert truncated.read_bytes() == contents[SHARD_KEYS[0]]
    assert file_identity(untouched) == before, "an intact shard was downloaded again"
    if store_has_checksums:
        assert corrupted.read_bytes() == contents[SHARD_KEYS[2]]
        assert (second.downloaded, second.skipped) == (2, 3)
    else:  # file:// reports no checksum, so only the size can be compared
        assert (second.downloaded, second.skipped) == (1, 4)
    assert not list(data_dir.rglob("*.partial"))


def test_max_files_takes_the_first_keys(bucket, tmp_path):
    storage = open_storage(bucket.url)
    upload_shards(storage, tmp_path)

    paths = download_shards(storage, tmp_path / "data", max_files=2, progress=False)

    assert paths == [tmp_path / "data" / key for key in SHARD_KEYS[:2]]
    assert sorted(path for path in (tmp_path / "data").rglob("*") if path.is_file()) == paths


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.download", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_downloads_and_summarises(bucket, tmp_path):
    storage = open_storage(bucket.url)
    (tmp_path / "shard").write_bytes(b"x" * 100)
    for key in SHARD_KEYS:
        storage.upload(tmp_path / "shard", key)

    result = run_cli(["--data-bucket", bucket.url, "--data-dir", str(tmp_path / "data"), "--max-files", "3",
                      "--no-progress"], bucket.subprocess_env())

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [f"downloaded 3, skipped 0, 300 bytes into {tmp_path / 'data'}"]
    assert sorted(path for path in (tmp_path / "data").rglob("*") if path.is_file()) == \
        [tmp_path / "data" / key for key in SHARD_KEYS[:3]]


@pytest.mark.parametrize("provider", ["s3", "gcs", "azure"])
def test_cli_error_is_one_line_naming_the_url(provider, storage_env, tmp_path):
    url, env = storage_env(provider)
    missing = f"{url.split('://')[0]}://missing-{uuid.uuid4().hex[:8]}/data"

    result = run_cli(["--data-bucket", missing, "--data-dir", str(tmp_path / "data"), "--no-progress"], env)

    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert missing in result.stderr and "--data-bucket" in result.stderr
    assert "does not exist" in result.stderr  # the env reached the emulator: not "cannot reach"
