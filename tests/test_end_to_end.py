"""The whole pipeline through ./start_training.sh on the test config: train, log, checkpoint, export, resume exactly."""

import json
import resource
import shutil
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from pretrain.checkpoint.format import load_checkpoint, verify_checkpoint
from tests.launcher import (
    REPO,
    RUN_NAME,
    check,
    checkpoints,
    final_weights,
    launch,
    logged,
)

pytestmark = pytest.mark.slow
SHORT = ["--logging-steps", "1", "--eval-steps", "0", "--warmup-steps", "2"]



def test_training_run_learns_logs_checkpoints_and_exports(tmp_path, sample_data):
    result = check(launch(tmp_path, sample_data, "--max-steps", "40", "--save-steps", "20", "--logging-steps", "5",
                          "--eval-steps", "20", "--warmup-steps", "5"))
    assert "launch --cpu --num_processes 1" in result.stdout
    losses = logged(tmp_path)
    assert sorted(losses) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert losses[40] < 0.6 * losses[5], losses  # the sample corpus has learnable structure
    eval_losses = logged(tmp_path, "eval/loss")
    assert sorted(eval_losses) == [20, 40] and eval_losses[40] < eval_losses[20]

    names = checkpoints(tmp_path)
    assert names == ["checkpoint-epoch0-step20-files7", "checkpoint-epoch0-step40-files7"]
    for name in names:
        assert verify_checkpoint(tmp_path / "checkpoints" / name) is None
    state = load_checkpoint(tmp_path / "checkpoints" / names[-1]).state
    assert state.step == 40 and state.samples_consumed == 40 * 16
    assert state.config["max_steps"] == 40 and state.run_name == RUN_NAME and state.versions["torch"]
    assert [point["step"] for point in state.history if "train/loss" in point] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert len(state.data["train"]) == 7 and state.epoch == 0

    events = EventAccumulator(str(tmp_path / "logs" / RUN_NAME))
    events.Reload()
    assert {"train/loss", "train/lr", "eval/loss", "perf/tokens_per_second"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20, 25, 30, 35, 40]

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "final-model")
    checkpoint_weights = load_checkpoint(tmp_path / "checkpoints" / names[-1]).model_state
    exported_state = exported.state_dict()
    assert set(exported_state) == set(checkpoint_weights)
    assert all(torch.equal(exported_state[k], checkpoint_weights[k]) for k in checkpoint_weights)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in exported_state)


