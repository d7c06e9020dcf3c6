"""The training loop: wire the rooms together, then one outer iteration per optimizer step and an inner loop over
micro-batches. The training position is the number of global samples consumed; the data order is a pure function of
it, so resume needs no iterator state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
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
    AutocastKwargs,
    DistributedDataParallelKwargs,
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
    broadcast_object_list,
    set_seed,
)
from torch.nn.parallel import DistributedDataParallel

from configs import TrainingConfig, as_dict, from_dict
from pretrain.agreement import Agreement
from pretrain.checkpoint.checkpointer import Checkpointer, Resumed
from pretrain.checkpoint.format import load_weights as checkpoint_weights
from pretrain.checkpoint.format import step_of
from pretrain.checkpoint.state_dicts import load_model_state
from pretrain.checkpoint.train_state import TrainState
from pretrain.data.samples import make_train_loader
from pretrain.data.training_data import frozen_from_json, prepare_training_data
from pretrain.distributed import on_main, signalled_ranks
from pretrain.ema import EMA
from pretrain.errors import cause_line
from pretrain.evaluation import Evaluator, eval_values
from pretrain.memory import measured_gpu_memory_gib, plan_for_config
from pretrain.metrics import Metrics, ThroughputModel
from pretrain.model.build import (
    add_z_loss,
    build_model,
    count_parameters,
    enable_activation_checkpointing,
)
from pretrain.model.export import (
    EXPORT_DIR_NAME,
    export_model,
    export_state,
    sample_lines,
)
from pretrain.model.families import family_for
from pretrain.model.peaks import peak_flops_per_device
from pretrain.model.pretrained import (
    PretrainedFolder,
    check_folder,
    check_tokenizer,
)
from pretrain.model.pretrained import load_weights as load_pretrained_weights
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
from pretrain.spikes import Limits, Spike, SpikeGuard, unskipped
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
    spike_skipped: torch.Tensor  # bool on the device: not applied because the step was a loss spike (skip policy)


class StepBatches:
    """Each step's micro-batches. A step that starts where the previous one ended reads on from the same reader; one
    that does not (a skipped window, a rollback) opens a reader at its first sample, and DataLoader workers start
    again there: a rare cost."""

    def __init__(self, open_at: Callable[[int], Iterator[torch.Tensor]], step_samples: int) -> None:
        self.open_at = open_at
        self.step_samples = step_samples
        self._iterator: Iterator[torch.Tensor] | None = None
        self._next_sample = -1

    def open(self, first_sample: int) -> None:
        """The reader for a step starting at first_sample, opened now (before the clock starts)."""
        if first_sample != self._next_sample or self._iterator is None:
            self._iterator = self.open_at(first_sample)
            self._next_sample = first_sample

    def at(self, first_sample: int) -> Iterator[torch.Tensor]:
        """The micro-batches of the step starting at first_sample."""
        self.open(first_sample)
        self._next_sample = first_sample + self.step_samples
        return self._iterator


def make_accelerator(config: TrainingConfig) -> Accelerator:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (the loss upcast, any fp32 run) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    precision = effective_mixed_precision(config, cuda)
    # cpu=True matters: without it a CPU-only multi-process launch gives independent runs with no all-reduce.
    # gradient_as_bucket_view: DDP's gradients are views into its all-reduce buckets instead of a second fp32 copy
    # (5.3 GiB per GPU for the production model; see the memory plan and zero_gradients).
    # cache_enabled=False: autocast's cache would keep every layer's bf16 weight copy until the forward pass ends,
    # also under activation checkpointing (2.4 GiB for the production model); each weight is cast once per forward
    # pass anyway, so the cache saves nothing and the values are the same. The process group's timeout is above
    # every allowance of the stall watchdog, so a stall ends with the watchdog's line rather than a collective's error.
    group_timeout = timedelta(seconds=StallLimits.from_config(config).process_group_seconds())
    return Accelerator(
        cpu=not cuda,
        mixed_precision=precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,
        fsdp_plugin=fsdp_plugin_from_launch(precision),
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True),
                         AutocastKwargs(cache_enabled=False), InitProcessGroupKwargs(timeout=group_timeout)],
    )


def fsdp_mixed_precision(precision: str):
    """FSDP1's policy for a run's precision: parameters and gradient reductions in bf16/fp16, buffers in fp32.

    Accelerate's own policy casts the buffers too, which turns GPT-NeoX's rotary inv_freq into bf16 (about one radian
    off at position 1000): a model trained under FSDP would then differ from its fp32 export and from the same run
    resumed under DDP, whose autocast leaves buffers alone. None for fp32 runs (no policy)."""
    from torch.distributed.fsdp import MixedPrecision

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return None
    return MixedPrecision(param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=torch.float32)


def fsdp_plugin_from_launch(precision: str) -> FullyShardedDataParallelPlugin | None:
    """Accelerate's FSDP plugin as `accelerate launch` configures it (from its environment), with our
    mixed-precision policy; None when the launch is not FSDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    plugin = FullyShardedDataParallelPlugin()
    policy = fsdp_mixed_precision(precision)
    if policy is not None and plugin.fsdp_version == 1:  # FSDP2 never casts buffers
        plugin.mixed_precision_policy = policy
    return plugin


