"""The memory plan (pretrain/memory.py) against PyTorch's own accounting: torch's MemTracker around the product's
train_step at small shapes, term by term and phase by phase, on one process, DDP and FSDP over 2 gloo processes,
activation checkpointing off and on, fp32 and bf16 autocast, fresh and after a resume; and DDP's gradients staying in
its buckets across micro-batches, seen by the tracker and, through the launcher, in a rank's peak memory.

Each planned term and each phase's total must be within 10% of what the tracker measures (observed: within 2.5%).
Two phases are only bounded: the forward pass must stay below the backward's start (the plan's premise; autocast's
weight cache broke it under checkpointing), and the optimizer step below it too (on CPU AdamW runs parameter by
parameter; on a GPU the fused kernel has no temporaries of that size).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from configs import get_config
from pretrain.checkpoint.state_dicts import (
    full_optimizer_state,
    load_full_optimizer_state,
)
from pretrain.loop import make_accelerator, train_step
from pretrain.memory import plan_memory
from pretrain.model.build import (
    block_classes,
    build_model,
    enable_activation_checkpointing,
)
from pretrain.model.families import family_for
from pretrain.optim import build_optimizer
from tests.launcher import check, launch, logged
from tests.memory_cpu_check import ACCUMULATION, MICRO_BATCH, SEQ_LEN, SHAPE
from tests.memory_tracking import PlanTermTracker, compare, describe
from tests.test_distributed import free_port, run_with_launcher_flags

TOLERANCE = 0.10


BOUNDED = ("forward", "optimizer step")


def assert_within(rows, tolerance: float = TOLERANCE) -> None:
    judged = [row for row in rows if row.name not in BOUNDED]
    wrong = [row.name for row in judged if not 1 - tolerance <= row.ratio <= 1 + tolerance]
    assert not wrong, f"off by more than {tolerance:.0%}: {wrong}\n{describe(rows)}"
    phases = {row.name: row for row in rows}
    for name in BOUNDED:
        assert phases[name].measured < phases["head backward"].measured, describe(rows)


@pytest.fixture
def fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# The Llama block at the same small shape: 4 heads sharing 2 K/V heads, SwiGLU, RMSNorm.
LLAMA_SHAPE = dataclasses.replace(SHAPE, model_type="llama", num_key_value_heads=2)
SHAPES = {"gpt_neox": SHAPE, "llama": LLAMA_SHAPE}


def one_process(precision: str, checkpointing: bool, resumed: bool = False, accelerator: Accelerator | None = None,
                shape=SHAPE):
    """The tracker around one train_step on one process (no wrapper): the second step, or the first of a new model
    after loading the first's optimizer state as Checkpointer.restore does. Returns (tracker, plan, losses)."""
    config = dataclasses.replace(get_config("test"), model=shape, seq_len=SEQ_LEN,
                                 per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=ACCUMULATION,
                                 mixed_precision="bf16", cpu_mixed_precision=precision == "bf16")
    accelerator = accelerator or make_accelerator(config)
    generator = torch.Generator().manual_seed(0)
    losses = []

    def prepared():
        torch.manual_seed(0)
        model = build_model(shape)
        if checkpointing:
            enable_activation_checkpointing(model)
        return accelerator.prepare(model, build_optimizer(model, config))

    def step(model, optimizer):
        batches = iter([torch.randint(0, shape.vocab_size, (MICRO_BATCH, SEQ_LEN), generator=generator)
                        for _ in range(ACCUMULATION)])
        losses.append(train_step(model, optimizer, accelerator, batches, ACCUMULATION, 1.0, 1e-3).loss_sum.item())

    model, optimizer = prepared()
    step(model, optimizer)
    if resumed:
        state = full_optimizer_state(model, optimizer.optimizer)
        accelerator.free_memory()
        model, optimizer = prepared()
        load_full_optimizer_state(model, optimizer.optimizer, state)
    tracker = PlanTermTracker(shape.vocab_size, tuple(block_classes(model, family_for(shape))))
    tracker.track_external(model, optimizer)
    with tracker:
        step(model, optimizer)
    plan = plan_memory(shape, seq_len=SEQ_LEN, micro_batch=MICRO_BATCH, accumulation=ACCUMULATION, num_gpus=1,
                       strategy="ddp", activation_checkpointing=checkpointing, mixed_precision=precision,
                       gpu_memory_gib=80)
    return tracker, plan, losses


