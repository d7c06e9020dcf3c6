"""The dry run: the resolved config and the 1.2B model built on the meta device, printed without allocating it."""

from __future__ import annotations

import os

import torch

from configs import TrainingConfig
from pretrain.loop import effective_mixed_precision, plan_lines
from pretrain.model import build_model


def print_dry_run(config: TrainingConfig, num_processes: int | None = None) -> None:
    processes = num_processes or int(os.environ.get("WORLD_SIZE", "0")) or config.num_processes
    model = build_model(config.model, device="meta")  # shapes only: no memory for the weights
    cuda = torch.cuda.is_available()
    print("dry run: nothing is allocated or trained")
    for line in plan_lines(config, processes, model):
        print(line)
    print(f"precision: {effective_mixed_precision(config, cuda)} on {'CUDA' if cuda else 'CPU'}"
          f"{'' if cuda else f' (the config asks for {config.mixed_precision} on GPU)'}; torch.compile: {config.compile_model}")
    print(f"checkpoints: every {config.save_steps} steps to {config.output_dir}"
          f"{' and ' + config.checkpoint_bucket if config.checkpoint_bucket else ''}, keep {config.save_total_limit}")
