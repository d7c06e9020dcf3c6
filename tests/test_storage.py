"""Storage backends against real emulators: multipart round trips, pagination, key operations, write checks."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from pretrain.files import bytes_digest
from pretrain.storage import ObjectInfo, StorageError, StorageOptions, open_storage
from tests.storage_fixtures import CLOUD_PROVIDERS, PAGINATING_PROVIDERS, PROVIDERS

MiB = 1024 * 1024
MULTIPART = StorageOptions(multipart_chunk_bytes=5 * MiB, max_concurrency=4, max_retries=2,
                           retry_backoff_seconds=0.05)
BIG_FILE_BYTES = 12 * MiB + 12345  # three 5 MiB parts, the last one short

# Requests that carry one part of a parallel upload, per store.
PART_UPLOAD = {"s3": ("PUT", r"partNumber="), "gcs": ("PUT", r"partNumber="), "azure": ("PUT", r"comp=block(&|$)")}
LIST_REQUEST = {"s3": r"list-type=2", "gcs-paged": r"/o(\?|$)", "azure": r"comp=list"}


def random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("provider", PROVIDERS)
def test_multipart_round_trip(provider, new_bucket, activate, fault_proxy, tmp_path):
    proxy = fault_proxy(provider) if provider in CLOUD_PROVIDERS else None
    bucket = activate(new_bucket(provider, through=proxy))
    storage = open_storage(bucket.url, MULTIPART)
    data = random_file(tmp_path / "big.bin", BIG_FILE_BYTES)

    storage.upload(tmp_path / "big.bin", "nested/dir/big.bin")
    storage.download("nested/dir/big.bin", tmp_path / "out" / "a" / "b" / "big.bin")

    assert (tmp_path / "out" / "a" / "b" / "big.bin").read_bytes() == data
    assert [(info.key, info.size) for info in storage.list()] == [("nested/dir/big.bin", BIG_FILE_BYTES)]
    assert not list((tmp_path / "out" / "a" / "b").glob("*.partial")), "temp file left behind"
    if proxy is not None:
        method, part_regex = PART_UPLOAD[provider]
        assert proxy.count(method=method, path_regex=part_regex) == 3, "large file did not go up in 3 parts"
        assert proxy.count(method="GET", ranged=True) >= 3, "large file did not come down in ranged parts"


def test_s3_multipart_etag_is_not_reported_as_md5(new_bucket, activate, tmp_path):
    import boto3

    bucket = activate(new_bucket("s3"))
    storage = open_storage(bucket.url, MULTIPART)
    random_file(tmp_path / "big.bin", BIG_FILE_BYTES)
    storage.upload(tmp_path / "big.bin", "big.bin")
    name, prefix = bucket.url.removeprefix("s3://").split("/", 1)

    etag = boto3.client("s3").head_object(Bucket=name, Key=f"{prefix}/big.bin")["ETag"]

    assert etag.strip('"').endswith("-3")
    assert storage.list() == [ObjectInfo("big.bin", BIG_FILE_BYTES, None)]


# "gcs-paged" is fake-gcs-server: gcp-storage-emulator ignores maxResults, so it could not show pagination.
@pytest.mark.parametrize("provider", PAGINATING_PROVIDERS)
def test_list_follows_every_page(provider, new_bucket, activate, fault_proxy, tmp_path):
    proxy = fault_proxy(provider) if provider != "file" else None
    bucket = activate(new_bucket(provider, through=proxy))
    storage = open_storage(bucket.url, StorageOptions(list_page_size=10))
    (tmp_path / "small.txt").write_bytes(b"0123456789")
    keys = [f"shards/d{index % 3}/obj{index:02d}.txt" for index in range(25)] + ["other/x.txt"]
    for key in keys:
        storage.upload(tmp_path / "small.txt", key)
    # A sibling of the root prefix ("root-sibling/..." next to "root/...") must not leak into the listing.
    bucket_root = bucket.url.rsplit("/", 1)[0]
    open_storage(bucket_root).upload(tmp_path / "small.txt", "root-sibling/y.txt")
    if proxy is not None:
        proxy.requests.clear()

    listed = storage.list()
    nested = storage.list("shards/d1/")

    assert [info.key for info in listed] == sorted(keys)
    assert all(info.size == 10 for info in listed)
    assert [info.key for info in nested] == sorted(key for key in keys if key.startswith("shards/d1/"))
    if proxy is not None:
        assert proxy.count(method="GET", path_regex=LIST_REQUEST[provider]) == 3 + 1  # 26 keys / 10 + the d1 page


def test_exists_delete_and_nested_download(bucket, tmp_path):
    storage = open_storage(bucket.url)
    (tmp_path / "one.txt").write_bytes(b"one")
    storage.upload(tmp_path / "one.txt", "a/b/one.txt")
    storage.upload(tmp_path / "one.txt", "a/two.txt")

    assert storage.exists("a/b/one.txt") and not storage.exists("a/b/missing.txt")
    storage.download("a/b/one.txt", tmp_path / "deep" / "er" / "one.txt")
    assert (tmp_path / "deep" / "er" / "one.txt").read_bytes() == b"one"

    storage.delete("a/b/one.txt")
    storage.delete("a/b/one.txt")  # deleting a missing key is not an error
    assert not storage.exists("a/b/one.txt")
    assert [info.key for info in storage.list()] == ["a/two.txt"]


def test_download_of_missing_object_names_it(bucket, tmp_path):
    storage = open_storage(bucket.url, MULTIPART)

    with pytest.raises(StorageError, match=r"does not exist|404|Not ?Found") as raised:
        storage.download("no/such.bin", tmp_path / "x.bin")

    assert f"{storage.url}/no/such.bin" in str(raised.value)
    assert not (tmp_path / "x.bin").exists()


def test_checksums_are_normalized(bucket, tmp_path):
    storage = open_storage(bucket.url)
    (tmp_path / "small.bin").write_bytes(b"hello shards")
    storage.upload(tmp_path / "small.bin", "small.bin")

    [info] = storage.list()

    expected = {None, f"crc32c:{bytes_digest(b'hello shards', 'crc32c')}", f"md5:{hashlib.md5(b'hello shards').hexdigest()}"}
    assert info.checksum in expected
    if bucket.provider != "file":
        assert info.checksum is not None, "a single-part upload should carry the store's checksum"


def test_invalid_keys_are_rejected(bucket, tmp_path):
    storage = open_storage(bucket.url)
    (tmp_path / "f").write_bytes(b"x")
    for key in ("", "/abs", "a/../b", "a//b", "./a"):
        with pytest.raises(ValueError, match="invalid object key"):
            storage.upload(tmp_path / "f", key)


def test_open_storage_schemes(tmp_path):
    assert open_storage(str(tmp_path / "plain")).url == str(tmp_path / "plain")
    assert type(open_storage((tmp_path / "x").as_uri())).__name__ == "LocalStorage"
    assert type(open_storage("gs://b/p")).__name__ == "GCSStorage"
    assert type(open_storage("s3://b")).__name__ == "S3Storage"
    assert type(open_storage("az://c/p/q")).__name__ == "AzureStorage"
    with pytest.raises(ValueError, match=r"ftp://host/x.*gs://.*s3://.*az://"):
        open_storage("ftp://host/x")
    with pytest.raises(ValueError, match="names no bucket"):
        open_storage("s3:///prefix")


def test_local_root_is_created_on_demand(tmp_path):
    storage = open_storage((tmp_path / "does" / "not" / "exist").as_uri())
    assert storage.list() == []
    storage.check_writable()
    assert (tmp_path / "does" / "not" / "exist").is_dir()
    assert storage.list() == []


def test_read_range_returns_only_the_requested_bytes(bucket, tmp_path):
    """A shard's header is read without downloading its tokens; a range past the end is cut short, not padded."""
    data = random_file(tmp_path / "obj.bin", 300_000)
    storage = open_storage(bucket.url)
    storage.upload(tmp_path / "obj.bin", "shards/obj.bin")
    assert storage.read_range("shards/obj.bin", 0, 64) == data[:64]
    assert storage.read_range("shards/obj.bin", 123_456, 1000) == data[123_456:124_456]
    assert storage.read_range("shards/obj.bin", 299_990, 1000) == data[299_990:]


