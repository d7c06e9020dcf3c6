"""Google Cloud Storage through google-cloud-storage; large files move as parallel XML multipart parts / ranged reads."""

from __future__ import annotations

import base64
from pathlib import Path

import requests
from google.api_core import exceptions as api_errors
from google.api_core.retry import Retry
from google.auth import exceptions as auth_errors
from google.cloud import storage
from google.cloud.storage import transfer_manager
from google.cloud.storage.exceptions import InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY
from google.oauth2 import service_account

from pretrain.files import atomic_path
from pretrain.storage.base import (
    CONNECT_TIMEOUT_SECONDS,
    READ_TIMEOUT_SECONDS,
    ObjectInfo,
    Storage,
    StorageOptions,
    bucket_and_prefix,
    built_once,
    connection_pool_size,
    join_key,
    validate_key,
)
from pretrain.storage.errors import Failure, storage_errors

_TIMEOUT = (CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS)
_MAX_XML_PARTS = 10_000
# The SDK streams a download into the file 8 KiB per Python call (_media's _SINGLE_GET_CHUNK_SIZE): one stream tops
# out near 150 MB/s of client CPU, and parallel ranges fight over the GIL (0.6x of one stream on 2 cores).
# single_shot_download reads each response in one call, so downloads come in parts of this size (or of
# multipart_chunk_bytes, if smaller), each read in one call, max_concurrency at once: about 4x the plain call's MB/s
# on the emulator. The cost is memory: a part in flight is held whole, 8 x 16 MiB per file with the defaults.
_DOWNLOAD_PART_BYTES = 16 * 1024 * 1024


def classify_gcs_error(error: BaseException) -> tuple[Failure, str] | None:
    if isinstance(error, auth_errors.DefaultCredentialsError):
        return Failure.NO_CREDENTIALS, "set GOOGLE_APPLICATION_CREDENTIALS, pass --gcs-credentials, or run on GCP"
    if isinstance(error, auth_errors.RefreshError):
        return Failure.DENIED, f"could not obtain an access token: {error}"
    if isinstance(error, api_errors.NotFound):
        return (Failure.NO_BUCKET if "bucket" in str(error.message).lower() else Failure.NOT_FOUND), str(error.message)
    if isinstance(error, (api_errors.Forbidden, api_errors.Unauthorized)):
        return Failure.DENIED, f"{error.code} {error.message}"
    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return Failure.UNREACHABLE, str(error)
    if isinstance(error, InvalidResponse) and getattr(error, "response", None) is not None:
        status = error.response.status_code
        if status == 404:
            return Failure.NOT_FOUND, f"HTTP {status}"
        if status in (401, 403):
            return Failure.DENIED, f"HTTP {status}"
        return Failure.OTHER, f"HTTP {status} from {error.response.request.method} request"
    if isinstance(error, api_errors.RetryError):
        return None  # its cause, the last attempt's error, says more
    if isinstance(error, api_errors.GoogleAPICallError):
        return Failure.OTHER, f"{error.code} {error.message}"
    return None


def retry_policy(options: StorageOptions) -> Retry | None:
    """api_core retries until a deadline rather than for a count, so max_retries becomes a deadline that fits
    that many doubling, jittered backoffs plus the attempts themselves (64 s for the defaults)."""
    if options.max_retries <= 0:
        return None
    initial = options.retry_backoff_seconds
    return DEFAULT_RETRY.with_delay(initial=initial, maximum=initial * 2 ** (options.max_retries - 1), multiplier=2.0) \
        .with_timeout(initial * 2 ** (options.max_retries + 1))


def _base64_to_hex(value: str | None) -> str | None:
    return base64.b64decode(value).hex() if value else None


