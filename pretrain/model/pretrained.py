"""`--init-from`: a new run that starts from the weights of a Hugging Face model folder. Its config must describe the
model this run builds, its weights are read from safetensors only (never a pickle), and its tokenizer must be the
one the data was prepared with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from configs import ModelConfig
from pretrain.checkpoint.state_dicts import load_model_state
from pretrain.files import file_digest
from pretrain.model.families import FAMILIES, family_for
from pretrain.prepare.tokenizer import load_tokenizer

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class PretrainedFolder:
    path: Path
    weight_files: tuple[Path, ...]
    model_type: str

    def record(self) -> dict[str, Any]:
        """What the run's TrainState keeps of its starting point."""
        return {"path": str(self.path.resolve()), "model_type": self.model_type,
                "files": {p.name: p.stat().st_size for p in self.weight_files}}


def describe_hf_config(config: Any) -> str:
    """One model's shape in a few words, from transformers' config of any family."""
    heads = getattr(config, "num_attention_heads", "?")
    kv_heads = getattr(config, "num_key_value_heads", None)
    heads_text = f"{heads} heads" + (f" ({kv_heads} K/V)" if kv_heads not in (None, heads) else "")
    return (f"{config.model_type} {getattr(config, 'num_hidden_layers', '?')} layers x "
            f"{getattr(config, 'hidden_size', '?')}, {heads_text}, FFN {getattr(config, 'intermediate_size', '?')}, "
            f"vocab {getattr(config, 'vocab_size', '?')}")


def check_folder(path_text: str, model: ModelConfig) -> PretrainedFolder:
    """The folder's config and weight files, checked against the run's model before anything is built or read.
    Errors are one line naming the flag: no folder, no config, a family this project does not train, a model of
    another shape (both named), or weights only as a pickle."""
    path = Path(path_text)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--init-from {path}: no config.json there; pass a Hugging Face model folder (as "
                                "save_pretrained writes it, e.g. checkpoints/final-model)")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (ValueError, OSError) as error:
        raise ValueError(f"--init-from {config_path}: not a readable config.json ({error})") from None
    if model_type not in FAMILIES:
        raise ValueError(f"--init-from {path}: a {model_type} model; the families this project trains are "
                         f"{', '.join(sorted(FAMILIES))}")
    from transformers import AutoConfig

    folder_config = AutoConfig.from_pretrained(str(path))
    family = family_for(model)
    ours = family.hf_config(family.resolve(model))
    if model_type != model.model_type:
        raise ValueError(f"--init-from {path}: the folder holds a {describe_hf_config(folder_config)}, this run builds "
                         f"a {describe_hf_config(ours)}; pass --model-type {model_type} and the folder's shape")
    differences = family.architecture_differences(folder_config, model)
    if differences:
        listed = ", ".join(f"{key} {theirs} there, {mine} here" for key, theirs, mine in differences[:6])
        raise ValueError(f"--init-from {path}: the folder holds a {describe_hf_config(folder_config)}, this run builds "
                         f"a {describe_hf_config(ours)} ({listed}); give the run the folder's shape")
    return PretrainedFolder(path=path, weight_files=_weight_files(path), model_type=model_type)


def _weight_files(path: Path) -> tuple[Path, ...]:
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"--init-from {path}: {SAFETENSORS_INDEX} names {missing[0]}, which is missing")
        return tuple(path / name for name in shards)
    if (path / SAFETENSORS_FILE).is_file():
        return (path / SAFETENSORS_FILE,)
    if any((path / name).is_file() for name in PICKLE_FILES):
        raise ValueError(f"--init-from {path}: the weights are a pickle (pytorch_model.bin), which can run code when "
                         "loaded; convert them to safetensors (save_pretrained(..., safe_serialization=True))")
    raise FileNotFoundError(f"--init-from {path}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} there")


def load_weights(model: torch.nn.Module, folder: PretrainedFolder) -> None:
    """The folder's weights in the built model, read by transformers' own loader (safetensors only, with the key
    renames its checkpoints use, e.g. GPT-NeoX's embed_out, cast to fp32) and copied in; a tensor of another shape, a
    tensor the model lacks or a parameter the folder lacks is one line. Costs one more copy of the model in host
    memory while it lasts, as a resume's loaded checkpoint does."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report and progress bar: our errors below say it in one line
    hf_logging.disable_progress_bar()
    try:
        loaded, info = type(model).from_pretrained(str(folder.path), use_safetensors=True, dtype=torch.float32,
                                                   output_loading_info=True, ignore_mismatched_sizes=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    where = f"--init-from {folder.path}"
    if info["mismatched_keys"]:
        key, theirs, ours = sorted(info["mismatched_keys"])[0]
        raise ValueError(f"{where}: {key} is {list(theirs)} there, {list(ours)} in this run's model")
    if info["unexpected_keys"]:
        raise ValueError(f"{where}: the folder holds {sorted(info['unexpected_keys'])[0]}, which this run's "
                         f"{folder.model_type} model does not have")
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"{where}: no tensor for {', '.join(missing[:3])}{more}")
    load_model_state(model, loaded.state_dict())


def check_tokenizer(folder: PretrainedFolder, tokenizer_dir: Path | None) -> str:
    """A line for the log when the folder's tokenizer is the data's (same file, or the same id for every token);
    ValueError when it is not, or when the folder has none to compare with a data tokenizer."""
    if tokenizer_dir is None:
        return (f"--init-from {folder.path}: the data names no tokenizer (no dataset.json with one), so the folder's "
                "is not checked against it")
    ours = load_tokenizer(tokenizer_dir, flag="the data's tokenizer")
    theirs_path = folder.path / "tokenizer.json"
    if not theirs_path.is_file():
        raise ValueError(f"--init-from {folder.path}: no tokenizer.json beside the weights to check against the data's "
                         f"({ours.json_path}); copy the model's tokenizer.json into the folder")
    if file_digest(theirs_path) == file_digest(ours.json_path):
        return f"--init-from {folder.path}: its tokenizer.json is the data's"
    theirs = load_tokenizer(folder.path, flag="--init-from")
    mine_vocab = ours.tokenizer.get_vocab(with_added_tokens=True)
    their_vocab = theirs.tokenizer.get_vocab(with_added_tokens=True)
    if mine_vocab == their_vocab:
        return f"--init-from {folder.path}: its tokenizer maps every token to the same id as the data's"
    by_id_mine = {i: t for t, i in mine_vocab.items()}
    by_id_theirs = {i: t for t, i in their_vocab.items()}
    differing = sorted(i for i in set(by_id_mine) | set(by_id_theirs) if by_id_mine.get(i) != by_id_theirs.get(i))
    first = differing[0]
    raise ValueError(
        f"--init-from {folder.path}: its tokenizer is not the data's ({ours.json_path}): {len(differing)} of "
        f"{max(len(by_id_mine), len(by_id_theirs))} ids differ (id {first} is {by_id_theirs.get(first)!r} there, "
        f"{by_id_mine.get(first)!r} in the data); prepare the data with its tokenizer (prepare_data --tokenizer "
        f"{folder.path})"
    )