def test_download_many_round_trip_with_nested_keys(bucket, tmp_path):
    """Several objects at once, one of them large enough to come down in parallel parts, into nested folders."""
    storage = open_storage(bucket.url, MULTIPART)
    sources = {"ckpt/model.safetensors": random_file(tmp_path / "src" / "model.bin", 6 * MiB + 3),
               "ckpt/state.json": random_file(tmp_path / "src" / "state.json", 100),
               "ckpt/nested/deeper/rng.pt": random_file(tmp_path / "src" / "rng.pt", 1),
               "ckpt/empty.txt": random_file(tmp_path / "src" / "empty.txt", 0)}
    local = dict(zip(sources, ["model.bin", "state.json", "rng.pt", "empty.txt"]))
    storage.upload_many([(tmp_path / "src" / local[key], key) for key in sources], max_workers=3)

    storage.download_many([(key, tmp_path / "out" / key) for key in sources], max_workers=3)

    assert {key: (tmp_path / "out" / key).read_bytes() for key in sources} == sources
    assert sorted(info.key for info in storage.list()) == sorted(sources)
    assert not list((tmp_path / "out").rglob("*.partial")), "temp file left behind"


def test_download_many_names_the_missing_object_and_starts_nothing_after_it(bucket, tmp_path):
    storage = open_storage(bucket.url, MULTIPART)
    (tmp_path / "one.txt").write_bytes(b"one")
    storage.upload_many([(tmp_path / "one.txt", "a/one.txt"), (tmp_path / "one.txt", "a/two.txt")])

    with pytest.raises(StorageError, match=r"does not exist|404|Not ?Found") as raised:
        storage.download_many([("a/missing.bin", tmp_path / "out" / "missing.bin"),
                               ("a/one.txt", tmp_path / "out" / "one.txt"),
                               ("a/two.txt", tmp_path / "out" / "two.txt")], max_workers=1)

    assert f"{storage.url}/a/missing.bin" in str(raised.value)
    assert "2 not started" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_many_transfers_reject_bad_batches_before_moving_anything(tmp_path):
    storage = open_storage((tmp_path / "bucket").as_uri())
    (tmp_path / "f").write_bytes(b"x")
    storage.upload(tmp_path / "f", "k")
    with pytest.raises(ValueError, match="appears twice"):
        storage.download_many([("k", tmp_path / "out" / "f"), ("k", tmp_path / "out" / ".." / "out" / "f")])
    with pytest.raises(ValueError, match="invalid object key"):
        storage.download_many([("k", tmp_path / "out" / "a"), ("../k", tmp_path / "out" / "b")])
    with pytest.raises(ValueError, match="appears twice"):
        storage.upload_many([(tmp_path / "f", "k2"), (tmp_path / "f", "k2")])
    with pytest.raises(ValueError, match="max_workers"):
        storage.download_many([("k", tmp_path / "out" / "a")], max_workers=0)
    assert not (tmp_path / "out").exists()
    assert [info.key for info in storage.list()] == ["k"]
    storage.download_many([])


