"""A checkpoint write that fails, with any exception at any file, ends the run within a step or two with one line and
exit 2 on every rank; nothing hangs and the last complete checkpoint stays intact. An upload that never lands makes
the run end with exit 4 naming the checkpoint that is only local."""

from __future__ import annotations

import resource
import subprocess
import time

import pytest
import safetensors.torch
import torch

from pretrain.agreement import Signals
from pretrain.checkpoint import format as checkpoint_format
from pretrain.checkpoint.checkpointer import CheckpointNotUploaded, CheckpointWriteError
from pretrain.checkpoint.format import verify_checkpoint
from pretrain.checkpoint.store import CheckpointStore
from pretrain.storage import StorageError
from tests.checkpointer_harness import harness, state_at, take_step
from tests.launcher import REPO, check, checkpoints, isolated_args, launch

TORCH_WRITE_FAILURE = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4372")


def failing(real, error: BaseException, after_calls: int = 0):
    calls = []

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) > after_calls:
            raise error
        return real(*args, **kwargs)

    return write


@pytest.mark.parametrize("target, error", [
    ("torch_save_optimizer", TORCH_WRITE_FAILURE),  # what torch.save raises when the disk fills mid-write
    ("torch_save_rng", OSError(28, "No space left on device")),
    ("safetensors", OSError(122, "Disk quota exceeded")),
    ("safetensors", RuntimeError("Error while serializing: IoError(Os { code: 28 })")),
])
def test_a_failed_write_is_raised_at_the_next_step_and_at_finish(tmp_path, monkeypatch, target, error):
    with harness(tmp_path) as (checkpointer, model, optimizer):
        checkpointer.save(state_at(1), model, optimizer, "scheduled")
        checkpointer.finish(state_at(1))
        good = CheckpointStore.local(tmp_path / "checkpoints").complete()
        assert good == ["checkpoint-epoch0-step1-files1"]
        if target == "safetensors":
            monkeypatch.setattr(checkpoint_format, "save_file", failing(safetensors.torch.save_file, error))
        else:  # the optimizer file is the first torch.save, the RNG file the second
            monkeypatch.setattr(torch, "save", failing(torch.save, error, after_calls=int(target == "torch_save_rng")))
        take_step(model, optimizer)
        checkpointer.save(state_at(2), model, optimizer, "scheduled")
        deadline = time.monotonic() + 60
        while not checkpointer.write_failed():  # the writer thread records it; bounded wait for it to get there
            assert time.monotonic() < deadline, "the write failure was never recorded"
            time.sleep(0.01)
        with pytest.raises(CheckpointWriteError) as raised:
            checkpointer.step_done(state_at(3), model, optimizer, Signals(write_failed=True))
        message = str(raised.value)
        assert "\n" not in message
        assert "could not write checkpoint checkpoint-epoch0-step2-files1" in message
        assert "checkpoint-epoch0-step1-files1, is intact" in message
        monkeypatch.undo()
        assert CheckpointStore.local(tmp_path / "checkpoints").complete() == good
        assert verify_checkpoint(tmp_path / "checkpoints" / good[0]) is None
        assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_a_failed_write_of_the_final_checkpoint_is_raised_by_finish(tmp_path, monkeypatch):
    with harness(tmp_path) as (checkpointer, model, optimizer):
        monkeypatch.setattr(torch, "save", failing(torch.save, TORCH_WRITE_FAILURE))
        checkpointer.save(state_at(5), model, optimizer, "final")
        with pytest.raises(CheckpointWriteError, match="could not write checkpoint checkpoint-epoch0-step5-files1"):
            checkpointer.finish(state_at(5))


def test_a_save_waits_for_the_previous_write_only_as_long_as_the_timeout(tmp_path, monkeypatch):
    """A writer stuck on a dead disk makes the next save fail in bounded time instead of hanging the run."""
    release = __import__("threading").Event()

    def stuck(*args, **kwargs):
        release.wait(timeout=60)
        raise OSError(5, "Input/output error")

    with harness(tmp_path, upload_timeout_seconds=1.0) as (checkpointer, model, optimizer):
        monkeypatch.setattr(torch, "save", stuck)
        checkpointer.save(state_at(1), model, optimizer, "scheduled")
        started = time.monotonic()
        with pytest.raises(CheckpointWriteError, match="did not finish in 1 s"):
            checkpointer.save(state_at(2), model, optimizer, "scheduled")
        assert time.monotonic() - started < 10
        release.set()


def test_an_upload_that_never_lands_ends_the_run_naming_the_local_only_checkpoint(tmp_path, monkeypatch):
    bucket = tmp_path / "bucket"
    with harness(tmp_path, checkpoint_bucket=str(bucket)) as (checkpointer, model, optimizer):
        checkpointer.save(state_at(1), model, optimizer, "scheduled")
        checkpointer.finish(state_at(1))
        assert CheckpointStore.local(bucket).complete() == ["checkpoint-epoch0-step1-files1"]

        def refused(*args, **kwargs):
            raise StorageError("upload to bucket refused (simulated outage)")

        monkeypatch.setattr(type(checkpointer.remote.storage), "upload", refused)
        take_step(model, optimizer)
        checkpointer.save(state_at(2), model, optimizer, "final")
        with pytest.raises(CheckpointNotUploaded, match="checkpoint checkpoint-epoch0-step2-files1 is only on this "
                                                         "machine's disk"):
            checkpointer.finish(state_at(2))
        assert checkpointer.upload_failures == 1


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr and "AttributeError" not in result.stderr, result.stderr[-4000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "error:" in last, result.stderr[-4000:]
    return last


SHORT = ["--logging-steps", "1", "--eval-steps", "0", "--warmup-steps", "1", "--lr-decay-steps", "20"]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_disk_that_fills_during_a_save_stops_every_rank_with_one_line(tmp_path, sample_data, processes):
    """The weights (3.7 MB) fit under the file-size limit, the optimizer state (7.4 MB) does not: torch.save raises
    RuntimeError on rank 0's writer thread. Every rank must stop with the same line and exit 2, within a step."""
    layout = ["--cpu-processes", "2", "--per-device-train-batch-size", "4"] if processes == 2 else []
    check(launch(tmp_path, sample_data, *layout, "--max-steps", "2", "--save-steps", "2", *SHORT))
    good = checkpoints(tmp_path)
    assert good == ["checkpoint-epoch0-step2-files7"]

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (5_000_000, 5_000_000))

    command = [str(REPO / "start_training.sh"), *isolated_args(tmp_path, sample_data), *layout, "--resume", "auto",
               "--max-steps", "12", "--save-steps", "4", *SHORT]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stderr[-4000:]
    last = one_line_error(result)
    assert "could not write checkpoint checkpoint-epoch0-step4-files7" in last
    assert "checkpoint-epoch0-step2-files7, is intact" in last
    # It stopped within a step or two of the failed save, not at the end of the run.
    assert "step 8/12" not in result.stdout, result.stdout[-2000:]
    assert checkpoints(tmp_path) == good
    assert verify_checkpoint(tmp_path / "checkpoints" / good[0]) is None
