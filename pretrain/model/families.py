"""The registry of model families: a new family is one module beside gpt_neox.py and one line here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pretrain.model.family import ModelFamily
from pretrain.model.gpt_neox import GPTNeoX
from pretrain.model.llama import Llama

if TYPE_CHECKING:
    from configs import ModelConfig

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (GPTNeoX(), Llama())}


def register_family(family: ModelFamily) -> ModelFamily:
    """Adds a family at run time (tests register a toy one); the built-in ones are listed above."""
    FAMILIES[family.name] = family
    return family


def family_for(model: ModelConfig) -> ModelFamily:
    if model.model_type not in FAMILIES:
        raise ValueError(f"--model-type {model.model_type!r} is not a known model family; choose one of: "
                         f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model.model_type]
