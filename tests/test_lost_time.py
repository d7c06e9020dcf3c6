"""Lost-time accounting for spot runs: what each restart lost (launch to first step, steps redone since the checkpoint
it resumed, upload lag at the previous run's end), totals in the checkpoint, the log and TensorBoard, and the
Young-Daly save interval of --save-every-minutes auto."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from configs import with_changes
from pretrain.checkpoint.format import load_checkpoint
from pretrain.checkpoint.lost_time import (
    FIRST_AUTO_INTERVAL_SECONDS,
    PROGRESS_FILE,
    LostTime,
    Progress,
    auto_save_interval,
    restart_cost,
    young_daly_interval,
)
from pretrain.checkpoint.store import CheckpointStore
from pretrain.loop import Trainer
from pretrain.preemption import PreemptionFlag
from pretrain.protocol import EXIT_PREEMPTED, LAUNCHED_ENV
from tests.launcher import (
    RUN_NAME,
    Watched,
    check,
    checkpoints,
    launch,
    launcher_command,
    wait_for_step,
)
from tests.spiky_data import one_thread, spike_config, write_corpus


def test_young_daly():
    # Young: sqrt(2 delta M); Daly's correction for a checkpoint cost of 10 s and an hour between failures.
    assert young_daly_interval(10, 3600) == pytest.approx(
        math.sqrt(2 * 10 * 3600) * (1 + math.sqrt(10 / 7200) / 3 + 10 / (18 * 3600)) - 10)
    assert 260 < young_daly_interval(10, 3600) < 263
    assert young_daly_interval(10_000, 3600) == 3600  # a checkpoint dearer than two failure intervals: M
    assert young_daly_interval(0, 3600) == 0
    # Nothing measured yet: a fixed first interval. Then the measured costs and the observed preemption rate.
    assert auto_save_interval(LostTime())[0] == FIRST_AUTO_INTERVAL_SECONDS
    seen = LostTime(save_seconds=2.0, upload_seconds=90.0, wall_seconds=10 * 3600, preemptions=4)
    mtbf = (10 * 3600 + 3600) / 5
    assert auto_save_interval(seen)[0] == pytest.approx(young_daly_interval(2.0, mtbf))  # about 3 minutes
    assert auto_save_interval(LostTime(save_seconds=2.0, upload_seconds=900.0))[0] == 900.0  # never below an upload
    assert auto_save_interval(LostTime(save_seconds=0.001))[0] == 60.0  # nor below a minute
    survived = LostTime(save_seconds=2.0, wall_seconds=100 * 3600)  # no preemption in 100 hours: rarely
    assert auto_save_interval(survived)[0] > 3 * auto_save_interval(seen)[0]


def test_what_a_restart_lost_from_the_previous_runs_progress_record():
    previous = Progress("run", step=130, elapsed_seconds=650.0, wall_seconds=900.0, unix=10_000.0)
    cost = restart_cost(100, 500.0, "run", previous, launched_unix=10_060.0, first_step_unix=10_075.0)
    assert (cost.startup_seconds, cost.redone_steps, cost.redone_seconds) == (15.0, 30, 150.0)
    assert cost.preempted and cost.known and cost.down_seconds == 60.0
    finished = Progress("run", 100, 500.0, 900.0, 10_000.0, ended="finished", upload_lag_seconds=4.0)
    cost = restart_cost(100, 500.0, "run", finished, 10_060.0, 10_075.0)
    assert not cost.preempted and cost.redone_steps == 0 and cost.upload_lag_seconds == 4.0
    for unusable in (None, Progress("another", 130, 650.0, 900.0, 10_000.0), Progress("run", 90, 450.0, 800.0, 1.0)):
        cost = restart_cost(100, 500.0, "run", unusable, 10_060.0, 10_075.0)
        assert not cost.known and cost.redone_steps == 0 and cost.startup_seconds == 15.0
    totals = LostTime()
    restart_cost(100, 500.0, "run", previous, 10_060.0, 10_075.0).add_to(totals)
    assert (totals.restarts, totals.preemptions, totals.total_seconds) == (1, 1, 165.0)
    assert Progress.from_bytes(previous.to_bytes()) == previous and Progress.from_bytes(b"{not json") is None


def test_a_run_killed_after_its_checkpoint_counts_the_steps_it_redoes(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    (tmp_path / "data").mkdir()
    config = spike_config(tmp_path, on_loss_spike="warn", max_steps=10, save_steps=5, lr_decay_steps=12)
    write_corpus(tmp_path / "data", config)

    def run(run_config) -> Trainer:
        monkeypatch.setenv(LAUNCHED_ENV, str(time.time()))  # as start_training.sh sets it
        trainer = Trainer(run_config, PreemptionFlag())
        try:
            with one_thread():
                trainer.run()
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        return trainer

    first = run(config)
    # The machine died after step 10 without a word: its last checkpoint was at 5, its last progress record at 10.
    output = Path(config.output_dir)
    store = CheckpointStore.local(output)
    store.delete(store.complete()[0])
    record = json.loads((output / PROGRESS_FILE).read_text())
    assert record["step"] == 10 and record["ended"] == "finished"
    (output / PROGRESS_FILE).write_text(json.dumps({**record, "ended": "", "upload_lag_seconds": 0.0}))

    resumed = run(with_changes(config, resume="auto", max_steps=12))
    lost = resumed.state.lost_time
    assert (lost.restarts, lost.preemptions, lost.redone_steps) == (1, 1, 5)
    at_five = load_checkpoint(output / "checkpoint-epoch0-step5-files7").state.elapsed_seconds
    assert lost.redone_seconds == pytest.approx(first.state.elapsed_seconds - at_five, abs=1e-6)
    assert 0 < lost.startup_seconds < 300 and lost.upload_lag_seconds == 0.0
    assert "this restart lost" in caplog.text and "5 step(s) redone since checkpoint-epoch0-step5-files7" in caplog.text
    metrics = Path(config.logging_dir) / "run" / "metrics.jsonl"
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert logged[-2]["lost/redone_seconds"] == lost.redone_seconds and logged[-2]["lost/restarts"] == 1.0


@pytest.mark.slow
def test_a_sigterm_resume_journey_reports_its_lost_time(tmp_path, sample_data):
    common = ["--logging-steps", "1", "--eval-steps", "0", "--warmup-steps", "2", "--lr-decay-steps", "40",
              "--save-steps", "1000", "--save-every-minutes", "auto"]
    run = Watched(launcher_command(tmp_path, sample_data, "--max-steps", "40", *common))
    wait_for_step(tmp_path, 3, run.process, timeout=600)
    run.process.send_signal(signal.SIGTERM)
    assert run.process.wait(timeout=120) == EXIT_PREEMPTED, run.text()[-3000:]
    assert "--save-every-minutes auto: every 10.0 min (no save measured yet)" in run.text()
    [emergency] = checkpoints(tmp_path)
    stopped_at = load_checkpoint(tmp_path / "checkpoints" / emergency).state.step
    progress = Progress.from_bytes((tmp_path / "bucket" / PROGRESS_FILE).read_bytes())
    assert progress.ended == "preempted" and progress.step == stopped_at and progress.upload_lag_seconds > 0

    resumed = check(launch(tmp_path, sample_data, "--resume", "auto", "--max-steps", str(stopped_at + 3), *common))
    line = next(line for line in resumed.stderr.splitlines() if "this restart lost" in line)
    assert f"0 step(s) redone since {emergency}" in line and "launch to first step" in line, line
    assert "--save-every-minutes auto: every 1.0 min (a save costs" in resumed.stderr  # now measured: the floor
    final = load_checkpoint(tmp_path / "checkpoints" / checkpoints(tmp_path)[-1]).state
    lost = final.lost_time
    assert (lost.restarts, lost.preemptions, lost.redone_steps) == (1, 1, 0)
    assert lost.startup_seconds > 1 and lost.upload_lag_seconds == progress.upload_lag_seconds
    assert lost.save_seconds > 0 and lost.upload_seconds > 0 and lost.wall_seconds > lost.startup_seconds
    assert "time lost to restarts and rollbacks so far: " in resumed.stderr
    events = EventAccumulator(str(tmp_path / "logs" / RUN_NAME))
    events.Reload()
    total = events.Scalars("lost/total_seconds")
    assert total[-1].step == stopped_at + 3 and total[-1].value == pytest.approx(lost.total_seconds, rel=1e-6)
    print(f"lost time after one SIGTERM at step {stopped_at}: {lost.describe()}; {line.split('INFO ')[-1]}")
