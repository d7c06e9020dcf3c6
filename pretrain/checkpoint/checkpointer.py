"""The whole life of a checkpoint behind a few calls: resolve `--resume` and load, decide when to save, write and
upload in the background, keep the newest few locally and in the bucket, and turn every failure into one line.

Stages and owners: save (this module: when, and the host snapshot) -> write (worker thread, `format.write_checkpoint`)
-> upload (second worker, `store.upload_checkpoint`) -> list/prune (`store.CheckpointStore` with `retention`, the same
code for the local folder and the bucket) -> resume (`resume()` here, `store.download_checkpoint`,
`format.load_checkpoint`).
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object

from configs import TrainingConfig
from pretrain.agreement import Signals
from pretrain.checkpoint import rng
from pretrain.checkpoint.format import (
    LOGS_PREFIX,
    NAME_PATTERN,
    TEMP_PREFIX,
    CheckpointError,
    CheckpointPayload,
    checkpoint_name,
    clean_temp_folders,
    load_checkpoint,
    step_of,
    verify_checkpoint,
    write_checkpoint,
)
from pretrain.checkpoint.retention import prune
from pretrain.checkpoint.state_dicts import (
    HostCopies,
    clean_state_dict,
    full_optimizer_state,
    load_full_optimizer_state,
)
from pretrain.checkpoint.store import (
    CheckpointStore,
    download_checkpoint,
    upload_checkpoint,
)
from pretrain.checkpoint.train_state import TrainState
from pretrain.checkpoint.worker import Job, Worker
from pretrain.distributed import on_local_main, on_main
from pretrain.errors import os_reason
from pretrain.preemption import Preempted, PreemptionFlag
from pretrain.progress import SAVE, UPLOAD, progress
from pretrain.storage import StorageError, open_storage, storage_options

log = logging.getLogger(__name__)

RESUME_MODES = ("latest", "auto")


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written to local disk (full, quota, permissions); the last complete one is intact."""


class CheckpointNotUploaded(Exception):
    """The run ended, but its newest checkpoint is only on this machine's disk."""


@dataclass
class Resumed:
    state: TrainState
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    rng_state: dict[str, Any]  # this rank's


