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


def build_optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    """Biases and norm weights (1-D tensors) are not decayed, as in GPT-NeoX and nanoGPT."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused=None lets torch pick the fused CUDA kernel where available and the foreach path on CPU.
    return torch.optim.AdamW(
        groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Not passed through accelerator.prepare(): Accelerate's wrapper would step it once per process per call."""
    warmup, decay, min_ratio = config.warmup_steps, config.effective_lr_decay_steps(), config.min_learning_rate_ratio

    def multiplier(step: int) -> float:
        return lr_multiplier(step, warmup, decay, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
