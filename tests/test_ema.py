"""The EMA of the weights (--ema-decay): the average it claims, kept in the checkpoint and resumed bit for bit,
exported instead of the weights when asked, and counted by the memory plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from configs import CONFIGS, with_changes
from pretrain.checkpoint.format import EMA_FILE, MODEL_FILE
from pretrain.checkpoint.store import CheckpointStore
from pretrain.cli import parse_config
from pretrain.ema import EMA
from pretrain.loop import Trainer
from pretrain.memory import GIB, plan_for_config
from pretrain.preemption import PreemptionFlag
from tests.spiky_data import one_thread, spike_config, write_corpus

EMA_RUN = dict(ema_decay=0.9, on_loss_spike="warn", max_steps=12, save_steps=6, lr_decay_steps=12)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ema-data")
    (root / "data").mkdir()
    write_corpus(root / "data", spike_config(root))
    return root / "data"


def run(config) -> Trainer:
    trainer = Trainer(config, PreemptionFlag())
    try:
        trainer.run()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return trainer


def newest(config) -> Path:
    return Path(config.output_dir) / CheckpointStore.local(Path(config.output_dir)).complete()[0]


def test_the_update_is_the_exponential_average():
    AcceleratorState._reset_state(reset_partial_state=True)
    model = torch.nn.Linear(4, 3)
    ema = EMA(Accelerator(cpu=True), model, decay=0.75)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    state = ema.full_state()
    assert set(state) == {"weight", "bias"}
    for name, p in model.named_parameters():
        assert torch.allclose(state[name], 0.75 * start[name] + 0.25 * p.detach())
    AcceleratorState._reset_state(reset_partial_state=True)


def test_resume_is_bit_exact_and_the_export_writes_the_average(tmp_path, data):
    straight = spike_config(tmp_path / "straight", data_dir=str(data), export_final_model=True,
                            export_weights="ema", **EMA_RUN)
    run(straight)
    split = spike_config(tmp_path / "split", data_dir=str(data), **{**EMA_RUN, "max_steps": 6})
    run(split)
    run(with_changes(split, max_steps=12, resume="auto"))

    a, b = newest(straight), newest(split)
    assert a.name == b.name == "checkpoint-epoch0-step12-files7"
    for file in (EMA_FILE, MODEL_FILE):
        x, y = load_file(str(a / file)), load_file(str(b / file))
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), file
    average, weights = load_file(str(a / EMA_FILE)), load_file(str(a / MODEL_FILE))
    assert set(average) <= set(weights) and any(not torch.equal(average[k], weights[k]) for k in average)

    exported = AutoModelForCausalLM.from_pretrained(Path(straight.output_dir) / "final-model").state_dict()
    assert all(torch.equal(exported[k], average[k]) for k in average)  # the EMA, not the weights


def test_a_checkpoint_without_an_ema_starts_one_from_its_weights(tmp_path, data):
    plain = spike_config(tmp_path, data_dir=str(data), **{**EMA_RUN, "ema_decay": 0.0, "max_steps": 6})
    run(plain)
    trainer = run(with_changes(plain, ema_decay=0.9, max_steps=7, resume="auto", save_steps=7))
    assert trainer.ema is not None
    saved = load_file(str(newest(trainer.config) / EMA_FILE))
    assert set(saved) == set(trainer.ema.names)


def test_the_memory_plan_counts_the_ema():
    config = parse_config(["--config", "production", "--ema-decay", "0.999"])
    plain = plan_for_config(parse_config(["--config", "production"]), num_gpus=2, gpu_memory_gib=80,
                            strategy="ddp", activation_checkpointing="false")
    with_ema = plan_for_config(config, num_gpus=2, gpu_memory_gib=80, strategy="ddp", activation_checkpointing="false")
    assert with_ema.plan.ema == with_ema.plan.weights and plain.plan.ema == 0  # fp32, like the weights
    assert with_ema.plan.total - plain.plan.total >= with_ema.plan.ema
    assert any(line.strip().startswith("EMA of the weights") for line in with_ema.plan.lines())
    sharded = plan_for_config(config, num_gpus=8, gpu_memory_gib=80, strategy="fsdp", activation_checkpointing="false")
    assert sharded.plan.ema == sharded.plan.weights < with_ema.plan.ema  # a shard of it under FSDP
    assert 5.0 < with_ema.plan.ema / GIB < 5.5  # 4 bytes x 1.41 B parameters


def test_export_weights_ema_needs_an_ema():
    with pytest.raises(ValueError, match="--export-weights ema needs an EMA: pass --ema-decay"):
        parse_config(["--export-weights", "ema"])
    with pytest.raises(ValueError, match="--ema-decay must be in"):
        parse_config(["--ema-decay", "1.0"])
    assert CONFIGS["test"].ema_decay == 0.0  # off unless asked
