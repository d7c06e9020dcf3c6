"""Checkpoint saving off the training thread: the loop hands over a host-memory snapshot and goes on.

A background thread writes the folder atomically (temp, fsync, manifest, rename), applies local retention
and hands the complete folder to the uploader. At most one snapshot is held: a save that comes due while
the previous one is still being written waits for it, so host memory holds one extra copy of the state.
A failed write is kept and raised on the training thread (`raise_if_failed`), never swallowed.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import CheckpointPayload, clean_temp_folders, complete_checkpoints, prune_local, write_checkpoint
from pretrain.checkpoint_sync import BackgroundUploader

log = logging.getLogger(__name__)


def snapshot(state: Any) -> Any:
    """A host-memory copy of every tensor in a nested state, so training can change the originals at once."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True).contiguous()  # contiguous: safetensors requires it
    if isinstance(state, dict):
        return {key: snapshot(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(value) for value in state)
    return state


class BackgroundSaver:
    def __init__(self, output_dir: Path, keep_local: int, uploader: BackgroundUploader | None) -> None:
        self.output_dir = output_dir
        self.keep_local = keep_local
        self.uploader = uploader
        self._condition = threading.Condition()
        self._job: tuple[str, CheckpointPayload, str, float] | None = None
        self._writing = False
        self._error: OSError | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def save(self, name: str, payload: CheckpointPayload, reason: str) -> None:
        """Queues a snapshot (tensors already copied); blocks only while the previous one is still being written."""
        with self._condition:
            waited = time.monotonic()
            while self._job is not None or self._writing:
                self._condition.wait()
            if time.monotonic() - waited > 1.0:
                log.warning("the previous checkpoint was still being written; waited %.1f s", time.monotonic() - waited)
            self._job = (name, payload, reason, time.monotonic())
            self._condition.notify_all()

    def wait_written(self, timeout_seconds: float | None = None) -> bool:
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        with self._condition:
            while self._job is not None or self._writing:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._condition.wait(timeout=left)
        return True

    def has_failed(self) -> bool:
        with self._condition:
            return self._error is not None

    def raise_if_failed(self) -> None:
        with self._condition:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout=5)

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and self._job is None:
                    self._condition.wait()
                if self._job is None:
                    return
                (name, payload, reason, queued_at), self._job = self._job, None
                self._writing = True
            try:
                self._write(name, payload, reason, queued_at)
            finally:
                with self._condition:
                    self._writing = False
                    self._condition.notify_all()

    def _write(self, name: str, payload: CheckpointPayload, reason: str, queued_at: float) -> None:
        try:
            folder = write_checkpoint(self.output_dir, name, payload)
        except OSError as error:
            clean_temp_folders(self.output_dir)
            kept = next((p.name for p in complete_checkpoints(self.output_dir)), None)
            failure = OSError(
                f"could not write checkpoint {name} in {self.output_dir}: {error.strerror or error}; free disk space "
                f"or fix permissions, then --resume latest (the last complete checkpoint, {kept or 'none'}, is intact)"
            )
            log.error("%s", failure)
            with self._condition:
                self._error = failure
            return
        protected = {folder.name}
        if self.uploader is not None:
            self.uploader.submit(folder)
            protected |= self.uploader.protected()
        prune_local(self.output_dir, self.keep_local, protected)
        log.info("saved %s (%s, written in %.1f s in the background)", folder, reason, time.monotonic() - queued_at)
