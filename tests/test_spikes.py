"""Loss spikes: detection against a running window, and the policies. A real spike (random tokens where one step reads,
in learnable text) is rolled back in the same process, its samples skipped, recorded, and skipped again after a
preemption and resume; a run without spikes is the same bit for bit whatever the policy."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from configs import CONFIGS, with_changes
from pretrain.agreement import Signals
from pretrain.checkpoint.checkpointer import Checkpointer
from pretrain.checkpoint.format import MODEL_FILE, load_checkpoint
from pretrain.checkpoint.store import CheckpointStore
from pretrain.checkpoint.train_state import TrainState
from pretrain.loop import Trainer
from pretrain.preemption import Preempted, PreemptionFlag
from pretrain.protocol import EXIT_NONFINITE, EXIT_PREEMPTED
from pretrain.spikes import (
    SpikeGuard,
    TooManySpikes,
    lr_scale,
    unskipped,
    window_limits,
)
from tests.launcher import (
    Watched,
    check,
    checkpoints,
    final_weights,
    launch,
    launcher_command,
    logged,
)
from tests.spiky_data import one_thread, spike_config, write_corpus

pytestmark = pytest.mark.usefixtures("single_thread")
SPIKE_STEP = 26  # save_steps 13: the spike comes after the checkpoint at 13 and is saved at 26 before it is seen
STEP_SAMPLES = 16


@pytest.fixture(scope="module")
def single_thread():
    with one_thread():
        yield


def state(**changes) -> TrainState:
    return TrainState(seed=42, seq_len=128, global_batch_samples=16, num_processes=1, data={}, run_name="run",
                      config={}, versions={}, **changes)


def agreed(step: int, loss: float, grad_norm: float = 1.0, spike_skipped: bool = False) -> Signals:
    return Signals(step=step, loss=loss, grad_norm=grad_norm, spike_skipped=spike_skipped)


def guard(policy: str, **changes) -> tuple[SpikeGuard, TrainState, list[str]]:
    config = with_changes(CONFIGS["test"], on_loss_spike=policy, loss_spike_window=4, **changes)
    said: list[str] = []
    run_state = state()
    return SpikeGuard(config, run_state, said.append), run_state, said


def test_limits_wait_for_a_full_window_then_take_mean_plus_sigmas_times_spread():
    window = [[1, 3.0, 1.0], [2, 3.2, 1.0], [3, 2.8, 1.0]]
    assert not window_limits(window, 4, 6.0, 6.0, before_step=10).active
    window.append([4, 3.0, 1.0])
    limits = window_limits(window, 4, 6.0, 0.0, before_step=10)
    assert limits.loss == pytest.approx(3.0 + 6 * math.sqrt(0.02)) and limits.grad_norm == math.inf
    # A loss that sat still is judged by at least 1% of its mean, and only steps before `before_step` count.
    flat = [[step, 2.0, 0.5] for step in range(1, 6)]
    assert window_limits(flat, 4, 6.0, 6.0, before_step=6).loss == pytest.approx(2.0 * 1.06)
    assert window_limits(flat, 4, 6.0, 6.0, before_step=6).grad_norm == pytest.approx(0.5 * 1.06)
    assert not window_limits(flat, 5, 6.0, 6.0, before_step=5).active


def test_skipped_windows_and_the_lowered_rate_are_pure_functions_of_the_record():
    windows = [[32, 48], [48, 64], [100, 116]]
    assert [unskipped(p, windows) for p in (0, 32, 40, 64, 99, 100, 116)] == [0, 64, 64, 64, 99, 116, 116]
    record = [{"restored_step": 13}]
    assert [lr_scale(step, record, 0.5, 5) for step in (13, 14, 18, 19)] == [1.0, 0.5, 0.5, 1.0]
    assert lr_scale(14, record, 1.0, 5) == lr_scale(14, record, 0.5, 0) == 1.0


def test_the_policies_on_agreed_values():
    for policy in ("warn", "skip", "rollback"):
        spikes, run_state, said = guard(policy)
        for step in range(1, 5):
            spikes.observe(agreed(step, 3.0 - 0.1 * step), run_state)
        spikes.observe(agreed(5, 9.0, spike_skipped=policy == "skip"), run_state)
        spikes.observe(agreed(5, 9.0, spike_skipped=policy == "skip"), run_state)  # the same step again: once
        assert run_state.loss_spikes == 1, policy
        kept = [entry[0] for entry in run_state.spike_window]
        if policy == "warn":  # logged, trained on, and part of the window from now on
            assert kept == [1, 2, 3, 4, 5] and "loss spike at step 5" in said[0] and spikes.take_rollback() is None
        elif policy == "skip":  # the device skipped it: out of the window
            assert kept == [1, 2, 3, 4] and "its update was skipped" in said[0]
        else:  # held for the loop, once
            assert kept == [1, 2, 3, 4] and not said
            spike = spikes.take_rollback()
            assert spike.step == 5 and spike.loss == 9.0 and spikes.take_rollback() is None
    spikes, run_state, _ = guard("warn", grad_spike_sigmas=6.0)
    for step in range(1, 5):
        spikes.observe(agreed(step, 3.0, grad_norm=1.0 + 0.01 * step), run_state)
    spikes.observe(agreed(5, 3.0, grad_norm=5.0), run_state)  # the loss is fine; the gradient norm is not
    assert run_state.loss_spikes == 1
    spikes.observe(agreed(6, math.nan, grad_norm=math.nan), run_state)  # non-finite: the other guard's business
    assert run_state.loss_spikes == 1 and run_state.spike_window[-1][0] == 5


def test_rollbacks_stop_the_run_after_the_budget():
    spikes, run_state, _ = guard("rollback", max_rollbacks=2, rollback_window_steps=100)
    for step in range(1, 5):
        spikes.observe(agreed(step, 3.0), run_state)
    run_state.rollbacks = [{"spike_step": 50, "restored_step": 40}, {"spike_step": 140, "restored_step": 130}]
    spikes.observe(agreed(5, 30.0), run_state)
    spike = dataclasses.replace(spikes.take_rollback(), step=200)
    spikes.check_budget(spike, run_state)  # one of the two is older than the window: one more is allowed
    run_state.rollbacks.append({"spike_step": 190, "restored_step": 180})
    with pytest.raises(TooManySpikes, match="after 2 rollbacks within 100 steps"):
        spikes.check_budget(spike, run_state)


def run_in_process(config, preempt_at: int | None = None) -> Trainer:
    """A whole run on one CPU process; with preempt_at, a SIGTERM once a step after a rollback reaches it."""
    flag = PreemptionFlag()
    real_step_done = Checkpointer.step_done

    def step_done(checkpointer, train_state, *args):
        if preempt_at is not None and train_state.rollbacks and train_state.step == preempt_at:
            flag._handle(signal.SIGTERM, None)  # what the handler does when the signal comes
        return real_step_done(checkpointer, train_state, *args)

    Checkpointer.step_done = step_done
    try:
        trainer = Trainer(config, flag)
        trainer.run()
    finally:
        Checkpointer.step_done = real_step_done
        AcceleratorState._reset_state(reset_partial_state=True)
    return trainer


def newest(config) -> str:
    return CheckpointStore.local(Path(config.output_dir)).complete()[0]


def final_checkpoint_weights(config) -> dict[str, torch.Tensor]:
    return load_file(str(Path(config.output_dir) / newest(config) / MODEL_FILE))


@pytest.fixture(scope="module")
def spiky(tmp_path_factory) -> tuple[Path, list[int]]:
    root = tmp_path_factory.mktemp("spiky")
    (root / "data").mkdir()
    return root / "data", write_corpus(root / "data", spike_config(root), spike_step=SPIKE_STEP)


@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory, spiky):
    root = tmp_path_factory.mktemp("rolled-back")
    config = spike_config(root, data_dir=str(spiky[0]))
    return config, run_in_process(config)


def losses_in_order(config) -> list[tuple[int, float]]:
    path = Path(config.logging_dir) / "run" / "metrics.jsonl"
    return [(r["step"], r["train/loss"]) for r in map(json.loads, path.read_text().splitlines()) if "train/loss" in r]


def test_a_real_spike_is_rolled_back_and_its_samples_skipped(spiky, rolled_back):
    random_samples = spiky[1]
    config, trainer = rolled_back
    run_state = trainer.state
    assert run_state.step == config.max_steps and run_state.loss_spikes == 1
    [rollback] = run_state.rollbacks
    assert rollback["spike_step"] == SPIKE_STEP and rollback["restored_step"] == 13
    assert rollback["skipped"] == [random_samples[0], random_samples[-1] + 1]
    assert rollback["skipped"] == [(SPIKE_STEP - 1) * STEP_SAMPLES, SPIKE_STEP * STEP_SAMPLES]
    assert run_state.skipped_samples == [rollback["skipped"]]
    assert run_state.lost_time.rollbacks == 1 and run_state.lost_time.rollback_seconds > 0

    records = losses_in_order(config)
    cut = next(i for i in range(1, len(records)) if records[i][0] <= records[i - 1][0])  # where the steps go back
    first, replay = records[:cut], records[cut:]
    spiked = dict(first)[SPIKE_STEP]
    assert spiked > 2 * dict(first)[SPIKE_STEP - 1], first  # the random tokens: a real spike, not an injected number
    assert [s for s, _ in first] == list(range(1, SPIKE_STEP + 2))  # seen one step late: rolled back after 27
    assert replay[0][0] == 14  # from the checkpoint at 13
    # The restored weights, optimizer state and RNG replay the steps before the spike exactly.
    assert [(s, v) for s, v in replay if s < SPIKE_STEP] == [(s, v) for s, v in first if 14 <= s < SPIKE_STEP]
    assert max(v for s, v in replay) < 0.5 * spiked  # the spike's samples are never read again

    # The checkpoint saved at the spike's step before it was seen was deleted, then saved again on the new path; every
    # checkpoint after the rollback carries the record.
    saved = load_checkpoint(Path(config.output_dir) / "checkpoint-epoch0-step26-files7").state
    assert saved.skipped_samples == [rollback["skipped"]] and saved.samples_consumed == (SPIKE_STEP + 1) * 16
    assert load_checkpoint(Path(config.output_dir) / "checkpoint-epoch0-step13-files7").state.rollbacks == []


def test_skipped_again_after_a_sigterm_and_resume(tmp_path, spiky, rolled_back):
    straight_config, straight = rolled_back
    config = spike_config(tmp_path, data_dir=str(spiky[0]))
    with pytest.raises(Preempted):
        run_in_process(config, preempt_at=20)  # after the rollback, before the replay reaches the spike's samples
    saved = load_checkpoint(Path(config.output_dir) / newest(config)).state
    assert saved.skipped_samples == straight.state.skipped_samples and saved.step == 22  # agreed a step late

    resumed = run_in_process(with_changes(config, resume="auto"))
    assert resumed.state.loss_spikes == 1 and len(resumed.state.rollbacks) == 1  # no second spike: skipped again
    assert resumed.state.lost_time.restarts == 1
    assert dict(losses_in_order(config)) == dict(losses_in_order(straight_config))
    a, b = final_checkpoint_weights(config), final_checkpoint_weights(straight_config)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_without_spikes_every_policy_trains_the_same_bits(tmp_path):
    (tmp_path / "data").mkdir()
    write_corpus(tmp_path / "data", spike_config(tmp_path))
    runs = {}
    for policy in ("warn", "rollback"):
        config = spike_config(tmp_path / policy, data_dir=str(tmp_path / "data"), on_loss_spike=policy, max_steps=20)
        trainer = run_in_process(config)
        assert trainer.state.loss_spikes == 0 and trainer.state.rollbacks == []
        runs[policy] = (losses_in_order(config), final_checkpoint_weights(config))
    assert runs["warn"][0] == runs["rollback"][0]
    assert all(torch.equal(runs["warn"][1][k], runs["rollback"][1][k]) for k in runs["warn"][1])


def test_skip_leaves_the_weights_as_they_were_before_the_spike(tmp_path, spiky):
    common = dict(data_dir=str(spiky[0]), on_loss_spike="skip", lr_decay_steps=32, save_steps=100)
    skipping = spike_config(tmp_path / "skip", max_steps=SPIKE_STEP, **common)
    trainer = run_in_process(skipping)
    assert trainer.state.loss_spikes == 1 and trainer.state.nonfinite_steps == 0
    before = spike_config(tmp_path / "before", max_steps=SPIKE_STEP - 1, **common)
    run_in_process(before)
    a, b = final_checkpoint_weights(skipping), final_checkpoint_weights(before)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_lowered_rate_after_a_rollback_and_the_budget_that_stops_the_run(tmp_path):
    # Two spikes two steps apart: the first is rolled back; the second, read one step earlier now, exceeds the budget.
    (tmp_path / "data").mkdir()
    write_corpus(tmp_path / "data", spike_config(tmp_path), spike_step=[SPIKE_STEP, SPIKE_STEP + 2])
    config = spike_config(tmp_path, max_rollbacks=1, loss_spike_lr_factor=0.5, loss_spike_lr_steps=5)
    with pytest.raises(TooManySpikes, match=f"loss spike at step {SPIKE_STEP + 1}: .* after 1 rollbacks within"):
        run_in_process(config)
    metrics = Path(config.logging_dir) / "run" / "metrics.jsonl"
    lrs = [(r["step"], r["train/lr"]) for r in map(json.loads, metrics.read_text().splitlines()) if "train/lr" in r]
    cut = next(i for i in range(1, len(lrs)) if lrs[i][0] <= lrs[i - 1][0])
    first, replay = dict(lrs[:cut]), dict(lrs[cut:])
    assert [replay[s] / first[s] for s in range(14, 20)] == [0.5] * 5 + [1.0]  # 5 steps after the checkpoint at 13


def test_too_many_spikes_exit_with_the_nonfinite_code(monkeypatch, tmp_path):
    import train

    monkeypatch.setattr(Trainer, "run", lambda self: (_ for _ in ()).throw(TooManySpikes("after 3 rollbacks")))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert train.main(["--config", "test", "--output-dir", str(tmp_path)]) == EXIT_NONFINITE
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


LAUNCH_SPIKE = 24  # save every 12: rolled back to 12, with 11 steps of replay to preempt in


@pytest.mark.slow
def test_through_the_launcher_a_sigterm_after_a_rollback_resumes_past_the_skipped_samples(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_corpus(data, spike_config(tmp_path), spike_step=LAUNCH_SPIKE)
    schedule = ["--max-steps", "27", "--save-steps", "12", "--logging-steps", "1", "--eval-steps", "0",
                "--warmup-steps", "2", "--on-loss-spike", "rollback", "--loss-spike-window", "8"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    check(launch(straight, data, *schedule))

    run = Watched(launcher_command(interrupted, data, *schedule))
    run.wait_for("rolled back to checkpoint-epoch0-step12-files7", timeout=600)
    run.process.send_signal(signal.SIGTERM)
    assert run.finish(timeout=600) == EXIT_PREEMPTED, run.text()[-3000:]
    emergency = checkpoints(interrupted)[-1]
    state_then = load_checkpoint(interrupted / "checkpoints" / emergency).state
    assert state_then.step < LAUNCH_SPIKE, f"the replay passed the spike before the signal landed ({emergency})"
    assert state_then.skipped_samples == [[(LAUNCH_SPIKE - 1) * 16, LAUNCH_SPIKE * 16]]

    resumed = check(launch(interrupted, data, *schedule, "--resume", "auto"))
    assert "loss spike" not in resumed.stderr  # the samples are skipped again, so there is nothing to see
    assert logged(interrupted) == logged(straight)
    a, b = final_weights(interrupted), final_weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)
