"""The training loop and the wiring around it: set-up, resume, step, evaluate, checkpoint, export.

One outer iteration per optimizer step, an inner loop over micro-batches. The training position is
the number of global samples consumed; the data order is a pure function of it, so resume needs no
iterator state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import accelerate
import numpy
import safetensors
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed

from configs import TrainingConfig, as_dict
from pretrain import rng
from pretrain.checkpoint import (
    CheckpointPayload,
    checkpoint_name,
    clean_temp_folders,
    complete_checkpoints,
    load_checkpoint,
)
from pretrain.checkpoint_sync import BackgroundUploader, remote_checkpoints, resolve_resume
from pretrain.data import TokenSamples, make_eval_batches, make_train_loader
from pretrain.download import download_shards
from pretrain.metrics import Metrics, ThroughputModel
from pretrain.model import build_model, count_parameters, describe, flops_per_token, peak_flops_per_device
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.preemption import PreemptionFlag
from pretrain.sample_data import generate_sample_data
from pretrain.saver import BackgroundSaver, snapshot
from pretrain.shards import ShardInfo, discover_shards, inspect_shards, split_eval_shards, verify_frozen_shards
from pretrain.state_dicts import clean_state_dict, full_optimizer_state, load_full_optimizer_state, load_model_state
from pretrain.distributed import on_main
from pretrain.storage import Storage, open_storage, storage_options

log = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1
EXPORT_DIR_NAME = "final-model"


class Preempted(Exception):
    """Raised after the emergency checkpoint is written; the entry point turns it into exit code 75."""


class NonFiniteLoss(Exception):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class Position:
    step: int = 0
    samples_consumed: int = 0


def effective_mixed_precision(config: TrainingConfig, cuda: bool) -> str:
    if not cuda:
        return config.mixed_precision if config.cpu_mixed_precision else "no"
    # including_emulation=False: pre-Ampere GPUs "support" bf16 only by slow emulation.
    if config.mixed_precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        log.warning("this GPU has no bf16; training in fp16 with a loss scaler")
        return "fp16"
    return config.mixed_precision


def make_accelerator(config: TrainingConfig) -> Accelerator:
    cuda = torch.cuda.is_available()
    # cpu=True matters: without it a CPU-only multi-process launch gives independent runs with no all-reduce.
    return Accelerator(
        cpu=not cuda,
        mixed_precision=effective_mixed_precision(config, cuda),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,
    )


def library_versions() -> dict[str, str]:
    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "numpy": numpy.__version__, "safetensors": safetensors.__version__,
    }


def plan_lines(config: TrainingConfig, num_processes: int, model: torch.nn.Module) -> list[str]:
    size = count_parameters(model)
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * num_processes
    tokens = per_step * config.seq_len
    return [
        f"model: GPT-NeoX {describe(size)}",
        f"batch: {config.per_device_train_batch_size} per device x {config.gradient_accumulation_steps} accumulation x "
        f"{num_processes} processes x {config.seq_len} tokens = {tokens:,} tokens per optimizer step",
        f"schedule: {config.max_steps:,} steps ({config.max_steps * tokens / 1e9:.2f} B tokens), warmup "
        f"{config.warmup_steps}, cosine to {config.min_learning_rate_ratio:g} x {config.learning_rate:g} at step "
        f"{config.effective_lr_decay_steps():,}",
        f"training FLOPs: {flops_per_token(size, config.model, config.seq_len) / 1e9:.2f} GFLOP per token",
    ]


class Trainer:
    """Owns the objects of one run. `run()` returns normally at the end, or raises Preempted / NonFiniteLoss."""

    def __init__(self, config: TrainingConfig, preemption: PreemptionFlag) -> None:
        self.config = config
        self.preemption = preemption
        self.accelerator = make_accelerator(config)
        self.is_main = self.accelerator.is_main_process
        self.output_dir = Path(config.output_dir)
        self.storage: Storage | None = None
        self.uploader: BackgroundUploader | None = None
        self.saver: BackgroundSaver | None = None
        self.upload_failures = 0
        self.position = Position()
        self.consecutive_nonfinite = 0
        self.nonfinite_total = 0
        self.last_save_time = time.monotonic()
        self.last_log_sync_time = time.monotonic()
        self.last_saved_step = -1
        self.elapsed_before = 0.0
        self.best_eval_loss = math.inf

    def log(self, message: str) -> None:
        if self.is_main:
            log.info(message)

    def run(self) -> None:
        try:
            self._set_up()
            self._train()
        finally:
            self._tear_down()  # also after a failed set-up: threads and the process group must not outlive the run

    # Set-up ---------------------------------------------------------------------------------------

    def _set_up(self) -> None:
        config, accelerator = self.config, self.accelerator
        set_seed(config.seed)
        self._open_checkpoint_bucket()
        resumed = self._load_resume_payload()
        self._start_saver()
        self._prepare_data(resumed)
        self.model = build_model(config.model)
        if resumed is not None:
            load_model_state(self.model, resumed.model_state)
        self.model_size = count_parameters(self.model)  # before prepare(): FSDP leaves each rank only its shard
        self.log("\n".join(plan_lines(config, accelerator.num_processes, self.model)))
        self.optimizer = build_optimizer(self.model, config)
        self.model, self.optimizer = accelerator.prepare(self.model, self.optimizer)
        self.scheduler = build_scheduler(self.optimizer.optimizer, config)
        if config.compile_model:
            self.model = _compile(self.model)
        if resumed is not None:
            self._restore(resumed)
        self.metrics = self._make_metrics()
        self._start_time = time.monotonic()

    def _open_checkpoint_bucket(self) -> None:
        if not self.config.checkpoint_bucket:
            return
        self.storage = open_storage(self.config.checkpoint_bucket, storage_options(self.config))
        # A tiny write now, so bad credentials fail in the first seconds, not at the first save hours later.
        on_main(self.accelerator, self.storage.check_writable)
        if self.is_main:
            self.uploader = BackgroundUploader(
                self.storage, self.config.remote_save_total_limit, self.config.storage_retry_backoff_seconds
            )
            self.log(f"checkpoints go to {self.output_dir} and {self.storage.url}")

    def _start_saver(self) -> None:
        if self.is_main:
            self.saver = BackgroundSaver(self.output_dir, self.config.save_total_limit, self.uploader)

    def _load_resume_payload(self) -> CheckpointPayload | None:
        config, accelerator = self.config, self.accelerator
        if self.is_main:
            clean_temp_folders(self.output_dir)
        if not config.resume:
            on_main(accelerator, self._refuse_existing_checkpoints)
            return None
        name = on_main(accelerator, lambda: resolve_resume(config.resume, self.output_dir, self.storage).name)
        folder = self.output_dir / name
        if accelerator.is_local_main_process and not self.is_main and not folder.exists():
            # Another node without a shared disk fetches its own copy.
            resolve_resume(name, self.output_dir, self.storage)
        accelerator.wait_for_everyone()
        self.log(f"resuming from {folder}")
        return load_checkpoint(folder)

    def _refuse_existing_checkpoints(self) -> None:
        """A fresh run must not mix its checkpoints with (or prune) those of an earlier run in the same place."""
        existing = [p.name for p in complete_checkpoints(self.output_dir)]
        where = str(self.output_dir)
        if not existing and self.storage is not None:
            existing, where = remote_checkpoints(self.storage), self.storage.url
        if existing:
            raise ValueError(
                f"{where} already holds checkpoints (newest: {existing[0]}); pass --resume latest to continue that run, "
                "or choose another --output-dir / --checkpoint-bucket for a new one"
            )

    def _prepare_data(self, resumed: CheckpointPayload | None) -> None:
        config, accelerator = self.config, self.accelerator
        data_dir = Path(config.data_dir)
        if resumed is not None:
            state = resumed.trainer_state
            train = [ShardInfo.from_dict(d) for d in state["shards"]["train"]]
            evaluation = [ShardInfo.from_dict(d) for d in state["shards"]["eval"]]
            if state["seq_len"] != config.seq_len or state["seed"] != config.seed:
                raise ValueError(
                    f"--seq-len/--seed differ from the checkpoint's ({state['seq_len']}, {state['seed']}); "
                    "the data order would change: use the checkpoint's values"
                )
            verify_frozen_shards(data_dir, train + evaluation)
        else:
            train, evaluation = on_main(accelerator, lambda: self._fetch_and_inspect_data(data_dir))
        self.train_shards, self.eval_shards = train, evaluation
        self.train_data = TokenSamples(data_dir, train, config.seq_len, config.seed)
        self.eval_data = TokenSamples(data_dir, evaluation, config.seq_len, config.seed) if evaluation else None
        self.log(
            f"data: {len(train)} training shards ({self.train_data.samples_per_epoch:,} samples of {config.seq_len} "
            f"tokens per epoch), {len(evaluation)} held out for evaluation"
        )

    def _fetch_and_inspect_data(self, data_dir: Path) -> tuple[list[ShardInfo], list[ShardInfo]]:
        """Main process only (shards are validated once, before step 1); multi-node runs share the data folder."""
        config = self.config
        if config.data_bucket:
            source = open_storage(config.data_bucket, storage_options(config))
            download_shards(source, data_dir, max_files=config.max_files or None, progress=self.is_main)
        has_shards = data_dir.is_dir() and any(data_dir.rglob("*.npz"))
        if config.generate_sample_data and not has_shards:
            self.log(f"{data_dir} has no shards: writing the synthetic sample corpus there")
            generate_sample_data(data_dir, vocab_size=config.model.vocab_size, seed=config.seed)
        rel_paths = discover_shards(data_dir, config.max_files or None)
        shards = inspect_shards(data_dir, rel_paths, config.seq_len, config.model.vocab_size)
        return split_eval_shards(shards, config.eval_shards)

    def _restore(self, resumed: CheckpointPayload) -> None:
        state = resumed.trainer_state
        load_full_optimizer_state(self.model, self.optimizer.optimizer, resumed.optimizer_state)
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.position = Position(state["step"], state["samples_consumed"])
        if state.get("global_batch_samples", self.global_batch_samples) != self.global_batch_samples:
            log.warning(
                "the global batch changes from %d to %d samples per step on resume (the sample order stays the same); "
                "adjust --gradient-accumulation-steps to keep it", state["global_batch_samples"], self.global_batch_samples,
            )
        self.last_saved_step = state["step"]
        self.elapsed_before = state.get("elapsed_seconds", 0.0)
        self.best_eval_loss = state.get("best_eval_loss") or math.inf
        self.nonfinite_total = state.get("nonfinite_steps", 0)
        self.run_name = state["run_name"]
        self.wandb_run_id = state.get("wandb_run_id")
        self.history = state.get("history", [])
        rank_key = f"rank{self.accelerator.process_index}"
        rng.restore(resumed.rng_states.get(rank_key, resumed.rng_states["rank0"]))

    def _make_metrics(self) -> Metrics:
        config, accelerator = self.config, self.accelerator
        if not hasattr(self, "run_name"):
            names = [config.run_name or f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"]
            self.run_name = broadcast_object_list(names)[0]
            self.wandb_run_id = uuid.uuid4().hex[:12] if config.wandb else None
            self.history = []
        self.run_dir = Path(config.logging_dir) / self.run_name
        size = self.model_size
        tokens_per_step = self.global_batch_samples * config.seq_len
        peak = peak_flops_per_device(accelerator.device, config.peak_tflops_per_device)
        throughput = ThroughputModel(
            tokens_per_step=tokens_per_step,
            flops_per_token=flops_per_token(size, config.model, config.seq_len),
            peak_flops_total=peak * accelerator.num_processes if peak else None,
        )
        wandb_settings = None
        if config.wandb:
            wandb_settings = {
                "project": config.wandb_project, "run_id": self.wandb_run_id or uuid.uuid4().hex[:12],
                "name": self.run_name, "mode": config.wandb_mode, "config": as_dict(config),
            }
        metrics = Metrics(self.run_dir, self.is_main, config.logging_steps, config.max_steps, self.position.step,
                          throughput, wandb_settings)
        metrics.history = list(self.history)
        self.log(f"logs: {self.run_dir} (tensorboard --logdir {config.logging_dir})")
        return metrics

    @property
    def global_batch_samples(self) -> int:
        c = self.config
        return c.per_device_train_batch_size * c.gradient_accumulation_steps * self.accelerator.num_processes

    # The loop -------------------------------------------------------------------------------------

    def _train(self) -> None:
        config, accelerator = self.config, self.accelerator
        loader = make_train_loader(
            self.train_data, self.position.samples_consumed, config.per_device_train_batch_size,
            accelerator.process_index, accelerator.num_processes, config.dataloader_num_workers,
            pin_memory=accelerator.device.type == "cuda",
        )
        batches = iter(loader)
        self.model.train()
        if self.position.step >= config.max_steps:
            self.log(f"already at step {self.position.step} (--max-steps {config.max_steps}): nothing to train")
        self.metrics.start_window(self.position.step)
        while self.position.step < config.max_steps:
            loss_sum = self._optimizer_step(batches)
            self.position.step += 1
            self.position.samples_consumed += self.global_batch_samples
            self._log_step(loss_sum)
            self._maybe_evaluate()
            preempted, time_due, save_failed = self._agree_on_flags()
            if save_failed:
                on_main(accelerator, self.saver.raise_if_failed)
            if preempted:
                self._save("emergency")
                self._finish_writes()
                raise Preempted(self.preemption.signal_name or "preemption")
            self._maybe_save(time_due)
        if self.last_saved_step != self.position.step:
            self._save("final")
        self._finish_writes()
        self._export()

    def _finish_writes(self) -> None:
        """Waits until every handed-over checkpoint is on disk; a failed write stops the run here on every rank."""
        def wait_and_check() -> None:
            self.saver.wait_written()
            self.saver.raise_if_failed()

        on_main(self.accelerator, wait_and_check)

    def _optimizer_step(self, batches) -> torch.Tensor:
        config, accelerator, model = self.config, self.accelerator, self.model
        loss_sum = torch.zeros((), device=accelerator.device)
        for _micro_step in range(config.gradient_accumulation_steps):
            input_ids = next(batches).to(accelerator.device, non_blocking=True)
            with accelerator.accumulate(model):
                loss = model(input_ids=input_ids, labels=input_ids).loss
                accelerator.backward(loss)
            loss_sum += loss.detach()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or math.inf)
        # One host sync per step: the price of never applying a NaN/inf update to the weights.
        finite = bool(torch.isfinite(grad_norm).item() and torch.isfinite(loss_sum).item())
        if finite:
            self.optimizer.step()
            skipped = accelerator.optimizer_step_was_skipped  # fp16 scaler overflow
        else:
            skipped = True
        with warnings.catch_warnings():
            # The schedule follows the step count even when an update is skipped; torch warns about exactly that.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._count_nonfinite(skipped)
        self._last_grad_norm = grad_norm
        return loss_sum

    def _count_nonfinite(self, skipped: bool) -> None:
        if not skipped:
            self.consecutive_nonfinite = 0
            return
        self.consecutive_nonfinite += 1
        self.nonfinite_total += 1
        self.log(f"step {self.position.step + 1}: non-finite loss or gradient, update skipped "
                 f"({self.consecutive_nonfinite} in a row)")
        if self.consecutive_nonfinite >= self.config.max_consecutive_nonfinite:
            raise NonFiniteLoss(
                f"{self.consecutive_nonfinite} optimizer steps in a row had a non-finite loss or gradient "
                f"(--max-consecutive-nonfinite {self.config.max_consecutive_nonfinite}); stopping. The last good "
                "checkpoint is kept: lower --learning-rate or check the data, then --resume latest"
            )

    def _log_step(self, loss_sum: torch.Tensor) -> None:
        step = self.position.step
        values = self.metrics.end_step(step, loss_sum, self.config.gradient_accumulation_steps, self.accelerator)
        if values is None:
            return
        values["train/lr"] = self._lr_of_step(step)
        values["train/grad_norm"] = float(self._last_grad_norm)
        values["train/nonfinite_steps"] = float(self.nonfinite_total)
        values["train/epoch"] = self.position.samples_consumed / self.train_data.samples_per_epoch
        values["time/elapsed_seconds"] = self.elapsed_before + time.monotonic() - self._start_time
        if self.uploader is not None:
            values["checkpoint/upload_failures"] = float(self.upload_failures)
        self.metrics.publish(step, values)

    def _lr_of_step(self, step: int) -> float:
        """The rate used by optimizer step `step` (1-based), which is what was applied, not the next one."""
        return self.config.learning_rate * self.scheduler.lr_lambdas[0](step - 1)

    def _agree_on_flags(self) -> tuple[bool, bool, bool]:
        """(preempted, time-based save due, a background write failed), agreed by all processes.

        A collective of a few bytes per step when there is more than one process, and one host sync.
        """
        time_due = (
            self.config.save_every_minutes > 0
            and time.monotonic() - self.last_save_time >= 60 * self.config.save_every_minutes
        )
        save_failed = self.saver is not None and self.saver.has_failed()
        flags = torch.tensor([int(self.preemption.requested), int(time_due), int(save_failed)],
                             device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        preempted, due, failed = (bool(value) for value in flags.tolist())
        return preempted, due, failed

    # Evaluation, checkpoints, export ----------------------------------------------------------------

    def _maybe_evaluate(self) -> None:
        """Every eval_steps, and always after the last step (before its checkpoint, so best_eval_loss includes it)."""
        step = self.position.step
        if step == self.config.max_steps or (self.config.eval_steps and step % self.config.eval_steps == 0):
            self._evaluate()

    def _evaluate(self) -> None:
        if self.eval_data is None:
            return
        config, accelerator = self.config, self.accelerator
        self.model.eval()
        total = torch.zeros((), device=accelerator.device)
        count = 0
        with torch.no_grad():
            for input_ids in make_eval_batches(self.eval_data, config.per_device_train_batch_size,
                                               accelerator.process_index, accelerator.num_processes, config.eval_batches):
                input_ids = input_ids.to(accelerator.device)
                total += self.model(input_ids=input_ids, labels=input_ids).loss.detach()
                count += 1
        self.model.train()
        loss = accelerator.reduce(total / count, reduction="mean").item()
        self.best_eval_loss = min(self.best_eval_loss, loss)
        self.metrics.publish(self.position.step, {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))})
        self.metrics.start_window(self.position.step)

    def _maybe_save(self, time_due: bool) -> None:
        if self.position.step % self.config.save_steps == 0:
            self._save("scheduled")
        elif time_due:
            self._save(f"{self.config.save_every_minutes:g} minutes since the last save")

    def _save(self, reason: str) -> None:
        accelerator = self.accelerator
        started = time.monotonic()
        model_state = accelerator.get_state_dict(self.model)  # gathers the full state under FSDP
        optimizer_state = full_optimizer_state(self.model, self.optimizer.optimizer)  # a collective under FSDP
        rng_states = gather_object([rng.capture()])
        epoch = self.train_data.order.epoch_of(self.position.samples_consumed)
        name = checkpoint_name(epoch, self.position.step, len(self.train_shards))
        def hand_over() -> None:
            # The only part the training thread waits for: a host-memory copy of the state.
            payload = CheckpointPayload(
                model_state=snapshot(clean_state_dict(model_state)),
                optimizer_state=snapshot(optimizer_state),
                rng_states={f"rank{i}": state for i, state in enumerate(rng_states)},
                trainer_state=self._trainer_state(),
            )
            self._report_uploads()
            self.saver.save(name, payload, reason)
            self.metrics.console(f"checkpoint {name} handed to the writer ({reason}, {time.monotonic() - started:.2f} s)")
            self.metrics.flush()
            self._maybe_sync_logs()

        on_main(accelerator, hand_over)
        self.last_saved_step = self.position.step
        self.last_save_time = time.monotonic()
        self.metrics.start_window(self.position.step)

    def _trainer_state(self) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {
            "format_version": STATE_FORMAT_VERSION,
            "step": self.position.step,
            "samples_consumed": self.position.samples_consumed,
            "epoch": self.train_data.order.epoch_of(self.position.samples_consumed),
            "seed": self.config.seed,
            "seq_len": self.config.seq_len,
            "num_processes": self.accelerator.num_processes,
            "global_batch_samples": self.global_batch_samples,
            "shards": {"train": [s.to_dict() for s in self.train_shards], "eval": [s.to_dict() for s in self.eval_shards]},
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "best_eval_loss": self.best_eval_loss if math.isfinite(self.best_eval_loss) else None,
            "nonfinite_steps": self.nonfinite_total,
            "history": self.metrics.history,
            "run_name": self.run_name,
            "wandb_run_id": self.wandb_run_id,
            "elapsed_seconds": self.elapsed_before + time.monotonic() - self._start_time,
            "config": as_dict(self.config),
            "versions": library_versions(),
        }

    def _report_uploads(self) -> None:
        if self.uploader is None:
            return
        report = self.uploader.take_report()
        self.upload_failures += len(report.failed)
        for failure in report.failed:
            log.error("checkpoint upload FAILED: %s (the next checkpoint will still be uploaded)", failure)

    def _maybe_sync_logs(self) -> None:
        every = self.config.sync_logs_every_minutes
        if self.uploader is not None and every > 0 and time.monotonic() - self.last_log_sync_time >= 60 * every:
            self.uploader.sync_logs(self.run_dir)
            self.last_log_sync_time = time.monotonic()

    def _export(self) -> None:
        """save_pretrained of the unwrapped model: loadable with AutoModelForCausalLM.from_pretrained."""
        if not self.config.export_final_model:
            return
        state = self.accelerator.get_state_dict(self.model)
        if self.is_main:
            final = self.output_dir / EXPORT_DIR_NAME
            temp = self.output_dir / f".tmp-{EXPORT_DIR_NAME}-{os.getpid()}"
            shutil.rmtree(temp, ignore_errors=True)
            unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            with _quiet_transformers():
                unwrapped.save_pretrained(temp, state_dict=snapshot(clean_state_dict(state)))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(temp, final)
            self.metrics.console(f"exported the final model to {final}")
        self.accelerator.wait_for_everyone()

    def _upload_budget(self, seconds: float) -> float:
        """After a preemption signal every wait comes out of the grace period the VM gives."""
        if self.preemption.requested:
            return min(seconds, self.preemption.grace_left(self.config.preemption_grace_seconds))
        return seconds

    def _tear_down(self) -> None:
        if self.saver is not None:
            # Also after an error: a snapshot already handed over is a good checkpoint and is finished.
            self.saver.wait_written(self.config.upload_timeout_seconds)
            self.saver.close()
        if self.uploader is not None:
            if self.uploader.busy():
                timeout = self._upload_budget(self.config.upload_timeout_seconds)
                if not self.uploader.wait(timeout):
                    log.error("checkpoint upload still running after %.0f s; the local checkpoint is complete "
                              "and will be used by --resume latest on this machine", timeout)
            if hasattr(self, "run_dir"):
                self.uploader.sync_logs(self.run_dir)
                self.uploader.wait(self._upload_budget(min(60.0, self.config.upload_timeout_seconds)))
            self._report_uploads()
            self.uploader.close()
        if hasattr(self, "metrics"):
            self.metrics.close()
        self.accelerator.end_training()


@contextlib.contextmanager
def _quiet_transformers():
    """save_pretrained draws its own progress bar, which would break our one-line-per-event console."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def _compile(model: torch.nn.Module) -> torch.nn.Module:
    """After prepare(), as Accelerate does; a failure to compile is a warning, not a dead run."""
    try:
        return torch.compile(model)
    except Exception as error:  # noqa: BLE001 - any backend failure falls back to eager
        log.warning("torch.compile failed (%s); training without it", error)
        return model
