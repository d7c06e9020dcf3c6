"""The Llama family through transformers' own LlamaForCausalLM: its counts against the built model and the bytes
autograd saves, causal attention without a mask (grouped-query too, also under compile), checkpointing, FSDP units,
generation and export, and family defaults that never borrow GPT-NeoX's."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
import torch.distributed as dist

from configs import TEST_MODEL, from_dict, get_config, with_changes
from pretrain.cli import parse_config
from pretrain.launch.command import parse_launch_args, plan_launch
from pretrain.memory import plan_for_config, plan_memory, saved_for_backward_bytes
from pretrain.model.build import (
    block_classes,
    build_model,
    count_parameters,
    enable_activation_checkpointing,
)
from pretrain.model.families import family_for
from pretrain.model.llama import Llama
from tests.launcher import free_port
from tests.test_memory_plan import _measure_saved_bytes
from tests.test_model import LLAMA_SMALL, _batch, _SdpaCalls

LLAMA = dataclasses.replace(TEST_MODEL, model_type="llama", num_key_value_heads=2)  # 4 heads sharing 2 K/V heads
SMALL = LLAMA_SMALL


@pytest.mark.parametrize("kv_heads", [None, 1, 2, 4])
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_is_what_transformers_holds(kv_heads, tied):
    shape = dataclasses.replace(LLAMA, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    model = build_model(shape, device="meta")
    assert type(model).__name__ == "LlamaForCausalLM"
    size = count_parameters(model)
    family = family_for(shape)
    assert family.parameter_count(shape) == size.total_params
    assert family.embedding_parameters(shape) == size.embedding_params
    matrices = sum(p.numel() for p in model.model.layers[0].parameters() if p.dim() == 2)
    assert family.layer_matrix_parameters(shape) == matrices


def test_production_llama_is_the_size_of_production():
    llama, neox = get_config("production_llama").model, get_config("production").model
    built = count_parameters(build_model(llama, device="meta"))
    assert family_for(llama).parameter_count(llama) == built.total_params == 1_423_362_048
    assert built.non_embedding_params == 1_217_509_376
    neox_non_embedding = count_parameters(build_model(neox, device="meta")).non_embedding_params
    assert abs(built.non_embedding_params / neox_non_embedding - 1) < 0.01


@pytest.mark.parametrize("layers", [2, 4])
@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_matches_what_autograd_saves(layers, mixed_precision, checkpointing):
    shape = dataclasses.replace(LLAMA, num_hidden_layers=layers)
    model = build_model(shape)
    model.train()
    if checkpointing:
        enable_activation_checkpointing(model)
    micro_batch, seq_len = 4, 128
    input_ids = torch.randint(0, shape.vocab_size, (micro_batch, seq_len), generator=torch.Generator().manual_seed(0))
    measured = _measure_saved_bytes(model, input_ids, autocast=mixed_precision == "bf16")
    expected = saved_for_backward_bytes(shape, seq_len=seq_len, micro_batch=micro_batch,
                                        mixed_precision=mixed_precision, fsdp=False,
                                        activation_checkpointing=checkpointing)
    plan = plan_memory(shape, seq_len=seq_len, micro_batch=micro_batch, accumulation=1, num_gpus=1, strategy="ddp",
                       activation_checkpointing=checkpointing, mixed_precision=mixed_precision, gpu_memory_gib=1)
    if mixed_precision == "bf16":  # autocast's weight copies, as in tests/test_memory_plan.py
        expected += plan.low_precision_weights if not checkpointing else 2 * shape.vocab_size * shape.hidden_size
    assert measured == pytest.approx(expected, rel=0.01), (measured, expected)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_with_bf16_weights_as_fsdp_runs_them(checkpointing):
    # FSDP's mixed precision computes with bf16 parameters: the residual stream is bf16 and RMSNorm upcasts it.
    shape = dataclasses.replace(LLAMA, num_hidden_layers=4)
    model = build_model(shape).to(torch.bfloat16)
    model.train()
    if checkpointing:
        enable_activation_checkpointing(model)
    input_ids = torch.randint(0, shape.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    measured = _measure_saved_bytes(model, input_ids, autocast=False)
    expected = saved_for_backward_bytes(shape, seq_len=128, micro_batch=4, mixed_precision="bf16", fsdp=True,
                                        activation_checkpointing=checkpointing)
    assert measured == pytest.approx(expected, rel=0.01), (measured, expected)


def test_the_memory_plan_asks_the_llama_family():
    config = get_config("production_llama")
    arguments = dict(seq_len=1024, micro_batch=4, accumulation=4, num_gpus=2, strategy="ddp",
                     activation_checkpointing=False, mixed_precision="bf16", gpu_memory_gib=79.1)
    llama = plan_memory(config.model, **arguments)
    assert llama.weights == 4 * family_for(config.model).parameter_count(config.model)
    neox = plan_memory(get_config("production").model, **arguments)
    assert llama.activations != neox.activations
    assert plan_for_config(config, num_gpus=2, gpu_memory_gib=79.1).fits
    small = plan_for_config(config, num_gpus=2, gpu_memory_gib=22.5)  # 2 x 24 GB: auto shards or shrinks
    assert small.fits and small.strategy == "fsdp"


def test_compiled_attention_gets_no_mask_and_shares_kv_heads():
    """Graph capture (no inductor): every layer's SDPA is causal, without a mask tensor, on the K/V heads as given."""
    model = build_model(SMALL)
    recorder = _SdpaCalls(lambda graph_module, example_inputs: graph_module.forward)
    input_ids = _batch(SMALL)
    torch.compile(model, backend=recorder)(input_ids=input_ids, labels=input_ids)
    assert len(recorder.calls) == SMALL.num_hidden_layers
    assert all(call["mask"] is None and call["is_causal"] is True for call in recorder.calls), recorder.calls
    with torch.no_grad():
        sdpa_inputs = []
        handle = torch.nn.functional.scaled_dot_product_attention
        try:
            def spy(query, key, value, **kwargs):
                sdpa_inputs.append((query.shape[1], key.shape[1], kwargs.get("enable_gqa")))
                return handle(query, key, value, **kwargs)
            torch.nn.functional.scaled_dot_product_attention = spy
            model(input_ids=input_ids)
        finally:
            torch.nn.functional.scaled_dot_product_attention = handle
    assert sdpa_inputs == [(4, 2, True)] * SMALL.num_hidden_layers


