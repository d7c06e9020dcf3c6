"""Building a model of any registered family through transformers' own classes, and counting what it holds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from configs import ModelConfig
from pretrain.model.attention import CAUSAL_SDPA, refuse_padding_mask
from pretrain.model.families import family_for
from pretrain.model.family import ModelFamily


def build_model(model: ModelConfig, device: str | torch.device = "cpu", attn_implementation: str = CAUSAL_SDPA):
    """A freshly initialised model of the config's family; on the meta device nothing is allocated (dry runs).

    attn_implementation: "causal_sdpa" (default: causal attention without a mask), or any of transformers' own
    ("sdpa", "eager", ...). The choice lives only in memory: save_pretrained does not write it, so an exported
    model loads with transformers' defaults anywhere.
    """
    family = family_for(model)
    hf_config = family.hf_config(family.resolve(model))
    hf_config._attn_implementation = attn_implementation
    with torch.device(device):
        built = family.model_class()(hf_config)
    if attn_implementation == CAUSAL_SDPA:
        built.register_forward_pre_hook(refuse_padding_mask, with_kwargs=True)
    return built


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant checkpointing).

    Keeps only each block's input ([batch, seq, hidden] per block) alive between forward and backward, for about one
    extra forward pass of compute (~33% more FLOPs per step). Call before torch.compile and before
    accelerator.prepare (FSDP and DDP wrap the already-checkpointed blocks).
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def add_z_loss(model: torch.nn.Module, coefficient: float):
    """Adds coefficient * mean(logsumexp(logits)^2) over the predicted positions to the loss of every training forward
    pass (z-loss, PaLM: keeps the softmax normaliser near 1 and the logits from drifting). A hook, so the training
    step is unchanged and evaluation (model.eval()) reports the plain loss. Cost: an fp32 copy of the logits
    (4 bytes x tokens x vocabulary) kept for the backward pass, which the memory plan does not count."""

    def hook(module, args, kwargs, output):
        if module.training and getattr(output, "loss", None) is not None:
            normaliser = torch.logsumexp(output.logits[:, :-1].float(), dim=-1)
            output.loss = output.loss + coefficient * normaliser.pow(2).mean()
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


@dataclass(frozen=True)
class ModelSize:
    total_params: int
    embedding_params: int  # input embedding plus output projection when untied

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params


def count_parameters(model: torch.nn.Module) -> ModelSize:
    """Counts what the built model really holds (shared tensors once), not a formula."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    embedding_ids = {id(model.get_input_embeddings().weight)}
    embedding = model.get_input_embeddings().weight.numel()
    output = model.get_output_embeddings()
    if output is not None and id(output.weight) not in embedding_ids:
        embedding += output.weight.numel()
    return ModelSize(total_params=total, embedding_params=embedding)


def block_classes(model: torch.nn.Module, family: ModelFamily) -> set[type]:
    """The classes of the model's blocks, found by the family's layer class name as Accelerate finds them: what FSDP
    wraps one unit each (torch's transformer_auto_wrap_policy takes this set)."""
    found = {type(module) for module in model.modules() if type(module).__name__ == family.layer_class_name}
    if not found:
        raise ValueError(f"the {family.display_name} family names block class {family.layer_class_name}, which the "
                         f"built model ({type(model).__name__}) does not contain")
    return found


def describe(size: ModelSize) -> str:
    return (
        f"{size.total_params:,} parameters ({size.total_params / 1e9:.3f} B), "
        f"{size.non_embedding_params:,} non-embedding, {size.embedding_params:,} in embeddings"
    )

