"""Checkpoints in any Storage, the local output folder or a bucket alike: list, check against the manifest, delete,
and the transfers between the two (upload after a save, download for a resume on a new VM)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.checkpoint.format import (
    MANIFEST,
    NAME_PATTERN,
    TEMP_PREFIX,
    CheckpointError,
    read_manifest,
    step_of,
    verify_checkpoint,
)
from pretrain.checkpoint.retention import CheckpointRecord
from pretrain.progress import UPLOAD, progress
from pretrain.storage import ObjectInfo, Storage, StorageError
from pretrain.storage.local import LocalStorage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredCheckpoint:
    """One checkpoint of a store as its manifest and listing describe it (nothing else is read)."""

    name: str
    step: int
    problem: str | None  # None: complete (every file of the manifest stored with its size and, where known, CRC32C)
    size_bytes: int  # what is stored under its name, manifest included
    created_unix: float | None
    eval_loss: float | None  # the eval loss measured at its step, from the manifest's summary

    @property
    def complete(self) -> bool:
        return self.problem is None

    @property
    def record(self) -> CheckpointRecord:
        return CheckpointRecord(self.name, self.step, self.eval_loss)


class CheckpointStore:
    """Checkpoints in one Storage, local folder or bucket alike: list, check against the manifest, prune.

    A listing reports sizes (and CRC32C where the store keeps one), so `problem` is cheap; the full content check of a
    local copy before a resume is `verify_checkpoint`.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    @classmethod
    def local(cls, output_dir: Path) -> CheckpointStore:
        return cls(LocalStorage(str(output_dir)))

    @property
    def url(self) -> str:
        return self.storage.url

    def names(self) -> list[str]:
        """Checkpoints whose manifest is present, newest step first (complete or not: see `complete`)."""
        if isinstance(self.storage, LocalStorage) and not self.storage.root.is_dir():
            return []
        found = set()
        for info in self.storage.list(""):
            parts = info.key.split("/")
            if len(parts) == 2 and parts[1] == MANIFEST and NAME_PATTERN.match(parts[0]):
                found.add(parts[0])
        return sorted(found, key=step_of, reverse=True)

    def read_manifest(self, name: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="manifest-") as scratch:
            self.storage.download(f"{name}/{MANIFEST}", Path(scratch) / MANIFEST)
            return read_manifest(Path(scratch))

    def problem(self, name: str, manifest: dict[str, Any] | None = None) -> str | None:
        """None when every file of the manifest is stored with its size (and CRC32C where the store reports it)."""
        try:
            manifest = manifest or self.read_manifest(name)
        except (CheckpointError, StorageError) as error:
            return str(error)
        return self._problem(name, manifest, {info.key: info for info in self.storage.list(f"{name}/")})

    def describe(self, name: str) -> StoredCheckpoint:
        """The checkpoint's manifest summary, size and completeness: one manifest read and one listing."""
        stored = {info.key: info for info in self.storage.list(f"{name}/")}
        size = sum(info.size for info in stored.values())
        try:
            manifest = self.read_manifest(name)
        except (CheckpointError, StorageError) as error:
            return StoredCheckpoint(name, step_of(name), str(error), size, None, None)
        summary = manifest.get("summary") if isinstance(manifest.get("summary"), dict) else {}
        eval_loss = summary.get("eval_loss")
        return StoredCheckpoint(name, step_of(name), self._problem(name, manifest, stored), size,
                                manifest.get("created_unix"), float(eval_loss) if eval_loss is not None else None)

    def describe_all(self) -> list[StoredCheckpoint]:
        """Every checkpoint with a manifest, newest first."""
        return [self.describe(name) for name in self.names()]

    def _problem(self, name: str, manifest: dict[str, Any], stored: dict[str, ObjectInfo]) -> str | None:
        for relative, expected in manifest["files"].items():
            where = f"{self.storage.object_url(name)}/{relative}"
            info = stored.get(f"{name}/{relative}")
            if info is None:
                return f"{where}: listed in the manifest but missing"
            if info.size != expected["size"]:
                return f"{where}: {info.size} bytes, the manifest says {expected['size']} (truncated or overwritten)"
            if info.checksum and info.checksum.startswith("crc32c:") and info.checksum != f"crc32c:{expected['crc32c']}":
                return f"{where}: checksum does not match the manifest (corrupted)"
        return None

    def complete(self) -> list[str]:
        """Checkpoints that pass `problem`, newest first."""
        return [name for name in self.names() if self.problem(name) is None]

    def delete(self, name: str) -> None:
        """The manifest goes first, so a crash mid-delete leaves something that is plainly not a checkpoint."""
        self.storage.delete(f"{name}/{MANIFEST}")
        for info in self.storage.list(f"{name}/"):
            self.storage.delete(info.key)
        if isinstance(self.storage, LocalStorage):
            shutil.rmtree(self.storage.root / name, ignore_errors=True)  # the emptied folders


def upload_checkpoint(folder: Path, remote: CheckpointStore, attempts: int = 3, backoff_seconds: float = 1.0) -> None:
    """Every file, the manifest last, then the remote copy is checked against the manifest.

    `attempts` per file on top of the SDK's own retries, for failures that escape them mid-transfer.
    """
    manifest = read_manifest(folder)
    for relative in [*manifest["files"], MANIFEST]:
        key = f"{folder.name}/{relative}"
        for attempt in range(1, attempts + 1):
            try:
                remote.storage.upload(folder / relative, key)
                progress.advanced(UPLOAD)  # heard by the stall watchdog while the run waits for this upload
                break
            except Exception as error:  # noqa: BLE001 - any transfer failure gets the same bounded retry
                if attempt == attempts:
                    raise StorageError(f"{remote.storage.object_url(key)}: upload failed after {attempt} attempts: "
                                       f"{error}") from error
                log.warning("upload of %s failed (attempt %d/%d): %s; retrying", key, attempt, attempts, error)
                time.sleep(backoff_seconds * 2 ** (attempt - 1))
    problem = remote.problem(folder.name, manifest)
    if problem:
        remote.storage.delete(f"{folder.name}/{MANIFEST}")  # an unverifiable copy must not count as a checkpoint
        raise StorageError(problem)


def download_checkpoint(remote: CheckpointStore, name: str, output_dir: Path) -> Path:
    """Into a temp folder, verified (sizes and checksums) against the manifest, then renamed into place."""
    temp = output_dir / f"{TEMP_PREFIX}download-{name}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    try:
        remote.storage.download(f"{name}/{MANIFEST}", temp / MANIFEST)
        manifest = read_manifest(temp)
        # Every file at once, each large one in parallel ranged parts: a resume on a new VM waits on this.
        remote.storage.download_many([(f"{name}/{relative}", temp / relative) for relative in manifest["files"]])
        problem = verify_checkpoint(temp)
        if problem:
            raise CheckpointError(f"{remote.storage.object_url(name)}: {problem.replace(str(temp), 'downloaded copy')}")
        final = output_dir / name
        if final.exists():
            shutil.rmtree(final)  # only reached when the local folder failed verification
        temp.rename(final)
        return final
    finally:
        shutil.rmtree(temp, ignore_errors=True)
