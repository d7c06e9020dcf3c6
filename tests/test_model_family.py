"""The model-family seam: a toy family registered at run time (GPT-2 through transformers' own GPT2LMHeadModel) is what
the builder builds, what the memory plan and the FLOPs count, and what FSDP wraps one unit per block."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.distributed as dist

from configs import get_config, with_changes
from pretrain.launch.command import parse_launch_args, plan_launch
from pretrain.memory import plan_memory
from pretrain.model.build import block_classes, build_model, count_parameters
from pretrain.model.families import FAMILIES, family_for, register_family
from pretrain.model.gpt_neox import GPTNeoX
from pretrain.plan import RunPlan
from tests.launcher import free_port


class ToyGPT2(GPTNeoX):
    """GPT-2's block has GPT-NeoX's parameter layout; what differs is the tied output projection, the learned position
    embeddings and the block class, so each of those shows whether the plan asked this family or assumed another."""

    name = "toy_gpt2"
    display_name = "Toy GPT-2"
    layer_class_name = "GPT2Block"

    def hf_config(self, model):
        from transformers import GPT2Config

        return GPT2Config(vocab_size=model.vocab_size, n_positions=model.max_position_embeddings,
                          n_embd=model.hidden_size, n_layer=model.num_hidden_layers, n_head=model.num_attention_heads,
                          n_inner=model.intermediate_size, use_cache=False, bos_token_id=0, eos_token_id=0,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    def model_class(self) -> type:
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel

    def embedding_parameters(self, model) -> int:
        return model.vocab_size * model.hidden_size  # always tied

    def final_parameters(self, model) -> int:
        return 2 * model.hidden_size + model.max_position_embeddings * model.hidden_size


@pytest.fixture
def toy():
    family = register_family(ToyGPT2())
    yield family
    del FAMILIES[family.name]


def toy_config():
    return with_changes(get_config("test"), model_type="toy_gpt2")


def test_the_builder_builds_the_family_and_its_count_is_what_transformers_holds(toy):
    config = toy_config()
    model = build_model(config.model)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert family_for(config.model) is toy
    assert toy.parameter_count(config.model) == count_parameters(model).total_params
    assert toy.parameter_count(config.model) != GPTNeoX().parameter_count(config.model)
    input_ids = torch.randint(0, 512, (2, 32))
    assert torch.isfinite(model(input_ids=input_ids, labels=input_ids).loss)  # causal_sdpa serves it too


def test_the_memory_plan_and_the_flops_ask_the_family(toy, monkeypatch):
    config = toy_config()
    arguments = dict(seq_len=128, micro_batch=8, accumulation=2, num_gpus=1, strategy="ddp",
                     activation_checkpointing=False, mixed_precision="bf16", gpu_memory_gib=24)
    before = plan_memory(config.model, **arguments)
    assert before.weights == 4 * toy.parameter_count(config.model)

    monkeypatch.setattr(ToyGPT2, "layer_parameters", lambda self, model: GPTNeoX.layer_parameters(self, model) + 1000)
    monkeypatch.setattr(ToyGPT2, "layer_activation_bytes", lambda self, *args, **kwargs: 12345)
    after = plan_memory(config.model, **arguments)
    assert after.weights - before.weights == 4 * 1000 * config.model.num_hidden_layers
    layers = config.model.num_hidden_layers
    # every layer's saved bytes
    assert after.activations - before.activations == layers * (
        12345 - GPTNeoX.layer_activation_bytes(toy, config.model, 128, 8, 2, 4))
    monkeypatch.setattr(ToyGPT2, "layer_backward_bytes", lambda self, *args, **kwargs: 777)
    assert plan_memory(config.model, **arguments).layer_backward - after.layer_backward == 777 - (
        GPTNeoX.layer_backward_bytes(toy, config.model, 128, 8, 2, 4))

    monkeypatch.setattr(ToyGPT2, "flops_per_token", lambda self, model, seq_len: 7.5e9)
    lines = RunPlan(config, 1, cuda=False, model_size=count_parameters(build_model(config.model, "meta"))).lines()
    assert any(line.startswith("model: Toy GPT-2 ") for line in lines)
    assert "training FLOPs: 7.50 GFLOP per token" in lines


def test_fsdp_wraps_one_unit_per_block_of_the_family(toy):
    config = toy_config()
    request = parse_launch_args(["--config", "test", "--model-type", "toy_gpt2", "--gpus", "2", "--strategy", "fsdp",
                                 "--gpu-memory-gb", "24"])
    planned, _ = plan_launch(request, available_gpus=2, cpu_count=4)
    flag = planned.accelerate_args.index("--fsdp_transformer_layer_cls_to_wrap")
    assert planned.accelerate_args[flag + 1] == "GPT2Block"

    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    model = build_model(config.model)
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=block_classes(model, toy))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True,
                                           device_id=torch.device("cpu"))
        units = [m for m in wrapped.modules() if isinstance(m, FullyShardedDataParallel)]
        wrapped_blocks = [type(unit.module).__name__ for unit in units[1:]]
        assert wrapped_blocks == ["GPT2Block"] * config.model.num_hidden_layers  # plus the root unit
    finally:
        dist.destroy_process_group()


def test_an_unknown_family_is_one_line_naming_the_flag_and_the_choices():
    with pytest.raises(ValueError, match=r"--model-type 'mamba' is not a known model family; choose one of: gpt_neox"):
        family_for(dataclasses.replace(get_config("test").model, model_type="mamba"))
