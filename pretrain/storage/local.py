"""A local folder acting as a bucket (file:///abs/path or a plain path): the embedded default store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

from pretrain.files import atomic_path, is_partial
from pretrain.storage.base import (
    ObjectInfo,
    Storage,
    StorageOptions,
    validate_key,
)
from pretrain.storage.errors import classify_os_error, storage_errors


def local_root(url: str) -> Path:
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URL {url!r} must be file:///absolute/path (no host)")
        return Path(unquote(parsed.path))
    return Path(url).expanduser()


class LocalStorage(Storage):
    def __init__(self, url: str, options: StorageOptions = StorageOptions()) -> None:
        super().__init__(url, options)
        self.root = local_root(url)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def upload(self, local_path: Path, key: str) -> None:
        target = self._path(key)
        with storage_errors("upload of", self.object_url(key), classify_os_error,
                            not_found=f"local file {local_path} does not exist"):
            # Copy-then-rename inside the destination folder, so the object appears whole or not at all.
            with atomic_path(target) as temp_path:
                shutil.copyfile(local_path, temp_path)

    def download(self, key: str, local_path: Path) -> None:
        source = self._path(key)
        with storage_errors("download of", self.object_url(key), classify_os_error, not_found="object does not exist"):
            with atomic_path(local_path) as temp_path:
                shutil.copyfile(source, temp_path)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        with storage_errors("read of", self.object_url(key), classify_os_error, not_found="object does not exist"):
            with open(self._path(key), "rb") as handle:
                handle.seek(start)
                return handle.read(length)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        objects = []
        with storage_errors("listing of", self.url, classify_os_error):
            for folder, _, names in os.walk(self.root):
                for name in names:
                    if is_partial(name):
                        continue  # an upload still being copied in
                    path = Path(folder) / name
                    key = path.relative_to(self.root).as_posix()
                    if key.startswith(prefix):
                        objects.append(ObjectInfo(key=key, size=path.stat().st_size, checksum=None))
        return sorted(objects, key=lambda info: info.key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        with storage_errors("delete of", self.object_url(key), classify_os_error):
            self._path(key).unlink(missing_ok=True)
