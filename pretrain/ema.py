"""An exponential moving average of the weights (--ema-decay): kept on the device beside them, updated after every
optimizer step, saved in the checkpoint (ema.safetensors) and resumed bit for bit, and exportable instead of them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
)

from pretrain.checkpoint.state_dicts import clean_state_dict


class EMA:
    """ema <- decay * ema + (1 - decay) * weights, for every trainable parameter.

    Cost: 4 bytes per parameter on each GPU (a shard of them under FSDP; a term of the memory plan), and one fused
    foreach lerp over all of them per step, queued on the device with no host sync. On the host it would cost a
    device-to-host copy of the whole model every step instead.
    """

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, decay: float) -> None:
        self.accelerator = accelerator
        self.model = model  # prepared (wrapped), not compiled: the same parameter tensors as the compiled module
        self.decay = decay
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = list(clean_state_dict({name: p for name, p in named}))
        self.params = [p for _, p in named]
        with torch.no_grad():
            self.shadow = [p.detach().clone() for p in self.params]
        self.sharded = hasattr(model, "clip_grad_norm_") or any(hasattr(p, "to_local") for p in self.params)

    def update(self) -> None:
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole EMA keyed like the model's state dict. Every rank calls it: under FSDP the shards are gathered by
        the model's own state-dict machinery, with the EMA swapped into the weights for that moment (one more
        shard-sized copy, briefly)."""
        if not self.sharded:
            return dict(zip(self.names, self.shadow, strict=True))
        with torch.no_grad(), self._swapped_in():
            gathered = clean_state_dict(self.accelerator.get_state_dict(self.model))
        return {name: gathered[name] for name in self.names if name in gathered}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """From a checkpoint's ema.safetensors (every rank, after prepare())."""
        with torch.no_grad():
            if not self.sharded:
                for name, tensor in zip(self.names, self.shadow, strict=True):
                    tensor.copy_(state[name])
                return
            with self._swapped_in():
                set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=False))
                for tensor, param in zip(self.shadow, self.params, strict=True):
                    tensor.copy_(param.detach())

    def reset_to_weights(self) -> None:
        """A run that resumes a checkpoint without an EMA starts one from its weights."""
        with torch.no_grad():
            for tensor, param in zip(self.shadow, self.params, strict=True):
                tensor.copy_(param.detach())

    @contextlib.contextmanager
    def _swapped_in(self) -> Iterator[None]:
        """The EMA in the weights for a moment (FSDP gathers or scatters only weights); the weights come back after."""
        saved = [p.detach().clone() for p in self.params]
        try:
            for param, tensor in zip(self.params, self.shadow, strict=True):
                param.data.copy_(tensor)
            yield
        finally:
            for param, tensor in zip(self.params, saved, strict=True):
                param.data.copy_(tensor)