def keeps_gradients_in_buckets(model: torch.nn.Module) -> bool:
    """Under DDP (also compiled) the gradients are views of the all-reduce buckets and stay so for the whole run."""
    return isinstance(getattr(model, "_orig_mod", model), DistributedDataParallel)


def zero_gradients(model: torch.nn.Module, optimizer) -> None:
    """Under DDP zeroed in place: a gradient set to None would make the next micro-batch under no_sync allocate a
    fresh fp32 copy beside the buckets (the buckets never go away), 4 bytes per parameter more at every step after the
    first, while the optimizer state exists. Elsewhere dropped, so the memory is free until the next backward pass."""
    optimizer.zero_grad(set_to_none=not keeps_gradients_in_buckets(model))


def place_gradients_in_buckets(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Under DDP, before the compile warm-up and the first step: a synchronised backward of a zero loss on two tokens,
    after which every gradient is a view of its bucket (DDP makes it one only in a synchronised backward).
    Otherwise the first micro-batches, and the warm-up, would allocate their gradients beside the buckets; after a
    resume the optimizer state is already loaded then, the moment a second fp32 copy does not fit. In this backward
    each gradient is copied into its bucket as it arrives, so at most one parameter's fresh gradient exists at a time.
    The gradients end at zero, as if untouched; no data, RNG or step is used, and the buckets are the ones DDP would
    have built after the first step."""
    if not keeps_gradients_in_buckets(model):
        return
    tokens = torch.zeros((1, 2), dtype=torch.long, device=accelerator.device)
    (model(input_ids=tokens, labels=tokens).loss * 0).backward()
    with model.no_sync():
        # DDP remakes its buckets (in the order gradients arrived) at the next forward: here, not in the first step,
        # where old and new buckets would overlap beside the activations. The backward frees this forward's graph
        # now (transformers' outputs can sit in a reference cycle until the garbage collector runs).
        (model(input_ids=tokens, labels=tokens).loss * 0).backward()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter.grad.zero_()


def train_step(model: torch.nn.Module, optimizer, accelerator: Accelerator, batches: Iterator[torch.Tensor],
               accumulation: int, max_grad_norm: float, lr: float, spike_limits: Limits | None = None) -> StepResult:
    """One optimizer step: forward/backward over `accumulation` micro-batches, clip, update unless non-finite (or,
    given spike_limits, a loss spike).

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
    spike = _spike_on_device(accelerator, loss_sum / accumulation, grad_norm, spike_limits)
    hold = nonfinite if spike is None else nonfinite | spike
    set_lr(optimizer, lr)
    if _skips_on_device(optimizer, accelerator):
        # The fused kernel skips the update on the device: no host sync.
        getattr(optimizer, "optimizer", optimizer).found_inf = hold.float()
        optimizer.step()
        skipped = nonfinite
    elif bool(hold.item()):  # CPU (no sync cost) or the unfused path
        skipped = nonfinite
    else:
        optimizer.step()
        skipped = torch.tensor(accelerator.optimizer_step_was_skipped, device=accelerator.device)  # fp16 overflow
    zero_gradients(model, optimizer)
    no_spike = torch.zeros((), dtype=torch.bool, device=grad_norm.device)
    spike_skipped = spike & ~nonfinite if spike is not None else no_spike
    return StepResult(loss_sum, grad_norm, skipped, spike_skipped)


def _spike_on_device(accelerator: Accelerator, loss: torch.Tensor, grad_norm: torch.Tensor,
                     limits: Limits | None) -> torch.Tensor | None:
    """--on-loss-spike skip: whether this step is a spike, decided on the device before its update. Every rank must
    reach the same verdict, so the loss is averaged over the processes first: the one extra collective per step that
    this policy costs (asynchronous on GPUs; no host sync)."""
    if limits is None or not limits.active:
        return None
    if accelerator.num_processes > 1:
        loss = accelerator.reduce(loss, reduction="mean")
    return (loss > limits.loss) | (grad_norm > limits.grad_norm)


def clip_gradients(model: torch.nn.Module, accelerator: Accelerator, max_norm: float) -> torch.Tensor:
    """The total norm over every process's gradients, clipped to max_norm (fp16 gradients are unscaled first)."""
    if hasattr(model, "clip_grad_norm_"):  # FSDP1 shards: only the module knows the norm over all of them
        accelerator.unscale_gradients()
        return model.clip_grad_norm_(max_norm)
    return accelerator.clip_grad_norm_(model.parameters(), max_norm)


def count_skipped(consecutive: torch.Tensor, total: torch.Tensor, skipped: torch.Tensor,
                  held: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The steps in a row whose update was held back (non-finite, or a spike skipped: `held`, default `skipped`) and
    the non-finite steps in all, on the device: no host sync for counts read only when logged or agreed on."""
    held = skipped if held is None else held
    return torch.where(held, consecutive + 1, 0), total + skipped.to(torch.int64)


def compiled_with_fallback(model: torch.nn.Module, optimizer, accelerator: Accelerator, batch: torch.Tensor,
                           backend: str) -> torch.nn.Module:
    """torch.compile after prepare(), as Accelerate does, then one forward/backward on a real batch before the
    clock starts: compilation happens there (lazily), so a backend that fails falls back to eager instead of
    killing the run, and the compile time stays out of the throughput figures. Its gradients are zeroed (under DDP
    they accumulate in the buckets, placed there before: no second copy with a resumed optimizer state)."""
    compiled = torch.compile(model, backend=backend)
    batch = batch.to(accelerator.device)
    try:
        with accelerator.no_sync(compiled):
            compiled(input_ids=batch, labels=batch).loss.backward()
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any backend failure falls back to eager
        log.warning("torch.compile (backend %s) failed at the first step (%s); training without it", backend,
                    cause_line(error))
        torch._dynamo.reset()
        compiled = model
    finally:
        zero_gradients(compiled, optimizer)
    return compiled


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
        frozen = frozen_from_json(resumed.state.data) if resumed else None
        if frozen is None and config.generate_sample_data and not config.data_bucket:
            on_main(accelerator, lambda: ensure_demo_corpus(config.sample_corpus, Path(config.data_dir),
                                                            config.model.vocab_size, config.seed))
        self.data = prepare_training_data(config, accelerator, frozen,
                                          start_sample=resumed.state.samples_consumed if resumed else 0,
                                          start_step=resumed.state.step if resumed else 0)
        self.cleanup.callback(self.data.close)
        self._log(f"{self.data.describe()} (ready in {time.monotonic() - started:.1f} s)")
        self._stop_if_preempted()
        # Built where it trains: on a GPU the random init runs there, never on the CPU before the weights load.
        model = build_model(config.model, device=accelerator.device)
        if resumed is not None:
            load_model_state(model, resumed.model_state)
        elif pretrained is not None:
            self._log(on_main(accelerator, lambda: check_tokenizer(pretrained, self.data.tokenizer_dir)))
            load_pretrained_weights(model, pretrained)
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
        # After the restore: torch's optimizer-state loader sets its state up by a zero-gradient step, and skips that
        # (then fails) when gradients already exist.
        place_gradients_in_buckets(self.model, accelerator)
        self.state = self._train_state(resumed, pretrained)
        self.ema = self._make_ema(resumed)
        if config.compile_model:
            self.model = self._compiled(self.model)
        self.evaluator = Evaluator(config, accelerator, self.data.eval)
        self.metrics = self.cleanup.enter_context(self._make_metrics())
        self.checkpointer.sync_logs_from(self.metrics.run_dir)
        self.watchdog.keep_stacks_in(self.metrics.run_dir,
                                     self.checkpointer.copy_log_file if self.checkpointer.remote else None)
        self.agreement = Agreement(accelerator.device, accelerator.num_processes)
        self.spikes = SpikeGuard(config, self.state, self._log)
        self.checkpointer.before_save = self._settle
        self.checkpointer.ema = self.ema
        self.batches = StepBatches(self._reader_at, self.plan.global_batch_samples)
        self._reset_counters()
        self._stop_if_preempted()

    def train(self) -> None:
        config, state, model = self.config, self.state, self.model
        self.batches.open(unskipped(state.samples_consumed, state.skipped_samples))
        model.train()
        if self.branch_start:
            # The branch's own first checkpoint, so it resumes without the main run's (which that run may prune).
            self.checkpointer.save(state, model, self.optimizer, "the cooldown branch's start")
        self.metrics.start_window(state.step)
        clock = time.monotonic()
        stop = None
        while state.step < config.max_steps and stop is None:
            state.samples_consumed = unskipped(state.samples_consumed, state.skipped_samples)
            self.spikes.note_step_start(state.step + 1, state.samples_consumed)
            result = train_step(model, self.optimizer, self.accelerator, self.batches.at(state.samples_consumed),
                                config.gradient_accumulation_steps, config.max_grad_norm, self._lr(state.step + 1),
                                self.spikes.device_limits(state, state.step + 1))
            state.step += 1
            state.samples_consumed += self.plan.global_batch_samples
            state.epoch = self.data.epoch_at(state.samples_consumed)
            previous, state.data_consumed = state.data_consumed, self.data.accounting(state.samples_consumed)
            for line in self.data.epoch_lines(previous, state.data_consumed, state.step):
                self._log(line)
            state.elapsed_seconds += time.monotonic() - clock
            clock = time.monotonic()
            if self.ema is not None:
                self.ema.update()
            self._count_skipped(result)
            self._log_step(result)
            self._maybe_evaluate()
            with progress.phase(COLLECTIVE):
                signals = self._agree(result)
            spike = self.spikes.take_rollback()
            if spike is not None:
                self._roll_back(spike)
                continue
            blocked = self.checkpointer.blocked_seconds
            with progress.phase(SAVE):
                self.checkpointer.step_done(state, model, self.optimizer, signals)
            self.metrics.exclude(self.checkpointer.blocked_seconds - blocked)
            progress.step_done(state.step)
            stop = self.evaluator.stop_reason(state)
        self._finish(stop)

    def _finish(self, stop: str | None) -> None:
        """The last checkpoint, the export (of the best checkpoint when stopping early), the wait for the uploads."""
        config, state = self.config, self.state
        with progress.phase(SAVE, "the final checkpoint"):
            self.checkpointer.save_final(state, self.model, self.optimizer, "early stop" if stop else "final")
            self.checkpointer.wait_written()  # a failed final write ends the run here, before the export writes
        if config.export_final_model:
            with progress.phase(EXPORT):
                final = self._export(best=stop is not None)
                self.metrics.console(f"exported the final model to {final}")
                if self.is_main and self.data.tokenizer_dir is not None and config.final_samples:
                    for line in sample_lines(final, config.final_samples):
                        self.metrics.console(f"sample: {line}")
        self.checkpointer.finish(state)
        if stop:
            self.metrics.console(stop)

    def _export(self, best: bool) -> Path:
        """The trained model (its live weights or their EMA, --export-weights), or the best checkpoint's."""
        config, accelerator = self.config, self.accelerator
        output_dir = Path(config.output_dir)
        name = on_main(accelerator, self.checkpointer.best_checkpoint) if best else None
        if name is not None and step_of(name) != self.state.step:
            def write_best() -> None:
                weights = checkpoint_weights(output_dir / name, config.export_weights)
                export_state(config.model, weights, output_dir / EXPORT_DIR_NAME, self.data.tokenizer_dir)
                log.info("exported %s, the checkpoint with the best eval loss (%s weights)", name,
                         config.export_weights)

            on_main(accelerator, write_best)
            return output_dir / EXPORT_DIR_NAME
        replace = self.ema.full_state() if config.export_weights == "ema" else None
        return export_model(accelerator, self.model, output_dir, self.data.tokenizer_dir, replace)

    def _agree(self, result: StepResult):
        """One small collective per step; what it returns was posted a step ago, so reading it never stalls."""
        state = self.state
        signals = self.agreement.exchange(
            state.step, self.preemption.requested, self.checkpointer.save_due_by_time(),
            self.checkpointer.write_failed(), self.consecutive_nonfinite,
            result.loss_sum / self.config.gradient_accumulation_steps, result.grad_norm, result.spike_skipped)
        self.spikes.observe(signals, state)
        if signals.consecutive_nonfinite >= self.config.max_consecutive_nonfinite:
            spikes = " or were skipped as loss spikes" if self.config.on_loss_spike == "skip" else ""
            raise NonFiniteLoss(
                f"{signals.consecutive_nonfinite} optimizer steps in a row had a non-finite loss or gradient{spikes} "
                f"(--max-consecutive-nonfinite {self.config.max_consecutive_nonfinite}); stopping. The last good "
                "checkpoint is kept: lower --learning-rate or check the data, then --resume auto"
            )
        return signals

    def _settle(self, state: TrainState) -> None:
        """Before a save: the last step's agreed values into the state now (a wait for the device, which the save's
        own copy of the weights waits for anyway), so a resumed run's spike window is the uninterrupted run's."""
        self.spikes.observe(self.agreement.settle(), state)

    def _roll_back(self, spike: Spike) -> None:
        """--on-loss-spike rollback: the last checkpoint from before the spike, restored in this process; the samples
        that led to it are skipped from now on (recorded in the state, so a resumed run skips them too)."""
        state, config = self.state, self.config
        self.spikes.check_budget(spike, state)
        restored = self.checkpointer.roll_back(spike.step, self.model, self.optimizer)
        if restored is None:
            self._log(f"{spike.describe()}; no checkpoint from before it to roll back to: training on")
            return
        window = self.spikes.record_rollback(spike, state, restored.state.step, restored.name,
                                             self.plan.global_batch_samples)
        state.lost_time.rollback_seconds += max(0.0, state.elapsed_seconds - restored.state.elapsed_seconds)
        state.rewind_to(restored.state)
        if self.ema is not None:
            self.ema.load(restored.ema_state) if restored.ema_state is not None else self.ema.reset_to_weights()
        self._reset_counters()
        self.agreement.forget()
        self.metrics.restart_at(state.step)
        skipped = f"samples [{window[0]}, {window[1]}) are skipped from now on" if window else "no samples skipped"
        lowered = (f"; the learning rate x {config.loss_spike_lr_factor:g} for {config.loss_spike_lr_steps} steps"
                   if self.spikes.lr_scale(state, state.step + 1) != 1.0 else "")
        self._log(f"{spike.describe()}: rolled back to {restored.name} (step {restored.state.step}); {skipped}"
                  f"{lowered}; rollback {len(state.rollbacks)} of this run (at most {config.max_rollbacks} within "
                  f"{config.rollback_window_steps} steps)")

    def _lr(self, step: int) -> float:
        """The scheduled rate, lowered for a while after a rollback when --loss-spike-lr-factor says so."""
        scale = self.spikes.lr_scale(self.state, step)
        return lr_at(step, self.config) * scale if scale != 1.0 else lr_at(step, self.config)

    def _reader_at(self, first_sample: int) -> Iterator[torch.Tensor]:
        """Each next batch waited for in the data phase: a reader that never returns is a stall the watchdog names."""
        config = self.config
        return progress.watch(iter(make_train_loader(
            self.data.train, first_sample, config.per_device_train_batch_size, self.accelerator.process_index,
            self.accelerator.num_processes, config.dataloader_num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
        )))

    def _reset_counters(self) -> None:
        device = self.accelerator.device
        self.consecutive_nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_total = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite_before = self.state.nonfinite_steps

    def _make_ema(self, resumed: Resumed | None) -> EMA | None:
        """--ema-decay: the average lives beside the weights (prepared, not yet compiled: the same tensors)."""
        if not self.config.ema_decay:
            if resumed is not None and resumed.ema_state is not None:
                self._log("the checkpoint holds an EMA of the weights, but --ema-decay is 0: it is not kept")
            return None
        ema = EMA(self.accelerator, self.model, self.config.ema_decay)
        if resumed is not None and resumed.ema_state is not None:
            ema.load(resumed.ema_state)
        elif resumed is not None:
            self._log("--ema-decay: the checkpoint holds no EMA of the weights; one starts from them now")
        return ema

    def _count_skipped(self, result: StepResult) -> None:
        self.consecutive_nonfinite, self.skipped_total = count_skipped(
            self.consecutive_nonfinite, self.skipped_total, result.skipped, held=result.skipped | result.spike_skipped)

    def _log_step(self, result: StepResult) -> None:
        state = self.state
        values = self.metrics.end_step(state.step, result.loss_sum, self.config.gradient_accumulation_steps,
                                       self.accelerator)
        if values is None:
            return
        # Read on logging steps only: this host read waits for the step to finish, which the log line needs anyway.
        state.nonfinite_steps = self.nonfinite_before + int(self.skipped_total.item())
        values["train/lr"] = self._lr(state.step)
        values["train/grad_norm"] = float(result.grad_norm)
        values["train/nonfinite_steps"] = float(state.nonfinite_steps)
        values["train/loss_spikes"] = float(state.loss_spikes)
        values["train/rollbacks"] = float(len(state.rollbacks))
        values.update(state.lost_time.scalars())
        values["train/epoch"] = self.data.epochs_at(state.samples_consumed)
        values.update(self.data.metric_values(state.samples_consumed))
        values["time/elapsed_seconds"] = state.elapsed_seconds
        if self.checkpointer.remote is not None:
            values["checkpoint/upload_failures"] = float(self.checkpointer.upload_failures)
        self.metrics.publish(state.step, values)

    def _maybe_evaluate(self) -> None:
        if not self.evaluator.due(self.state.step):
            return
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()  # the step's queued work stays training time; the evaluation waits for it anyway
        started = time.perf_counter()
        with progress.phase(EVALUATION):
            loss = self.evaluator.evaluate(self.model)
        self.evaluator.record(self.state, loss)
        self.metrics.publish(self.state.step, eval_values(loss, self.evaluator.per_source))
        self.metrics.exclude(time.perf_counter() - started)

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
            if self.data.grew:  # the checkpoints from here on record the data added at this resume
                state.data = self.data.frozen.to_json()
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
        signalled = signalled_ranks(self.accelerator, self.preemption.received)
        if signalled:
            self.preemption.agree()
            raise Preempted(self.preemption.signal_name, signalled)

    def _wants_activation_checkpointing(self) -> bool:
        """`auto`: only on a GPU whose memory the current layout would not fit without it (see the memory plan)."""
        setting = self.config.gradient_checkpointing
        if setting != "auto" or self.accelerator.device.type != "cuda":
            return setting == "true"
        strategy = "fsdp" if self.accelerator.distributed_type == DistributedType.FSDP else "ddp"
        gib = self.config.gpu_memory_gb or measured_gpu_memory_gib(self.accelerator.device.index or 0)
        processes = self.accelerator.num_processes
        nodes = max(1, processes // int(os.environ.get("LOCAL_WORLD_SIZE") or processes))  # set by torchrun
        layout = plan_for_config(self.config, num_gpus=processes, gpu_memory_gib=gib, strategy=strategy,
                                 activation_checkpointing="false", keep_micro_batch=True, nodes=nodes,
                                 ddp_gradient_as_bucket_view=True)
        self._log("\n".join(layout.plan.lines()))
        if not layout.fits:
            self._log("activation checkpointing on: without it the plan does not fit with headroom")
        return not layout.fits

    def _compiled(self, model: torch.nn.Module) -> torch.nn.Module:
        config = self.config
        started = time.monotonic()
        first = self.state.samples_consumed
        batch = torch.stack([self.data.train[i] for i in range(first, first + config.per_device_train_batch_size)])
        compiled = compiled_with_fallback(model, self.optimizer, self.accelerator, batch, config.compile_backend)
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
