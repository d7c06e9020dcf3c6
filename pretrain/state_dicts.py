"""Model and optimizer state between wrapped models (DDP, FSDP, torch.compile) and checkpoints.

Checkpoints hold the whole state keyed by plain parameter names, so any strategy on any number of
processes, compiled or not, can load them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state keyed by parameter name, so any strategy on any number of processes can load it.

    `optimizer.state_dict()` holds only this rank's shard under FSDP, and numbers parameters instead of naming them.
    Every rank must call this under FSDP. On GPUs the result lands in CPU memory, on rank 0 only when there are several
    processes; on CPUs nothing is "offloaded", which FSDP1 would crash doing (segfault, torch 2.13 with gloo).
    """
    on_gpu = next(model.parameters()).device.type != "cpu"
    options = StateDictOptions(full_state_dict=True, cpu_offload=on_gpu)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Loads what full_optimizer_state saved; under FSDP each rank keeps its own shard (every rank must call it)."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without wrapper prefixes (`_orig_mod.` from torch.compile, `module.` from DDP); tensors as they are."""
    cleaned = {}
    for key, tensor in state.items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key.replace("._orig_mod.", ".")] = tensor.detach()
    return cleaned


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(clean_state_dict(state), strict=False)
    tied = {"embed_out.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")



def snapshot(state: Any) -> Any:
    """A host-memory copy of every tensor in a nested state, so training can change the originals at once."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True).contiguous()  # contiguous: safetensors requires it
    if isinstance(state, dict):
        return {key: snapshot(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(value) for value in state)
    return state