@pytest.mark.parametrize("family", sorted(SHAPES))
@pytest.mark.parametrize("precision, checkpointing, resumed", [
    ("no", False, False), ("no", True, False), ("bf16", False, False), ("bf16", True, False), ("bf16", False, True),
], ids=["fp32", "fp32-checkpointing", "bf16", "bf16-checkpointing", "bf16-resumed"])
def test_one_process_plan_matches_the_tracker(precision, checkpointing, resumed, family, fresh_accelerator_state):
    tracker, plan, _ = one_process(precision, checkpointing, resumed, shape=SHAPES[family])
    assert_within(compare(plan, tracker))


def test_autocast_keeps_no_weight_copies_of_checkpointed_blocks(fresh_accelerator_state):
    """Accelerate's autocast caches each cast weight until the forward pass ends, so under checkpointing every
    block's bf16 copies were there at the forward's end, above the backward's start (the plan counted one block's);
    the loop turns the cache off, which leaves only the output projection's copy there, and changes no value."""
    output_copy = 2 * SHAPE.vocab_size * SHAPE.hidden_size
    block_copies = 2 * family_for(SHAPE).layer_matrix_parameters(SHAPE)
    tracker, plan, ours = one_process("bf16", checkpointing=True)
    forward, head = tracker.phases["forward"], tracker.phases["head backward"]
    assert forward[1]["low_precision_weights"] == output_copy == plan.low_precision_weights
    assert forward[0] < head[0]

    AcceleratorState._reset_state(reset_partial_state=True)
    default = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=ACCUMULATION)
    tracker, _, cached = one_process("bf16", checkpointing=True, accelerator=default)
    forward, head = tracker.phases["forward"], tracker.phases["head backward"]
    assert forward[1]["low_precision_weights"] >= output_copy + SHAPE.num_hidden_layers * block_copies  # and biases
    assert forward[0] > head[0]
    assert ours == cached


@pytest.mark.slow
def test_ddp_and_fsdp_plans_match_the_tracker_and_ddp_keeps_one_gradient_copy(tmp_path):
    result_file = tmp_path / "memory.json"
    check(run_with_launcher_flags("memory_cpu_check.py", str(result_file)))
    results = json.loads(result_file.read_text())
    rows = {layout: {name: (v["planned"], v["measured"]) for name, v in values.items()}
            for layout, values in results.items()}
    text = json.dumps(rows, indent=1)
    for layout, values in rows.items():
        if "before the fix" in layout:
            continue
        for name, (planned, measured) in values.items():
            if name in BOUNDED:
                assert measured < values["head backward"][1], (layout, text)
            else:
                assert abs(planned - measured) <= TOLERANCE * measured, (layout, name, text)
    # The loop before its fix: fresh gradients under no_sync beside the buckets, in the steady state and in the
    # first step after a resume, one whole fp32 copy more than the plan (and than the fixed loop above)
    copy = 4 * family_for(SHAPE).parameter_count(SHAPE)
    for layout in ("ddp before the fix", "ddp resumed before the fix"):
        planned, measured = rows[layout]["gradients"]
        assert measured == 2 * planned == 2 * copy, (layout, text)
        assert rows[layout]["peak"][1] - rows["ddp"]["peak"][1] == copy, (layout, text)


# Large gradients against a small micro-batch: a second fp32 copy of them is 53 MB, the activations a few MB.
WIDE = {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 4}


@pytest.mark.slow
def test_a_rank_with_four_micro_batches_peaks_no_higher_than_with_one(tmp_path, sample_data):
    """Through the launcher on 2 gloo processes: rank 0's peak resident memory (VmHWM, logged at every step), with 4
    accumulation micro-batches against 1 of the same size, at step 2. Before the fix the 4-micro-batch run held a
    second fp32 copy of the gradients from step 2 on: +44 MB at step 2 and +67 MB at step 3 (a copy is 53 MB);
    fixed, the two agreed within 6 MB in three pairs of runs. The bound is half a copy."""
    flags = [arg for name, value in WIDE.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    flags += ["--per-device-train-batch-size", "1", "--max-steps", "2", "--logging-steps", "1", "--save-steps", "100",
              "--eval-steps", "0", "--export-final-model", "false"]
    peaks = {}
    for accumulation in (1, 4):
        workdir = tmp_path / f"accumulation{accumulation}"
        check(launch(workdir, sample_data, "--cpu-processes", "2", "--main-port", str(free_port()), *flags,
                     "--gradient-accumulation-steps", str(accumulation)))
        peaks[accumulation] = logged(workdir, "memory/peak_rss_gib")[2] * 2**30
    shape = dataclasses.replace(get_config("test").model, **WIDE)
    copy = 4 * family_for(shape).parameter_count(shape)
    assert peaks[4] <= peaks[1] + copy / 2, {k: round(v / 2**20, 1) for k, v in peaks.items()}
