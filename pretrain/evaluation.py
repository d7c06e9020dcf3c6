"""Held-out loss: the same batches at every evaluation, every `eval_steps` steps and after the last one; for a
mixture, each source's on its own eval shards, and their mean; what the run remembers of it (best, latest,
evaluations without improvement) and early stopping on it."""

from __future__ import annotations

import logging
import math

import torch
from accelerate import Accelerator

from configs import TrainingConfig
from pretrain.data.samples import TokenSamples, make_eval_batches
from pretrain.errors import cause_line

log = logging.getLogger(__name__)


class Evaluator:
    def __init__(self, config: TrainingConfig, accelerator: Accelerator,
                 data: TokenSamples | dict[str, TokenSamples] | None) -> None:
        self.config = config
        self.accelerator = accelerator
        self.data = data
        self.per_source: dict[str, float] = {}  # a mixture's last losses, by source
        self._eager_only = False

    def due(self, step: int) -> bool:
        """Every eval_steps, and always after the last step (before its checkpoint, so best_eval_loss includes it)."""
        every = self.config.eval_steps
        return self.data is not None and (step == self.config.max_steps or (every > 0 and step % every == 0))

    def evaluate(self, model: torch.nn.Module) -> float:
        """Mean loss over the eval batches of every process (one host sync); a mixture: the mean of its sources'.

        A compiled model compiles again for evaluation (no_grad, eval mode) at its first one; a backend that fails
        there falls back to the eager model for this and every later evaluation, as the training's warm-up does."""
        if self._eager_only:
            model = getattr(model, "_orig_mod", model)
        try:
            return self._evaluate(model)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - any backend failure falls back to eager
            eager = getattr(model, "_orig_mod", None)
            if eager is None:
                raise
            log.warning("torch.compile failed at the first evaluation (%s); evaluating without it", cause_line(error))
            self._eager_only = True
            return self._evaluate(eager)

    def _evaluate(self, model: torch.nn.Module) -> float:
        accelerator = self.accelerator
        model.eval()
        try:
            if isinstance(self.data, dict):
                names = list(self.data)
                means = torch.stack([self._mean_loss(model, self.data[name]) for name in names])
                losses = accelerator.reduce(means, reduction="mean").tolist()
                self.per_source = dict(zip(names, losses))
                return sum(losses) / len(losses)
            return accelerator.reduce(self._mean_loss(model, self.data), reduction="mean").item()
        finally:
            model.train()

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

    @staticmethod
    def record(state, loss: float) -> None:
        """Into the TrainState: the same on every rank, since the loss is reduced across processes."""
        improved = loss < state.best_eval_loss
        state.best_eval_loss = min(state.best_eval_loss, loss)
        state.last_eval_step, state.last_eval_loss = state.step, loss
        state.evals_without_improvement = 0 if improved else state.evals_without_improvement + 1

    def stop_reason(self, state) -> str | None:
        """--early-stop-patience: why the run stops now, or None."""
        patience = self.config.early_stop_patience
        if not patience or state.evals_without_improvement < patience:
            return None
        return (f"early stop at step {state.step}: the eval loss has not improved for {patience} evaluations "
                f"(--early-stop-patience {patience}; best {state.best_eval_loss:.4f})")


def eval_values(loss: float, per_source: dict[str, float] | None = None) -> dict[str, float]:
    values = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
    for name, source_loss in (per_source or {}).items():
        values[f"eval/loss/{name}"] = source_loss
        values[f"eval/perplexity/{name}"] = math.exp(min(source_loss, 50.0))
    return values
