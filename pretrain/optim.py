"""AdamW with the usual no-decay groups, and the learning rate as a pure function of the optimizer step."""

from __future__ import annotations

import math

import torch

from configs import TrainingConfig


def lr_multiplier(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine to `min_ratio` at `decay_steps`, flat after. `step` counts completed optimizer steps."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, config: TrainingConfig) -> float:
    """The rate optimizer step `step` (1-based) applies. Nothing to save: resume recomputes it from the step."""
    multiplier = lr_multiplier(step - 1, config.warmup_steps, config.effective_lr_decay_steps(),
                               config.min_learning_rate_ratio)
    return config.learning_rate * multiplier


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
