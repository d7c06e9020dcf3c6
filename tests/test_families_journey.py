"""The model-family journeys through ./start_training.sh: a Llama-block run on 2 CPU processes trains, resumes
bit-exactly after SIGTERM and exports a folder transformers loads and generates from; a new run --init-from that
folder starts at its loss (a mismatched folder is one line, exit 2); and a cooldown branch from a stable-phase
checkpoint of a wsd run runs beside the main run, both preempted and resumed."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

from pretrain.checkpoint.format import load_checkpoint
from pretrain.cli import parse_config
from pretrain.data.samples import TokenSamples
from pretrain.data.training_data import FrozenShards
from pretrain.optim import lr_at
from pretrain.prepare.demo_corpus import write_sample_corpus
from pretrain.protocol import EXIT_BAD_INPUT, EXIT_PREEMPTED
from tests.launcher import (
    RUN_NAME,
    Watched,
    check,
    checkpoints,
    final_weights,
    isolated_args,
    last_line,
    launch,
    launcher_command,
    logged,
    wait_for_step,
)

pytestmark = pytest.mark.slow
LLAMA = ["--model-type", "llama"]
SHORT = ["--logging-steps", "1", "--eval-steps", "0", "--warmup-steps", "2", "--lr-decay-steps", "40",
         "--save-steps", "1000", "--final-samples", "0"]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    """The default job's real-text corpus (stdlib docs, a 512-id BPE): data with a tokenizer, for pipeline()."""
    data = tmp_path_factory.mktemp("text-data")
    write_sample_corpus("text", data, 512, 0)
    return data


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory, text_data):
    """A Llama run on 2 CPU processes stopped by SIGTERM and resumed, and the same run straight through."""
    root = tmp_path_factory.mktemp("llama")
    interrupted, straight = root / "interrupted", root / "straight"
    two = [*LLAMA, "--cpu-processes", "2"]
    run = Watched(launcher_command(interrupted, text_data, "--max-steps", "40", *two, *SHORT))
    wait_for_step(interrupted, 3, run.process)
    run.process.send_signal(signal.SIGTERM)
    assert run.process.wait(timeout=180) == EXIT_PREEMPTED, run.text()[-3000:]
    stopped_at = int(checkpoints(interrupted)[-1].split("-step")[1].split("-")[0])
    end = stopped_at + 2
    resumed = check(launch(interrupted, text_data, "--resume", "auto", "--max-steps", str(end), *two, *SHORT))
    check(launch(straight, text_data, "--max-steps", str(end), *two, *SHORT))
    return interrupted, straight, resumed, end


def test_a_llama_run_on_two_processes_resumes_bit_exactly_after_sigterm(llama_runs):
    interrupted, straight, resumed, end = llama_runs
    assert "--num_processes 2" in resumed.stdout and "model: Llama " in resumed.stderr
    assert sorted(logged(straight)) == list(range(1, end + 1))
    assert logged(interrupted) == logged(straight)  # the same float at every step
    a, b = final_weights(interrupted), final_weights(straight)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    state = load_checkpoint(straight / "checkpoints" / checkpoints(straight)[-1]).state
    assert state.config["model"]["model_type"] == "llama" and state.config["model"]["hidden_act"] == "silu"


def test_the_llama_export_loads_and_generates_through_transformers(llama_runs):
    _, straight, _, _ = llama_runs
    final = straight / "checkpoints" / "final-model"
    model = AutoModelForCausalLM.from_pretrained(final)
    assert type(model).__name__ == "LlamaForCausalLM"
    generated = pipeline("text-generation", model=str(final))("Return the", max_new_tokens=8, do_sample=False)
    text = generated[0]["generated_text"]
    assert text.startswith("Return the") and len(text) > len("Return the")


def test_init_from_an_export_starts_at_that_models_loss_as_a_new_run(llama_runs, text_data, tmp_path):
    _, straight, _, _ = llama_runs
    final = straight / "checkpoints" / "final-model"
    result = check(launch(tmp_path, text_data, *LLAMA, "--init-from", str(final), "--max-steps", "1",
                          "--logging-steps", "1", "--eval-steps", "0", "--warmup-steps", "1", "--final-samples", "0"))
    assert "its tokenizer.json is the data's" in result.stderr or "same id as the data's" in result.stderr
    saved = load_checkpoint(tmp_path / "checkpoints" / checkpoints(tmp_path)[-1])
    assert saved.state.step == 1 and saved.state.run_name == RUN_NAME
    assert saved.state.init_from["path"] == str(final.resolve()) and saved.state.init_from["model_type"] == "llama"
    assert {int(s["step"]) for s in saved.optimizer_state["state"].values()} == {1}  # a fresh optimizer

    # The first step's loss (mean of its two micro-batches, before the update) is the exported model's evaluation
    # loss on those samples.
    frozen = FrozenShards.from_json(saved.state.data)
    samples = TokenSamples(text_data, list(frozen.train), 128, 42, mix_shards=frozen.order.mix_shards,
                           shard_chunks=frozen.order.shard_chunks)
    exported = AutoModelForCausalLM.from_pretrained(final).eval()
    with torch.no_grad():
        losses = [exported(input_ids=batch, labels=batch).loss.item() for batch in
                  (torch.stack([samples[i] for i in range(m * 8, m * 8 + 8)]) for m in range(2))]
    assert logged(tmp_path)[1] == pytest.approx(sum(losses) / 2, rel=1e-5, abs=1e-6)


