"""torch.compile is applied after prepare() and warmed up on a real batch before the clock starts: a backend that
fails there (as inductor can, lazily, at the first forward) falls back to eager instead of ending the run."""

import logging

import pytest
import torch
from accelerate.state import AcceleratorState

from configs import CONFIGS, with_changes
from pretrain.cli import validate
from pretrain.data.synthetic import generate_sample_data
from pretrain.loop import Trainer
from pretrain.preemption import PreemptionFlag


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("simulated backend failure: no compiler for this device")


torch._dynamo.register_backend(compiler_fn=failing_backend, name="failing_for_tests")


@pytest.fixture
def config(tmp_path):
    generate_sample_data(tmp_path / "data", vocab_size=512, seed=0)
    return validate(with_changes(
        CONFIGS["test"], data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "checkpoints"),
        logging_dir=str(tmp_path / "logs"), checkpoint_bucket="", run_name="run", max_steps=2, save_steps=100,
        eval_steps=0, warmup_steps=1, logging_steps=1, export_final_model=False, compile_model=True,
    ))


def run_to_the_end(config) -> Trainer:
    trainer = Trainer(config, PreemptionFlag())
    try:
        trainer.run()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        torch._dynamo.reset()
    return trainer


def test_a_backend_that_fails_at_the_first_step_falls_back_to_eager(config, caplog):
    caplog.set_level(logging.WARNING)
    trainer = run_to_the_end(with_changes(config, compile_backend="failing_for_tests"))
    assert "torch.compile (backend failing_for_tests) failed at the first step (" in caplog.text
    assert "simulated backend failure" in caplog.text
    assert not isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule)  # trained eager
    losses = [point["train/loss"] for point in trainer.state.history if "train/loss" in point]
    assert trainer.state.step == 2 and len(losses) == 2 and losses[-1] < losses[0]


def test_a_working_backend_is_kept(config, caplog):
    caplog.set_level(logging.WARNING)
    trainer = run_to_the_end(with_changes(config, compile_backend="eager"))  # dynamo tracing, no codegen: fast
    assert "failed at the first step" not in caplog.text
    assert isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.state.step == 2


def failing_in_evaluation(graph_module, example_inputs):
    if not torch.is_grad_enabled():  # the evaluation's graph (no_grad) compiles apart from the training's
        raise RuntimeError("simulated backend failure for the no_grad graph")
    return graph_module.forward


torch._dynamo.register_backend(compiler_fn=failing_in_evaluation, name="failing_at_evaluation_for_tests")


def test_a_backend_that_fails_at_the_first_evaluation_falls_back_to_eager_there(config, caplog):
    caplog.set_level(logging.WARNING)
    trainer = run_to_the_end(with_changes(config, compile_backend="failing_at_evaluation_for_tests", eval_steps=1))
    assert "torch.compile failed at the first evaluation (" in caplog.text and "no_grad graph" in caplog.text
    assert caplog.text.count("failed at the first evaluation") == 1  # the second evaluation goes eager at once
    assert isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule)  # training stays compiled
    evaluations = [point["eval/loss"] for point in trainer.state.history if "eval/loss" in point]
    assert trainer.state.step == 2 and len(evaluations) == 2
