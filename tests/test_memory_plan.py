"""The memory plan: verdicts for the production configs, the layout choice, its arithmetic, and its activation
estimate against the bytes autograd really saves on the test model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from configs import TEST_MODEL, get_config
from pretrain.memory import (
    GIB,
    USABLE_GIB,
    choose_layout,
    plan_for_config,
    plan_memory,
    saved_for_backward_bytes,
)
from pretrain.model.build import (
    build_model,
    count_parameters,
    enable_activation_checkpointing,
)
from pretrain.model.families import family_for

PRODUCTION = get_config("production")

# The README's "Will it fit?" table: (config, GPU class in GB, GPUs) -> the layout choose_layout picks, or None
# where nothing fits. The same table is in the README; a change of the plan shows up here first.
EXPECTED_LAYOUTS = {
    ("production", 24, 1): None,
    ("production", 24, 2): ("fsdp", False, 2, 8),
    ("production", 24, 8): ("fsdp", False, 4, 4),
    ("production", 40, 1): ("ddp", False, 4, 4),
    ("production", 40, 2): ("ddp", False, 4, 4),
    ("production", 40, 8): ("ddp", False, 4, 4),
    ("production", 80, 1): ("ddp", False, 4, 4),
    ("production", 80, 2): ("ddp", False, 4, 4),
    ("production", 80, 8): ("ddp", False, 4, 4),
    ("production_8gpu", 24, 1): None,
    ("production_8gpu", 24, 2): ("fsdp", False, 2, 16),
    ("production_8gpu", 24, 8): ("fsdp", False, 4, 8),
    ("production_8gpu", 40, 1): ("ddp", False, 4, 8),
    ("production_8gpu", 40, 2): ("fsdp", False, 8, 4),
    ("production_8gpu", 40, 8): ("fsdp", False, 8, 4),
    ("production_8gpu", 80, 1): ("ddp", False, 8, 4),
    ("production_8gpu", 80, 2): ("ddp", False, 8, 4),
    ("production_8gpu", 80, 8): ("ddp", False, 8, 4),
}


def _plan(config=PRODUCTION, **changes):
    arguments = dict(
        seq_len=config.seq_len, micro_batch=config.per_device_train_batch_size,
        accumulation=config.gradient_accumulation_steps, num_gpus=2, strategy="ddp", activation_checkpointing=False,
        mixed_precision="bf16", gpu_memory_gib=USABLE_GIB[24],
    )
    arguments.update(changes)
    return plan_memory(config.model, **arguments)


@pytest.mark.parametrize("name", ["test", "production"])
def test_parameter_count_matches_the_built_model(name):
    config = get_config(name)
    built = build_model(config.model, device="meta")
    assert family_for(config.model).parameter_count(config.model) == count_parameters(built).total_params


def test_production_ddp_does_not_fit_two_24gb_cards_and_says_why():
    plan = _plan()
    assert plan.verdict == "does not fit"
    # fp32 weights, gradients, AdamW moments and DDP's bucket copy of the gradients: 20 bytes per parameter
    assert plan.weights + plan.gradients + plan.optimizer + plan.ddp_buckets == 20 * family_for(PRODUCTION.model).parameter_count(PRODUCTION.model)
    text = "\n".join(plan.lines())
    assert "does not fit" in text and "DDP gradient buckets" in text and "22.5 GiB" in text


def test_production_ddp_fits_two_80gb_cards():
    assert _plan(gpu_memory_gib=USABLE_GIB[80]).verdict == "fits"


@pytest.mark.parametrize("key", sorted(EXPECTED_LAYOUTS))
def test_the_readme_table(key):
    name, gpu_class, gpus = key
    layout = plan_for_config(get_config(name), num_gpus=gpus, gpu_memory_gib=USABLE_GIB[gpu_class])
    expected = EXPECTED_LAYOUTS[key]
    if expected is None:
        assert not layout.fits and layout.reason.startswith("nothing fits")
    else:
        assert layout.fits, layout.reason
        assert (layout.strategy, layout.activation_checkpointing, layout.micro_batch, layout.accumulation) == expected


@pytest.mark.parametrize("gpu_class", [24, 40, 80])
@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_choose_layout_picks_the_first_fitting_layout_by_cost_and_keeps_the_global_batch(gpu_class, gpus):
    config = PRODUCTION
    layout = plan_for_config(config, num_gpus=gpus, gpu_memory_gib=USABLE_GIB[gpu_class])
    assert layout.micro_batch * layout.accumulation == 16
    # plan_for_config plans the loop's DDP, whose gradients are views of its buckets
    assert layout.plan == _plan(
        num_gpus=gpus, gpu_memory_gib=USABLE_GIB[gpu_class], strategy=layout.strategy,
        activation_checkpointing=layout.activation_checkpointing, micro_batch=layout.micro_batch,
        accumulation=layout.accumulation, ddp_gradient_as_bucket_view=True,
    )
    if layout.fits:
        # everything the ranking puts first does not fit: DDP at the asked micro-batch always comes first
        if (layout.strategy, layout.micro_batch, layout.activation_checkpointing) != ("ddp", 4, False):
            assert not _plan(num_gpus=gpus, gpu_memory_gib=USABLE_GIB[gpu_class], ddp_gradient_as_bucket_view=True).fits


def test_forced_choices_are_kept():
    layout = plan_for_config(PRODUCTION, num_gpus=2, gpu_memory_gib=USABLE_GIB[24], strategy="fsdp",
                             activation_checkpointing="true")
    assert (layout.strategy, layout.activation_checkpointing, layout.micro_batch) == ("fsdp", True, 4)
    layout = plan_for_config(PRODUCTION, num_gpus=2, gpu_memory_gib=USABLE_GIB[24], strategy="ddp",
                             activation_checkpointing="false")
    assert not layout.fits and layout.strategy == "ddp" and not layout.activation_checkpointing
    assert "nothing fits" in layout.reason


def test_checkpointing_is_chosen_when_nothing_else_fits():
    # a 4096-token sequence: even one sample's activations do not fit 2 x 24 GB without checkpointing
    config = dataclasses.replace(PRODUCTION, seq_len=4096)
    layout = plan_for_config(config, num_gpus=2, gpu_memory_gib=USABLE_GIB[24])
    assert layout.fits and layout.activation_checkpointing and layout.strategy == "fsdp"


def test_components_add_up():
    for strategy in ("ddp", "fsdp"):
        for checkpointing in (False, True):
            for fused in (False, True):
                plan = _plan(strategy=strategy, activation_checkpointing=checkpointing, fused_optimizer=fused)
                # FSDP's sharded gradients are made as its units finish the backward pass: not at its peak
                gradients = 0 if strategy == "fsdp" else plan.gradients
                in_backward = (plan.weights + plan.optimizer + plan.ddp_buckets + gradients
                               + plan.low_precision_weights + plan.fsdp_unsharded + plan.activations
                               + max(plan.logits_and_loss, plan.layer_backward))
                optimizer_step = plan.static + plan.optimizer_step_temporaries
                assert plan.total == max(in_backward, optimizer_step) + plan.overhead
                assert plan.headroom == plan.gpu_memory_bytes - plan.total
                assert f"{plan.total / GIB:8.2f} GiB" in "\n".join(plan.lines())


def test_checkpointing_and_sharding_only_ever_save_memory():
    for gpus in (2, 8):
        ddp, fsdp = _plan(num_gpus=gpus), _plan(num_gpus=gpus, strategy="fsdp")
        assert fsdp.total < ddp.total
        for plan in (ddp, fsdp):
            checkpointed = _plan(num_gpus=gpus, strategy=plan.strategy, activation_checkpointing=True)
            assert checkpointed.activations < plan.activations / 3


def test_more_gpus_never_increase_sharded_bytes():
    previous = previous_total = None
    for gpus in (2, 3, 4, 8, 16, 64):
        plan = _plan(num_gpus=gpus, strategy="fsdp")
        sharded = (plan.weights, plan.gradients, plan.optimizer)
        if previous is not None:
            assert all(now <= before for now, before in zip(sharded, previous))
            assert plan.total <= previous_total
        previous, previous_total = sharded, plan.total


def test_hybrid_shard_divides_the_state_by_the_gpus_of_a_node():
    params = family_for(PRODUCTION.model).parameter_count(PRODUCTION.model)
    all_sixteen, two_nodes = _plan(num_gpus=16, strategy="fsdp"), _plan(num_gpus=16, strategy="fsdp", nodes=2)
    assert all_sixteen.weights == 4 * params // 16 and two_nodes.weights == 4 * params // 8
    assert two_nodes.optimizer == _plan(num_gpus=8, strategy="fsdp").optimizer
    assert two_nodes.total > all_sixteen.total
    assert "FSDP on 16 GPUs (sharded over the 8 of a node)" in two_nodes.lines()[0]
    assert _plan(num_gpus=16, nodes=2).weights == 4 * params  # DDP replicates everything anyway


def test_fsdp_counts_its_sharded_gradients_only_after_the_backward_pass():
    fsdp = _plan(strategy="fsdp", fused_optimizer=False)
    base = fsdp.weights + fsdp.optimizer + fsdp.fsdp_unsharded + fsdp.activations + fsdp.backward_working
    assert fsdp.allocated == max(base, fsdp.static + fsdp.optimizer_step_temporaries)
    ddp = _plan(ddp_gradient_as_bucket_view=True)
    assert ddp.allocated == (ddp.static + ddp.low_precision_weights + ddp.activations + ddp.backward_working)


def test_activations_grow_linearly_with_the_micro_batch():
    one, four = _plan(micro_batch=1), _plan(micro_batch=4)
    assert four.activations == pytest.approx(4 * one.activations, rel=1e-6)
    assert four.logits_and_loss == 4 * one.logits_and_loss


def test_the_math_attention_kernel_adds_a_seq_squared_term():
    flash, math = _plan(), _plan(flash_attention=False)
    heads, layers = PRODUCTION.model.num_attention_heads, PRODUCTION.model.num_hidden_layers
    assert math.activations - flash.activations == layers * 4 * heads * 1024 * 1024 * (2 + 4)


@pytest.mark.parametrize("bad", [dict(strategy="zero3"), dict(mixed_precision="fp8"), dict(num_gpus=0)])
def test_bad_arguments_are_value_errors(bad):
    with pytest.raises(ValueError):
        _plan(**bad)
    if "strategy" in bad:
        with pytest.raises(ValueError, match="--strategy"):
            choose_layout(PRODUCTION.model, seq_len=1024, micro_batch=4, accumulation=4, num_gpus=2,
                          mixed_precision="bf16", gpu_memory_gib=24, strategy="zero3")


def _measure_saved_bytes(model, input_ids, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass, parameters excepted."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), context:
        loss = model(input_ids=input_ids, labels=input_ids).loss
    del loss
    return sum(saved.values())


@pytest.mark.parametrize("layers", [2, 4])
@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_matches_what_autograd_saves(layers, mixed_precision, checkpointing):
    shape = dataclasses.replace(TEST_MODEL, num_hidden_layers=layers)
    model = build_model(shape)
    model.train()
    if checkpointing:
        enable_activation_checkpointing(model)
    micro_batch, seq_len = 4, 128
    input_ids = torch.randint(0, shape.vocab_size, (micro_batch, seq_len), generator=torch.Generator().manual_seed(0))
    measured = _measure_saved_bytes(model, input_ids, autocast=mixed_precision == "bf16")

    expected = saved_for_backward_bytes(
        shape, seq_len=seq_len, micro_batch=micro_batch, mixed_precision=mixed_precision, fsdp=False,
        activation_checkpointing=checkpointing,
    )
    plan = plan_memory(shape, seq_len=seq_len, micro_batch=micro_batch, accumulation=1, num_gpus=1, strategy="ddp",
                       activation_checkpointing=checkpointing, mixed_precision=mixed_precision, gpu_memory_gib=1)
    if mixed_precision == "bf16":
        # autocast's bf16 copies of the weight matrices are saved too; inside checkpointed layers they are made
        # again in the recompute, out of sight of these hooks, so only the output projection's copy shows
        expected += plan.low_precision_weights if not checkpointing else 2 * shape.vocab_size * shape.hidden_size
    assert measured == pytest.approx(expected, rel=0.03), (measured, expected)


def test_keep_micro_batch_answers_whether_the_configured_batch_fits():
    # 2 x 24 GB: the auto choice halves the micro-batch; kept at 4, FSDP needs activation checkpointing
    layout = plan_for_config(PRODUCTION, num_gpus=2, gpu_memory_gib=USABLE_GIB[24], strategy="fsdp",
                             keep_micro_batch=True)
    assert (layout.micro_batch, layout.activation_checkpointing) == (4, True) and layout.fits
    layout = plan_for_config(PRODUCTION, num_gpus=2, gpu_memory_gib=USABLE_GIB[24], strategy="fsdp",
                             activation_checkpointing="false", keep_micro_batch=True)
    assert layout.micro_batch == 4 and not layout.fits


def test_bucket_views_let_ddp_fit_two_40gb_cards():
    # Accelerate's default DDP keeps a second fp32 copy of the gradients; the loop's gradient_as_bucket_view does not
    default_ddp = plan_for_config(PRODUCTION, num_gpus=2, gpu_memory_gib=USABLE_GIB[40], ddp_gradient_as_bucket_view=False)
    assert default_ddp.strategy == "fsdp"
    layout = plan_for_config(PRODUCTION, num_gpus=2, gpu_memory_gib=USABLE_GIB[40])
    assert (layout.strategy, layout.micro_batch, layout.fits) == ("ddp", 4, True)
