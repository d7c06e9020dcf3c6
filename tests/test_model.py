"""The model: causal attention without a mask tensor (also under torch.compile), the same numbers as transformers'
own attention, activation checkpointing, and the GPU peak table used for MFU."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from configs import TEST_MODEL
from pretrain.model.build import (
    add_z_loss,
    build_model,
    enable_activation_checkpointing,
)
from pretrain.model.peaks import gpu_peak, peak_flops_per_device, peak_tflops_for_name

# One layer and small widths: inductor's compile time on CPU grows with the number of kernels, not their size.
TINY = dataclasses.replace(
    TEST_MODEL, num_hidden_layers=1, hidden_size=64, intermediate_size=256, vocab_size=128, num_attention_heads=4
)
TWO_LAYERS = dataclasses.replace(TINY, num_hidden_layers=2)
# The Llama family's small shape (tests/test_llama.py): 4 heads sharing 2 K/V heads. The tests below that compare our
# attention with transformers' run for each family.
LLAMA_SMALL = dataclasses.replace(TEST_MODEL, model_type="llama", num_key_value_heads=2, num_hidden_layers=2,
                                  hidden_size=64, intermediate_size=192, vocab_size=128)
EACH_FAMILY = pytest.mark.parametrize("shape", [TWO_LAYERS, LLAMA_SMALL], ids=["gpt_neox", "llama"])


def _batch(shape=TINY, batch=2, seq=64, seed=0):
    return torch.randint(0, shape.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _twin(model, attn_implementation, shape=TINY):
    other = build_model(shape, attn_implementation=attn_implementation)
    other.load_state_dict(model.state_dict())
    return other


def _loss_and_grads(model, input_ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()}


class _SdpaCalls:
    """A torch.compile backend that records every SDPA call in the graph dynamo captured, then hands the graph on."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[dict] = []

    def __call__(self, graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and "scaled_dot_product_attention" in str(node.target):
                mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
                self.calls.append({"mask": mask, "is_causal": node.kwargs.get("is_causal")})
        return self.inner(graph_module, example_inputs)


@pytest.fixture(scope="module")
def compiled_run():
    """One inductor compile of the tiny model (about 20 s with a warm inductor cache, a few minutes cold on 2
    busy cores), its loss and gradients, and the eager model's for the same weights and batch."""
    from torch._inductor.compile_fx import compile_fx

    torch.manual_seed(0)
    model = build_model(TINY)
    model.train()
    input_ids = _batch()
    eager_loss, eager_grads = _loss_and_grads(model, input_ids)
    recorder = _SdpaCalls(compile_fx)
    compiled = torch.compile(model, backend=recorder)
    compiled_loss, compiled_grads = _loss_and_grads(compiled, input_ids)
    return recorder.calls, (eager_loss, eager_grads), (compiled_loss, compiled_grads)


def test_compiled_attention_gets_no_mask_tensor(compiled_run):
    calls, _, _ = compiled_run
    assert len(calls) == TINY.num_hidden_layers
    assert all(call["mask"] is None and call["is_causal"] is True for call in calls), calls


def test_compiled_loss_and_grads_equal_eager(compiled_run):
    _, (eager_loss, eager_grads), (compiled_loss, compiled_grads) = compiled_run
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_transformers_sdpa_would_get_a_mask_under_compile():
    """The control: what the custom attention avoids. Graph capture only (no inductor), so it is quick."""
    model = build_model(TINY, attn_implementation="sdpa")
    recorder = _SdpaCalls(lambda graph_module, example_inputs: graph_module.forward)
    input_ids = _batch()
    torch.compile(model, backend=recorder)(input_ids=input_ids, labels=input_ids)
    assert recorder.calls and all(call["mask"] is not None for call in recorder.calls)


@EACH_FAMILY
@pytest.mark.parametrize("other", ["sdpa", "eager"])
def test_same_numbers_as_transformers_attention(other, shape):
    torch.manual_seed(0)
    model = build_model(shape)
    reference = _twin(model, other, shape)
    input_ids = _batch(shape)
    loss, grads = _loss_and_grads(model, input_ids)
    reference_loss, reference_grads = _loss_and_grads(reference, input_ids)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-6)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@EACH_FAMILY
@pytest.mark.parametrize("compiled", [False, True])
def test_activation_checkpointing_gives_the_same_loss_and_grads(compiled, shape):
    torch.manual_seed(0)
    model = build_model(shape)
    checkpointed = _twin(model, "causal_sdpa", shape)
    enable_activation_checkpointing(checkpointed)
    model.train()
    checkpointed.train()
    assert all(layer.gradient_checkpointing for layer in checkpointed.base_model.layers)
    input_ids = _batch(shape)
    loss, grads = _loss_and_grads(model, input_ids)
    # Under compile, graph capture and AOT autograd's handling of checkpointed regions (aot_eager: no inductor,
    # so no kernel compile time) are what the training loop's torch.compile also goes through.
    run = torch.compile(checkpointed, backend="aot_eager") if compiled else checkpointed
    checkpointed_loss, checkpointed_grads = _loss_and_grads(run, input_ids)
    tolerance = 1e-6 if compiled else 0.0
    torch.testing.assert_close(checkpointed_loss, loss, rtol=tolerance, atol=tolerance)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_a_padding_mask_is_refused_not_ignored():
    model = build_model(TINY)
    input_ids = _batch()
    mask = torch.ones_like(input_ids)
    model(input_ids=input_ids, attention_mask=mask)  # all ones, as generate() passes: nothing to ignore
    mask[0, :5] = 0
    with pytest.raises(ValueError, match="padding attention_mask"):
        model(input_ids=input_ids, attention_mask=mask)


