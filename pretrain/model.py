"""Builds the transformers GPT-NeoX model from a ModelConfig; parameter and FLOP counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from configs import ModelConfig

# Dense bf16 tensor-core peaks by GPU name, for MFU; unknown devices report no MFU rather than a guess.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "L40": 181.0, "A6000": 155.0, "4090": 165.0}


def to_hf_config(model: ModelConfig) -> GPTNeoXConfig:
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


def build_model(model: ModelConfig, device: str | torch.device = "cpu") -> GPTNeoXForCausalLM:
    """A freshly initialised model; on the meta device nothing is allocated (used for dry runs of the 1.2B model)."""
    with torch.device(device):
        return GPTNeoXForCausalLM(to_hf_config(model))


@dataclass(frozen=True)
class ModelSize:
    total_params: int
    embedding_params: int  # input embedding plus output projection when untied

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params


def count_parameters(model: torch.nn.Module) -> ModelSize:
    """Counts what the model really holds (shared tensors once), not a formula."""
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


def flops_per_token(size: ModelSize, model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6N for the matmuls plus attention scores (PaLM appendix B)."""
    attention = 12 * model.num_hidden_layers * model.hidden_size * seq_len
    output_projection = 6 * model.vocab_size * model.hidden_size
    return 6 * size.non_embedding_params + output_projection + attention


def peak_flops_per_device(device: torch.device, configured_tflops: float) -> float | None:
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def describe(size: ModelSize) -> str:
    return (
        f"{size.total_params:,} parameters ({size.total_params / 1e9:.3f} B), "
        f"{size.non_embedding_params:,} non-embedding, {size.embedding_params:,} in embeddings"
    )
