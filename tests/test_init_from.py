"""--init-from, in-process: a Hugging Face folder is checked against the run's model (family and every config entry
that shapes the weights), read from safetensors only, and its tokenizer checked against the data's."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from configs import TEST_MODEL
from pretrain.model.build import build_model
from pretrain.model.pretrained import check_folder, check_tokenizer, load_weights
from pretrain.prepare.tokenizer import train_byte_level_bpe

LLAMA = dataclasses.replace(TEST_MODEL, model_type="llama", num_key_value_heads=2, num_hidden_layers=2)
NEOX = dataclasses.replace(TEST_MODEL, num_hidden_layers=2)


def _exported(tmp_path, shape, name="model"):
    torch.manual_seed(1)
    model = build_model(shape)
    folder = tmp_path / name
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("shape", [LLAMA, NEOX, dataclasses.replace(LLAMA, tie_word_embeddings=True)],
                         ids=["llama", "gpt_neox", "llama-tied"])
def test_a_matching_folder_loads_every_tensor(tmp_path, shape):
    source, folder = _exported(tmp_path, shape)
    found = check_folder(str(folder), shape)
    assert found.record()["model_type"] == shape.model_type
    assert found.record()["files"] == {"model.safetensors": (folder / "model.safetensors").stat().st_size}
    torch.manual_seed(2)
    fresh = build_model(shape)
    assert not torch.equal(fresh.get_input_embeddings().weight, source.get_input_embeddings().weight)
    load_weights(fresh, found)
    expected = source.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in fresh.state_dict().items())


def test_bf16_weights_are_cast_to_the_runs_fp32(tmp_path):
    source, folder = _exported(tmp_path, LLAMA)
    state = {k: v.to(torch.bfloat16) for k, v in load_file(str(folder / "model.safetensors")).items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    fresh = build_model(LLAMA)
    load_weights(fresh, check_folder(str(folder), LLAMA))
    assert fresh.lm_head.weight.dtype == torch.float32
    assert torch.equal(fresh.lm_head.weight, source.lm_head.weight.to(torch.bfloat16).float())


@pytest.mark.parametrize("change, fragment", [
    (dict(num_hidden_layers=3), "(num_hidden_layers 2 there, 3 here)"),
    (dict(num_key_value_heads=4), "(num_key_value_heads 2 there, 4 here)"),
    (dict(intermediate_size=256, vocab_size=640), "intermediate_size 512 there, 256 here, vocab_size 512 there, 640"),
    (dict(hidden_act="gelu"), "hidden_act silu there, gelu here"),
    (dict(rotary_emb_base=500000), "rope_parameters"),
])
def test_a_folder_of_another_shape_is_one_line_naming_both(tmp_path, change, fragment):
    _, folder = _exported(tmp_path, LLAMA)
    with pytest.raises(ValueError) as error:
        check_folder(str(folder), dataclasses.replace(LLAMA, **change))
    message = str(error.value)
    assert "\n" not in message and fragment in message, message
    assert message.startswith(f"--init-from {folder}: the folder holds a llama 2 layers x 128, 4 heads (2 K/V)")


def test_context_length_and_init_are_not_part_of_the_shape(tmp_path):
    _, folder = _exported(tmp_path, LLAMA)
    check_folder(str(folder), dataclasses.replace(LLAMA, max_position_embeddings=128, initializer_range=0.01))


def test_another_family_or_an_unsupported_one_is_named(tmp_path):
    _, folder = _exported(tmp_path, LLAMA)
    with pytest.raises(ValueError, match=r"this run builds a gpt_neox 2 layers .*; pass --model-type llama"):
        check_folder(str(folder), NEOX)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(ValueError, match="a mistral model; the families this project trains are gpt_neox, llama"):
        check_folder(str(folder), LLAMA)


def test_pickled_weights_are_refused_and_missing_files_named(tmp_path):
    _, folder = _exported(tmp_path, LLAMA)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="the weights are a pickle .* convert them to safetensors"):
        check_folder(str(folder), LLAMA)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        check_folder(str(folder), LLAMA)
    with pytest.raises(FileNotFoundError, match="no config.json there"):
        check_folder(str(tmp_path / "nowhere"), LLAMA)


def test_sharded_safetensors_load_and_a_tensor_of_another_shape_is_named(tmp_path):
    source, folder = _exported(tmp_path, LLAMA)
    state = load_file(str(folder / "model.safetensors"))
    keys = sorted(state)
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(folder / name), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}))
    (folder / "model.safetensors").unlink()
    fresh = build_model(LLAMA)
    found = check_folder(str(folder), LLAMA)
    assert [p.name for p in found.weight_files] == ["a.safetensors", "b.safetensors"]
    load_weights(fresh, found)
    assert torch.equal(fresh.model.norm.weight, source.model.norm.weight)

    bad = dict(load_file(str(folder / "b.safetensors")))
    key = next(k for k in bad if k.endswith("mlp.up_proj.weight"))
    bad[key] = torch.zeros(7, 128)
    save_file(bad, str(folder / "b.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{key} is \[7, 128\] there, \[512, 128\] in this run's model"):
        load_weights(build_model(LLAMA), check_folder(str(folder), LLAMA))
    del bad[key]
    save_file(bad, str(folder / "b.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"no tensor for {key}"):
        load_weights(build_model(LLAMA), check_folder(str(folder), LLAMA))
    bad[key] = state[key]
    bad["model.extra.weight"] = torch.zeros(3)
    save_file(bad, str(folder / "b.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="the folder holds model.extra.weight, which this run's llama model does not"):
        load_weights(build_model(LLAMA), check_folder(str(folder), LLAMA))


def _tokenizer(folder, texts, vocab_size=300):
    folder.mkdir(parents=True, exist_ok=True)
    train_byte_level_bpe(texts, vocab_size, folder / "tokenizer.json")
    return folder


def test_the_tokenizer_must_be_the_datas(tmp_path):
    _, folder = _exported(tmp_path, LLAMA)
    texts = ["the quick brown fox jumps over the lazy dog " * 20, "return the number of items in the list " * 20]
    data = _tokenizer(tmp_path / "data", texts)
    found = check_folder(str(folder), LLAMA)
    assert "not checked" in check_tokenizer(found, None)
    with pytest.raises(ValueError, match="no tokenizer.json beside the weights"):
        check_tokenizer(found, data)
    shutil.copy(data / "tokenizer.json", folder / "tokenizer.json")
    assert "is the data's" in check_tokenizer(found, data)
    # the same vocabulary written by transformers (other bytes) passes; another vocabulary does not
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_file=str(data / "tokenizer.json"), eos_token="<|endoftext|>").save_pretrained(
        folder)
    assert "maps every token to the same id" in check_tokenizer(found, data)
    other = _tokenizer(tmp_path / "other", ["completely different words arrive here " * 30])
    shutil.copy(other / "tokenizer.json", folder / "tokenizer.json")
    with pytest.raises(ValueError) as error:
        check_tokenizer(found, data)
    assert "its tokenizer is not the data's" in str(error.value) and "ids differ" in str(error.value)
    assert "\n" not in str(error.value)
