"""The Storage interface every backend implements, with its options, object metadata and error type."""

from __future__ import annotations

import functools
import tempfile
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

# Refused connections fail at once; these bound a silent network (dropped SYNs, stalled reads) per attempt.
CONNECT_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 120.0

WRITE_PROBE_PREFIX = ".write-check-"

# Objects in flight at once in download_many/upload_many; each large one also runs max_concurrency part requests.
DEFAULT_FILE_WORKERS = 4

T = TypeVar("T")


class StorageError(Exception):
    """A storage operation failed; the message is one line, names the URL and never carries credentials."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    checksum: str | None


@dataclass(frozen=True)
class StorageOptions:
    gcs_credentials: str | None = None
    gcp_project: str | None = None
    s3_endpoint_url: str | None = None
    max_retries: int = 5
    retry_backoff_seconds: float = 1.0
    max_concurrency: int = 8
    multipart_chunk_bytes: int = 64 * 1024 * 1024
    # Objects per list request (every store caps it at 1000 or more); tests shrink it to cross page boundaries.
    list_page_size: int = 1000


def write_probe_options(options: StorageOptions) -> StorageOptions:
    """Options for check_writable: a preflight answers in seconds, so it retries once, briefly."""
    return replace(options, max_retries=min(options.max_retries, 1),
                   retry_backoff_seconds=min(options.retry_backoff_seconds, 0.2))


def connection_pool_size(options: StorageOptions) -> int:
    """HTTP connections an SDK client keeps: several objects in flight (download_many, parallel shard downloads)
    each run max_concurrency part requests; a smaller pool opens and discards a connection per extra request."""
    return max(10, DEFAULT_FILE_WORKERS * 2 * options.max_concurrency)


def validate_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"invalid object key {key!r}: use a relative '/'-separated path without '.', '..' or empty parts")
    return key


def bucket_and_prefix(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b/' -> ('bucket', 'a/b')."""
    _, _, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"storage URL {url!r} names no bucket; expected scheme://bucket[/prefix]")
    return bucket, prefix.strip("/")


def join_key(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


def _check_distinct(what: str, values: list[Any]) -> None:
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{what} {value} appears twice in one transfer batch; each must be transferred once")
        seen.add(value)


def built_once(factory: Callable[[Any], T]) -> T:
    """A lazily built, cached attribute (an SDK client) that concurrent first callers build only once."""
    name = factory.__name__

    @functools.wraps(factory)
    def get(self: Any) -> T:
        if name not in self.__dict__:
            with self._build_lock:
                if name not in self.__dict__:
                    self.__dict__[name] = factory(self)
        return self.__dict__[name]

    return property(get)  # type: ignore[return-value]


class Storage(ABC):
    """A bucket (or local folder) under a root prefix; keys are relative to that prefix."""

    url: str

    def __init__(self, url: str, options: StorageOptions) -> None:
        self.url = url
        self.options = options
        self._build_lock = threading.RLock()  # the GCS bucket handle is built from the client

    @abstractmethod
    def upload(self, local_path: Path, key: str) -> None: ...

    @abstractmethod
    def download(self, key: str, local_path: Path) -> None: ...

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of an object (fewer at its end): a shard's header without its tokens."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def download_many(self, pairs: Sequence[tuple[str, Path]], max_workers: int = DEFAULT_FILE_WORKERS) -> None:
        """Downloads (key, local_path) pairs, up to max_workers objects at once, each atomically as download() does.

        On the first failure the objects not yet started are cancelled and the running ones end (each bounded by
        the SDK timeouts and retries); then the StorageError of the object that failed first is raised. On return
        or raise no thread is still writing and no partial file is left; objects that completed stay in place.
        """
        for key, _ in pairs:
            validate_key(key)  # a bad key fails before anything moves
        _check_distinct("local path", [Path(path).resolve() for _, path in pairs])
        self._transfer_many(self.download, list(pairs), max_workers, "download")

    def upload_many(self, pairs: Sequence[tuple[Path, str]], max_workers: int = DEFAULT_FILE_WORKERS) -> None:
        """Uploads (local_path, key) pairs, up to max_workers objects at once; failures end it as in download_many."""
        for _, key in pairs:
            validate_key(key)
        _check_distinct("key", [key for _, key in pairs])
        self._transfer_many(self.upload, list(pairs), max_workers, "upload")

    def _transfer_many(self, transfer: Callable[[Any, Any], None], pairs: list[tuple[Any, Any]], max_workers: int,
                       action: str) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        if not pairs:
            return
        failures: list[BaseException] = []  # in the order they happened; list.append is atomic across threads
        stop = threading.Event()

        def run(first: Any, second: Any) -> bool:
            if stop.is_set():
                return False
            try:
                transfer(first, second)
            except BaseException as error:
                failures.append(error)
                stop.set()  # before this worker takes the next queued transfer
                raise
            return True

        workers = min(max_workers, len(pairs))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"storage-{action}") as pool:
            futures = [pool.submit(run, first, second) for first, second in pairs]
            try:
                # No timeout here: each transfer is bounded by connect/read timeouts and a finite retry policy.
                wait(futures, return_when=FIRST_EXCEPTION)
            finally:
                # After a failure (or an interrupt) queued transfers never start; leaving the `with` joins the
                # running ones, so nothing writes after this method returns.
                stop.set()
                for future in futures:
                    future.cancel()
        if not failures:
            return
        # run() returns False for a transfer it skipped because an earlier one had failed.
        not_started = sum(1 for future in futures
                          if future.cancelled() or (future.exception() is None and not future.result()))
        first = failures[0]
        if not isinstance(first, StorageError):
            raise first
        others = [f"{len(failures) - 1} other {action}(s) failed too" if len(failures) > 1 else "",
                  f"{not_started} not started" if not_started else ""]
        detail = "; ".join(part for part in others if part)
        raise StorageError(f"{first} ({detail})" if detail else str(first)) from None

    def object_url(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"

    def check_writable(self) -> None:
        probe = type(self)(self.url, write_probe_options(self.options))
        key = f"{WRITE_PROBE_PREFIX}{uuid.uuid4().hex}"
        payload = f"write check {key}\n".encode()
        with tempfile.TemporaryDirectory(prefix="storage-write-check-") as scratch:
            sent, received = Path(scratch) / "sent", Path(scratch) / "received"
            sent.write_bytes(payload)
            try:
                probe.upload(sent, key)
                try:
                    probe.download(key, received)
                except StorageError:
                    with suppress(StorageError):
                        probe.delete(key)
                    raise
                probe.delete(key)
            except StorageError as error:
                raise StorageError(f"storage {self.url} is not writable: {error}") from None
            if received.read_bytes() != payload:
                raise StorageError(f"storage {self.url} is not writable: a test object read back different bytes")

