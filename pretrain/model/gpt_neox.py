"""The GPT-NeoX family (transformers' GPTNeoXForCausalLM): the 1.2B `production` model the project was built for."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pretrain.model.family import ModelFamily

if TYPE_CHECKING:
    from configs import ModelConfig


class GPTNeoX(ModelFamily):
    name = "gpt_neox"
    display_name = "GPT-NeoX"
    layer_class_name = "GPTNeoXLayer"
    defaults = {"hidden_act": "gelu", "layer_norm_eps": 1e-5}
    # Pythia's shapes (Biderman et al. 2023); pythia-1.4b is the `production` model.
    presets = {
        "pythia-70m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
        "pythia-160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        "pythia-410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        "pythia-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8, intermediate_size=8192),
        "pythia-1.4b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=8192),
        "pythia-2.8b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, intermediate_size=10240),
        "pythia-6.9b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=16384),
    }

    def hf_config(self, model: ModelConfig):
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(
            vocab_size=model.vocab_size,
            hidden_size=model.hidden_size,
            num_hidden_layers=model.num_hidden_layers,
            num_attention_heads=model.num_attention_heads,
            intermediate_size=model.intermediate_size,
            max_position_embeddings=model.max_position_embeddings,
            rotary_pct=model.rotary_pct,
            rotary_emb_base=model.rotary_emb_base,
            use_parallel_residual=model.use_parallel_residual,
            hidden_act=model.hidden_act,
            tie_word_embeddings=model.tie_word_embeddings,
            hidden_dropout=model.hidden_dropout,
            attention_dropout=model.attention_dropout,
            layer_norm_eps=model.layer_norm_eps,
            initializer_range=model.initializer_range,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
        )

    def model_class(self) -> type:
        from transformers import GPTNeoXForCausalLM

        return GPTNeoXForCausalLM

    def layer_parameters(self, model: ModelConfig) -> int:
        h, f = model.hidden_size, model.intermediate_size
        # two LayerNorms, fused QKV, attention output, and the MLP's two matrices, all with biases
        return 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)

    def layer_matrix_parameters(self, model: ModelConfig) -> int:
        h, f = model.hidden_size, model.intermediate_size
        return 4 * h * h + 2 * h * f

    def final_parameters(self, model: ModelConfig) -> int:
        return 2 * model.hidden_size  # the final LayerNorm

    def layer_activation_bytes(self, model: ModelConfig, seq_len: int, micro_batch: int, compute_bytes: int,
                               residual_bytes: int, flash: bool = True) -> int:
        """Counted from what each op saves (checked against saved-tensor hooks in tests/test_memory_plan.py): the
        residual stream x, the low-precision inputs of the QKV, attention-output and MLP matrices, the QKV output (V
        is a view of it), Q and K after rotary, the attention output and its contiguous copy, and the MLP's
        activation input and output. The math kernel also keeps the attention probabilities (and fp32 scores)."""
        bs = micro_batch * seq_len
        h, f, heads = model.hidden_size, model.intermediate_size, model.num_attention_heads
        hidden = bs * h * (residual_bytes + 9 * compute_bytes)
        if not model.use_parallel_residual:
            hidden += bs * h * residual_bytes  # the MLP's LayerNorm reads x + attention, a tensor of its own
        mlp = 2 * bs * f * compute_bytes
        small = 16 * bs + 4 * bs * heads  # LayerNorm mean/rstd, attention log-sum-exp
        scores = 0 if flash else micro_batch * heads * seq_len * seq_len * (compute_bytes + 4)
        return hidden + mlp + small + scores


    def layer_backward_bytes(self, model: ModelConfig, seq_len: int, micro_batch: int, compute_bytes: int,
                             residual_bytes: int, flat_unit_gradient: bool = False) -> int:
        """Measured with torch's MemTracker around train_step (tests/test_memory_tracker.py): the gradient of the MLP's
        activation, of the residual stream and of one hidden-size activation, and one weight gradient in the compute
        dtype before it is added to the fp32 gradient (under FSDP1 the whole block's flat gradient at once)."""
        bs = micro_batch * seq_len
        h, f = model.hidden_size, model.intermediate_size
        weight_gradient = compute_bytes * (self.layer_parameters(model) if flat_unit_gradient else h * f)
        return compute_bytes * bs * f + (residual_bytes + compute_bytes) * bs * h + weight_gradient