# Loss, gradients, checkpointing and generation against transformers' own attention: tests/test_model.py, for each
# family.


def test_export_loads_with_auto_model_and_computes_the_same(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = build_model(SMALL).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["num_key_value_heads"] == 2 and saved["hidden_act"] == "silu"
    assert "causal_sdpa" not in json.dumps(saved)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    input_ids = _batch(SMALL)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_fsdp_wraps_one_unit_per_llama_block():
    request = parse_launch_args(["--config", "test", "--model-type", "llama", "--gpus", "2", "--strategy", "fsdp",
                                 "--gpu-memory-gb", "24"])
    planned, _ = plan_launch(request, available_gpus=2, cpu_count=4)
    flags = planned.accelerate_args
    assert flags[flags.index("--fsdp_transformer_layer_cls_to_wrap") + 1] == "LlamaDecoderLayer"

    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    model = build_model(SMALL)
    policy = functools.partial(transformer_auto_wrap_policy,
                               transformer_layer_cls=block_classes(model, family_for(SMALL)))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True,
                                           device_id=torch.device("cpu"))
        units = [m for m in wrapped.modules() if isinstance(m, FullyShardedDataParallel)]
        assert [type(unit.module).__name__ for unit in units[1:]] == ["LlamaDecoderLayer"] * SMALL.num_hidden_layers
    finally:
        dist.destroy_process_group()


def test_unset_fields_take_the_familys_defaults_never_gpt_neoxs():
    llama = parse_config(["--config", "production", "--model-type", "llama"]).model
    assert (llama.hidden_act, llama.layer_norm_eps, llama.num_key_value_heads) == ("silu", 1e-6, 16)
    built = build_model(with_changes(get_config("test"), model_type="llama").model, device="meta").config
    assert (built.hidden_act, built.rms_norm_eps, built.num_key_value_heads) == ("silu", 1e-6, 4)
    neox = parse_config(["--config", "production"]).model
    assert (neox.hidden_act, neox.layer_norm_eps, neox.num_key_value_heads) == ("gelu", 1e-5, None)
    given = parse_config(["--model-type", "llama", "--hidden-act", "gelu", "--layer-norm-eps", "1e-5"]).model
    assert (given.hidden_act, given.layer_norm_eps) == ("gelu", 1e-5)


@pytest.mark.parametrize("argv, fragment", [
    (["--model-type", "llama", "--rotary-pct", "1.0"], "--rotary-pct is a gpt_neox field the llama family does not"),
    (["--model-type", "llama", "--use-parallel-residual", "false"], "--use-parallel-residual is a gpt_neox field"),
    (["--model-type", "llama", "--hidden-dropout", "0.1"], "--hidden-dropout is a gpt_neox field"),
    (["--model-type", "llama", "--num-key-value-heads", "3"], "must be a multiple of --num-key-value-heads (3)"),
    (["--num-key-value-heads", "2"], "--num-key-value-heads 2: the gpt_neox family has one K/V head"),
])
def test_fields_a_family_does_not_use_are_refused_in_one_line(argv, fragment):
    with pytest.raises(ValueError) as error:
        parse_config(argv)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_a_checkpoint_config_written_before_the_families_still_builds_the_same_model():
    # trainer_state.json of the previous version: no size_preset, target_params or num_key_value_heads
    old = {**dataclasses.asdict(get_config("production")), "model": {
        "model_type": "gpt_neox", "vocab_size": 50257, "hidden_size": 2048, "num_hidden_layers": 24,
        "num_attention_heads": 16, "intermediate_size": 8192, "max_position_embeddings": 2048, "rotary_pct": 0.25,
        "rotary_emb_base": 10000, "use_parallel_residual": True, "hidden_act": "gelu", "tie_word_embeddings": False,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "layer_norm_eps": 1e-5, "initializer_range": 0.02}}
    for key in ("lr_schedule", "wsd_decay_fraction", "wsd_decay_shape", "z_loss_coefficient", "init_from",
                "cooldown_from", "cooldown_steps"):
        old.pop(key)
    restored = from_dict(old)
    assert restored.model == parse_config(["--config", "production"]).model
    assert restored.lr_schedule == "cosine" and restored.z_loss_coefficient == 0.0
    assert family_for(restored.model).hf_config(restored.model).to_dict() == \
        family_for(restored.model).hf_config(parse_config(["--config", "production"]).model).to_dict()


def test_the_family_is_registered_and_named_in_the_plan():
    assert isinstance(family_for(LLAMA), Llama)
    model = build_model(LLAMA, device="meta")
    assert block_classes(model, family_for(LLAMA)) == {type(model.model.layers[0])}
    with pytest.raises(ValueError, match="choose one of: gpt_neox, llama"):
        family_for(dataclasses.replace(LLAMA, model_type="mamba"))
