"""Run by tests/test_distributed.py under the launcher's CPU flags (2 gloo processes): each rank trains the prepared
model on its own, different tokens, and the weights must still be bit-identical on every rank afterwards.

Writes what it saw to a JSON file: per-rank losses (which differ: the data differs), whether the weights agree after
the synchronised steps, and, as a control that the comparison can see a difference, after one step taken under
`no_sync` (gradients not all-reduced).

    accelerate launch --multi_gpu --num_processes 2 tests/ddp_sync_check.py RESULT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate.utils import gather, set_seed

from configs import get_config
from pretrain.loop import make_accelerator, train_step
from pretrain.model.build import build_model
from pretrain.optim import build_optimizer, lr_at
from tests.process_exit import leave_without_teardown

CONFIG = get_config("test")
SYNCED_STEPS = 3


def flat_weights(accelerator, model) -> torch.Tensor:
    parameters = accelerator.unwrap_model(model).parameters()
    return torch.cat([p.detach().reshape(-1) for p in parameters])


def spread_across_ranks(accelerator, model) -> float:
    """Largest difference between any rank's weights and rank 0's; 0.0 means bit-identical."""
    every_rank = gather(flat_weights(accelerator, model)[None])
    return (every_rank - every_rank[0]).abs().max().item()


def step(accelerator, model, optimizer, generator) -> float:
    """One optimizer step of the product's own step function, on tokens only this rank draws."""
    accumulation = CONFIG.gradient_accumulation_steps
    batches = iter([torch.randint(0, CONFIG.model.vocab_size, (2, 32), generator=generator) for _ in range(accumulation)])
    # The peak rate (the end of warmup), so three steps move the weights measurably.
    result = train_step(model, optimizer, accelerator, batches, accumulation, CONFIG.max_grad_norm,
                        lr_at(CONFIG.warmup_steps, CONFIG))
    return result.loss_sum.item() / accumulation


def main(result_path: str) -> None:
    accelerator = make_accelerator(CONFIG)
    set_seed(CONFIG.seed)
    model = build_model(CONFIG.model)
    optimizer = build_optimizer(model, CONFIG)
    model, optimizer = accelerator.prepare(model, optimizer)
    initial = flat_weights(accelerator, model).clone()
    generator = torch.Generator().manual_seed(1000 + accelerator.process_index)

    losses = [step(accelerator, model, optimizer, generator) for _ in range(SYNCED_STEPS)]
    moved = (flat_weights(accelerator, model) - initial).abs().max().item()
    spread_after_synced_steps = spread_across_ranks(accelerator, model)
    with accelerator.no_sync(model):
        step(accelerator, model, optimizer, generator)
    spread_after_unsynced_step = spread_across_ranks(accelerator, model)

    losses_by_rank = gather(torch.tensor([losses])).tolist()
    if accelerator.is_main_process:
        Path(result_path).write_text(json.dumps({
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "backend": accelerator.state.backend,
            "losses_by_rank": losses_by_rank,
            "largest_weight_change": moved,
            "spread_after_synced_steps": spread_after_synced_steps,
            "spread_after_unsynced_step": spread_after_unsynced_step,
        }, indent=1))
    accelerator.end_training()
    leave_without_teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