@pytest.mark.parametrize("shape", [TINY, LLAMA_SMALL], ids=["gpt_neox", "llama"])
def test_generation_with_a_kv_cache_matches_transformers_sdpa(shape):
    """Decoding steps (one query, many cached keys) go to transformers' implementation: same tokens as its sdpa."""
    torch.manual_seed(0)
    model = build_model(shape).eval()
    reference = _twin(model, "sdpa", shape).eval()
    prompt = _batch(shape, batch=1, seq=8)
    with torch.no_grad():
        ours = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        theirs = reference.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_the_exported_config_does_not_name_the_custom_attention(tmp_path):
    build_model(TINY).save_pretrained(tmp_path)
    assert "causal_sdpa" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))


# Names as torch.cuda.get_device_name reports them (nvidia-smi's product names), with the peak bf16 TFLOPS.
DEVICE_NAMES = [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5),
    ("NVIDIA H200", "H200 SXM", 989.4),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5),
    ("NVIDIA GH200 480GB", "H200 SXM", 989.4),
    ("NVIDIA H800", "H800 SXM", 989.4),
    ("NVIDIA A100-SXM4-40GB", "A100", 312.0),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100-PCIE-40GB", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ("NVIDIA L40S", "L40S", 362.05),
    ("NVIDIA L40", "L40", 181.05),
    ("NVIDIA L4", "L4", 121.0),
    ("NVIDIA A10G", "A10G", 125.0),
    ("NVIDIA A10", "A10", 125.0),
    ("NVIDIA RTX A6000", "RTX A6000", 154.8),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2),
    ("Tesla V100-SXM2-16GB", "V100 SXM2", 125.0),  # no bf16: the fp16 peak, which the loop falls back to
    ("Tesla V100-PCIE-32GB", "V100 PCIe", 112.0),
    ("Tesla V100S-PCIE-32GB", "V100S", 130.0),
    ("Tesla T4", "T4", 65.0),
]


@pytest.mark.parametrize("device_name, gpu, bf16", DEVICE_NAMES)
def test_peak_table_matches_real_device_names(device_name, gpu, bf16):
    assert gpu_peak(device_name)[0] == gpu
    assert peak_tflops_for_name(device_name, "bf16") == bf16


@pytest.mark.parametrize("device_name", ["NVIDIA GeForce RTX 4090 D", "NVIDIA B200", "NVIDIA RTX 6000 Ada Generation",
                                         "NVIDIA H20", "NVIDIA L40G", "AMD Instinct MI300X", ""])
def test_unknown_gpus_get_no_peak_rather_than_a_neighbours(device_name):
    assert gpu_peak(device_name) is None
    assert peak_tflops_for_name(device_name) is None


def test_peak_follows_the_precision():
    assert peak_tflops_for_name("NVIDIA A100-SXM4-80GB", "no") == 156.0  # TF32
    assert peak_tflops_for_name("Tesla V100-SXM2-16GB", "no") == 15.7  # no TF32 on Volta: plain fp32
    assert peak_tflops_for_name("NVIDIA H100 80GB HBM3", "fp16") == 989.4


def test_configured_peak_wins_and_cpu_has_none():
    assert peak_flops_per_device(torch.device("cpu"), 100.0) == 100e12
    assert peak_flops_per_device(torch.device("cpu"), 0.0) is None


@pytest.mark.parametrize("model_type", ["gpt_neox", "llama"])
def test_z_loss_adds_the_squared_log_normaliser_in_training_only(model_type):
    shape = dataclasses.replace(TINY, model_type=model_type)
    torch.manual_seed(0)
    model = build_model(shape).train()
    input_ids = _batch(shape)
    output = model(input_ids=input_ids, labels=input_ids)
    plain = output.loss.detach()
    normaliser = torch.logsumexp(output.logits[:, :-1].float(), dim=-1)
    handle = add_z_loss(model, 1e-2)
    with_z = model(input_ids=input_ids, labels=input_ids).loss
    torch.testing.assert_close(with_z, plain + 1e-2 * normaliser.pow(2).mean(), rtol=1e-6, atol=0)
    assert with_z > plain
    with_z.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids, labels=input_ids).loss, plain)  # evaluation: the plain loss
    handle.remove()
    model.train()
    assert torch.equal(model(input_ids=input_ids, labels=input_ids).loss.detach(), plain)  # 0: no hook, bit for bit
