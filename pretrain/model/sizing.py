"""A model's shape from a named preset of its family or from a parameter target (`--size-preset`, `--target-params`).
Pure arithmetic on the family's own parameter formula, so the launcher sizes a model without transformers.

The rule for `--target-params N` (N counts the parameters outside the embeddings and the output projection, as the
project calls `production` "1.2B", so the shape does not depend on the tokenizer):

1. Aspect ratio (width / depth) a = 64 + 20 * log10(N / 1e8), kept within [32, 128]: about 64 at 100M and 86 at
   1.2B, growing towards 128 at 10B+, as in the GPT-3, Pythia and Llama tables.
2. Width: a block holds about 12 * width^2 parameters, so N = depth * 12 * width^2 with depth = width / a gives
   width = (a * N / 12)^(1/3), rounded to a multiple of four heads: 256 below 2048, 512 from there (at least 256).
3. The family's standard block at that width (ModelFamily.standard_block): heads of 64 dimensions below a width
   of 2048 and 128 from there; FFN 4x (GPT-NeoX) or SwiGLU's 8/3x rounded up to a multiple of 256 with a quarter
   as many K/V heads (Llama, as Llama 3's 32:8).
4. Depth: the whole number of those blocks whose count (with the final norm) is nearest N, at least 1.

The exact count is the family's formula (ModelFamily.parameter_count), which tests check against transformers' count
of the built model; it lands within about 1/(2 * depth) of N. For GPT-NeoX, 1.2B gives the `production` shape.
"""

from __future__ import annotations

import dataclasses
import math
import re

from configs import ModelConfig
from pretrain.model.families import family_for

SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
MIN_TARGET = 10**5


def parse_count(text: str) -> int:
    """`350M`, `1.2B`, `125m`, `7e9` or `350000000` as a whole number of parameters."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", text.lower())
    if not match:
        raise ValueError(f"--target-params {text!r}: expected a parameter count such as 350M, 1.2B or 125000000")
    count = round(float(match.group(1)) * _SUFFIXES[match.group(2)])
    if count < MIN_TARGET:
        raise ValueError(f"--target-params {text}: {count:,} parameters is below the smallest the rule sizes "
                         f"({MIN_TARGET:,})")
    return count


def aspect_ratio(target: int) -> float:
    return min(128.0, max(32.0, 64.0 + 20.0 * math.log10(target / 1e8)))


def shape_for_target(model: ModelConfig, target: int) -> ModelConfig:
    """The model with the shape the rule above gives its family for `target` non-embedding parameters."""
    family = family_for(model)
    ideal = (aspect_ratio(target) * target / 12) ** (1 / 3)
    width = max(256, 256 * round(ideal / 256))
    if width >= 2048:
        width = 512 * round(ideal / 512)
    block = {"num_key_value_heads": None, **family.standard_block(width)}
    one_layer = dataclasses.replace(model, hidden_size=width, num_hidden_layers=1, **block)
    counted = family.resolve(one_layer)
    per_layer, final = family.layer_parameters(counted), family.final_parameters(counted)
    depth = max(1, round((target - final) / per_layer))
    return dataclasses.replace(one_layer, num_hidden_layers=depth)


def preset_shape(model: ModelConfig) -> ModelConfig:
    family = family_for(model)
    if model.size_preset not in family.presets:
        from pretrain.model.families import FAMILIES

        owner = next((f.name for f in FAMILIES.values() if model.size_preset in f.presets), None)
        hint = f" (it is a {owner} preset: add --model-type {owner})" if owner else ""
        raise ValueError(f"--size-preset {model.size_preset!r} is not a {family.name} preset{hint}; "
                         f"{family.name} presets: {', '.join(family.presets) or 'none'}")
    return dataclasses.replace(model, **{"num_key_value_heads": None, **family.presets[model.size_preset]})


def apply_sizing(model: ModelConfig, given: set[str]) -> ModelConfig:
    """The model with the shape its --size-preset or --target-params names; unchanged without either. `given`: the
    fields set on the command line, none of which may be a shape field the sizing sets."""
    if not (model.size_preset or model.target_params):
        return model
    if model.size_preset and model.target_params:
        raise ValueError("--size-preset and --target-params both choose the shape; pass one of them")
    flag = "--size-preset" if model.size_preset else "--target-params"
    clashing = [f"--{name.replace('_', '-')}" for name in SHAPE_FIELDS if name in given]
    if clashing:
        raise ValueError(f"{flag} sets the layers, width, heads and FFN size; drop {' and '.join(clashing)}, or "
                         f"{flag} to give the shape by hand")
    if model.size_preset:
        return preset_shape(model)
    return shape_for_target(model, parse_count(model.target_params))


def describe_sizing(model: ModelConfig) -> str | None:
    """The plan's line for a sized model: the shape chosen and its exact count (the family's formula)."""
    if not (model.size_preset or model.target_params):
        return None
    family = family_for(model)
    resolved = family.resolve(model)
    non_embedding = family.parameter_count(resolved) - family.embedding_parameters(resolved)
    heads = f"{resolved.num_attention_heads} heads of {resolved.hidden_size // resolved.num_attention_heads}"
    if resolved.num_key_value_heads not in (None, resolved.num_attention_heads):
        heads += f", {resolved.num_key_value_heads} K/V heads"
    shape = (f"{resolved.num_hidden_layers} layers x {resolved.hidden_size} wide ({heads}), FFN "
             f"{resolved.intermediate_size}")
    if model.size_preset:
        return f"size: --size-preset {model.size_preset}: {shape}: {non_embedding:,} non-embedding parameters"
    target = parse_count(model.target_params)
    return (f"size: --target-params {model.target_params} ({target:,}): {shape}: {non_embedding:,} non-embedding "
            f"parameters ({(non_embedding - target) / target:+.1%}), "
            f"{family.parameter_count(resolved):,} with the embeddings")
