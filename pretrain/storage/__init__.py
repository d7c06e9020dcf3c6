"""Object storage for checkpoints and data shards: one Storage interface over a local folder, GCS, S3 and Azure Blob.

This package is the only place that imports the cloud SDKs; each is imported when a URL of its scheme is opened.
"""

from pretrain.storage.base import ObjectInfo, Storage, StorageError, StorageOptions
from pretrain.storage.factory import open_storage, storage_options
from pretrain.storage.redaction import redact

__all__ = ["ObjectInfo", "Storage", "StorageError", "StorageOptions", "open_storage", "redact", "storage_options"]
