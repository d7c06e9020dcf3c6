"""The final export: the unwrapped model via save_pretrained, loadable with AutoModelForCausalLM.from_pretrained."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from pretrain.state_dicts import clean_state_dict, snapshot

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
        with _quiet_transformers():
            unwrapped.save_pretrained(temp, state_dict=snapshot(clean_state_dict(state)))
        if tokenizer_dir is not None:
            from transformers import PreTrainedTokenizerFast

            PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir)).save_pretrained(temp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temp, final)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def _quiet_transformers():
    """save_pretrained draws its own progress bar, which would break our one-line-per-event console."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
