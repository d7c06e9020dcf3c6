"""Exports as Hugging Face folders (save_pretrained, loadable with AutoModelForCausalLM.from_pretrained): the trained
model at the end of a run, or any checkpoint's weights (live or EMA) without a training process."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from configs import ModelConfig
from pretrain.checkpoint.state_dicts import clean_state_dict, snapshot
from pretrain.errors import os_reason
from pretrain.model.build import build_model
from pretrain.prepare.tokenizer import load_tokenizer

EXPORT_DIR_NAME = "final-model"


def export_model(accelerator: Accelerator, model: torch.nn.Module, output_dir: Path,
                 tokenizer_dir: Path | None = None, replace: dict[str, torch.Tensor] | None = None) -> Path | None:
    """Every rank calls it (the full state is gathered under FSDP); rank 0 writes a temp folder, then renames it.
    `replace`: tensors written instead of the model's own (the EMA of its weights)."""
    state = accelerator.get_state_dict(model)
    final = output_dir / EXPORT_DIR_NAME
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        write_export(unwrapped, {**clean_state_dict(state), **(replace or {})}, final, tokenizer_dir)
    accelerator.wait_for_everyone()
    return final


def export_state(model_config: ModelConfig, state: dict[str, torch.Tensor], final: Path,
                 tokenizer_dir: Path | None = None) -> Path:
    """A checkpoint's weights as a Hugging Face folder, with no training process: the model is built on the meta
    device (nothing allocated, nothing initialised) and save_pretrained writes the given tensors."""
    write_export(build_model(model_config, device="meta"), clean_state_dict(state), final, tokenizer_dir)
    return final


def write_export(unwrapped: torch.nn.Module, state: dict[str, torch.Tensor], final: Path,
                 tokenizer_dir: Path | None) -> None:
    """save_pretrained into a temp folder beside `final` (with the tokenizer), then renamed into place."""
    temp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    if tokenizer_dir is not None:
        eos_id = load_tokenizer(tokenizer_dir).eos_token_id
        # Generation stops at the document separator the data was packed with.
        unwrapped.config.eos_token_id = unwrapped.config.bos_token_id = unwrapped.config.pad_token_id = eos_id
        unwrapped.generation_config.eos_token_id = unwrapped.generation_config.pad_token_id = eos_id
    try:
        with _quiet_transformers():
            unwrapped.save_pretrained(temp, state_dict=snapshot(state))
        if tokenizer_dir is not None:
            save_tokenizer(tokenizer_dir, temp, unwrapped.config)
    except Exception as error:  # safetensors reports a full disk as SafetensorError, torch as RuntimeError
        shutil.rmtree(temp, ignore_errors=True)
        raise OSError(f"could not export the model to {final}: {os_reason(error)}; the checkpoints are complete: "
                      f"free disk space and run the same command again to export") from None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temp, final)


SAMPLE_PROMPTS = ("Return the", "The", "If the", "This module")


def sample_lines(final: Path, count: int, max_new_tokens: int = 30, seed: int = 0) -> list[str]:
    """What the exported folder generates through transformers' own pipeline(), as a user would load it."""
    from transformers import pipeline, set_seed

    set_seed(seed)
    with _quiet_transformers():
        generator = pipeline("text-generation", model=str(final), device="cpu")
    lines = []
    for prompt in (SAMPLE_PROMPTS * count)[:count]:
        text = generator(prompt, max_new_tokens=max_new_tokens, do_sample=True, top_k=40)[0]["generated_text"]
        lines.append(" ".join(text.split()))
    return lines


def save_tokenizer(tokenizer_dir: Path, out_dir: Path, model_config) -> None:
    """The data's tokenizer beside the weights, as transformers' AutoTokenizer and pipeline() load it."""
    from transformers import PreTrainedTokenizerFast

    loaded = load_tokenizer(tokenizer_dir)
    if loaded.vocab_size > model_config.vocab_size:
        raise ValueError(f"{loaded.json_path}: {loaded.vocab_size} token ids, more than the model's --vocab-size "
                         f"{model_config.vocab_size}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(loaded.json_path), eos_token=loaded.eos_token,
                                        bos_token=loaded.eos_token, pad_token=loaded.eos_token)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def _quiet_transformers():
    """save_pretrained draws its own progress bar, which would break our one-line-per-event console."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
