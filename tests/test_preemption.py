"""Preemption and crashes: SIGTERM writes an emergency checkpoint and exits 75; a second Ctrl-C exits at once;
SIGKILL at random moments never costs more than the steps since the last complete checkpoint, and the
resumed run ends bit-identical to one that was never interrupted."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pretrain.checkpoint.format import verify_checkpoint
from pretrain.protocol import EXIT_PREEMPTED
from tests.launcher import (
    REPO,
    RUN_NAME,
    Watched,
    check,
    checkpoints,
    final_weights,
    isolated_args,
    launch,
    launcher_command,
    logged,
    wait_for_step,
)

pytestmark = pytest.mark.slow
COMMON = ["--logging-steps", "1", "--eval-steps", "0", "--warmup-steps", "2", "--lr-decay-steps", "40"]



def test_sigterm_writes_an_emergency_checkpoint_exits_75_and_resumes_exactly(tmp_path, sample_data):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    run = Watched(launcher_command(interrupted, sample_data, "--max-steps", "40", "--save-steps", "1000", *COMMON))
    wait_for_step(interrupted, 3, run.process)
    run.process.send_signal(signal.SIGTERM)  # to start_training.sh, which forwards it to the training process
    assert run.process.wait(timeout=120) == EXIT_PREEMPTED, run.text()[-3000:]
    assert "forwarding SIGTERM" in run.text() and "SIGTERM received" in run.text()

    saved = checkpoints(interrupted)
    assert len(saved) == 1, saved  # the emergency one: no scheduled save came due
    assert verify_checkpoint(interrupted / "checkpoints" / saved[0]) is None
    stopped_at = int(saved[0].split("-step")[1].split("-")[0])
    assert stopped_at >= 3

    end = stopped_at + 2
    check(launch(interrupted, sample_data, "--resume", "latest", "--max-steps", str(end), "--save-steps", "1000", *COMMON))
    check(launch(straight, sample_data, "--max-steps", str(end), "--save-steps", "1000", *COMMON))
    assert logged(interrupted) == logged(straight)
    a, b = final_weights(interrupted), final_weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_exits_at_once_and_keeps_the_last_checkpoint(tmp_path, sample_data):
    workdir = tmp_path / "run"
    check(launch(workdir, sample_data, "--max-steps", "2", "--save-steps", "2", *COMMON))
    good = checkpoints(workdir)
    run = Watched(launcher_command(workdir, sample_data, "--resume", "latest", "--max-steps", "40", "--save-steps", "1000", *COMMON))
    wait_for_step(workdir, 3, run.process)
    run.process.send_signal(signal.SIGINT)
    run.wait_for("SIGINT received")
    run.process.send_signal(signal.SIGINT)
    assert run.process.wait(timeout=60) == 130, run.text()[-3000:]
    for name in checkpoints(workdir):
        assert verify_checkpoint(workdir / "checkpoints" / name) is None, name
    assert good[0] in checkpoints(workdir)


def test_sigint_reaches_the_training_when_the_launcher_started_with_sigint_ignored(tmp_path, sample_data):
    # As a background job of a script starts it: a Ctrl-C (SIGINT) must still reach the training, not be dropped.
    workdir = tmp_path / "run"
    ignoring = ["bash", "-c", 'trap "" INT; exec "$0" "$@"', *launcher_command(workdir, sample_data, "--max-steps", "40",
                                                                             "--save-steps", "1000", *COMMON)]
    run = Watched(ignoring)
    wait_for_step(workdir, 3, run.process)
    run.process.send_signal(signal.SIGINT)
    assert run.process.wait(timeout=120) == EXIT_PREEMPTED, run.text()[-3000:]
    assert "SIGINT received" in run.text()


def test_sigkill_at_random_moments_never_loses_or_changes_the_result(tmp_path, sample_data):
    """SIGKILL lands mid-step, mid-save and mid-upload (seeded delays); each time --resume latest continues."""
    kills_wanted = int(os.environ.get("PRETRAIN_KILL_POINTS", "10"))
    chooser = random.Random(20261122)
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    def train_py(workdir: Path, resume: bool) -> list[str]:
        return [
            sys.executable, "train.py", *isolated_args(workdir, sample_data), "--max-steps", "16", "--save-steps", "2",
            *COMMON, *(["--resume", "latest"] if resume else []),
        ]

    check(subprocess.run(train_py(straight, False), cwd=REPO, capture_output=True, text=True, timeout=300))

    kills, started_once, outcomes = 0, False, []
    while True:
        process = subprocess.Popen(train_py(killed, started_once), cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        started_once = True
        if kills < kills_wanted:
            # Start-up takes a few seconds; the delays spread the kill over start-up, steps, saves and uploads.
            delay = chooser.uniform(2.0, 9.0)
            try:
                process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                kills += 1
                outcomes.append(f"killed after {delay:.1f} s")
                continue
        stderr = process.communicate(timeout=300)[1]
        if process.returncode == 0 and kills >= kills_wanted:
            break
        assert process.returncode == 0 or "no complete checkpoint" in stderr, stderr[-3000:]
        if "no complete checkpoint" in stderr:
            started_once = False  # killed before its first checkpoint: start afresh, as a user would
        outcomes.append(f"exit {process.returncode}")
    assert kills >= kills_wanted, outcomes
    assert logged(killed) == logged(straight), outcomes
    a, b = final_weights(killed), final_weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a), outcomes
    events = EventAccumulator(str(killed / "logs" / RUN_NAME))
    events.Reload()
    # What the killed runs logged past their last checkpoint is purged: one point per step, as in a straight run.
    assert [event.step for event in events.Scalars("train/loss")] == list(range(1, 17)), outcomes