def test_stopping_and_resuming_is_bit_identical_to_a_straight_run(tmp_path, sample_data):
    straight, split = tmp_path / "straight", tmp_path / "split"
    check(launch(straight, sample_data, "--max-steps", "8", "--save-steps", "4", *SHORT))
    check(launch(split, sample_data, "--max-steps", "4", "--lr-decay-steps", "8", "--save-steps", "4", *SHORT))
    assert checkpoints(split) == ["checkpoint-epoch0-step4-files7"]
    resumed = check(launch(split, sample_data, "--resume", "latest", "--max-steps", "8", "--save-steps", "4", *SHORT))
    assert "resuming from" in resumed.stderr and "checkpoint-epoch0-step4-files7" in resumed.stderr

    expected, got = logged(straight), logged(split)
    assert sorted(got) == list(range(1, 9))
    assert got == expected  # the same float at every step, not merely close
    a, b = final_weights(straight), final_weights(split)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_dry_run_of_production_builds_the_plan_without_allocating(tmp_path):
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = subprocess.run([sys.executable, "train.py", "--config", "production", "--dry-run"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    check(result)
    assert "1,414,455,296 parameters" in result.stdout and "1,208,602,624 non-embedding" in result.stdout
    assert "4 per device x 4 accumulation x 2 processes x 1024 tokens = 32,768 tokens" in result.stdout
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert max(before, peak_kib) < 3 * 1024 * 1024  # the fp32 weights alone would be 5.7 GB


def test_asking_for_gpus_on_a_cpu_machine_is_a_clear_error(tmp_path, sample_data):
    result = launch(tmp_path, sample_data, "--gpus", "2")
    assert result.returncode == 2
    assert "--gpus 2: no GPU is visible on this machine; use --gpus 0" in result.stderr
    assert checkpoints(tmp_path) == []


def test_a_compiled_runs_checkpoint_resumes_without_compile(tmp_path, sample_data):
    """torch.compile (inductor on CPU) after prepare(): no `_orig_mod.` leaks into checkpoints or the export."""
    compiled = check(launch(tmp_path, sample_data, "--compile-model", "true", "--max-steps", "2", "--save-steps", "2",
                            "--lr-decay-steps", "4", *SHORT))
    assert "torch.compile failed" not in compiled.stderr
    saved = load_checkpoint(tmp_path / "checkpoints" / checkpoints(tmp_path)[-1]).model_state
    assert not any("_orig_mod" in key for key in saved)
    check(launch(tmp_path, sample_data, "--compile-model", "false", "--resume", "latest", "--max-steps", "4",
                 "--save-steps", "2", "--lr-decay-steps", "4", *SHORT))
    assert sorted(logged(tmp_path)) == [1, 2, 3, 4]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "final-model").state_dict()
    assert set(exported) == set(saved)


def test_the_default_job_goes_from_text_to_a_model_that_generates(tmp_path):
    """An empty data folder: real text is prepared with a trained tokenizer, trained on, exported with the tokenizer;
    the export loads in transformers' pipeline() and pretrain.generate samples from a checkpoint in the bucket."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "README.md").write_text("what goes here\n")  # as in a fresh clone: data/ is not empty, it has no shards
    result = check(launch(tmp_path, data, "--max-steps", "4", "--save-steps", "4", "--logging-steps", "2",
                          "--eval-steps", "0", "--warmup-steps", "1", "--final-samples", "2"))
    manifest = json.loads((data / "dataset.json").read_text())
    assert manifest["vocab_size"] <= 512 and manifest["tokenizer"]["file"] == "tokenizer.json"
    samples = [line for line in result.stdout.splitlines() if line.startswith("sample: ")]
    assert len(samples) == 2 and samples[0].startswith("sample: Return the"), result.stdout[-2000:]

    final = tmp_path / "checkpoints" / "final-model"
    from transformers import pipeline

    generated = pipeline("text-generation", model=str(final))("The", max_new_tokens=5, do_sample=False)
    assert generated[0]["generated_text"].startswith("The")

    shutil.rmtree(tmp_path / "checkpoints")  # a machine that has only the bucket
    command = [sys.executable, "-m", "pretrain.generate", "--checkpoint", "latest", "--output-dir",
               str(tmp_path / "checkpoints"), "--checkpoint-bucket", str(tmp_path / "bucket"), "--prompt", "If the",
               "--max-new-tokens", "8"]
    out = check(subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300))
    assert out.stdout.startswith("If the") and "checkpoint-epoch0-step4" in out.stderr


def test_activation_checkpointing_resumes_exactly_and_trains_like_without_it(tmp_path, sample_data):
    straight, split, without = tmp_path / "straight", tmp_path / "split", tmp_path / "without"
    schedule = ["--max-steps", "4", "--save-steps", "2", "--lr-decay-steps", "4", *SHORT]
    check(launch(straight, sample_data, "--gradient-checkpointing", "true", *schedule))
    check(launch(split, sample_data, "--gradient-checkpointing", "true", *schedule, "--max-steps", "2"))
    check(launch(split, sample_data, "--gradient-checkpointing", "true", *schedule, "--resume", "auto"))
    check(launch(without, sample_data, "--gradient-checkpointing", "false", *schedule))
    assert logged(split) == logged(straight)  # bit for bit across the stop
    a, b = final_weights(straight), final_weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Recomputing the forward pass in backward changes no arithmetic that matters: the same losses within rounding.
    recomputed, kept = logged(straight), logged(without)
    assert sorted(recomputed) == sorted(kept) == [1, 2, 3, 4]
    assert max(abs(recomputed[s] - kept[s]) for s in kept) < 1e-5, (recomputed, kept)
