"""Trains the test model under DDP, FSDP1 and FSDP2 on 2 gloo CPU processes, then resumes each one's step-3
checkpoint on a single process; writes every loss to a JSON file that tests/test_distributed.py judges.

Accelerate runs FSDP only on GPUs (on CPU processes it falls back to DDP), so this wraps the model with torch's FSDP
directly, with what configs/accelerate/fsdp.yaml asks Accelerate for: FULL_SHARD, one unit per block of the model family,
use_orig_params. Everything else is the pipeline's own: model, optimizer groups, the loop's step function
(pretrain.loop.train_step: accumulation, clipping, the update, the learning rate), the global sample order, and the full
model/optimizer state that the checkpointer saves.

    accelerate launch --multi_gpu --num_processes 2 tests/fsdp_cpu_check.py DATA_DIR RESULT_JSON
"""

from __future__ import annotations

import functools
import io
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import set_seed
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from configs import get_config
from pretrain.checkpoint.state_dicts import (
    full_optimizer_state,
    load_full_optimizer_state,
)
from pretrain.data.format import discover_shards, inspect_shards, split_eval_shards
from pretrain.data.samples import TokenSamples, make_train_loader
from pretrain.loop import fsdp_mixed_precision, make_accelerator, train_step
from pretrain.model.build import block_classes, build_model
from pretrain.model.families import family_for
from pretrain.optim import build_optimizer, lr_at
from tests.process_exit import leave_without_teardown

CONFIG = get_config("test")
STEPS, SAVE_AT = 6, 3
STRATEGIES = ("ddp", "fsdp1", "fsdp2")


def wrap(model: torch.nn.Module, strategy: str, mixed_precision=None) -> torch.nn.Module:
    if strategy == "ddp":
        return DistributedDataParallel(model)
    if strategy == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        blocks = block_classes(model, family_for(CONFIG.model))
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=blocks)
        return FullyShardedDataParallel(model, auto_wrap_policy=policy, sharding_strategy=ShardingStrategy.FULL_SHARD,
                                        use_orig_params=True, device_id=torch.device("cpu"),
                                        mixed_precision=mixed_precision)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    blocks = tuple(block_classes(model, family_for(CONFIG.model)))
    for layer in [module for module in model.modules() if isinstance(module, blocks)]:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train(accelerator, model, optimizer, batches, steps: range, strategy: str) -> list[float]:
    """The product's step for each of `steps` (1-based optimizer steps); the logged loss is the mean over ranks.

    strategy "single" is one process on its own (the resumed run), with nothing to average over.
    """
    losses = []
    accumulation = CONFIG.gradient_accumulation_steps
    for step in steps:
        result = train_step(model, optimizer, accelerator, batches, accumulation, CONFIG.max_grad_norm,
                            lr_at(step, CONFIG))
        loss_sum = result.loss_sum
        if strategy != "single":
            dist.all_reduce(loss_sum)
            loss_sum /= dist.get_world_size()
        losses.append(loss_sum.item() / accumulation)
    return losses


def run_distributed(accelerator, strategy: str, data: TokenSamples, rank: int, world: int) -> dict:
    set_seed(CONFIG.seed)
    model = build_model(CONFIG.model)
    parameter_names = [name for name, _ in model.named_parameters()]
    if strategy == "fsdp2":
        model = wrap(model, strategy)
        optimizer = build_optimizer(model, CONFIG)  # fully_shard swaps in DTensor parameters: build after
    else:
        optimizer = build_optimizer(model, CONFIG)  # before wrapping, as loop.py does: groups see the real shapes
        model = wrap(model, strategy)
    batches = iter(make_train_loader(data, 0, CONFIG.per_device_train_batch_size, rank, world, num_workers=0))
    losses = train(accelerator, model, optimizer, batches, range(1, SAVE_AT + 1), strategy)
    full = StateDictOptions(full_state_dict=True)
    checkpoint = saved_and_loaded({
        "model": get_model_state_dict(model, options=full),
        "optimizer": full_optimizer_state(model, optimizer),
    })
    local_numel = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    losses += train(accelerator, model, optimizer, batches, range(SAVE_AT + 1, STEPS + 1), strategy)
    return {
        "losses": losses,
        "checkpoint": checkpoint,
        "parameter_names": parameter_names,
        "local_numel": local_numel,
    }


