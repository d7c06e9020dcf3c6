"""Signals through ./start_training.sh: SIGTERM at any moment reaches every rank, the run ends with the training's own
exit code (75 after an emergency checkpoint), no traceback is printed and no process of the run is left behind."""

from __future__ import annotations

import os
import re
import signal

import pytest
import torch

from pretrain.checkpoint.format import verify_checkpoint
from pretrain.protocol import EXIT_PREEMPTED
from tests.launcher import (
    RUN_NAME,
    Watched,
    check,
    checkpoints,
    final_weights,
    free_port,
    launch,
    launcher_command,
    logged,
    survivors,
    wait_for_step,
)

pytestmark = pytest.mark.slow
COMMON = ["--logging-steps", "1", "--eval-steps", "0", "--warmup-steps", "2", "--lr-decay-steps", "40", "--save-steps", "1000"]
TWO_PROCESSES = ["--cpu-processes", "2", "--per-device-train-batch-size", "4"]
NOISE = ("Traceback", "CalledProcessError", "ChildFailedError", "closing signal", "FileNotFoundError")


def assert_quiet_and_gone(run: Watched, marker: str) -> str:
    text = run.text()
    for noise in NOISE:
        assert noise not in text, text[-4000:]
    assert survivors(marker) == [], survivors(marker)
    return text


def forwarded_pids(text: str) -> set[str]:
    return {pid for line in re.findall(r"forwarding SIGTERM to training processes ([\d ]+)", text) for pid in line.split()}


def test_sigterm_mid_training_reaches_both_ranks_and_resumes_exactly(tmp_path, sample_data):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    run = Watched(launcher_command(interrupted, sample_data, *TWO_PROCESSES, "--main-port", str(free_port()),
                                   "--max-steps", "40", *COMMON))
    wait_for_step(interrupted, 2, run.process, timeout=300)
    run.process.send_signal(signal.SIGTERM)  # to start_training.sh only, as an orchestrator does
    assert run.finish(timeout=180) == EXIT_PREEMPTED, run.text()[-4000:]
    text = assert_quiet_and_gone(run, str(interrupted))
    assert len(forwarded_pids(text)) == 2, text[-4000:]
    assert text.count("SIGTERM received") >= 2, text[-4000:]  # each rank says so (torchrun may repeat it to one)

    saved = checkpoints(interrupted)
    assert len(saved) == 1, saved  # the emergency one: no scheduled save came due
    assert verify_checkpoint(interrupted / "checkpoints" / saved[0]) is None
    stopped_at = int(saved[0].split("-step")[1].split("-")[0])
    assert stopped_at >= 2

    end = stopped_at + 2
    check(launch(interrupted, sample_data, *TWO_PROCESSES, "--main-port", str(free_port()), "--resume", "auto",
                 "--max-steps", str(end), *COMMON))
    check(launch(straight, sample_data, *TWO_PROCESSES, "--main-port", str(free_port()), "--max-steps", str(end), *COMMON))
    assert logged(interrupted) == logged(straight)
    a, b = final_weights(interrupted), final_weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_during_start_up_ends_the_run_and_leaves_nothing_behind(processes, tmp_path, sample_data):
    workdir = tmp_path / "run"
    layout = TWO_PROCESSES + ["--main-port", str(free_port())] if processes == 2 else []
    run = Watched(launcher_command(workdir, sample_data, *layout, "--max-steps", "40", *COMMON), with_stdout=True)
    run.wait_for("running:")
    run.process.send_signal(signal.SIGTERM)  # before any rank has started: start_training.sh holds it for them
    code = run.finish(timeout=300)
    text = assert_quiet_and_gone(run, str(workdir))
    assert "SIGTERM received while starting up" in text, text[-4000:]
    # Each rank gets it once it is ready; if training set-up does not check for it, the ranks stop after step 1
    # with an emergency checkpoint. Either way 75, and far fewer than the 40 steps asked for.
    assert code == EXIT_PREEMPTED, text[-4000:]
    assert len(forwarded_pids(text)) == processes, text[-4000:]
    assert text.count("SIGTERM received:") >= processes, text[-4000:]
    steps = logged(workdir) if (workdir / "logs" / RUN_NAME / "metrics.jsonl").exists() else {}
    assert max(steps, default=0) <= 2, steps
    for name in checkpoints(workdir):
        assert verify_checkpoint(workdir / "checkpoints" / name) is None, name


def test_a_killed_accelerate_leaves_no_training_process_behind(tmp_path, sample_data):
    """If accelerate itself dies (the OOM killer, a stray kill -9), the ranks it started are stopped as if preempted."""
    workdir = tmp_path / "run"
    run = Watched(launcher_command(workdir, sample_data, "--max-steps", "40", *COMMON))
    wait_for_step(workdir, 2, run.process, timeout=300)
    # The launcher's child, which planned the run and runs accelerate launch in-process.
    wrapper = [line for line in survivors(str(workdir)) if "pretrain.launch.command" in line]
    assert len(wrapper) == 1, wrapper
    os.kill(int(wrapper[0].split(":")[0]), signal.SIGKILL)
    assert run.finish(timeout=180) == EXIT_PREEMPTED, run.text()[-4000:]
    text = assert_quiet_and_gone(run, str(workdir))
    assert "stopping them" in text and "SIGTERM received" in text, text[-4000:]
    assert len(checkpoints(workdir)) == 1
