"""AdamW with the usual no-decay groups, and the learning rate as a pure function of the optimizer step."""

from __future__ import annotations

import math

import torch

from configs import TrainingConfig


def lr_multiplier(step: int, warmup_steps: int, decay_steps: int, min_ratio: float, schedule: str = "cosine",
                  decay_start: int | None = None, shape: str = "1-sqrt") -> float:
    """Linear warmup to 1, then a decay to `min_ratio` at `decay_steps`, flat after. `step` counts completed
    optimizer steps.

    cosine: cosine from the end of warmup. linear: a straight line from the end of warmup. wsd (warmup-stable-decay,
    Hu et al. 2024, "MiniCPM"): flat at 1 until `decay_start`, then `shape` down to the floor: 1-sqrt (Hägele et al.
    2024, the best of their cooldowns), linear or cosine. A cooldown branch is a wsd decay from its branch point.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        decay_start, shape = warmup_steps, "linear"
    elif schedule != "wsd":
        raise ValueError(f"--lr-schedule {schedule!r}: expected cosine, wsd or linear")
    start = warmup_steps if decay_start is None else decay_start
    if step <= start:
        return 1.0  # exactly the peak, also where the decay begins (a cooldown branch's first step)
    progress = min(1.0, (step - start) / max(1, decay_steps - start))
    return min_ratio + (1.0 - min_ratio) * _remaining(shape, progress)


def _remaining(shape: str, progress: float) -> float:
    """The share of the decay still ahead at `progress` (0 at the start of the decay, 1 at its end)."""
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"--wsd-decay-shape {shape!r}: expected 1-sqrt, linear or cosine")


def lr_at(step: int, config: TrainingConfig) -> float:
    """The rate optimizer step `step` (1-based) applies. Nothing to save: resume recomputes it from the step."""
    schedule = "wsd" if config.cooldown_steps else config.lr_schedule
    multiplier = lr_multiplier(step - 1, config.warmup_steps, config.effective_lr_decay_steps(),
                               config.min_learning_rate_ratio, schedule=schedule, decay_start=config.lr_decay_start(),
                               shape=config.wsd_decay_shape)
    return config.learning_rate * multiplier


def stable_steps(config: TrainingConfig) -> tuple[int, int] | None:
    """The checkpoint steps a cooldown branch may start from: those of a wsd run after warmup and before its
    decay, where the rate is at its peak and has never been lower since warmup (None for other schedules)."""
    if config.lr_schedule != "wsd" or config.cooldown_steps:
        return None
    return config.warmup_steps, config.lr_decay_start()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    """Biases and norm weights (1-D tensors) are not decayed, as in GPT-NeoX and nanoGPT.

    Fused on CUDA: one kernel for the whole update instead of a few per parameter group, and it can skip a
    non-finite step on the device (`found_inf`) without a host sync. CPU has no fused kernel: the foreach path.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = any(p.device.type == "cuda" for p in decay)
    return torch.optim.AdamW(
        groups, lr=lr_at(1, config), betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
        fused=True if on_cuda else None,
    )
