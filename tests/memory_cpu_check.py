"""The memory plan against torch's MemTracker on 2 gloo CPU processes: the product's train_step under DDP (fresh, after
a resume, and as the loop was before its gradients stayed in DDP's buckets) and under FSDP1 with the loop's bf16
policy, activation checkpointing off and on; writes rank 0's comparisons to a JSON file that
tests/test_memory_tracker.py judges.

    accelerate launch --multi_gpu --num_processes 2 tests/memory_cpu_check.py RESULT_JSON
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import torch
from accelerate.utils.modeling import get_mixed_precision_context_manager
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from configs import get_config
from pretrain.checkpoint.state_dicts import (
    full_optimizer_state,
    load_full_optimizer_state,
)
from pretrain.loop import (
    fsdp_mixed_precision,
    make_accelerator,
    place_gradients_in_buckets,
    train_step,
)
from pretrain.memory import plan_memory
from pretrain.model.build import (
    block_classes,
    build_model,
    enable_activation_checkpointing,
)
from pretrain.model.families import family_for
from pretrain.optim import build_optimizer
from tests.memory_tracking import PlanTermTracker, compare
from tests.process_exit import leave_without_teardown

# A vocabulary, hidden and MLP size, and token count that differ, so a tensor's last dimension names what it is.
SHAPE = dataclasses.replace(get_config("test").model, num_hidden_layers=2, vocab_size=1000)
MICRO_BATCH, SEQ_LEN, ACCUMULATION = 2, 64, 2
CONFIG = dataclasses.replace(get_config("test"), model=SHAPE, seq_len=SEQ_LEN, per_device_train_batch_size=MICRO_BATCH,
                             gradient_accumulation_steps=ACCUMULATION, mixed_precision="bf16",
                             cpu_mixed_precision=True)


def batches(generator: torch.Generator):
    return iter([torch.randint(0, SHAPE.vocab_size, (MICRO_BATCH, SEQ_LEN), generator=generator)
                 for _ in range(ACCUMULATION)])


def step(model, optimizer, accelerator, generator) -> None:
    train_step(model, optimizer, accelerator, batches(generator), ACCUMULATION, CONFIG.max_grad_norm, 1e-3)


def plan(strategy: str, checkpointing: bool):
    # the CPU's AdamW runs parameter by parameter: no group-wide temporaries, as with the fused kernel
    return plan_memory(SHAPE, seq_len=SEQ_LEN, micro_batch=MICRO_BATCH, accumulation=ACCUMULATION, num_gpus=2,
                       strategy=strategy, activation_checkpointing=checkpointing, mixed_precision="bf16",
                       gpu_memory_gib=80, ddp_gradient_as_bucket_view=True)


def ddp(accelerator, checkpointing: bool, resumed_state=None, before_the_fix: bool = False) -> tuple[dict, dict]:
    """A DDP run: with `resumed_state`, the first step after loading that optimizer state; else the third step.
    before_the_fix: the loop as it was (gradients set to None after each step, none placed in the buckets)."""
    torch.manual_seed(0)
    model = build_model(SHAPE)
    if checkpointing:
        enable_activation_checkpointing(model)
    optimizer = build_optimizer(model, CONFIG)
    tracker = PlanTermTracker(SHAPE.vocab_size, tuple(block_classes(model, family_for(SHAPE))))
    generator = torch.Generator().manual_seed(accelerator.process_index)
    with tracker.setting_up():
        model, optimizer = accelerator.prepare(model, optimizer)
        if resumed_state is not None:
            load_full_optimizer_state(model, optimizer.optimizer, resumed_state)  # Checkpointer.restore
        if not before_the_fix:
            place_gradients_in_buckets(model, accelerator)  # what the loop does after prepare() and the restore
        for _ in range(0 if resumed_state is not None else 2):  # DDP remakes its buckets after the first sync
            step(model, optimizer, accelerator, generator)
            if before_the_fix:
                optimizer.zero_grad(set_to_none=True)  # the line train_step used to end with
    tracker.track_external(model, optimizer)
    with tracker:
        step(model, optimizer, accelerator, generator)
    state = full_optimizer_state(model, optimizer.optimizer)
    result = measured(tracker, plan("ddp", checkpointing))
    accelerator.free_memory()
    return result, state


def fsdp(accelerator, checkpointing: bool) -> dict:
    """FSDP1 as Accelerate wraps it on GPUs (FULL_SHARD, one unit per block, use_orig_params, the loop's bf16
    policy, autocast around the forward), on gloo; the second step."""
    torch.manual_seed(0)
    model = build_model(SHAPE)
    if checkpointing:
        enable_activation_checkpointing(model)
    optimizer = build_optimizer(model, CONFIG)
    blocks = tuple(block_classes(model, family_for(SHAPE)))
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=set(blocks))
    model = FullyShardedDataParallel(model, auto_wrap_policy=policy, sharding_strategy=ShardingStrategy.FULL_SHARD,
                                     use_orig_params=True, device_id=torch.device("cpu"),
                                     mixed_precision=fsdp_mixed_precision("bf16"))
    autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
    model.forward = autocast(model.forward)
    generator = torch.Generator().manual_seed(accelerator.process_index)
    step(model, optimizer, accelerator, generator)
    tracker = PlanTermTracker(SHAPE.vocab_size, blocks)
    tracker.track_fsdp(model)
    tracker.track_external(model, optimizer)
    with tracker:
        step(model, optimizer, accelerator, generator)
    return measured(tracker, plan("fsdp", checkpointing))


def measured(tracker: PlanTermTracker, planned) -> dict:
    return {row.name: {"planned": row.planned, "measured": row.measured} for row in compare(planned, tracker)}


def main(result_path: str) -> None:
    accelerator = make_accelerator(CONFIG)
    results = {}
    for checkpointing in (False, True):
        suffix = " + checkpointing" if checkpointing else ""
        results[f"ddp{suffix}"], state = ddp(accelerator, checkpointing)
        results[f"ddp resumed{suffix}"], _ = ddp(accelerator, checkpointing, resumed_state=state)
        results[f"fsdp{suffix}"] = fsdp(accelerator, checkpointing)
    results["ddp before the fix"], state = ddp(accelerator, False, before_the_fix=True)
    results["ddp resumed before the fix"], _ = ddp(accelerator, False, resumed_state=state, before_the_fix=True)
    if accelerator.is_main_process:
        Path(result_path).write_text(json.dumps(results, indent=1))
    accelerator.wait_for_everyone()
    leave_without_teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
