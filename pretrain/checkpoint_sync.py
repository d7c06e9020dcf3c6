"""Checkpoints in a bucket: the background uploader, remote retention, download, and resolving `--resume`.

The uploader works on complete, immutable local folders: files first, the manifest last, then the
remote sizes and checksums are verified. One upload is in flight at a time; a newer checkpoint that
comes due meanwhile waits as the single pending one (an older pending one is dropped, never piled up).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.checkpoint import (
    MANIFEST,
    NAME_PATTERN,
    TEMP_PREFIX,
    CheckpointError,
    local_checkpoints,
    read_manifest,
    step_of,
    validate_resume_name,
    verify_checkpoint,
)
from pretrain.storage import Storage, StorageError

log = logging.getLogger(__name__)

FILE_ATTEMPTS = 3  # on top of the SDK's own per-request retries, for failures that escape them mid-transfer
LOGS_PREFIX = "logs"


def upload_checkpoint(storage: Storage, folder: Path, retry_backoff_seconds: float = 1.0) -> None:
    """Uploads every file, the manifest last, then checks the remote copy against the manifest."""
    manifest = read_manifest(folder)
    for relative in manifest["files"]:
        _upload_with_retries(storage, folder / relative, f"{folder.name}/{relative}", retry_backoff_seconds)
    _upload_with_retries(storage, folder / MANIFEST, f"{folder.name}/{MANIFEST}", retry_backoff_seconds)
    problem = remote_problem(storage, folder.name, manifest)
    if problem:
        storage.delete(f"{folder.name}/{MANIFEST}")  # an unverifiable copy must not count as a checkpoint
        raise StorageError(problem)


def _upload_with_retries(storage: Storage, path: Path, key: str, backoff: float) -> None:
    for attempt in range(1, FILE_ATTEMPTS + 1):
        try:
            storage.upload(path, key)
            return
        except Exception as error:  # noqa: BLE001 - any transfer failure gets the same bounded retry
            if attempt == FILE_ATTEMPTS:
                raise StorageError(f"{storage.url}/{key}: upload failed after {attempt} attempts: {error}") from error
            log.warning("upload of %s failed (attempt %d/%d): %s; retrying", key, attempt, FILE_ATTEMPTS, error)
            time.sleep(backoff * 2 ** (attempt - 1))


def remote_problem(storage: Storage, name: str, manifest: dict) -> str | None:
    """None when every file of the manifest is in the bucket with the right size (and CRC32C where the store reports it)."""
    remote = {info.key: info for info in storage.list(f"{name}/")}
    for relative, expected in manifest["files"].items():
        info = remote.get(f"{name}/{relative}")
        if info is None:
            return f"{storage.url}/{name}/{relative}: missing after upload"
        if info.size != expected["size"]:
            return f"{storage.url}/{name}/{relative}: {info.size} bytes in the bucket, {expected['size']} expected"
        if info.checksum and info.checksum.startswith("crc32c:") and info.checksum != f"crc32c:{expected['crc32c']}":
            return f"{storage.url}/{name}/{relative}: checksum in the bucket does not match the manifest"
    return None


def remote_checkpoints(storage: Storage) -> list[str]:
    """Names of remote checkpoints that have a manifest, newest step first (contents checked on download)."""
    names = set()
    for info in storage.list(""):
        parts = info.key.split("/")
        if len(parts) == 2 and parts[1] == MANIFEST and NAME_PATTERN.match(parts[0]):
            names.add(parts[0])
    return sorted(names, key=step_of, reverse=True)


def prune_remote(storage: Storage, keep: int) -> list[str]:
    """Keeps the newest `keep` remote checkpoints (keep >= 1, so the newest complete one always stays)."""
    deleted = []
    for name in remote_checkpoints(storage)[max(1, keep):]:
        storage.delete(f"{name}/{MANIFEST}")  # first: from here on it is plainly not a checkpoint
        for info in storage.list(f"{name}/"):
            storage.delete(info.key)
        deleted.append(name)
    return deleted


def download_checkpoint(storage: Storage, name: str, output_dir: Path) -> Path:
    """Downloads into a temp folder, verifies sizes and checksums against the manifest, then renames into place."""
    temp = output_dir / f"{TEMP_PREFIX}download-{name}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    try:
        storage.download(f"{name}/{MANIFEST}", temp / MANIFEST)
        manifest = read_manifest(temp)
        for relative in manifest["files"]:
            storage.download(f"{name}/{relative}", temp / relative)
        problem = verify_checkpoint(temp)
        if problem:
            raise CheckpointError(f"{storage.url}/{name}: {problem.replace(str(temp), 'downloaded copy')}")
        final = output_dir / name
        if final.exists():
            shutil.rmtree(final)  # only reached when the local folder failed verification
        temp.rename(final)
        return final
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def resolve_resume(name: str, output_dir: Path, storage: Storage | None) -> Path:
    """The local folder to resume from: a named checkpoint or the newest complete one, local or remote.

    `latest` skips incomplete or corrupt candidates with a warning naming each; a named checkpoint that
    is corrupt everywhere is an error, never silently replaced by another.
    """
    validate_resume_name(name)
    where = f"{output_dir}" + (f" or {storage.url}" if storage else "")
    if name != "latest":
        return _fetch(name, output_dir, storage, where)
    candidates = {p.name for p in local_checkpoints(output_dir)}
    if storage is not None:
        candidates.update(remote_checkpoints(storage))
    for candidate in sorted(candidates, key=step_of, reverse=True):
        try:
            return _fetch(candidate, output_dir, storage, where)
        except (CheckpointError, FileNotFoundError, StorageError) as error:
            log.warning("skipping %s: %s", candidate, error)
    raise FileNotFoundError(f"--resume latest: no complete checkpoint in {where}; start without --resume")


def _fetch(name: str, output_dir: Path, storage: Storage | None, where: str) -> Path:
    local = output_dir / name
    local_problem = verify_checkpoint(local) if local.exists() else f"{local}: not present locally"
    if local_problem is None:
        return local
    if storage is not None and storage.exists(f"{name}/{MANIFEST}"):
        if local.exists():
            log.warning("%s; downloading it from %s", local_problem, storage.url)
        return download_checkpoint(storage, name, output_dir)
    if local.exists():
        raise CheckpointError(local_problem)
    raise FileNotFoundError(f"--resume {name}: no such checkpoint in {where}")


@dataclass
class UploadReport:
    uploaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # one line each: name and reason


class BackgroundUploader:
    """Uploads checkpoints (and, when idle, the log folder) on one background thread."""

    def __init__(self, storage: Storage, keep_remote: int, retry_backoff_seconds: float = 1.0) -> None:
        self.storage = storage
        self.keep_remote = keep_remote
        self.retry_backoff_seconds = retry_backoff_seconds
        self._condition = threading.Condition()
        self._pending: Path | None = None
        self._in_flight: str | None = None
        self._logs_pending: Path | None = None
        self._syncing_logs = False
        self._report = UploadReport()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="checkpoint-uploader", daemon=True)
        self._thread.start()

    def submit(self, folder: Path) -> None:
        with self._condition:
            if self._in_flight is not None:
                dropped = f"; {self._pending.name} will not be uploaded" if self._pending is not None else ""
                log.warning(
                    "upload of %s still running; %s will go up after it%s", self._in_flight, folder.name, dropped
                )
            self._pending = folder
            self._condition.notify_all()

    def sync_logs(self, run_dir: Path) -> None:
        """Asks for a copy of the log folder; it goes up when no checkpoint is waiting."""
        with self._condition:
            self._logs_pending = run_dir
            self._condition.notify_all()

    def protected(self) -> set[str]:
        """Checkpoint names local retention must not delete yet."""
        with self._condition:
            return {name for name in (self._in_flight, self._pending and self._pending.name) if name}

    def take_report(self) -> UploadReport:
        with self._condition:
            report, self._report = self._report, UploadReport()
            return report

    def busy(self) -> bool:
        with self._condition:
            return self._busy()

    def _busy(self) -> bool:
        return any((self._in_flight, self._pending, self._logs_pending, self._syncing_logs))

    def wait(self, timeout_seconds: float, progress_every_seconds: float = 10.0) -> bool:
        """Blocks until all uploads (and a requested log sync) are done or the timeout passes; prints progress meanwhile."""
        deadline = time.monotonic() + timeout_seconds
        next_report = time.monotonic()
        with self._condition:
            while self._busy():
                now = time.monotonic()
                if now >= deadline:
                    return False
                if now >= next_report:
                    waiting = self._in_flight or (self._pending.name if self._pending else "the log folder")
                    log.info("waiting for upload of %s to %s (%.0f s left)", waiting, self.storage.url, deadline - now)
                    next_report = now + progress_every_seconds
                self._condition.wait(timeout=min(1.0, deadline - now))
        return True

    def close(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout=5)

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and self._pending is None and self._logs_pending is None:
                    self._condition.wait()
                if self._stopping:
                    return
                folder, logs = self._pending, None
                if folder is not None:
                    self._pending, self._in_flight = None, folder.name
                else:
                    logs, self._logs_pending = self._logs_pending, None
                    self._syncing_logs = True
            if folder is not None:
                self._upload(folder)
            else:
                self._upload_logs(logs)

    def _upload(self, folder: Path) -> None:
        started = time.monotonic()
        try:
            upload_checkpoint(self.storage, folder, self.retry_backoff_seconds)
            deleted = prune_remote(self.storage, self.keep_remote)
            log.info(
                "uploaded %s to %s in %.1f s%s", folder.name, self.storage.url, time.monotonic() - started,
                f"; removed old remote {', '.join(deleted)}" if deleted else "",
            )
            outcome = ("uploaded", folder.name)
        except Exception as error:  # noqa: BLE001 - reported on the training thread, never swallowed
            log.error("UPLOAD FAILED for %s to %s: %s", folder.name, self.storage.url, error)
            outcome = ("failed", f"{folder.name}: {error}")
        with self._condition:
            getattr(self._report, outcome[0]).append(outcome[1])
            self._in_flight = None
            self._condition.notify_all()

    def _upload_logs(self, run_dir: Path) -> None:
        try:
            for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
                key = f"{LOGS_PREFIX}/{run_dir.name}/{path.relative_to(run_dir).as_posix()}"
                self.storage.upload(path, key)
        except Exception as error:  # noqa: BLE001 - logs are best effort; checkpoints are what must land
            log.warning("log sync to %s failed: %s", self.storage.url, error)
        with self._condition:
            self._syncing_logs = False
            self._condition.notify_all()

