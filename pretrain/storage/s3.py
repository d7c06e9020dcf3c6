"""Amazon S3 and S3-compatible stores through boto3, whose transfer manager splits large files into parallel parts."""

from __future__ import annotations

from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore import exceptions as aws_errors
from botocore.config import Config

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

_MISSING_BUCKET_CODES = {"NoSuchBucket"}
_MISSING_OBJECT_CODES = {"NoSuchKey", "404", "NotFound"}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem"}


def classify_s3_error(error: BaseException) -> tuple[Failure, str] | None:
    if isinstance(error, (aws_errors.NoCredentialsError, aws_errors.PartialCredentialsError)):
        return Failure.NO_CREDENTIALS, "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or run with an instance role"
    if isinstance(error, (aws_errors.EndpointConnectionError, aws_errors.ConnectionClosedError,
                          aws_errors.ConnectTimeoutError, aws_errors.ReadTimeoutError)):
        return Failure.UNREACHABLE, str(error)
    if isinstance(error, aws_errors.ClientError):
        details = error.response.get("Error", {})
        code = str(details.get("Code", "")) or str(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        message = details.get("Message") or ""
        if code in _MISSING_BUCKET_CODES:
            return Failure.NO_BUCKET, code
        if code in _MISSING_OBJECT_CODES:
            return Failure.NOT_FOUND, code
        if code in _DENIED_CODES:
            return Failure.DENIED, code
        return Failure.OTHER, f"{code}: {message}" if message else code
    return None


class S3Storage(Storage):
    def __init__(self, url: str, options: StorageOptions = StorageOptions()) -> None:
        super().__init__(url, options)
        self.bucket, self.prefix = bucket_and_prefix(url)

    @built_once
    def _client(self):
        config = Config(
            # "standard" mode retries throttling, 5xx and dropped connections with jittered backoff
            # (50 ms base, 20 s cap, fixed by botocore: retry_backoff_seconds has no knob to map onto here).
            retries={"total_max_attempts": self.options.max_retries + 1, "mode": "standard"},
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            read_timeout=READ_TIMEOUT_SECONDS,
            max_pool_connections=connection_pool_size(self.options),
        )
        # A Session per storage: boto3's default session is not safe to create clients from in several threads.
        return boto3.session.Session().client("s3", endpoint_url=self.options.s3_endpoint_url, config=config)

    @built_once
    def _transfer_config(self) -> TransferConfig:
        chunk = self.options.multipart_chunk_bytes
        return TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk,
                              max_concurrency=self.options.max_concurrency, use_threads=True,
                              num_download_attempts=self.options.max_retries + 1)

    def _name(self, key: str) -> str:
        return join_key(self.prefix, validate_key(key))

    def upload(self, local_path: Path, key: str) -> None:
        name = self._name(key)
        with storage_errors("upload to", self.object_url(key), classify_s3_error):
            self._client.upload_file(str(local_path), self.bucket, name, Config=self._transfer_config)

    def download(self, key: str, local_path: Path) -> None:
        name = self._name(key)
        with storage_errors("download of", self.object_url(key), classify_s3_error):
            with atomic_path(local_path) as temp_path:
                self._client.download_file(self.bucket, name, str(temp_path), Config=self._transfer_config)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        name = self._name(key)
        with storage_errors("read of", self.object_url(key), classify_s3_error):
            response = self._client.get_object(Bucket=self.bucket, Key=name, Range=f"bytes={start}-{start + length - 1}")
            return response["Body"].read()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        root = f"{self.prefix}/" if self.prefix else ""
        objects = []
        with storage_errors("listing of", self.url, classify_s3_error):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root + prefix, PaginationConfig={"PageSize": self.options.list_page_size})
            for page in pages:
                for item in page.get("Contents", []):
                    if item["Key"].endswith("/"):
                        continue  # a console-made "folder" placeholder, not a file
                    objects.append(ObjectInfo(key=item["Key"][len(root):], size=item["Size"],
                                              checksum=_etag_checksum(item.get("ETag"))))
        return sorted(objects, key=lambda info: info.key)

    def exists(self, key: str) -> bool:
        name = self._name(key)
        with storage_errors("existence check of", self.object_url(key), classify_s3_error):
            try:
                self._client.head_object(Bucket=self.bucket, Key=name)
            except aws_errors.ClientError as error:
                if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return False
                raise
        return True

    def delete(self, key: str) -> None:
        name = self._name(key)
        with storage_errors("delete of", self.object_url(key), classify_s3_error):
            self._client.delete_object(Bucket=self.bucket, Key=name)


def _etag_checksum(etag: str | None) -> str | None:
    """An ETag is the content MD5 only for single-part uploads; a multipart one ('<md5 of md5s>-N') is not."""
    if not etag:
        return None
    etag = etag.strip('"')
    return None if "-" in etag else f"md5:{etag}"
