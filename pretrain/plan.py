"""The run plan: batch arithmetic, precision, schedule and model size, in one wording for the launcher, the loop and
`--dry-run` (which builds the model on the meta device and prints the plan without allocating anything).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from configs import TrainingConfig
from pretrain.model.families import family_for
from pretrain.model.sizing import describe_sizing

if TYPE_CHECKING:
    from pretrain.model.build import ModelSize

log = logging.getLogger(__name__)


def effective_mixed_precision(config: TrainingConfig, cuda: bool) -> str:
    if not cuda:
        return config.mixed_precision if config.cpu_mixed_precision else "no"
    # including_emulation=False: pre-Ampere GPUs "support" bf16 only by slow emulation.
    # Only a GPU that is here can be asked; a plan for GPUs elsewhere (a dry run) takes the config at its word.
    if (config.mixed_precision == "bf16" and torch.cuda.is_available()
            and not torch.cuda.is_bf16_supported(including_emulation=False)):
        log.warning("this GPU has no bf16; training in fp16 with a loss scaler")
        return "fp16"
    return config.mixed_precision


@dataclass(frozen=True)
class RunPlan:
    config: TrainingConfig
    num_processes: int
    cuda: bool
    model_size: "ModelSize | None" = None  # known once the model is built (on the meta device for a dry run)

    @property
    def global_batch_samples(self) -> int:
        c = self.config
        return c.per_device_train_batch_size * c.gradient_accumulation_steps * self.num_processes

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_samples * self.config.seq_len

    @property
    def precision(self) -> str:
        return effective_mixed_precision(self.config, self.cuda)

    def lines(self) -> list[str]:
        # transformers only when a model was built: the launcher prints its plan without importing it (seconds).
        if self.model_size is not None:
            from pretrain.model.build import describe
        family = family_for(self.config.model)
        c = self.config
        device = f"{self.num_processes} GPU{'s' if self.num_processes > 1 else ''}" if self.cuda else (
            f"CPU, {self.num_processes} process{'es' if self.num_processes > 1 else ''}")
        lines = [f"config {c.name} on {device}, mixed precision {self.precision}, torch.compile "
                 f"{'on' if c.compile_model else 'off'}"]
        if self.model_size is not None:
            lines.append(f"model: {family.display_name} {describe(self.model_size)}")
        lines.append(
            f"batch: {c.per_device_train_batch_size} per device x {c.gradient_accumulation_steps} accumulation x "
            f"{self.num_processes} process{'es' if self.num_processes > 1 else ''} x {c.seq_len} tokens = "
            f"{self.tokens_per_step:,} tokens per optimizer step"
        )
        floor = f"{c.min_learning_rate_ratio:g} x {c.learning_rate:g} at step {c.effective_lr_decay_steps():,}"
        if c.cooldown_steps:
            decay = f"cooldown branch from step {c.lr_decay_start():,}: {c.wsd_decay_shape} to {floor}"
        elif c.lr_schedule == "wsd":
            decay = f"stable until step {c.lr_decay_start():,}, then {c.wsd_decay_shape} to {floor}"
        else:
            decay = f"{c.lr_schedule} to {floor}"
        lines.append(
            f"schedule: {c.max_steps:,} steps ({c.max_steps * self.tokens_per_step / 1e9:.2f} B tokens), warmup "
            f"{c.warmup_steps}, {decay}"
        )
        if c.z_loss_coefficient:
            lines.append(f"z-loss: {c.z_loss_coefficient:g} x mean(logsumexp(logits)^2) added to the training loss")
        sizing = describe_sizing(c.model)
        if sizing is not None:
            lines.append(sizing)
        if self.model_size is not None:
            gflops = family.flops_per_token(c.model, c.seq_len) / 1e9
            lines.append(f"training FLOPs: {gflops:.2f} GFLOP per token")
        return lines


def print_dry_run(config: TrainingConfig) -> None:
    from pretrain.model.build import build_model, count_parameters

    processes = int(os.environ.get("WORLD_SIZE", "0")) or config.num_processes
    model = build_model(config.model, device="meta")  # shapes only: no memory for the weights
    plan = RunPlan(config, processes, torch.cuda.is_available(), count_parameters(model))
    print("dry run: nothing is allocated or trained")
    for line in plan.lines():
        print(line)
    print(f"checkpoints: every {config.save_steps} steps to {config.output_dir}"
          f"{' and ' + config.checkpoint_bucket if config.checkpoint_bucket else ''}, keep {config.save_total_limit}")
