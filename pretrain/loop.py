"""The training loop: wire the rooms together, then one outer iteration per optimizer step and an inner loop over
micro-batches. The training position is the number of global samples consumed; the data order is a pure function of
it, so resume needs no iterator state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import accelerate
import numpy
import safetensors
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    InitProcessGroupKwargs,
    broadcast_object_list,
    set_seed,
)

from configs import TrainingConfig, as_dict, from_dict
from pretrain.agreement import Agreement
from pretrain.checkpoint.checkpointer import Checkpointer, Resumed
from pretrain.checkpoint.state_dicts import load_model_state
from pretrain.checkpoint.train_state import TrainState
from pretrain.data.samples import make_train_loader
from pretrain.data.training_data import FrozenShards, prepare_training_data
from pretrain.distributed import on_main
from pretrain.evaluation import Evaluator, eval_values
from pretrain.memory import measured_gpu_memory_gib, plan_for_config
from pretrain.metrics import Metrics, ThroughputModel
from pretrain.model.build import (
    add_z_loss,
    build_model,
    count_parameters,
    enable_activation_checkpointing,
)
from pretrain.model.export import export_model, sample_lines
from pretrain.model.families import family_for
from pretrain.model.peaks import peak_flops_per_device
from pretrain.model.pretrained import (
    PretrainedFolder,
    check_folder,
    check_tokenizer,
    load_weights,
)
from pretrain.optim import build_optimizer, lr_at, set_lr, stable_steps
from pretrain.plan import RunPlan, effective_mixed_precision
from pretrain.preemption import Preempted, PreemptionFlag
from pretrain.prepare.demo_corpus import ensure_demo_corpus
from pretrain.progress import (
    COLLECTIVE,
    EVALUATION,
    EXPORT,
    SAVE,
    START_UP,
    progress,
)
from pretrain.watchdog import StallLimits, Watchdog

log = logging.getLogger(__name__)


class OutOfMemory(ValueError):
    """The layout did not fit the GPU; the message names the flags that change it (exit code 2, like bad input)."""


class NonFiniteLoss(Exception):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # summed over micro-batches, on the device: read only when logged
    grad_norm: torch.Tensor
    skipped: torch.Tensor  # bool on the device: the update was not applied (non-finite gradient)


def make_accelerator(config: TrainingConfig) -> Accelerator:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (the loss upcast, any fp32 run) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    # cpu=True matters: without it a CPU-only multi-process launch gives independent runs with no all-reduce.
    # gradient_as_bucket_view: DDP's gradients are views into its all-reduce buckets instead of a second fp32 copy
    # (5.3 GiB per GPU for the production model; see the memory plan). The process group's timeout is above every
    # allowance of the stall watchdog, so a stall ends with the watchdog's line rather than a collective's error.
    group_timeout = timedelta(seconds=StallLimits.from_config(config).process_group_seconds())
    return Accelerator(
        cpu=not cuda,
        mixed_precision=effective_mixed_precision(config, cuda),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True),
                         InitProcessGroupKwargs(timeout=group_timeout)],
    )


def train_step(model: torch.nn.Module, optimizer, accelerator: Accelerator, batches: Iterator[torch.Tensor],
               accumulation: int, max_grad_norm: float, lr: float) -> StepResult:
    """One optimizer step: forward/backward over `accumulation` micro-batches, clip, update unless non-finite.

    Under DDP the gradient all-reduce happens once, in the last micro-batch's backward (accumulate() syncs then).
    """
    loss_sum = torch.zeros((), device=accelerator.device)
    for _micro_step in range(accumulation):
        input_ids = next(batches).to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(model):
            loss = model(input_ids=input_ids, labels=input_ids).loss
            accelerator.backward(loss)
        loss_sum += loss.detach()
    grad_norm = clip_gradients(model, accelerator, max_grad_norm or math.inf)
    # The norm is of the all-reduced gradients, so every rank reaches the same verdict.
    nonfinite = ~torch.isfinite(grad_norm)
    set_lr(optimizer, lr)
    if _skips_on_device(optimizer, accelerator):
        getattr(optimizer, "optimizer", optimizer).found_inf = nonfinite.float()  # the fused kernel skips the update: no host sync
        optimizer.step()
        skipped = nonfinite
    elif bool(nonfinite.item()):  # CPU (no sync cost) or the unfused path
        skipped = nonfinite
    else:
        optimizer.step()
        skipped = torch.tensor(accelerator.optimizer_step_was_skipped, device=accelerator.device)  # fp16 overflow
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, grad_norm, skipped)


def clip_gradients(model: torch.nn.Module, accelerator: Accelerator, max_norm: float) -> torch.Tensor:
    """The total norm over every process's gradients, clipped to max_norm (fp16 gradients are unscaled first)."""
    if hasattr(model, "clip_grad_norm_"):  # FSDP1 shards: only the module knows the norm over all of them
        accelerator.unscale_gradients()
        return model.clip_grad_norm_(max_norm)
    return accelerator.clip_grad_norm_(model.parameters(), max_norm)


