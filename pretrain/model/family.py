"""The model-family seam: everything that differs between architectures, behind one interface.

The memory plan, the launcher (FSDP wrapping), the plan's FLOPs and the model builder ask a family
(pretrain.model.families.family_for); nothing else in the project names an architecture. Pure arithmetic here:
transformers is imported only when a model is built, so the launcher plans without it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from configs import ModelConfig


class ModelFamily(ABC):
    """One architecture, through transformers' own classes (nothing is re-implemented here).

    A family maps a ModelConfig to transformers' config and model class, names its block class (FSDP wraps one unit
    per block, activation checkpointing recomputes per block), and answers the shape arithmetic the memory plan and
    MFU need. `tests/test_model_family.py` registers a toy family and checks that these answers are what the plan,
    the FLOPs and the FSDP wrapping use, and `tests/test_memory_plan.py` that parameter_count matches transformers'.
    """

    name: str  # the --model-type value
    display_name: str  # as the plan prints it
    layer_class_name: str  # transformers' block class, e.g. GPTNeoXLayer
    # What an unset (None) ModelConfig field means for this family, e.g. {"hidden_act": "gelu"}.
    defaults: ClassVar[dict[str, Any]] = {}
    # Named block shapes (--size-preset): each sets hidden_size, num_hidden_layers, num_attention_heads,
    # intermediate_size and, with grouped-query attention, num_key_value_heads. Vocabulary and tying stay the run's.
    presets: ClassVar[dict[str, dict[str, int]]] = {}
    grouped_query_attention: ClassVar[bool] = False  # whether --num-key-value-heads may differ from the heads

    @abstractmethod
    def hf_config(self, model: ModelConfig) -> Any:
        """transformers' PretrainedConfig for this shape (use_cache off: training never decodes)."""

    @abstractmethod
    def model_class(self) -> type:
        """transformers' *ForCausalLM class."""

    def validate(self, model: ModelConfig) -> None:
        """Raises ValueError naming the flag for a shape this family cannot build."""
        if model.hidden_size % model.num_attention_heads:
            raise ValueError(f"--hidden-size ({model.hidden_size}) must be divisible by --num-attention-heads "
                             f"({model.num_attention_heads})")
        kv_heads = model.num_key_value_heads
        if kv_heads is not None and kv_heads != model.num_attention_heads and not self.grouped_query_attention:
            raise ValueError(f"--num-key-value-heads {kv_heads}: the {self.name} family has one K/V head per attention "
                             f"head; leave it unset")

    @abstractmethod
    def layer_parameters(self, model: ModelConfig) -> int:
        """Parameters of one block."""

    @abstractmethod
    def layer_matrix_parameters(self, model: ModelConfig) -> int:
        """Parameters of one block's weight matrices: what autocast copies to bf16/fp16 for each forward pass."""

    @abstractmethod
    def final_parameters(self, model: ModelConfig) -> int:
        """Parameters outside the blocks and the embeddings (the final norm)."""

    @abstractmethod
    def layer_activation_bytes(self, model: ModelConfig, seq_len: int, micro_batch: int, compute_bytes: int,
                               residual_bytes: int, flash: bool = True) -> int:
        """Bytes one block saves for its backward pass (eager autograd; torch.compile saves at most this).

        compute_bytes: the dtype matmuls run in (2 under bf16/fp16 autocast or FSDP's bf16 parameters, else 4);
        residual_bytes: the dtype of the residual stream (that of the weights). flash: an attention kernel that keeps
        nothing of size seq^2 (flash, cuDNN, memory-efficient SDPA)."""

    def final_activation_bytes(self, model: ModelConfig, tokens: int, compute_bytes: int, residual_bytes: int) -> int:
        """Bytes the final norm and the output projection save for the backward pass: a LayerNorm's input, mean and
        rstd, and the projection's input; the loss's own are counted by the memory plan."""
        return tokens * model.hidden_size * (residual_bytes + compute_bytes) + 16 * tokens

    @abstractmethod
    def layer_backward_bytes(self, model: ModelConfig, seq_len: int, micro_batch: int, compute_bytes: int,
                             residual_bytes: int, flat_unit_gradient: bool = False) -> int:
        """Bytes one block's backward pass holds on top of the activations saved for it (the gradients of its
        activations, a weight's gradient before it is accumulated). flat_unit_gradient: FSDP1, where the gradient
        arrives as one flat tensor for the whole block."""

    def embedding_parameters(self, model: ModelConfig) -> int:
        """Input embedding, plus the output projection when untied."""
        return model.vocab_size * model.hidden_size * (1 if model.tie_word_embeddings else 2)

    def parameter_count(self, model: ModelConfig) -> int:
        """Every parameter of the built model (shared tensors once): the count transformers reports."""
        return (self.embedding_parameters(model) + model.num_hidden_layers * self.layer_parameters(model)
                + self.final_parameters(model))

    def flops_per_token(self, model: ModelConfig, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N for the matmuls plus causal attention.

        PaLM's appendix B counts 12 * layers * hidden * seq for the scores and the weighted sum over the full square;
        with is_causal a token attends to (seq + 1) / 2 keys on average and flash/cuDNN kernels skip the masked
        blocks, so half of that: counting the full square would put MFU about 3.5% too high for `production`."""
        non_embedding = self.parameter_count(model) - self.embedding_parameters(model)
        output_projection = 6 * model.vocab_size * model.hidden_size
        attention = 6 * model.num_hidden_layers * model.hidden_size * seq_len
        return 6 * non_embedding + output_projection + attention

    def resolve(self, model: ModelConfig) -> ModelConfig:
        """The config with every unset field at this family's default (what the run records and builds)."""
        unset = {name: value for name, value in self.defaults.items() if getattr(model, name) is None}
        return dataclasses.replace(model, **unset) if unset else model

    def standard_block(self, hidden_size: int) -> dict[str, int]:
        """The block the sizing rule (pretrain/model/sizing.py) gives a width: heads of 64 dimensions below 2048, of
        128 from there (GPT-3, Pythia, Llama), and a 4x FFN. Families with another FFN or GQA override it."""
        head_dim = 64 if hidden_size < 2048 else 128
        return {"num_attention_heads": max(1, hidden_size // head_dim), "intermediate_size": 4 * hidden_size}

    def architecture_differences(self, folder_config: Any, model: ModelConfig) -> list[tuple[str, Any, Any]]:
        """(key, folder's value, this run's value) for each entry of transformers' config that defines the weights
        or the function of the model and differs; positions beyond seq_len, ids, dropout and init do not count."""
        ours = self.hf_config(self.resolve(model)).to_dict()
        theirs = folder_config.to_dict()
        differences = []
        for key in sorted(set(ours) | set(theirs)):
            if key in _NOT_ARCHITECTURE or "dropout" in key or key.startswith("_"):
                continue
            if _normalised(theirs.get(key)) != _normalised(ours.get(key)):
                differences.append((key, theirs.get(key), ours.get(key)))
        return differences


# Entries of a transformers config that neither shape the weights nor change what the model computes on a training
# batch of up to max_position_embeddings tokens.
_NOT_ARCHITECTURE = {
    "transformers_version", "architectures", "output_hidden_states", "output_attentions", "return_dict", "dtype",
    "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "initializer_range", "max_position_embeddings",
    "pretraining_tp", "name_or_path", "tokenizer_class", "classifier_dropout", "tie_encoder_decoder",
}


def _normalised(value: Any) -> Any:
    """Ints and floats compare by value (a config.json may say 10000 or 10000.0), dicts key by key."""
    if isinstance(value, dict):
        return {key: _normalised(item) for key, item in value.items()}
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return float(value)