class GCSStorage(Storage):
    def __init__(self, url: str, options: StorageOptions = StorageOptions()) -> None:
        super().__init__(url, options)
        self.bucket_name, self.prefix = bucket_and_prefix(url)
        self._retry = retry_policy(options)

    @built_once
    def _client(self) -> storage.Client:
        # With STORAGE_EMULATOR_HOST set and no credentials given, the SDK itself uses anonymous credentials
        # and the project from the environment (Client.__init__), so emulators need no branch here.
        kwargs = {}
        if self.options.gcp_project:
            kwargs["project"] = self.options.gcp_project
        if self.options.gcs_credentials:
            credentials = service_account.Credentials.from_service_account_file(
                self.options.gcs_credentials, scopes=list(storage.Client.SCOPE))
            kwargs["credentials"] = credentials
            kwargs.setdefault("project", credentials.project_id)
        client = storage.Client(**kwargs)
        # The client's session keeps 10 connections; the maintainers' advice for concurrent transfers is to mount
        # a larger pool (python-storage#253). An mTLS adapter, if the session has one, is left as it is.
        size = connection_pool_size(self.options)
        for scheme in ("https://", "http://"):
            if type(client._http.get_adapter(scheme)) is requests.adapters.HTTPAdapter:
                client._http.mount(scheme, requests.adapters.HTTPAdapter(pool_connections=size, pool_maxsize=size))
        return client

    @built_once
    def _bucket(self) -> storage.Bucket:
        return self._client.bucket(self.bucket_name)

    def _name(self, key: str) -> str:
        return join_key(self.prefix, validate_key(key))

    def _part_bytes(self, size: int) -> int:
        return max(self.options.multipart_chunk_bytes, -(-size // _MAX_XML_PARTS))

    def upload(self, local_path: Path, key: str) -> None:
        name = self._name(key)
        with storage_errors("upload to", self.object_url(key), classify_gcs_error,
                            not_found=f"bucket {self.bucket_name} does not exist"):
            size = local_path.stat().st_size
            blob = self._bucket.blob(name)
            if size > self.options.multipart_chunk_bytes:
                # XML multipart upload: parts go up concurrently and each part is CRC32C-checked by the server.
                transfer_manager.upload_chunks_concurrently(
                    str(local_path), blob, chunk_size=self._part_bytes(size), max_workers=self.options.max_concurrency,
                    worker_type=transfer_manager.THREAD, retry=self._retry)
            else:
                blob.upload_from_filename(str(local_path), retry=self._retry, timeout=_TIMEOUT)

    def download(self, key: str, local_path: Path) -> None:
        name = self._name(key)
        with storage_errors("download of", self.object_url(key), classify_gcs_error):
            blob = self._bucket.get_blob(name, retry=self._retry, timeout=_TIMEOUT)
            if blob is None:
                raise api_errors.NotFound("object does not exist")
            part_bytes = min(self.options.multipart_chunk_bytes, _DOWNLOAD_PART_BYTES)
            with atomic_path(local_path) as temp_path:
                if blob.size > part_bytes:
                    # Each part's CRC32C is combined into the object's and checked against the server's.
                    transfer_manager.download_chunks_concurrently(
                        blob, str(temp_path), chunk_size=part_bytes,
                        max_workers=self.options.max_concurrency, worker_type=transfer_manager.THREAD,
                        download_kwargs={"retry": self._retry, "timeout": _TIMEOUT, "single_shot_download": True},
                        crc32c_checksum=blob.crc32c is not None)
                else:
                    blob.download_to_filename(str(temp_path), retry=self._retry, timeout=_TIMEOUT,
                                              single_shot_download=True)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        name = self._name(key)
        with storage_errors("read of", self.object_url(key), classify_gcs_error):
            # `end` is inclusive in the GCS client.
            return self._bucket.blob(name).download_as_bytes(start=start, end=start + length - 1, retry=self._retry,
                                                             timeout=_TIMEOUT)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        root = f"{self.prefix}/" if self.prefix else ""
        objects = []
        with storage_errors("listing of", self.url, classify_gcs_error,
                            not_found=f"bucket {self.bucket_name} does not exist"):
            blobs = self._client.list_blobs(self.bucket_name, prefix=root + prefix,
                                            page_size=self.options.list_page_size, retry=self._retry, timeout=_TIMEOUT)
            for blob in blobs:
                if blob.name.endswith("/"):
                    continue  # a console-made "folder" placeholder, not a file
                if blob.crc32c:
                    checksum = f"crc32c:{_base64_to_hex(blob.crc32c)}"
                elif blob.md5_hash:
                    checksum = f"md5:{_base64_to_hex(blob.md5_hash)}"
                else:
                    checksum = None
                objects.append(ObjectInfo(key=blob.name[len(root):], size=blob.size, checksum=checksum))
        return sorted(objects, key=lambda info: info.key)

    def exists(self, key: str) -> bool:
        name = self._name(key)
        with storage_errors("existence check of", self.object_url(key), classify_gcs_error):
            return self._bucket.blob(name).exists(retry=self._retry, timeout=_TIMEOUT)

    def delete(self, key: str) -> None:
        name = self._name(key)
        with storage_errors("delete of", self.object_url(key), classify_gcs_error):
            try:
                self._bucket.blob(name).delete(retry=self._retry, timeout=_TIMEOUT)
            except api_errors.NotFound:
                pass