class Checkpointer:
    """Rank 0 writes and uploads; every rank takes part in the collectives of a save and learns of every failure."""

    def __init__(self, config: TrainingConfig, accelerator: Accelerator, preemption: PreemptionFlag) -> None:
        self.config = config
        self.accelerator = accelerator
        self.preemption = preemption
        self.is_main = accelerator.is_main_process
        self.output_dir = Path(config.output_dir)
        self.local = CheckpointStore.local(self.output_dir)
        self.remote: CheckpointStore | None = None
        self.writer: Worker | None = None
        self.uploader: Worker | None = None
        self.logs_dir: Path | None = None
        self.last_saved_step = -1
        self.last_save_time = time.monotonic()
        self.last_logs_sync = time.monotonic()
        self.upload_failures = 0
        self.host = HostCopies()
        if config.checkpoint_bucket:
            storage = open_storage(config.checkpoint_bucket, storage_options(config))
            # A tiny write now, so bad credentials fail in the first seconds, not at the first save hours later.
            with progress.phase(UPLOAD, f"write check of {storage.url}"):
                on_main(accelerator, storage.check_writable)
            self.remote = CheckpointStore(storage)
        if self.is_main:
            self.writer = Worker("checkpoint-writer")
            if self.remote is not None:
                self.uploader = Worker("checkpoint-uploader")
            where = f"{self.output_dir}" + (f" and {self.remote.url}" if self.remote else "")
            log.info("checkpoints go to %s", where)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def resume(self) -> Resumed | None:
        """The checkpoint `--resume` names (or None for a fresh run), loaded on every rank, checked against the config."""
        if self.is_main:
            clean_temp_folders(self.output_dir)
        mode = self.config.resume
        if not mode:
            on_main(self.accelerator, self._refuse_existing_checkpoints)
            return None
        started = time.monotonic()
        name = on_main(self.accelerator, lambda: self._resolve(mode))
        if name is None:
            if self.is_main:
                log.info("--resume auto: no checkpoint in %s yet; starting a new run", self._where())
            return None
        folder = self.output_dir / name
        if self.accelerator.is_local_main_process and not self.is_main and not folder.exists():
            self._fetch(name)  # another node without a shared disk fetches its own copy
        self.accelerator.wait_for_everyone()
        fetched = time.monotonic()
        payload = load_checkpoint(folder)
        self._check_compatible(payload.state)
        self.last_saved_step = payload.state.step
        rank = f"rank{self.accelerator.process_index}"
        if self.is_main:
            log.info("resuming from %s at step %d (checkpoint fetched in %.1f s, loaded in %.1f s)",
                     folder, payload.state.step, fetched - started, time.monotonic() - fetched)
        return Resumed(payload.state, payload.model_state, payload.optimizer_state,
                       payload.rng_states.get(rank, payload.rng_states["rank0"]))

    def branch_point(self, location: str) -> Resumed:
        """A cooldown branch's start: another run's checkpoint (a local folder, or a URL of one in a bucket), loaded
        on every rank as a resume loads its own. It must lie outside this run's folder and bucket, which the branch
        keeps to itself; a bucket copy is fetched into a temporary folder on each machine and removed after loading."""
        started = time.monotonic()
        trimmed = location.rstrip("/")
        name = trimmed.rsplit("/", 1)[-1]
        scratch = None
        if "://" in trimmed:
            parent = trimmed[: -len(name)].rstrip("/")
            if self.remote is not None and parent == self.remote.url.rstrip("/"):
                raise ValueError(f"--cooldown-from {location}: that checkpoint is in this run's --checkpoint-bucket; a "
                                 "cooldown branch needs a bucket prefix (and --output-dir) of its own")
            scratch = self.output_dir / f"{TEMP_PREFIX}branch-point"
            source = CheckpointStore(open_storage(parent, storage_options(self.config)))

            def fetch() -> None:
                shutil.rmtree(scratch, ignore_errors=True)
                scratch.mkdir(parents=True)
                download_checkpoint(source, name, scratch)

            on_local_main(self.accelerator, fetch)
            folder = scratch / name
        else:
            folder = Path(trimmed)
            if folder.resolve().parent == self.output_dir.resolve():
                raise ValueError(f"--cooldown-from {location}: that checkpoint is in this run's --output-dir; a "
                                 "cooldown branch needs an --output-dir (and bucket prefix) of its own")
            problem = on_main(self.accelerator, lambda: verify_checkpoint(folder) if folder.is_dir() else
                              f"--cooldown-from {location}: no such checkpoint folder")
            if problem:
                raise CheckpointError(problem)
        payload = load_checkpoint(folder)
        self._check_compatible(payload.state)
        self.accelerator.wait_for_everyone()
        if scratch is not None:
            on_local_main(self.accelerator, lambda: shutil.rmtree(scratch, ignore_errors=True))
        if self.is_main:
            log.info("cooldown branch from %s at step %d (run %s), loaded in %.1f s", location, payload.state.step,
                     payload.state.run_name, time.monotonic() - started)
        rank = f"rank{self.accelerator.process_index}"
        return Resumed(payload.state, payload.model_state, payload.optimizer_state,
                       payload.rng_states.get(rank, payload.rng_states["rank0"]))

    def restore(self, resumed: Resumed, model: torch.nn.Module, optimizer) -> None:
        """After prepare(): optimizer state (each rank keeps its shard under FSDP), loss scaler and this rank's RNG."""
        load_full_optimizer_state(model, optimizer.optimizer, resumed.optimizer_state)
        if resumed.state.scaler and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(resumed.state.scaler)
        rng.restore(resumed.rng_state)

    def sync_logs_from(self, logs_dir: Path) -> None:
        """The run's log folder goes to the bucket every `sync_logs_every_minutes` and at the end."""
        self.logs_dir = logs_dir

    def copy_log_file(self, path: Path) -> None:
        """One file of the run's log folder to the bucket's, now (a stall's stacks, pretrain.watchdog)."""
        self.remote.storage.upload(path, f"{LOGS_PREFIX}/{self.logs_dir.name}/{path.name}")

    def save_due_by_time(self) -> bool:
        every = self.config.save_every_minutes
        return every > 0 and time.monotonic() - self.last_save_time >= 60 * every

    def write_failed(self) -> bool:
        return self.writer is not None and self.writer.has_failed()

    def step_done(self, state: TrainState, model: torch.nn.Module, optimizer, signals: Signals) -> None:
        """The save policy, after every optimizer step, on agreed signals so every rank takes the same branch."""
        if signals.write_failed:
            on_main(self.accelerator, self._raise_write_failure)
        if signals.preempted:
            self.save(state, model, optimizer, "emergency")
            self.finish(state)
            raise Preempted(self.preemption.signal_name or "preemption")
        if state.step % self.config.save_steps == 0:
            self.save(state, model, optimizer, "scheduled")
        elif signals.save_due:
            self.save(state, model, optimizer, f"{self.config.save_every_minutes:g} minutes since the last save")

    def save(self, state: TrainState, model: torch.nn.Module, optimizer, reason: str) -> None:
        """Gathers the full state (a collective under FSDP) and hands a host copy to the writer; returns before disk I/O."""
        if self.last_saved_step == state.step:
            return
        started = time.monotonic()
        model_state = self.accelerator.get_state_dict(model)
        optimizer_state = full_optimizer_state(model, optimizer.optimizer)
        rng_states = gather_object([rng.capture()])
        scaler = self.accelerator.scaler
        state.scaler = scaler.state_dict() if scaler is not None else None

        def hand_over() -> None:
            name = checkpoint_name(state.epoch, state.step, len(state.data["train"]))
            self._report_uploads()
            self._wait_for_writer()
            # The only copy the training thread waits for; FSDP states arrive gathered into fresh host memory.
            fresh = self.accelerator.distributed_type == DistributedType.FSDP
            payload = CheckpointPayload(
                model_state=self.host.copy(clean_state_dict(model_state), fresh),
                optimizer_state=self.host.copy(optimizer_state, fresh),
                rng_states={f"rank{i}": value for i, value in enumerate(rng_states)},
                state=copy.deepcopy(state),
            )
            queued = time.monotonic()
            self.writer.submit(Job(name, lambda: self._write(name, payload, reason, queued)))
            log.info("checkpoint %s handed to the writer (%s, %.2f s)", name, reason, queued - started)
            self._maybe_sync_logs()

        # On rank 0 only, but a failure there (a stuck or failed earlier write) must stop every rank, not just rank 0.
        on_main(self.accelerator, hand_over)
        self.last_saved_step = state.step
        self.last_save_time = time.monotonic()

    def wait_written(self) -> None:
        """Until the newest checkpoint is on disk; a failed write raises on every rank."""
        on_main(self.accelerator, self._wait_for_writer)

    def finish(self, state: TrainState) -> None:
        """Waits for the newest checkpoint on disk and in the bucket; a failure of either ends the run on every rank."""
        on_main(self.accelerator, self._wait_for_writer)
        on_main(self.accelerator, self._check_uploaded)

    def close(self) -> None:
        """Always, also after an error: a snapshot already handed over is a good checkpoint, so it is finished."""
        if self.writer is not None:
            with progress.phase(SAVE, "the checkpoint writer finishing"):
                finished = self.writer.wait_idle(self.config.upload_timeout_seconds)
            if not finished:
                log.error("the checkpoint writer did not finish in %.0f s", self.config.upload_timeout_seconds)
            self.writer.close()
            for name, error in self.writer.take_failures():
                log.error("%s", self._write_failure_message(name, error))
        if self.uploader is not None:
            self._wait_for_uploads()
            self._report_uploads()
            self.uploader.close()

    def _resolve(self, mode: str) -> str | None:
        """The local checkpoint folder name to resume from (fetched from the bucket if needed), or None (auto, none)."""
        if mode not in RESUME_MODES:
            if not NAME_PATTERN.match(mode):
                raise ValueError(f"--resume {mode!r}: use 'auto', 'latest' or a checkpoint folder name like "
                                 "checkpoint-epoch0-step1250-files8 (no '/' or '..')")
            return self._fetch(mode).name
        candidates = set(self.local.names())
        if self.remote is not None:
            candidates.update(self.remote.names())
        for candidate in sorted(candidates, key=step_of, reverse=True):
            try:
                return self._fetch(candidate).name
            except (CheckpointError, FileNotFoundError, StorageError) as error:
                log.warning("skipping %s: %s", candidate, error)
        if mode == "latest":
            raise FileNotFoundError(f"--resume latest: no complete checkpoint in {self._where()}; "
                                    "use --resume auto to start a new run when there is none")
        return None

    def _fetch(self, name: str) -> Path:
        """A verified local copy of checkpoint `name`; a corrupt one is never silently replaced by another."""
        local = self.output_dir / name
        local_problem = verify_checkpoint(local) if local.exists() else f"{local}: not present locally"
        if local_problem is None:
            return local
        if self.remote is not None and name in self.remote.names():
            if local.exists():
                log.warning("%s; downloading it from %s", local_problem, self.remote.url)
            started = time.monotonic()
            folder = download_checkpoint(self.remote, name, self.output_dir)
            size = sum(p.stat().st_size for p in folder.iterdir())
            seconds = time.monotonic() - started
            log.info("downloaded %s (%.0f MB) in %.1f s, %.0f MB/s", name, size / 1e6, seconds, size / 1e6 / max(seconds, 1e-9))
            return folder
        if local.exists():
            raise CheckpointError(local_problem)
        raise FileNotFoundError(f"--resume {name}: no such checkpoint in {self._where()}")

    def _refuse_existing_checkpoints(self) -> None:
        """A fresh run must not mix its checkpoints with (or prune) those of an earlier run in the same place."""
        for store in (self.local, self.remote):
            existing = store.names() if store is not None else []
            if existing:
                raise ValueError(
                    f"{store.url} already holds checkpoints (newest: {existing[0]}); pass --resume auto to continue "
                    "that run, or choose another --output-dir / --checkpoint-bucket for a new one"
                )

    def _check_compatible(self, state: TrainState) -> None:
        if state.seq_len != self.config.seq_len or state.seed != self.config.seed:
            raise ValueError(
                f"--seq-len/--seed ({self.config.seq_len}, {self.config.seed}) differ from the checkpoint's "
                f"({state.seq_len}, {state.seed}); the data order would change: use the checkpoint's values"
            )

    def _where(self) -> str:
        return f"{self.output_dir}" + (f" or {self.remote.url}" if self.remote else "")

    def _wait_for_writer(self) -> None:
        """Until the writer is idle (bounded), then raises what it failed at. Also before a save: one snapshot in host
        memory at a time, so a save that comes due during the previous write waits for it."""
        if self.writer is None:
            return
        waited = time.monotonic()
        with progress.phase(SAVE, f"waiting for the checkpoint write to {self.output_dir}"):  # each file is progress
            idle = self.writer.wait_idle(self.config.upload_timeout_seconds)
        if not idle:
            raise CheckpointWriteError(
                f"the previous checkpoint write to {self.output_dir} did not finish in "
                f"{self.config.upload_timeout_seconds:.0f} s (--upload-timeout-seconds); is the disk stuck?"
            )
        if time.monotonic() - waited > 1.0:
            log.warning("the previous checkpoint was still being written; waited %.1f s", time.monotonic() - waited)
        self._raise_write_failure()

    def _write(self, name: str, payload: CheckpointPayload, reason: str, queued: float) -> None:
        """On the writer thread: the folder, then local retention, then the upload."""
        try:
            folder = write_checkpoint(self.output_dir, name, payload)
        except Exception:
            clean_temp_folders(self.output_dir)
            raise
        if self.uploader is not None:
            dropped = self.uploader.submit(Job(name, lambda: self._upload(folder)), replace=True)
            if dropped is not None and dropped.name != LOGS_PREFIX:
                log.warning("upload of %s still running; %s goes up after it and %s will not be uploaded",
                            self.uploader.busy_with()[0], name, dropped.name)
        protected = {name, *(self.uploader.busy_with() if self.uploader else [])}
        prune(self.local, self.config.save_total_limit, protected)
        log.info("saved %s (%s, written in %.1f s in the background)", folder, reason, time.monotonic() - queued)

    def _upload(self, folder: Path) -> None:
        """On the uploader thread."""
        started = time.monotonic()
        try:
            upload_checkpoint(folder, self.remote, backoff_seconds=self.config.storage_retry_backoff_seconds)
        except Exception as error:
            log.error("UPLOAD FAILED for %s to %s: %s", folder.name, self.remote.url, error)
            raise
        deleted = prune(self.remote, self.config.remote_save_total_limit)
        log.info("uploaded %s to %s in %.1f s%s", folder.name, self.remote.url, time.monotonic() - started,
                 f"; removed old remote {', '.join(deleted)}" if deleted else "")

    def _raise_write_failure(self) -> None:
        failures = self.writer.take_failures() if self.writer is not None else []
        if failures:
            name, error = failures[-1]
            raise CheckpointWriteError(self._write_failure_message(name, error))

    def _write_failure_message(self, name: str, error: BaseException) -> str:
        reason = os_reason(error)
        kept = next(iter(self.local.complete()), None)
        return (f"could not write checkpoint {name} in {self.output_dir}: {reason}; free disk space or fix "
                f"permissions, then --resume auto (the last complete checkpoint, {kept or 'none'}, is intact)")

    def _report_uploads(self) -> None:
        if self.uploader is None:
            return
        for name, error in self.uploader.take_failures():
            self.upload_failures += 1
            log.error("checkpoint upload FAILED: %s: %s (the next checkpoint will still be uploaded)", name, error)

    def _upload_budget(self) -> float:
        """After a preemption signal every wait comes out of the grace period the VM gives."""
        seconds = self.config.upload_timeout_seconds
        if self.preemption.requested:
            return min(seconds, self.preemption.grace_left(self.config.preemption_grace_seconds))
        return seconds

    def _wait_for_uploads(self) -> None:
        if self.uploader is None:
            return
        budget = self._upload_budget()
        busy = ", ".join(self.uploader.busy_with())
        if busy:
            log.info("waiting for the upload of %s to %s (at most %.0f s)", busy, self.remote.url, budget)
        # Each file uploaded is progress (store.upload_checkpoint): the stall watchdog ends a wait that hears of none.
        with progress.phase(UPLOAD, f"waiting for {busy or 'the uploads'} to reach {self.remote.url}"):
            if not self.uploader.wait_idle(budget):
                log.error("checkpoint upload still running after %.0f s", budget)
                return
            if self.logs_dir is not None and self.logs_dir.is_dir():
                self.uploader.submit(Job(LOGS_PREFIX, self._upload_logs), replace=True)
                self.uploader.wait_idle(min(60.0, self._upload_budget()))

    def _check_uploaded(self) -> None:
        """At the end (or the end of the preemption grace): the newest checkpoint must be in the bucket."""
        if self.uploader is None:
            return
        self._wait_for_uploads()
        self._report_uploads()
        newest = next(iter(self.local.complete()), None)
        with progress.phase(UPLOAD, f"listing {self.remote.url}"):
            uploaded = newest is None or newest in self.remote.complete()
        if not uploaded:
            raise CheckpointNotUploaded(
                f"checkpoint {newest} is only on this machine's disk ({self.output_dir}), not in {self.remote.url}: "
                "its upload failed or did not finish (see the errors above); a new VM would resume from an older "
                "checkpoint. Copy it to the bucket, or resume on this machine with --resume auto"
            )

    def _maybe_sync_logs(self) -> None:
        every = self.config.sync_logs_every_minutes
        if self.uploader is None or self.logs_dir is None or every <= 0:
            return
        if time.monotonic() - self.last_logs_sync >= 60 * every and not self.uploader.busy_with():
            try:
                self.uploader.submit(Job(LOGS_PREFIX, self._upload_logs), timeout_seconds=0)
            except TimeoutError:
                return  # a checkpoint upload was queued meanwhile: it goes first, the logs next time
            self.last_logs_sync = time.monotonic()

    def _upload_logs(self) -> None:
        try:
            for path in sorted(p for p in self.logs_dir.rglob("*") if p.is_file()):
                key = f"{LOGS_PREFIX}/{self.logs_dir.name}/{path.relative_to(self.logs_dir).as_posix()}"
                self.remote.storage.upload(path, key)
                progress.advanced(UPLOAD)
        except Exception as error:  # noqa: BLE001 - logs are best effort; checkpoints are what must land
            log.warning("log sync to %s failed: %s", self.remote.url, error)
