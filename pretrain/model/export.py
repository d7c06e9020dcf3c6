"""The final export: the unwrapped model via save_pretrained, loadable with AutoModelForCausalLM.from_pretrained."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from pretrain.checkpoint.state_dicts import clean_state_dict, snapshot
from pretrain.errors import os_reason
from pretrain.prepare.tokenizer import load_tokenizer

EXPORT_DIR_NAME = "final-model"


def export_model(accelerator: Accelerator, model: torch.nn.Module, output_dir: Path,
                 tokenizer_dir: Path | None = None) -> Path | None:
    """Every rank calls it (the full state is gathered under FSDP); rank 0 writes a temp folder, then renames it."""
    state = accelerator.get_state_dict(model)
    final = output_dir / EXPORT_DIR_NAME
    if accelerator.is_main_process:
        temp = output_dir / f".tmp-{EXPORT_DIR_NAME}-{os.getpid()}"
        shutil.rmtree(temp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        if tokenizer_dir is not None:
            eos_id = load_tokenizer(tokenizer_dir).eos_token_id
            # Generation stops at the document separator the data was packed with.
            unwrapped.config.eos_token_id = unwrapped.config.bos_token_id = unwrapped.config.pad_token_id = eos_id
            unwrapped.generation_config.eos_token_id = unwrapped.generation_config.pad_token_id = eos_id
        try:
            with _quiet_transformers():
                unwrapped.save_pretrained(temp, state_dict=snapshot(clean_state_dict(state)))
            if tokenizer_dir is not None:
                save_tokenizer(tokenizer_dir, temp, unwrapped.config)
        except Exception as error:  # safetensors reports a full disk as SafetensorError, torch as RuntimeError
            shutil.rmtree(temp, ignore_errors=True)
            raise OSError(f"could not export the final model to {final}: {os_reason(error)}; the checkpoints are complete: "
                          f"free disk space and run the same command again to export") from None
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temp, final)
    accelerator.wait_for_everyone()
    return final


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