def _skips_on_device(optimizer, accelerator: Accelerator) -> bool:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper, or a bare torch optimizer
    return accelerator.scaler is None and bool(inner.defaults.get("fused"))


class Trainer:
    """Owns the objects of one run. `run()` returns normally at the end, or raises Preempted / NonFiniteLoss / a
    checkpoint or data error that the entry point turns into an exit code."""

    def __init__(self, config: TrainingConfig, preemption: PreemptionFlag) -> None:
        self.config = config
        self.preemption = preemption
        self.cleanup = contextlib.ExitStack()
        # Before joining the others, which can stall too; stopped last, after the clean-up's own waits.
        self.watchdog = self.cleanup.enter_context(Watchdog.for_run(config, preemption))
        try:
            with progress.phase(START_UP, "joining the other processes"):
                self.accelerator = make_accelerator(config)
        except BaseException:
            self.cleanup.close()
            raise
        self.is_main = self.accelerator.is_main_process

    def run(self) -> None:
        with self.cleanup:
            self.cleanup.callback(self.accelerator.end_training)  # also after a failed set-up: no stray process group
            try:
                self.set_up()
                self.train()
            except torch.OutOfMemoryError:
                c = self.config
                raise OutOfMemory(
                    f"out of GPU memory with micro-batch {c.per_device_train_batch_size} x {c.seq_len} tokens, "
                    f"--gradient-checkpointing {c.gradient_checkpointing} (see the memory plan above, or run with "
                    "--dry-run); lower --per-device-train-batch-size and raise --gradient-accumulation-steps to keep "
                    "the global batch, or pass --gradient-checkpointing true, or launch with --strategy fsdp"
                ) from None
            except BaseException:
                self.watchdog.end_if_stalled()  # an error a stall caused (its peer gone) ends with the stall's line
                raise

    def set_up(self) -> None:
        config, accelerator = self.config, self.accelerator
        set_seed(config.seed)
        self.checkpointer = self.cleanup.enter_context(Checkpointer(config, accelerator, self.preemption))
        resumed = self.checkpointer.resume()
        # A fresh cooldown branch starts from the main run's checkpoint as if resuming it, under a run of its own.
        self.branch_start = resumed is None and bool(config.cooldown_from)
        if self.branch_start:
            resumed = self.checkpointer.branch_point(config.cooldown_from)
            self._check_branch_point(resumed.state)
        pretrained: PretrainedFolder | None = None
        if config.init_from and resumed is None:
            pretrained = check_folder(config.init_from, config.model)  # before the data: a wrong folder fails fast
        elif config.init_from:
            self._log(f"--init-from {config.init_from} is not used: this run resumes with its checkpoint's weights")
        self._stop_if_preempted()
        started = time.monotonic()
        frozen = FrozenShards.from_json(resumed.state.data) if resumed else None
        if frozen is None and config.generate_sample_data and not config.data_bucket:
            on_main(accelerator, lambda: ensure_demo_corpus(config.sample_corpus, Path(config.data_dir),
                                                            config.model.vocab_size, config.seed))
        self.data = prepare_training_data(config, accelerator, frozen,
                                          start_sample=resumed.state.samples_consumed if resumed else 0)
        self.cleanup.callback(self.data.close)
        self._log(f"{self.data.describe()} (ready in {time.monotonic() - started:.1f} s)")
        self._stop_if_preempted()
        # Built where it trains: on a GPU the random init runs there, never on the CPU before the weights load.
        model = build_model(config.model, device=accelerator.device)
        if resumed is not None:
            load_model_state(model, resumed.model_state)
        elif pretrained is not None:
            self._log(on_main(accelerator, lambda: check_tokenizer(pretrained, self.data.tokenizer_dir)))
            load_weights(model, pretrained)
            self._log(f"initialised from {pretrained.path} ({', '.join(p.name for p in pretrained.weight_files)}); "
                      "a new run: step 0, a fresh optimizer")
        if config.z_loss_coefficient:
            add_z_loss(model, config.z_loss_coefficient)
        self.plan = RunPlan(config, accelerator.num_processes, accelerator.device.type == "cuda", count_parameters(model))
        self._log("\n".join(self.plan.lines()))
        if self._wants_activation_checkpointing():
            enable_activation_checkpointing(model)  # before prepare() and compile, which wrap the checkpointed layers
        optimizer = build_optimizer(model, config)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if resumed is not None:
            self.checkpointer.restore(resumed, self.model, self.optimizer)
        self.state = self._train_state(resumed, pretrained)
        if config.compile_model:
            self.model = self._compiled(self.model)
        self.evaluator = Evaluator(config, accelerator, self.data.eval)
        self.metrics = self.cleanup.enter_context(self._make_metrics())
        self.checkpointer.sync_logs_from(self.metrics.run_dir)
        self.watchdog.keep_stacks_in(self.metrics.run_dir,
                                     self.checkpointer.copy_log_file if self.checkpointer.remote else None)
        self.agreement = Agreement(accelerator.device, accelerator.num_processes)
        self.consecutive_nonfinite = torch.zeros((), dtype=torch.int64, device=accelerator.device)
        self.skipped_total = torch.zeros((), dtype=torch.int64, device=accelerator.device)
        self.nonfinite_before = self.state.nonfinite_steps
        self._stop_if_preempted()

    def train(self) -> None:
        config, state, model = self.config, self.state, self.model
        batches = progress.watch(iter(make_train_loader(
            self.data.train, state.samples_consumed, config.per_device_train_batch_size,
            self.accelerator.process_index, self.accelerator.num_processes, config.dataloader_num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
        )))
        model.train()
        if self.branch_start:
            # The branch's own first checkpoint, so it resumes without the main run's (which that run may prune).
            self.checkpointer.save(state, model, self.optimizer, "the cooldown branch's start")
        self.metrics.start_window(state.step)
        clock = time.monotonic()
        while state.step < config.max_steps:
            result = train_step(model, self.optimizer, self.accelerator, batches, config.gradient_accumulation_steps,
                                config.max_grad_norm, lr_at(state.step + 1, config))
            state.step += 1
            state.samples_consumed += self.plan.global_batch_samples
            state.epoch = state.samples_consumed // self.data.samples_per_epoch
            state.elapsed_seconds += time.monotonic() - clock
            clock = time.monotonic()
            self._count_skipped(result)
            self._log_step(result)
            self._maybe_evaluate()
            with progress.phase(COLLECTIVE):
                signals = self._agree(result)
            with progress.phase(SAVE):
                self.checkpointer.step_done(state, model, self.optimizer, signals)
            progress.step_done(state.step)
        with progress.phase(SAVE, "the final checkpoint"):
            self.checkpointer.save(state, model, self.optimizer, "final")
            self.checkpointer.wait_written()  # a failed final write ends the run here, before the export writes
        if config.export_final_model:
            with progress.phase(EXPORT):
                final = export_model(self.accelerator, model, Path(config.output_dir), self.data.tokenizer_dir)
                self.metrics.console(f"exported the final model to {final}")
                if self.is_main and self.data.tokenizer_dir is not None and config.final_samples:
                    for line in sample_lines(final, config.final_samples):
                        self.metrics.console(f"sample: {line}")
        self.checkpointer.finish(state)

    def _agree(self, result: StepResult):
        """One small collective per step; what it returns was posted a step ago, so reading it never stalls."""
        signals = self.agreement.exchange(self.preemption.requested, self.checkpointer.save_due_by_time(),
                                          self.checkpointer.write_failed(), self.consecutive_nonfinite)
        if signals.consecutive_nonfinite >= self.config.max_consecutive_nonfinite:
            raise NonFiniteLoss(
                f"{signals.consecutive_nonfinite} optimizer steps in a row had a non-finite loss or gradient "
                f"(--max-consecutive-nonfinite {self.config.max_consecutive_nonfinite}); stopping. The last good "
                "checkpoint is kept: lower --learning-rate or check the data, then --resume auto"
            )
        return signals

    def _count_skipped(self, result: StepResult) -> None:
        """On the device: no host sync for a count that is read only when logged or agreed on."""
        self.consecutive_nonfinite = torch.where(result.skipped, self.consecutive_nonfinite + 1, 0)
        self.skipped_total += result.skipped.to(torch.int64)

    def _log_step(self, result: StepResult) -> None:
        state = self.state
        values = self.metrics.end_step(state.step, result.loss_sum, self.config.gradient_accumulation_steps,
                                       self.accelerator)
        if values is None:
            return
        # Read on logging steps only: this host read waits for the step to finish, which the log line needs anyway.
        state.nonfinite_steps = self.nonfinite_before + int(self.skipped_total.item())
        values["train/lr"] = lr_at(state.step, self.config)
        values["train/grad_norm"] = float(result.grad_norm)
        values["train/nonfinite_steps"] = float(state.nonfinite_steps)
        values["train/epoch"] = state.samples_consumed / self.data.samples_per_epoch
        values["time/elapsed_seconds"] = state.elapsed_seconds
        if self.checkpointer.remote is not None:
            values["checkpoint/upload_failures"] = float(self.checkpointer.upload_failures)
        self.metrics.publish(state.step, values)

    def _maybe_evaluate(self) -> None:
        if not self.evaluator.due(self.state.step):
            return
        with progress.phase(EVALUATION):
            loss = self.evaluator.evaluate(self.model)
        self.state.best_eval_loss = min(self.state.best_eval_loss, loss)
        self.metrics.publish(self.state.step, eval_values(loss))
        self.metrics.start_window(self.state.step)

    def _check_branch_point(self, state: TrainState) -> None:
        """A cooldown branch starts where its main run's rate is at its peak: after warmup, before any decay."""
        main = from_dict(state.config)
        stable = stable_steps(main)
        where = f"--cooldown-from {self.config.cooldown_from}"
        if stable is None:
            schedule = "a cooldown branch" if main.cooldown_steps else f"--lr-schedule {main.lr_schedule}"
            raise ValueError(f"{where}: its run ({state.run_name}) is {schedule}; a cooldown branch starts from a "
                             "stable-phase checkpoint of a --lr-schedule wsd run")
        if not stable[0] <= state.step <= stable[1]:
            raise ValueError(f"{where}: step {state.step} is outside the stable phase of its run ({state.run_name}: "
                             f"steps {stable[0]} to {stable[1]}, after warmup and before the decay)")

    def _train_state(self, resumed: Resumed | None, pretrained: PretrainedFolder | None = None) -> TrainState:
        config = self.config
        if resumed is not None and self.branch_start:
            state, main_run = resumed.state, resumed.state.run_name
            state.run_name = config.run_name or f"{main_run}-cooldown{state.step}"
            if state.run_name == main_run:
                raise ValueError(f"--run-name {main_run} is the name of the run the cooldown branch starts from; "
                                 "give the branch a name of its own")
            state.branch = {"from": config.cooldown_from, "run_name": main_run, "step": state.step}
            state.wandb_run_id = uuid.uuid4().hex[:12] if config.wandb else None
        if resumed is not None:
            state = resumed.state
            if state.global_batch_samples != self.plan.global_batch_samples:
                log.warning("the global batch changes from %d to %d samples per step on resume (the sample order "
                            "stays the same); adjust --gradient-accumulation-steps to keep it",
                            state.global_batch_samples, self.plan.global_batch_samples)
            state.global_batch_samples = self.plan.global_batch_samples
            state.num_processes = self.accelerator.num_processes
            state.config, state.versions = as_dict(config), library_versions()
            return state
        name = broadcast_object_list([config.run_name or f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"])[0]
        return TrainState(
            seed=config.seed, seq_len=config.seq_len, global_batch_samples=self.plan.global_batch_samples,
            num_processes=self.accelerator.num_processes, data=self.data.frozen.to_json(), run_name=name,
            config=as_dict(config), versions=library_versions(),
            wandb_run_id=uuid.uuid4().hex[:12] if config.wandb else None,
            init_from=pretrained.record() if pretrained is not None else None,
        )

    def _make_metrics(self) -> Metrics:
        config, accelerator, state = self.config, self.accelerator, self.state
        peak = peak_flops_per_device(accelerator.device, config.peak_tflops_per_device, self.plan.precision)
        throughput = ThroughputModel(
            tokens_per_step=self.plan.tokens_per_step,
            flops_per_token=family_for(config.model).flops_per_token(config.model, config.seq_len),
            peak_flops_total=peak * accelerator.num_processes if peak else None,
        )
        wandb_settings = None
        if config.wandb:
            wandb_settings = {"project": config.wandb_project, "run_id": state.wandb_run_id or uuid.uuid4().hex[:12],
                              "name": state.run_name, "mode": config.wandb_mode, "config": as_dict(config)}
        run_dir = Path(config.logging_dir) / state.run_name
        metrics = Metrics(run_dir, self.is_main, config.logging_steps, config.max_steps, state.step, throughput,
                          wandb_settings, history=state.history)
        self._log(f"logs: {run_dir} (tensorboard --logdir {config.logging_dir})")
        return metrics

    def _stop_if_preempted(self) -> None:
        """Between set-up stages: a signal before step 1 ends the run at once (nothing new to save). Every rank passes
        the same stages, so they agree here in one small collective and stop together, never one rank alone."""
        requested = torch.tensor([int(self.preemption.requested)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            requested = self.accelerator.reduce(requested, reduction="sum")
        if int(requested.item()):
            raise Preempted(self.preemption.signal_name or "a signal on another process")

    def _wants_activation_checkpointing(self) -> bool:
        """`auto`: only on a GPU whose memory the current layout would not fit without it (see the memory plan)."""
        setting = self.config.gradient_checkpointing
        if setting != "auto" or self.accelerator.device.type != "cuda":
            return setting == "true"
        strategy = "fsdp" if self.accelerator.distributed_type == DistributedType.FSDP else "ddp"
        gib = self.config.gpu_memory_gb or measured_gpu_memory_gib(self.accelerator.device.index or 0)
        layout = plan_for_config(self.config, num_gpus=self.accelerator.num_processes, gpu_memory_gib=gib,
                                 strategy=strategy, activation_checkpointing="false", keep_micro_batch=True,
                                 ddp_gradient_as_bucket_view=True)
        self._log("\n".join(layout.plan.lines()))
        if not layout.fits:
            self._log("activation checkpointing on: without it the plan does not fit with headroom")
        return not layout.fits

    def _compiled(self, model: torch.nn.Module) -> torch.nn.Module:
        """torch.compile after prepare(), as Accelerate does, then one forward/backward on a real batch before the
        clock starts: compilation happens there (lazily), so a backend that fails falls back to eager instead of
        killing the run, and the compile time stays out of the throughput figures. The gradients are dropped."""
        config = self.config
        started = time.monotonic()
        compiled = torch.compile(model, backend=config.compile_backend)
        batch = torch.stack([self.data.train[i] for i in range(self.state.samples_consumed,
                                                                self.state.samples_consumed + config.per_device_train_batch_size)])
        try:
            with self.accelerator.no_sync(compiled):
                compiled(input_ids=batch.to(self.accelerator.device), labels=batch.to(self.accelerator.device)).loss.backward()
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - any backend failure falls back to eager
            lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
            reason = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # "backend='x' raised:" + the cause
            log.warning("torch.compile (backend %s) failed at the first step (%s); training without it",
                        config.compile_backend, reason)
            torch._dynamo.reset()
            compiled = model
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        self._log(f"compiled the model in {time.monotonic() - started:.1f} s (backend {config.compile_backend})")
        return compiled

    def _log(self, message: str) -> None:
        if self.is_main:
            log.info(message)


def library_versions() -> dict[str, str]:
    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "numpy": numpy.__version__, "safetensors": safetensors.__version__,
    }