def test_init_from_a_folder_of_another_shape_is_one_line_and_exit_2(llama_runs, text_data, tmp_path):
    _, straight, _, _ = llama_runs
    final = straight / "checkpoints" / "final-model"
    result = launch(tmp_path, text_data, *LLAMA, "--init-from", str(final), "--num-hidden-layers", "3",
                    "--max-steps", "1")
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-3000:]
    line = last_line(result.stderr)
    assert (f"error: --init-from {final}: the folder holds a llama 4 layers x 128, 4 heads, FFN 512, vocab 512, this "
            "run builds a llama 3 layers x 128, 4 heads, FFN 512, vocab 512 (num_hidden_layers 4 there, 3 here)") in line
    assert "Traceback" not in result.stderr and checkpoints(tmp_path) == []


MAIN = ["--lr-schedule", "wsd", "--max-steps", "60", "--wsd-decay-fraction", "0.25", "--warmup-steps", "2",
        "--save-steps", "5", "--save-total-limit", "20", "--remote-save-total-limit", "20", "--logging-steps", "1",
        "--eval-steps", "0", "--final-samples", "0"]


def _branch_args(source: Path) -> list[str]:
    return [*MAIN, "--cooldown-from", str(source), "--cooldown-steps", "8", "--run-name", "branch"]


def _logged(workdir: Path, run_name: str, key: str = "train/loss") -> dict[int, float]:
    values = {}
    for line in (workdir / "logs" / run_name / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if key in record:
            values[record["step"]] = record[key]
    return values


def _wait_for_logged_step(workdir: Path, run_name: str, step: int, run: Watched, timeout: float = 240) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.process.poll() is None:
        path = workdir / "logs" / run_name / "metrics.jsonl"
        if path.exists() and max(_logged(workdir, run_name), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run_name} never reached step {step}:\n{run.text()[-3000:]}")


def test_a_cooldown_branch_runs_beside_the_main_run_and_both_resume(tmp_path, sample_data):
    main, branch, straight_branch = tmp_path / "main", tmp_path / "branch", tmp_path / "straight-branch"
    run = Watched(launcher_command(main, sample_data, *MAIN))
    wait_for_step(main, 12, run.process)
    run.process.send_signal(signal.SIGTERM)
    assert run.process.wait(timeout=120) == EXIT_PREEMPTED, run.text()[-3000:]
    source = main / "checkpoints" / "checkpoint-epoch0-step10-files7"
    assert source.is_dir(), checkpoints(main)

    # The main run resumes while the branch starts from its step-10 checkpoint; the branch is preempted too.
    main_again = Watched(launcher_command(main, sample_data, *MAIN, "--resume", "auto"))
    cooldown = Watched(launcher_command(branch, sample_data, *_branch_args(source), "--resume", "auto"))
    _wait_for_logged_step(branch, "branch", 13, cooldown)
    cooldown.process.send_signal(signal.SIGTERM)
    assert cooldown.finish(timeout=120) == EXIT_PREEMPTED, cooldown.text()[-3000:]
    assert "cooldown branch from" in cooldown.text() and "the cooldown branch's start" in cooldown.text()
    resumed = check(launch(branch, sample_data, *_branch_args(source), "--resume", "auto"))
    assert f"resuming from {branch / 'checkpoints'}" in resumed.stderr
    assert main_again.finish(timeout=300) == 0, main_again.text()[-3000:]
    check(launch(straight_branch, sample_data, *_branch_args(source)))

    main_config = parse_config(["--config", "test", *isolated_args(main, sample_data), *MAIN])
    branch_config = parse_config(["--config", "test", *isolated_args(branch, sample_data), *_branch_args(source)])
    assert (branch_config.max_steps, branch_config.lr_decay_start()) == (18, 10)
    main_loss, branch_loss = logged(main), _logged(branch, "branch")
    assert sorted(main_loss) == list(range(1, 61))
    assert sorted(branch_loss) == list(range(11, 19))
    # Steps 11 and 12 see the weights of step 10 and of one update at the peak rate, in both runs: the same losses.
    assert (branch_loss[11], branch_loss[12]) == (main_loss[11], main_loss[12])
    assert branch_loss[13] != main_loss[13] and branch_loss[18] != main_loss[18]
    assert _logged(branch, "branch") == _logged(straight_branch, "branch")  # bit-exact across its preemption
    a, b = final_weights(branch), final_weights(straight_branch)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    for step, rate in _logged(main, RUN_NAME, "train/lr").items():
        assert rate == lr_at(step, main_config)
    branch_rates = _logged(branch, "branch", "train/lr")
    assert [branch_rates[s] for s in range(11, 19)] == [lr_at(s, branch_config) for s in range(11, 19)]
    assert branch_rates[11] == main_config.learning_rate and branch_rates[18] < 0.3 * main_config.learning_rate
    assert all(rate == main_config.learning_rate for step, rate in _logged(main, RUN_NAME, "train/lr").items()
               if 2 <= step <= 46)  # warmup over 2 steps; steps 2 to 46 at the peak; decay from step 46 on

    state = load_checkpoint(branch / "checkpoints" / checkpoints(branch)[-1]).state
    assert state.run_name == "branch" and state.step == 18
    assert state.branch == {"from": str(source), "run_name": RUN_NAME, "step": 10}
    assert "checkpoint-epoch0-step10-files7" in checkpoints(branch)  # its own start, not the main run's folder
    assert [p["step"] for p in state.history if "train/loss" in p][:12] == list(range(1, 13))  # main's, then its own
    main_state = load_checkpoint(main / "checkpoints" / checkpoints(main)[-1]).state
    assert main_state.run_name == RUN_NAME and main_state.branch is None and main_state.step == 60
