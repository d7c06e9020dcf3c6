"""The whole life of a checkpoint behind a few calls: resolve `--resume` and load, decide when to save (steps, minutes
or Young-Daly), write and upload in the background, keep the newest few (and the best, and milestones) locally and in
the bucket, roll back to one in-process, count what restarts lose, and turn every failure into one line.

Stages and owners: save (this module: when, and the host snapshot) -> write (worker thread, `format.write_checkpoint`)
-> upload (second worker, `store.upload_checkpoint`) -> list/prune (`store.CheckpointStore` with `retention`, the same
code for the local folder and the bucket) -> resume (`resume()` here, `store.download_checkpoint`,
`format.load_checkpoint`).
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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
from pretrain.checkpoint.lost_time import (
    FIRST_AUTO_INTERVAL_SECONDS,
    PROGRESS_FILE,
    LostTime,
    Progress,
    auto_save_interval,
    restart_cost,
    smoothed,
)
from pretrain.checkpoint.retention import RetentionPolicy, best_record, prune
from pretrain.checkpoint.state_dicts import (
    HostCopies,
    clean_state_dict,
    full_optimizer_state,
    load_full_optimizer_state,
    load_live_model_state,
)
from pretrain.checkpoint.store import (
    CheckpointStore,
    download_checkpoint,
    upload_checkpoint,
)
from pretrain.checkpoint.train_state import TrainState
from pretrain.checkpoint.worker import Job, Worker
from pretrain.distributed import on_local_main, on_main, signalled_ranks
from pretrain.errors import os_reason
from pretrain.files import write_atomically
from pretrain.preemption import Preempted, PreemptionFlag
from pretrain.progress import SAVE, UPLOAD, progress
from pretrain.protocol import launched_unix
from pretrain.storage import StorageError, open_storage, storage_options

log = logging.getLogger(__name__)

RESUME_MODES = ("latest", "auto")
PROGRESS_EVERY_SECONDS = 5.0  # how often the local progress record is rewritten (a 200-byte atomic write)


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
    ema_state: dict[str, torch.Tensor] | None = None
    name: str = ""


class WeightAverage(Protocol):
    """What a save takes besides the model (pretrain.ema.EMA): every rank calls full_state."""

    def full_state(self) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class _Restart:
    resumed_step: int
    resumed_elapsed: float
    previous: Progress | None
    name: str


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
        self.blocked_seconds = 0.0  # how long saves held training up: not training time for tokens/s
        self.last_logs_sync = time.monotonic()
        self.upload_failures = 0
        self.host = HostCopies()
        self.ema_host = HostCopies()  # its own buffers: keyed by path, the EMA would land in the weights' ones
        self.ema: WeightAverage | None = None  # set by the loop when the run keeps an EMA of the weights
        # Runs on every rank before a save is taken: the loop folds the last step's agreed values into the state.
        self.before_save: Callable[[TrainState], None] | None = None
        # Lost time: this process's launch, the run's wall clock before it, and a restart still to be counted.
        self.launched_unix = launched_unix()
        self._wall_base = 0.0
        self._restart: _Restart | None = None
        self._ended_unix: float | None = None
        self._last_progress = 0.0
        self._uploads_measured: list[float] = []  # upload durations, appended by the uploader thread
        self._auto_interval: float | None = None
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
            self._update_auto_interval(LostTime())  # a fresh run's; a resumed run's follows from its checkpoint

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
        resumed, fetched = self._load(name)
        if self.is_main:
            log.info("resuming from %s at step %d (checkpoint fetched in %.1f s, loaded in %.1f s)",
                     self.output_dir / name, resumed.state.step, fetched - started, time.monotonic() - fetched)
        previous = on_main(self.accelerator, self._read_progress)
        self._restart = _Restart(resumed.state.step, resumed.state.elapsed_seconds, previous, name)
        self._wall_base = resumed.state.lost_time.wall_seconds
        if previous is not None and previous.run_name == resumed.state.run_name:
            # The previous run's latest measurements: its last save and upload came after its last checkpoint.
            totals = resumed.state.lost_time
            self._wall_base = max(self._wall_base, previous.wall_seconds)
            totals.save_seconds = previous.save_seconds or totals.save_seconds
            totals.upload_seconds = previous.upload_seconds or totals.upload_seconds
        if self.is_main:
            self._update_auto_interval(resumed.state.lost_time)
        return resumed

    def _load(self, name: str) -> tuple[Resumed, float]:
        """Checkpoint `name` (already local on this node's main process) loaded on every rank; and when it was local."""
        folder = self.output_dir / name

        def fetch_here() -> None:
            if not self.is_main:  # another machine: its own verified copy, downloaded when its disk lacks one
                self._fetch(name)

        # On every machine's first process at once; a failure on any machine is raised on every rank.
        on_local_main(self.accelerator, fetch_here)
        fetched = time.monotonic()
        payload = load_checkpoint(folder)
        self._check_compatible(payload.state)
        self.last_saved_step = payload.state.step
        rank = f"rank{self.accelerator.process_index}"
        return Resumed(payload.state, payload.model_state, payload.optimizer_state,
                       payload.rng_states.get(rank, payload.rng_states["rank0"]), payload.ema_state, name), fetched

    def roll_back(self, before_step: int, model: torch.nn.Module, optimizer) -> Resumed | None:
        """The newest complete checkpoint from before `before_step` (local, else from the bucket), loaded into the live
        model and optimizer and this rank's RNG, in this process; None when there is none. The checkpoints after it
        belong to abandoned steps: they are deleted, here and in the bucket, so that no resume picks one."""
        on_main(self.accelerator, self._wait_for_workers)
        name = on_main(self.accelerator, lambda: self._newest_before(before_step))
        if name is None:
            return None
        on_main(self.accelerator, lambda: self._abandon_after(step_of(name)))
        resumed, _ = self._load(name)
        load_live_model_state(model, resumed.model_state)
        self.restore(resumed, model, optimizer)
        return resumed

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
        """--save-every-minutes; with auto, rank 0's measurements decide (the agreement tells the other ranks)."""
        minutes = self.config.save_interval_minutes()
        if minutes is None:
            if not self.is_main:
                return False
            seconds = self._auto_interval or FIRST_AUTO_INTERVAL_SECONDS
        else:
            seconds = 60 * minutes
        return seconds > 0 and time.monotonic() - self.last_save_time >= seconds

    def write_failed(self) -> bool:
        return self.writer is not None and self.writer.has_failed()

    def step_done(self, state: TrainState, model: torch.nn.Module, optimizer, signals: Signals) -> None:
        """The save policy, after every optimizer step, on agreed signals so every rank takes the same branch."""
        if self._restart is not None:
            self._count_restart(state)
        if signals.write_failed:
            on_main(self.accelerator, self._raise_write_failure)
        if signals.preempted:
            self._ended_unix = time.time()
            self.preemption.agree()  # from here every wait comes out of the grace period, on every machine
            signalled = signalled_ranks(self.accelerator, self.preemption.received)
            self.save(state, model, optimizer, "emergency")
            self.finish(state, ended="preempted")
            raise Preempted(self.preemption.signal_name, signalled)
        if state.step % self.config.save_steps == 0:
            self.save(state, model, optimizer, "scheduled")
        elif signals.save_due:
            self.save(state, model, optimizer, f"{self._interval_words()} since the last save")
        elif self._new_best_worth_saving(state):
            self.save(state, model, optimizer, f"new best eval loss {state.last_eval_loss:.4f}")
        # Only once a checkpoint exists: a restart's losses are counted from the checkpoint it resumes.
        due = time.monotonic() - self._last_progress >= PROGRESS_EVERY_SECONDS
        if self.is_main and due and self.last_saved_step >= 0:
            self._write_progress(state)

    def save_final(self, state: TrainState, model: torch.nn.Module, optimizer, reason: str = "final") -> None:
        """The last save of a run that ends here: from now on the machine only waits (for the write, the upload)."""
        self._ended_unix = time.time()
        self.save(state, model, optimizer, reason)

    def save(self, state: TrainState, model: torch.nn.Module, optimizer, reason: str) -> None:
        """Gathers the full state (a collective under FSDP) and hands a host copy to the writer; returns before disk I/O."""
        if self.last_saved_step == state.step:
            return
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the step's queued work stays training time; the copy below waits for it anyway
        started = time.monotonic()
        if self.before_save is not None:
            self.before_save(state)
        self._note_measurements(state)
        model_state = self.accelerator.get_state_dict(model)
        optimizer_state = full_optimizer_state(model, optimizer.optimizer)
        ema_state = self.ema.full_state() if self.ema is not None else None
        rng_states = gather_object([rng.capture()])
        scaler = self.accelerator.scaler
        state.scaler = scaler.state_dict() if scaler is not None else None

        def hand_over() -> None:
            files = state.data.get("train_files") or len(state.data["train"])  # a mixture's record counts its own
            name = checkpoint_name(state.epoch, state.step, files)
            self._report_uploads()
            self._wait_for_writer()
            # The only copy the training thread waits for; FSDP states arrive gathered into fresh host memory.
            fresh = self.accelerator.distributed_type == DistributedType.FSDP
            model_copy = self.host.copy(clean_state_dict(model_state), fresh)
            optimizer_copy = self.host.copy(optimizer_state, fresh)
            ema_copy = self.ema_host.copy(ema_state, fresh) if ema_state is not None else None
            # The cost of a save as training sees it (what --save-every-minutes auto weighs against preemptions),
            # measured before the state is copied, so that this checkpoint carries it.
            state.lost_time.save_seconds = smoothed(state.lost_time.save_seconds, time.monotonic() - started)
            payload = CheckpointPayload(model_copy, optimizer_copy,
                                        {f"rank{i}": value for i, value in enumerate(rng_states)},
                                        copy.deepcopy(state), ema_copy)
            queued = time.monotonic()
            self.writer.submit(Job(name, lambda: self._write(name, payload, reason, queued)))
            log.info("checkpoint %s handed to the writer (%s, %.2f s)", name, reason, queued - started)
            self._update_auto_interval(state.lost_time)
            self._write_progress(state)
            self._maybe_sync_logs()

        # On rank 0 only, but a failure there (a stuck or failed earlier write) must stop every rank, not just rank 0.
        on_main(self.accelerator, hand_over)
        self.last_saved_step = state.step
        self.last_save_time = time.monotonic()
        self.blocked_seconds += self.last_save_time - started

    def wait_written(self) -> None:
        """Until the newest checkpoint is on disk; a failed write raises on every rank."""
        on_main(self.accelerator, self._wait_for_writer)

    def finish(self, state: TrainState, ended: str = "finished") -> None:
        """Waits for the newest checkpoint on disk and in the bucket; a failure of either ends the run on every rank.
        Then the run's last word (progress.json, here and in the bucket): how far it got and how long the wait took."""
        on_main(self.accelerator, self._wait_for_writer)
        try:
            on_main(self.accelerator, self._check_uploaded)
        finally:
            if self.is_main and self.last_saved_step >= 0:
                lag = time.time() - self._ended_unix if self._ended_unix is not None else 0.0
                self._write_progress(state, ended=ended, upload_lag_seconds=lag)
                self._upload_progress()
                log.info("time lost to restarts and rollbacks so far: %s%s", state.lost_time.describe(),
                         f"; and {lag:.1f} s waiting for the last upload now" if self.remote is not None else "")

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
        prune(self.local, RetentionPolicy.of(self.config), protected)
        log.info("saved %s (%s, written in %.1f s in the background)", folder, reason, time.monotonic() - queued)

    def _upload(self, folder: Path) -> None:
        """On the uploader thread."""
        started = time.monotonic()
        try:
            upload_checkpoint(folder, self.remote, backoff_seconds=self.config.storage_retry_backoff_seconds)
        except Exception as error:
            log.error("UPLOAD FAILED for %s to %s: %s", folder.name, self.remote.url, error)
            raise
        seconds = time.monotonic() - started
        self._uploads_measured.append(seconds)
        deleted = prune(self.remote, RetentionPolicy.of(self.config, remote=True))
        self._upload_progress()
        log.info("uploaded %s to %s in %.1f s%s", folder.name, self.remote.url, seconds,
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
        if self.preemption.requested or self.preemption.agreed:
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
        self._upload_progress()

    def _wait_for_workers(self) -> None:
        """Until the writer and the uploader are idle (bounded): before a rollback deletes what they worked on."""
        self._wait_for_writer()
        if self.uploader is not None and not self.uploader.wait_idle(self.config.upload_timeout_seconds):
            log.error("checkpoint upload still running after %.0f s", self.config.upload_timeout_seconds)
        self._report_uploads()

    def _newest_before(self, step: int) -> str | None:
        candidates = set(self.local.names())
        if self.remote is not None:
            candidates.update(self.remote.names())
        for candidate in sorted((c for c in candidates if step_of(c) < step), key=step_of, reverse=True):
            try:
                return self._fetch(candidate).name
            except (CheckpointError, FileNotFoundError, StorageError) as error:
                log.warning("skipping %s: %s", candidate, error)
        return None

    def _abandon_after(self, step: int) -> None:
        for store in (self.local, self.remote):
            abandoned = [name for name in store.names() if step_of(name) > step] if store is not None else []
            for name in abandoned:
                store.delete(name)
            if abandoned:
                log.info("removed %s from %s: saved after the restored checkpoint, on steps now abandoned",
                         ", ".join(abandoned), store.url)

    def _new_best_worth_saving(self, state: TrainState) -> bool:
        """With --keep-best or --early-stop-patience, an evaluation that beats every earlier one is saved, so the best
        weights exist as a checkpoint to keep and to export."""
        wanted = self.config.keep_best or self.config.early_stop_patience > 0
        loss = state.eval_loss_here
        return wanted and loss is not None and math.isfinite(loss) and state.evals_without_improvement == 0

    def best_checkpoint(self) -> str | None:
        """The local complete checkpoint with the lowest eval loss measured at its step (main process)."""
        best = best_record([stored.record for stored in self.local.describe_all() if stored.complete])
        return best.name if best is not None else None

    def _count_restart(self, state: TrainState) -> None:
        """After this process's first step: what the restart lost, into the run's totals and the log."""
        restart, self._restart = self._restart, None
        cost = restart_cost(restart.resumed_step, restart.resumed_elapsed, state.run_name, restart.previous,
                            self.launched_unix, time.time())
        cost.add_to(state.lost_time)
        if self.is_main:
            log.info("%s", cost.describe(restart.name))

    def _note_measurements(self, state: TrainState) -> None:
        state.saved_unix = time.time()
        state.lost_time.wall_seconds = self._wall_base + (time.time() - self.launched_unix)
        self._fold_uploads(state)

    def _fold_uploads(self, state: TrainState) -> None:
        while self._uploads_measured:
            state.lost_time.upload_seconds = smoothed(state.lost_time.upload_seconds, self._uploads_measured.pop(0))

    def _update_auto_interval(self, lost_time: LostTime) -> None:
        if self.config.save_interval_minutes() is not None:
            return
        seconds, why = auto_save_interval(lost_time)
        if self._auto_interval is None or abs(seconds - self._auto_interval) > 0.1 * self._auto_interval:
            log.info("--save-every-minutes auto: every %.1f min (%s)", seconds / 60, why)
        self._auto_interval = seconds

    def _interval_words(self) -> str:
        minutes = self.config.save_interval_minutes()
        if minutes is None:
            return f"{(self._auto_interval or 0) / 60:.1f} minutes (auto)"
        return f"{minutes:g} minutes"

    def _write_progress(self, state: TrainState, ended: str = "", upload_lag_seconds: float = 0.0) -> None:
        """The run's progress record on local disk (main process): a run killed without a word leaves the latest."""
        self._last_progress = time.monotonic()
        self._fold_uploads(state)
        progress = Progress(state.run_name, state.step, state.elapsed_seconds,
                            self._wall_base + (time.time() - self.launched_unix), time.time(), ended,
                            upload_lag_seconds, state.lost_time.save_seconds, state.lost_time.upload_seconds)
        try:
            write_atomically(self.output_dir / PROGRESS_FILE, progress.to_bytes())
        except OSError as error:
            log.warning("could not write %s: %s", self.output_dir / PROGRESS_FILE, error)

    def _upload_progress(self) -> None:
        """The local progress record to the bucket: after each upload, each log sync and at the end (best effort)."""
        path = self.output_dir / PROGRESS_FILE
        if self.remote is None or not path.is_file():
            return
        try:
            self.remote.storage.upload(path, PROGRESS_FILE)
        except Exception as error:  # noqa: BLE001 - an estimate of lost time must never fail a run
            log.warning("could not upload %s to %s: %s", PROGRESS_FILE, self.remote.url, error)

    def _read_progress(self) -> Progress | None:
        """The previous run's last progress record: the local one (same machine), else the bucket's."""
        path = self.output_dir / PROGRESS_FILE
        if path.is_file():
            return Progress.from_bytes(path.read_bytes())
        if self.remote is None:
            return None
        try:
            if not self.remote.storage.exists(PROGRESS_FILE):
                return None
            self.remote.storage.download(PROGRESS_FILE, path)
            return Progress.from_bytes(path.read_bytes())
        except (StorageError, OSError) as error:
            log.warning("could not read %s from %s: %s", PROGRESS_FILE, self.remote.url, error)
            return None
