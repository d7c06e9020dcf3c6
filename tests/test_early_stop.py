"""--early-stop-patience: evaluations that stop improving end the run with exit 0, saying why, after exporting the
checkpoint with the best eval loss (saved when it was measured)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pretrain.checkpoint.format import MODEL_FILE, load_checkpoint
from pretrain.checkpoint.store import CheckpointStore
from pretrain.cli import parse_config
from pretrain.data.format import write_shard
from pretrain.loop import Trainer
from pretrain.preemption import PreemptionFlag
from tests.spiky_data import (
    SHARDS,
    TOKENS_PER_SHARD,
    VOCAB,
    one_thread,
    spike_config,
    write_corpus,
)


def test_a_run_whose_eval_loss_stops_improving_stops_and_exports_the_best(tmp_path, capsys):
    # Held-out data of random tokens: the better the model learns the text, the worse it predicts them.
    (tmp_path / "data").mkdir()
    write_corpus(tmp_path / "data", spike_config(tmp_path))
    noise = np.random.default_rng(3).integers(0, VOCAB, size=TOKENS_PER_SHARD).astype(np.uint16)
    write_shard(tmp_path / "data" / f"shard_{SHARDS - 1:03d}.npz", noise)
    config = spike_config(tmp_path, max_steps=40, eval_steps=2, early_stop_patience=2, export_final_model=True,
                          final_samples=0, keep_best=True, save_steps=100, on_loss_spike="warn")
    trainer = Trainer(config, PreemptionFlag())
    try:
        with one_thread():
            trainer.run()  # returns normally: train.py exits 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)

    state = trainer.state
    assert state.step < config.max_steps and state.evals_without_improvement == 2
    evals = [(point["step"], point["eval/loss"]) for point in state.history if "eval/loss" in point]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert state.best_eval_loss == best_loss and evals[-1][0] == state.step == best_step + 4
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"early stop at step {state.step}: the eval loss has not improved for 2 evaluations")

    output = Path(config.output_dir)
    store = CheckpointStore.local(output)
    best = next(c for c in store.describe_all() if c.step == best_step)  # saved when it was measured
    assert best.eval_loss == best_loss and store.complete()[0].endswith(f"step{state.step}-files7")
    assert load_checkpoint(output / store.complete()[0]).state.evals_without_improvement == 2
    exported = AutoModelForCausalLM.from_pretrained(output / "final-model").state_dict()
    saved = load_file(str(output / best.name / MODEL_FILE))
    assert all(torch.equal(exported[k], saved[k]) for k in saved)


def test_early_stopping_needs_evaluations():
    with pytest.raises(ValueError, match="--early-stop-patience needs evaluations during training: pass --eval-steps"):
        parse_config(["--config", "production", "--early-stop-patience", "3"])
