"""Azure Blob Storage through azure-storage-blob; large files go up as parallel blocks and come down as parallel ranges."""

from __future__ import annotations

import os
from pathlib import Path

import requests
from azure.core import exceptions as azure_errors
from azure.storage.blob import BlobServiceClient, ContainerClient, ExponentialRetry
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from pretrain.files import atomic_path
from pretrain.storage.base import (
    CONNECT_TIMEOUT_SECONDS,
    READ_TIMEOUT_SECONDS,
    ObjectInfo,
    Storage,
    StorageError,
    StorageOptions,
    bucket_and_prefix,
    built_once,
    connection_pool_size,
    join_key,
    validate_key,
)
from pretrain.storage.errors import Failure, storage_errors


def classify_azure_error(error: BaseException) -> tuple[Failure, str] | None:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if type(error).__name__ == "CredentialUnavailableError":  # azure.identity is optional: match it by name
        return Failure.NO_CREDENTIALS, "DefaultAzureCredential found none; log in with 'az login' or use a managed identity"
    if isinstance(error, azure_errors.ResourceNotFoundError):
        code = getattr(error, "error_code", None) or ""
        return (Failure.NO_BUCKET if code == "ContainerNotFound" else Failure.NOT_FOUND), code or first_line
    if isinstance(error, azure_errors.ClientAuthenticationError):
        return Failure.DENIED, getattr(error, "error_code", None) or first_line
    if isinstance(error, (azure_errors.ServiceRequestError, azure_errors.ServiceResponseError)):
        return Failure.UNREACHABLE, first_line
    if isinstance(error, azure_errors.HttpResponseError):
        code = getattr(error, "error_code", None) or f"HTTP {error.status_code}"
        return (Failure.DENIED if error.status_code == 403 else Failure.OTHER), f"{code}: {first_line}"
    return None


def retry_policy(options: StorageOptions) -> ExponentialRetry:
    """Waits backoff + (2*backoff)**n (3, 5, 9, 17, 33 s for a 1 s backoff); the SDK default waits ~15 s per fault."""
    backoff = options.retry_backoff_seconds
    return ExponentialRetry(initial_backoff=backoff, increment_base=2 * backoff,
                            retry_total=options.max_retries, random_jitter_range=backoff)


def _pooled_session(options: StorageOptions) -> requests.Session:
    """The session azure-core would build (urllib3 retries off: the retry policy above owns retries), with a pool
    sized for concurrent transfers instead of requests' 10 connections."""
    session = requests.Session()
    size = connection_pool_size(options)
    no_retries = Retry(total=False, redirect=False, raise_on_status=False)
    for scheme in ("https://", "http://"):
        session.mount(scheme, HTTPAdapter(pool_connections=size, pool_maxsize=size, max_retries=no_retries))
    return session


class AzureStorage(Storage):
    def __init__(self, url: str, options: StorageOptions = StorageOptions()) -> None:
        super().__init__(url, options)
        self.container_name, self.prefix = bucket_and_prefix(url)

    @built_once
    def _container(self) -> ContainerClient:
        chunk = self.options.multipart_chunk_bytes
        settings = dict(retry_policy=retry_policy(self.options), max_single_put_size=chunk, max_block_size=chunk,
                        max_single_get_size=chunk, max_chunk_get_size=chunk, session=_pooled_session(self.options),
                        connection_timeout=CONNECT_TIMEOUT_SECONDS, read_timeout=READ_TIMEOUT_SECONDS)
        connection_string = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if connection_string:
            service = BlobServiceClient.from_connection_string(connection_string, **settings)
        else:
            account = os.environ.get("AZURE_STORAGE_ACCOUNT")
            account_url = os.environ.get("AZURE_STORAGE_ACCOUNT_URL") or (
                f"https://{account}.blob.core.windows.net" if account else None)
            if not account_url:
                raise StorageError(f"cannot open {self.url}: set AZURE_STORAGE_CONNECTION_STRING, or "
                                   "AZURE_STORAGE_ACCOUNT (optionally AZURE_STORAGE_ACCOUNT_URL) to sign in with Azure AD")
            from azure.identity import DefaultAzureCredential

            service = BlobServiceClient(account_url, credential=DefaultAzureCredential(), **settings)
        return service.get_container_client(self.container_name)

    def _name(self, key: str) -> str:
        return join_key(self.prefix, validate_key(key))

    def upload(self, local_path: Path, key: str) -> None:
        name = self._name(key)
        with storage_errors("upload to", self.object_url(key), classify_azure_error,
                            not_found=f"container {self.container_name} does not exist"):
            with open(local_path, "rb") as stream:
                self._container.upload_blob(name, stream, length=os.fstat(stream.fileno()).st_size, overwrite=True,
                                            max_concurrency=self.options.max_concurrency)

    def download(self, key: str, local_path: Path) -> None:
        name = self._name(key)
        with storage_errors("download of", self.object_url(key), classify_azure_error):
            with atomic_path(local_path) as temp_path, open(temp_path, "wb") as out:
                self._container.download_blob(name, max_concurrency=self.options.max_concurrency).readinto(out)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        name = self._name(key)
        with storage_errors("read of", self.object_url(key), classify_azure_error):
            return self._container.download_blob(name, offset=start, length=length).readall()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        root = f"{self.prefix}/" if self.prefix else ""
        objects = []
        with storage_errors("listing of", self.url, classify_azure_error,
                            not_found=f"container {self.container_name} does not exist"):
            for blob in self._container.list_blobs(name_starts_with=root + prefix,
                                                   results_per_page=self.options.list_page_size):
                if blob.name.endswith("/"):
                    continue  # a "folder" placeholder, not a file
                md5 = blob.content_settings.content_md5 if blob.content_settings else None
                objects.append(ObjectInfo(key=blob.name[len(root):], size=blob.size,
                                          checksum=f"md5:{bytes(md5).hex()}" if md5 else None))
        return sorted(objects, key=lambda info: info.key)

    def exists(self, key: str) -> bool:
        name = self._name(key)
        with storage_errors("existence check of", self.object_url(key), classify_azure_error):
            return self._container.get_blob_client(name).exists()

    def delete(self, key: str) -> None:
        name = self._name(key)
        with storage_errors("delete of", self.object_url(key), classify_azure_error):
            try:
                self._container.delete_blob(name)
            except azure_errors.ResourceNotFoundError:
                pass