def run_bf16(accelerator, strategy: str, policy, data: TokenSamples, rank: int, world: int,
             steps: int = STEPS) -> dict:
    """bf16 as Accelerate runs it on GPUs: autocast around the forward (its weight cache off, as the loop sets it),
    under FSDP1 also the given mixed-precision policy. Returns the losses and the rotary frequencies' dtype after
    training (they are buffers: FSDP1 casts them to the policy's buffer_dtype)."""
    set_seed(CONFIG.seed)
    model = build_model(CONFIG.model)
    optimizer = build_optimizer(model, CONFIG)
    model = wrap(model, strategy, policy)
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)(model.forward)
    batches = iter(make_train_loader(data, 0, CONFIG.per_device_train_batch_size, rank, world, num_workers=0))
    losses = train(accelerator, model, optimizer, batches, range(1, steps + 1), strategy)
    frequencies = {name: str(buffer.dtype) for name, buffer in model.named_buffers() if name.endswith("inv_freq")}
    return {"losses": losses, "rotary_dtypes": sorted(set(frequencies.values()))}


def accelerate_default_policy():
    """The policy Accelerate builds for mixed_precision bf16 on its own (FullyShardedDataParallelPlugin)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=1, sync_module_states=False, cpu_ram_efficient_loading=False)
    plugin.set_mixed_precision("bf16")
    return plugin.mixed_precision_policy


def saved_and_loaded(state: dict) -> dict:
    """A copy through torch.save and the checkpoint's weights_only load: some tensors are the live ones otherwise."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def resume_on_one_process(accelerator, checkpoint: dict, data: TokenSamples) -> list[float]:
    """What `--resume` does with 1 process: the whole global batch per micro-batch, from the saved sample position."""
    model = build_model(CONFIG.model)
    model.load_state_dict(checkpoint["model"])
    optimizer = build_optimizer(model, CONFIG)
    load_full_optimizer_state(model, optimizer, checkpoint["optimizer"])
    world = dist.get_world_size()
    samples_consumed = SAVE_AT * CONFIG.per_device_train_batch_size * CONFIG.gradient_accumulation_steps * world
    batches = iter(make_train_loader(data, samples_consumed, CONFIG.per_device_train_batch_size * world, 0, 1, 0))
    return train(accelerator, model, optimizer, batches, range(SAVE_AT + 1, STEPS + 1), "single")


def load_data(data_dir: Path) -> TokenSamples:
    paths = discover_shards(data_dir)
    shards = inspect_shards(data_dir, paths, CONFIG.seq_len, CONFIG.model.vocab_size)
    train_shards, _ = split_eval_shards(shards, CONFIG.eval_shards)
    return TokenSamples(data_dir, train_shards, CONFIG.seq_len, CONFIG.seed)


def main(data_dir: str, result_path: str) -> None:
    accelerator = make_accelerator(CONFIG)  # the pipeline's own process group: gloo on CPU processes
    rank, world = accelerator.process_index, accelerator.num_processes
    data = load_data(Path(data_dir))
    runs = {strategy: run_distributed(accelerator, strategy, data, rank, world) for strategy in STRATEGIES}
    bf16 = {
        "ddp": run_bf16(accelerator, "ddp", None, data, rank, world),
        "fsdp1": run_bf16(accelerator, "fsdp1", fsdp_mixed_precision("bf16"), data, rank, world),
        "fsdp1_accelerate_default": run_bf16(accelerator, "fsdp1", accelerate_default_policy(), data, rank, world,
                                             steps=1),
    }
    if rank == 0:
        result = {"world_size": world, "distributed_type": str(accelerator.distributed_type), "bf16": bf16}
        for strategy, run in runs.items():
            checkpoint = run["checkpoint"]
            result[strategy] = {
                "losses": run["losses"],
                "resumed_losses": resume_on_one_process(accelerator, checkpoint, data),
                "model_keys": sorted(checkpoint["model"]),
                "optimizer_keys": sorted(checkpoint["optimizer"]["state"]),
                "parameter_names": sorted(run["parameter_names"]),
                "local_numel": run["local_numel"],
                "total_numel": sum(t.numel() for t in checkpoint["model"].values()),
            }
        Path(result_path).write_text(json.dumps(result, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    leave_without_teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
