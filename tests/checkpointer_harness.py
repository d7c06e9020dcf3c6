"""An in-process Checkpointer on one CPU process with a small prepared model, for tests of the save/resume policy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from configs import CONFIGS, with_changes
from pretrain.checkpoint.checkpointer import Checkpointer
from pretrain.checkpoint.train_state import TrainState
from pretrain.preemption import PreemptionFlag


@contextmanager
def harness(tmp_path, weights: int = 1024, **changes) -> Iterator[tuple[Checkpointer, torch.nn.Module, object]]:
    """(checkpointer, prepared model, prepared optimizer); `weights` floats of parameters (12 MiB = 3 * 2**20)."""
    changes = {"checkpoint_bucket": "", "storage_retry_backoff_seconds": 0.01, **changes}
    config = with_changes(CONFIGS["test"], output_dir=str(tmp_path / "checkpoints"), **changes)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(weights // 16, 16, bias=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpointer = Checkpointer(config, accelerator, PreemptionFlag())
    try:
        yield checkpointer, model, optimizer
    finally:
        checkpointer.close()
        AcceleratorState._reset_state(reset_partial_state=True)


def state_at(step: int) -> TrainState:
    return TrainState(seed=42, seq_len=128, global_batch_samples=16, num_processes=1,
                      data={"train": [{"path": "a.npz", "num_tokens": 1000, "size_bytes": 2000}], "eval": []},
                      run_name="run", config={}, versions={}, step=step, samples_consumed=16 * step)


def take_step(model, optimizer) -> None:
    """Changes the weights and the optimizer state, so consecutive checkpoints differ."""
    model(torch.ones(1, model.in_features)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
