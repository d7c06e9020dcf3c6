"""Held-out loss: the same batches at every evaluation, every `eval_steps` steps and after the last one; for a
mixture, each source's on its own eval shards, and their mean."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

from configs import TrainingConfig
from pretrain.data.samples import TokenSamples, make_eval_batches


class Evaluator:
    def __init__(self, config: TrainingConfig, accelerator: Accelerator,
                 data: TokenSamples | dict[str, TokenSamples] | None) -> None:
        self.config = config
        self.accelerator = accelerator
        self.data = data
        self.per_source: dict[str, float] = {}  # a mixture's last losses, by source

    def due(self, step: int) -> bool:
        """Every eval_steps, and always after the last step (before its checkpoint, so best_eval_loss includes it)."""
        every = self.config.eval_steps
        return self.data is not None and (step == self.config.max_steps or (every > 0 and step % every == 0))

    def evaluate(self, model: torch.nn.Module) -> float:
        """Mean loss over the eval batches of every process (one host sync); a mixture: the mean of its sources'."""
        accelerator = self.accelerator
        model.eval()
        if isinstance(self.data, dict):
            names = list(self.data)
            means = torch.stack([self._mean_loss(model, self.data[name]) for name in names])
            losses = accelerator.reduce(means, reduction="mean").tolist()
            self.per_source = dict(zip(names, losses))
            model.train()
            return sum(losses) / len(losses)
        mean = self._mean_loss(model, self.data)
        model.train()
        return accelerator.reduce(mean, reduction="mean").item()

    def _mean_loss(self, model: torch.nn.Module, data: TokenSamples) -> torch.Tensor:
        config, accelerator = self.config, self.accelerator
        total = torch.zeros((), device=accelerator.device)
        count = 0
        with torch.no_grad():
            for input_ids in make_eval_batches(data, config.per_device_train_batch_size,
                                               accelerator.process_index, accelerator.num_processes,
                                               config.eval_batches):
                input_ids = input_ids.to(accelerator.device)
                total += model(input_ids=input_ids, labels=input_ids).loss.detach()
                count += 1
        return total / count


def eval_values(loss: float, per_source: dict[str, float] | None = None) -> dict[str, float]:
    values = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
    for name, source_loss in (per_source or {}).items():
        values[f"eval/loss/{name}"] = source_loss
        values[f"eval/perplexity/{name}"] = math.exp(min(source_loss, 50.0))
    return values
