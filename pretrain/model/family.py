"""The model-family seam: everything that differs between architectures, behind one interface.

The memory plan, the launcher (FSDP wrapping), the plan's FLOPs and the model builder ask a family
(pretrain.model.families.family_for); nothing else in the project names an architecture. Pure arithmetic here:
transformers is imported only when a model is built, so the launcher plans without it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

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
