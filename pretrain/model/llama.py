"""The Llama family (transformers' LlamaForCausalLM): RMSNorm, SwiGLU, rotary positions on every head dimension and
grouped-query attention, the block most 0.1-7B pre-training runs use today."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from pretrain.model.family import ModelFamily

if TYPE_CHECKING:
    from configs import ModelConfig

# ModelConfig fields Llama has no use for, with the only value they may hold under it (their default).
_GPT_NEOX_ONLY = {"rotary_pct": 0.25, "use_parallel_residual": True, "hidden_dropout": 0.0}


class Llama(ModelFamily):
    name = "llama"
    display_name = "Llama"
    layer_class_name = "LlamaDecoderLayer"
    defaults = {"hidden_act": "silu", "layer_norm_eps": 1e-6}
    grouped_query_attention = True
    # Published Llama-block shapes (SmolLM, TinyLlama, Llama 2 and 3.2); their vocabulary and tying are not part of
    # the preset: the run's --vocab-size and --tie-word-embeddings apply.
    presets = {
        "smollm-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                            intermediate_size=1536),
        "smollm-360m": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                            intermediate_size=2560),
        "tinyllama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                               intermediate_size=5632),
        "llama3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                            intermediate_size=8192),
        "smollm-1.7b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                            intermediate_size=8192),
        "llama3.2-3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                            intermediate_size=8192),
        "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                          intermediate_size=11008),
    }

    def resolve(self, model: ModelConfig) -> ModelConfig:
        model = super().resolve(model)
        if model.num_key_value_heads is None:
            model = dataclasses.replace(model, num_key_value_heads=model.num_attention_heads)
        return model

    def validate(self, model: ModelConfig) -> None:
        super().validate(model)
        for name, only in _GPT_NEOX_ONLY.items():
            if getattr(model, name) != only:
                raise ValueError(f"--{name.replace('_', '-')} is a gpt_neox field the llama family does not use; "
                                 f"leave it at {only}")
        kv_heads = self.resolve(model).num_key_value_heads
        if kv_heads < 1 or model.num_attention_heads % kv_heads:
            raise ValueError(f"--num-attention-heads ({model.num_attention_heads}) must be a multiple of "
                             f"--num-key-value-heads ({kv_heads})")

    def hf_config(self, model: ModelConfig):
        from transformers import LlamaConfig

        model = self.resolve(model)
        return LlamaConfig(
            vocab_size=model.vocab_size,
            hidden_size=model.hidden_size,
            num_hidden_layers=model.num_hidden_layers,
            num_attention_heads=model.num_attention_heads,
            num_key_value_heads=model.num_key_value_heads,
            intermediate_size=model.intermediate_size,
            max_position_embeddings=model.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": float(model.rotary_emb_base)},
            hidden_act=model.hidden_act,
            tie_word_embeddings=model.tie_word_embeddings,
            attention_dropout=model.attention_dropout,
            rms_norm_eps=model.layer_norm_eps,
            initializer_range=model.initializer_range,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
        )

    def model_class(self) -> type:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM

    def _kv_width(self, model: ModelConfig) -> int:
        kv_heads = model.num_key_value_heads or model.num_attention_heads
        return kv_heads * (model.hidden_size // model.num_attention_heads)

    def layer_parameters(self, model: ModelConfig) -> int:
        h, f = model.hidden_size, model.intermediate_size
        # two RMSNorm weights, Q and O (h x h), K and V (h x kv_width), gate, up and down (h x f); no biases
        return 2 * h + 2 * h * h + 2 * h * self._kv_width(model) + 3 * h * f

    def layer_matrix_parameters(self, model: ModelConfig) -> int:
        return self.layer_parameters(model) - 2 * model.hidden_size

    def final_parameters(self, model: ModelConfig) -> int:
        return model.hidden_size  # the final RMSNorm

    def final_activation_bytes(self, model: ModelConfig, tokens: int, compute_bytes: int, residual_bytes: int) -> int:
        """The final RMSNorm keeps its fp32 input, its reciprocal root and its normalised output; the output projection
        keeps the norm's output (or its low-precision cast)."""
        r, c = residual_bytes, compute_bytes
        return tokens * model.hidden_size * (4 + r + (r if c == r else c)) + 20 * tokens

    def standard_block(self, hidden_size: int) -> dict[str, int]:
        """SwiGLU's FFN at 8/3 of the width rounded up to a multiple of 256 (Llama's multiple_of), which keeps the
        block's parameters near a 4x MLP's; a quarter as many K/V heads as heads (Llama 3's 32:8) where they
        divide, else one per head."""
        block = super().standard_block(hidden_size)
        heads = block["num_attention_heads"]
        return {**block, "intermediate_size": 256 * math.ceil(8 * hidden_size / 3 / 256),
                "num_key_value_heads": heads // 4 if heads % 4 == 0 else heads}

    def layer_activation_bytes(self, model: ModelConfig, seq_len: int, micro_batch: int, compute_bytes: int,
                               residual_bytes: int, flash: bool = True) -> int:
        """Counted from what each op saves (checked against saved-tensor hooks in tests/test_llama.py). Per token
        and hidden unit: each RMSNorm keeps its input in fp32 (the residual stream itself, or an upcast copy of a
        bf16 one) and its normalised output in the residual dtype; the matmuls after it keep that output, or under
        autocast a low-precision cast per matmul (Q, K, V; gate, up: autocast caches only weight casts). Attention
        keeps Q and K after rotary, V, and its output (which is o_proj's input), K and V at the K/V width; SwiGLU
        keeps gate, silu(gate), up and their product. The math kernel also keeps the attention probabilities."""
        bs = micro_batch * seq_len
        h, f, heads = model.hidden_size, model.intermediate_size, model.num_attention_heads
        r, c = residual_bytes, compute_bytes
        norm_outputs = 2 * r if c == r else 5 * c  # one shared input per norm, or a cast per matmul reading it
        hidden = bs * h * (2 * 4 + 2 * r + norm_outputs + 2 * c)
        keys_values = bs * self._kv_width(model) * 2 * c
        mlp = 4 * bs * f * c
        small = 8 * bs + 4 * bs * heads  # RMSNorm reciprocal roots, attention log-sum-exp
        scores = 0 if flash else micro_batch * heads * seq_len * seq_len * (c + 4)
        return hidden + keys_values + mlp + small + scores

    def layer_backward_bytes(self, model: ModelConfig, seq_len: int, micro_batch: int, compute_bytes: int,
                             residual_bytes: int, flat_unit_gradient: bool = False) -> int:
        """As GPT-NeoX's (the gradients of the MLP's activations, of the residual stream and of one hidden-size
        activation, and one weight gradient in the compute dtype), with SwiGLU's two FFN-wide gradients (gate and
        up) where a 4x MLP has one; checked with torch's MemTracker (tests/test_memory_tracker.py)."""
        bs = micro_batch * seq_len
        h, f = model.hidden_size, model.intermediate_size
        weight_gradient = compute_bytes * (self.layer_parameters(model) if flat_unit_gradient else h * f)
        return 2 * compute_bytes * bs * f + (residual_bytes + compute_bytes) * bs * h + weight_gradient