def test_upload_many_names_the_missing_local_file(bucket, tmp_path):
    storage = open_storage(bucket.url)
    (tmp_path / "present.txt").write_bytes(b"here")

    with pytest.raises(StorageError) as raised:
        storage.upload_many([(tmp_path / "absent.txt", "run/absent.txt"), (tmp_path / "present.txt", "run/p.txt")],
                            max_workers=1)

    assert f"{storage.url}/run/absent.txt" in str(raised.value)
    assert "1 not started" in str(raised.value)
    assert storage.list() == []


@pytest.mark.parametrize("provider", CLOUD_PROVIDERS)
def test_concurrent_downloads_fit_the_connection_pool(provider, new_bucket, activate, tmp_path, caplog):
    """Four objects of three parts each at once: the SDK's HTTP pool must hold every connection, or urllib3
    opens a new one per extra request and logs "Connection pool is full" into the training log."""
    storage = open_storage(activate(new_bucket(provider)).url, MULTIPART)
    keys = [f"ckpt/part{index}.bin" for index in range(4)]
    random_file(tmp_path / "src.bin", 11 * MiB)
    storage.upload_many([(tmp_path / "src.bin", key) for key in keys])

    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        storage.download_many([(key, tmp_path / "out" / key) for key in keys], max_workers=4)

    assert not [record.getMessage() for record in caplog.records if "pool is full" in record.getMessage()]
    assert all((tmp_path / "out" / key).stat().st_size == 11 * MiB for key in keys)
