"""Maps a storage URL to its backend, importing that backend's SDK only when its scheme is used."""

from __future__ import annotations

import importlib

from pretrain.storage.base import Storage, StorageError, StorageOptions
from pretrain.storage.local import LocalStorage

# scheme -> (module, class, pip package that provides its SDK)
_BACKENDS = {
    "file": ("pretrain.storage.local", "LocalStorage", None),
    "gs": ("pretrain.storage.gcs", "GCSStorage", "google-cloud-storage"),
    "s3": ("pretrain.storage.s3", "S3Storage", "boto3"),
    "az": ("pretrain.storage.azure", "AzureStorage", "azure-storage-blob azure-identity"),
}
VALID_URL_FORMS = "file:///absolute/path (or a plain local path), gs://bucket/prefix, s3://bucket/prefix, az://container/prefix"


def open_storage(url: str, options: StorageOptions = StorageOptions()) -> Storage:
    scheme, separator, _ = url.partition("://")
    if not separator:
        return LocalStorage(url, options)
    if scheme.lower() not in _BACKENDS:
        raise ValueError(f"unsupported storage URL {url!r}: use {VALID_URL_FORMS}")
    module_name, class_name, package = _BACKENDS[scheme.lower()]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise StorageError(f"cannot open {url}: its SDK is not installed ({error.name}); pip install {package}") from None
    return getattr(module, class_name)(url, options)


def storage_options(config) -> StorageOptions:
    """The storage settings of a TrainingConfig (its gcs_*, s3_* and storage_* fields)."""
    return StorageOptions(
        gcs_credentials=config.gcs_credentials or None,
        gcp_project=config.gcp_project or None,
        s3_endpoint_url=config.s3_endpoint_url or None,
        max_retries=config.storage_max_retries,
        retry_backoff_seconds=config.storage_retry_backoff_seconds,
    )
