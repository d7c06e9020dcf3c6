"""Model and optimizer state between wrapped models (DDP, FSDP, torch.compile) and checkpoints.

Checkpoints hold the whole state keyed by plain parameter names, so any strategy on any number of
processes, compiled or not, can load them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state keyed by parameter name, so any strategy on any number of processes can load it.

    `optimizer.state_dict()` holds only this rank's shard under FSDP, and numbers parameters instead of naming them.
    Every rank must call this under FSDP. On GPUs the result lands in CPU memory, on rank 0 only when there are several
    processes; on CPUs nothing is "offloaded", which FSDP1 would crash doing (segfault, torch 2.13 with gloo).
    """
    # Offloaded to CPU only when sharded: gathering a whole FSDP state on one GPU would not fit; unsharded, the
    # checkpointer copies the live GPU tensors into its pinned buffers itself (one copy instead of two).
    sharded = any(hasattr(p, "to_local") for p in model.parameters()) or hasattr(model, "clip_grad_norm_")
    on_gpu = next(model.parameters()).device.type != "cpu"
    options = StateDictOptions(full_state_dict=True, cpu_offload=on_gpu and sharded)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Loads what full_optimizer_state saved; under FSDP each rank keeps its own shard (every rank must call it)."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without wrapper prefixes (`_orig_mod.` from torch.compile, `module.` from DDP, and the wrapper names FSDP1
    and checkpoint_wrapper put into named_parameters()); tensors as they are."""
    cleaned = {}
    for key, tensor in state.items():
        for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
            key = key.replace(wrapper, "")
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key.replace("._orig_mod.", ".")] = tensor.detach()
    return cleaned


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(clean_state_dict(state), strict=False)
    # A tied output projection is the input embedding under a second name: a state may hold it under either.
    embedding = model.get_input_embeddings().weight
    tied = {name for name, p in model.named_parameters(remove_duplicate=False) if p is embedding}
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def load_live_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Into a prepared model in place (plain, DDP or FSDP; compiled or not), as a rollback needs: the parameters keep
    their identity, so the optimizer's references stay valid. Every rank calls it (FSDP scatters the full state)."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper shares the parameters
    if hasattr(inner, "clip_grad_norm_") or any(hasattr(p, "to_local") for p in inner.parameters()):
        set_model_state_dict(inner, clean_state_dict(state), options=StateDictOptions(full_state_dict=True))
        return
    load_model_state(getattr(inner, "module", inner), state)  # DDP's wrapper holds the model as .module


def snapshot(state: Any) -> Any:
    """A host-memory copy of every tensor in a nested state, so training can change the originals at once."""
    return HostCopies().copy(state)


class HostCopies:
    """Host buffers that a state is copied into, kept and reused by the next save of the same shapes: a save costs one
    memcpy of the state and no allocation. Buffers for GPU tensors are pinned, so the copies run at full PCIe speed
    and are queued without a sync each; one synchronize at the end. Tensors that are already fresh host copies (an
    FSDP state gathered with CPU offload) are taken as they are. The caller must not copy again while the previous
    copies are still being read (the checkpointer waits for its writer first)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, state: Any, fresh_on_host: bool = False) -> Any:
        copied = self._copy(state, "", fresh_on_host)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        return copied

    def _copy(self, state: Any, path: str, fresh_on_host: bool) -> Any:
        if isinstance(state, torch.Tensor):
            return self._tensor(state.detach(), path, fresh_on_host)
        if isinstance(state, dict):
            return {key: self._copy(value, f"{path}/{key}", fresh_on_host) for key, value in state.items()}
        if isinstance(state, (list, tuple)):
            return type(state)(self._copy(value, f"{path}/{index}", fresh_on_host) for index, value in enumerate(state))
        return state

    def _tensor(self, tensor: torch.Tensor, path: str, fresh_on_host: bool) -> torch.Tensor:
        if fresh_on_host and tensor.device.type == "cpu":
            return tensor.contiguous()  # contiguous: safetensors requires it
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=tensor.is_cuda)
            self._buffers[path] = buffer
        buffer.copy_(tensor, non_blocking=tensor.is_cuda)
        return buffer
