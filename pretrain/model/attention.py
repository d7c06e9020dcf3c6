"""Causal attention without a mask tensor, registered with transformers under its own name for every model family."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

CAUSAL_SDPA = "causal_sdpa"


def causal_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA with `is_causal=True` and no mask tensor, so flash/cuDNN kernels stay eligible under torch.compile.

    transformers' own "sdpa" path builds a [batch, 1, seq, seq] mask while tracing (its packed-sequence detection
    cannot decide at trace time), which forces the memory-efficient or math kernel. Our samples are never padded
    nor packed, so plain causal attention is exact. Decoding with a cache (query shorter than keys) would need a
    bottom-right-aligned mask: that case goes to transformers' implementation.
    """
    if query.shape[2] != key.shape[2] or attention_mask is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # Grouped-query attention (fewer K/V heads than query heads): the kernel shares each K/V head across its group,
    # as transformers' sdpa does without a mask, instead of materialising repeated K and V.
    grouped = query.shape[1] != key.shape[1]
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, scale=scaling, is_causal=True, **({"enable_gqa": True} if grouped else {})
    )
    return output.transpose(1, 2).contiguous(), None


# Registered under a name transformers' mask interface does not know, so create_causal_mask returns None at once:
# no mask is built, and no packed-sequence check (a host sync in eager mode) runs.
AttentionInterface.register(CAUSAL_SDPA, causal_sdpa_attention)


def refuse_padding_mask(module, args, kwargs):
    # With causal_sdpa transformers drops a 2-D padding mask without a word; a padded batch must fail loudly instead.
    # Training passes no mask (no cost); generate() passes an all-ones one, checked here at one host sync per call.
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError(
            "a padding attention_mask was passed to a model built with attn_implementation='causal_sdpa', which "
            "ignores it; build the model with attn_implementation='sdpa' to use padded batches"
        )
