"""Stalls through ./start_training.sh: a stopped rank (2 processes, and a one-process run), a bucket that stops
answering, one that never answers its write check, and a SIGTERM during a stall. Each run ends by itself within the
stall timeout (or the grace period) plus a margin, with every process's Python stacks in the log, one last line naming
the stalled rank and phase, its exit code, nothing left behind and the checkpoints intact; --resume auto continues bit
for bit. The policy's unit tests are tests/test_watchdog.py."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint.format import verify_checkpoint
from pretrain.protocol import EXIT_PREEMPTED, EXIT_RESTART, progress_file
from tests import emulators
from tests.fault_proxy import NO_ANSWER, BlackHole
from tests.launcher import (
    RUN_NAME,
    Watched,
    check,
    checkpoints,
    final_weights,
    free_port,
    last_line,
    launch,
    launch_folder_of,
    launcher_command,
    logged,
    rank_pids,
    survivors,
    wait_for_step,
)
from tests.storage_fixtures import HERMETIC_ENV, STORAGE_ENV_VARS

pytestmark = pytest.mark.slow
STALL_SECONDS = 15.0
STALL = ["--stall-timeout-minutes", str(STALL_SECONDS / 60)]
# From the stall to the launcher's exit beyond the timeout: the watchdog's half-second look, the launcher's look
# (a second), the stacks, accelerate and torchrun noticing the exit, the launcher's clean-up; on 2 shared cores.
MARGIN_SECONDS = 20.0
COMMON = ["--logging-steps", "1", "--eval-steps", "0", "--warmup-steps", "2", "--lr-decay-steps", "40",
          "--save-steps", "2"]
TWO_PROCESSES = ["--cpu-processes", "2", "--per-device-train-batch-size", "4"]
END = 10  # the resumed runs end here, as the straight runs they are compared with
NOISE = ("Traceback", "CalledProcessError", "ChildFailedError", "closing signal", "before it could report")


@pytest.fixture
def own_processes(tmp_path):
    """Whatever a failed test left running (a rank it stopped included) is killed: only processes of its own folder."""
    yield
    for line in survivors(str(tmp_path)):
        try:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def straight_two(tmp_path_factory, sample_data) -> Path:
    workdir = tmp_path_factory.mktemp("straight-two") / "run"
    check(launch(workdir, sample_data, *TWO_PROCESSES, "--main-port", str(free_port()), "--max-steps", str(END),
                 *COMMON))
    return workdir


@pytest.fixture(scope="module")
def straight_one(tmp_path_factory, sample_data) -> Path:
    workdir = tmp_path_factory.mktemp("straight-one") / "run"
    check(launch(workdir, sample_data, "--max-steps", str(END), *COMMON))
    return workdir


def ended_by_stall(run: Watched, workdir: Path, ranks: int) -> str:
    """The last line (checked by the caller), after every rank's stacks; nothing left; the checkpoints intact."""
    text = run.text()
    for noise in NOISE:
        assert noise not in text, text[-5000:]
    for rank in range(ranks):
        assert re.search(rf"Python stacks of rank {rank} \(pid \d+\), every thread", text), text[-5000:]
    assert text.count("(most recent call first)") >= ranks, text[-5000:]
    assert survivors(str(workdir)) == []
    for name in checkpoints(workdir):
        assert verify_checkpoint(workdir / "checkpoints" / name) is None, name
    return last_line(text)


def resumes_exactly(workdir: Path, straight: Path, data: Path, *args: str, env: dict[str, str] | None = None) -> None:
    check(launch(workdir, data, *args, "--resume", "auto", "--max-steps", str(END), *COMMON, *STALL, env=env))
    assert logged(workdir) == logged(straight)
    a, b = final_weights(workdir), final_weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stopped_rank_ends_the_run_with_76_and_it_resumes_exactly(tmp_path, sample_data, straight_two,
                                                                      own_processes):
    workdir = tmp_path / "run"
    run = Watched(launcher_command(workdir, sample_data, *TWO_PROCESSES, "--main-port", str(free_port()),
                                   "--max-steps", "40", *COMMON, *STALL))
    wait_for_step(workdir, 3, run.process, timeout=300)
    os.kill(rank_pids(str(workdir))[1], signal.SIGSTOP)
    stopped = time.monotonic()
    code = run.finish(timeout=STALL_SECONDS + 120)
    took = time.monotonic() - stopped
    print(f"stopped to the launcher's exit: {took:.1f} s")  # pytest -s shows the figure
    assert code == EXIT_RESTART, run.text()[-5000:]
    assert took < STALL_SECONDS + MARGIN_SECONDS, took
    line = ended_by_stall(run, workdir, ranks=2)
    # The phase and step are the last the stopped process published, up to a second before the stop: start-up at
    # step 0 when its first steps all came within that second.
    assert re.search(r"error: the run stalled: rank 1 made no progress for \d+ s in [\w-]+ at step \d+ \(its process is "
                     r"stopped\); rank 0 waited in", line), line
    for rank in (0, 1):  # and in the bucket's log folder, beside the run's
        for logs in (workdir / "logs" / RUN_NAME, workdir / "bucket" / "logs" / RUN_NAME):
            assert "most recent call first" in (logs / f"stacks-rank{rank}.txt").read_text()
    resumes_exactly(workdir, straight_two, sample_data, *TWO_PROCESSES, "--main-port", str(free_port()))


def test_a_stopped_one_process_run_ends_with_76_and_it_resumes_exactly(tmp_path, sample_data, straight_one,
                                                                         own_processes):
    """No collective, so no peer notices: the launcher sees the stopped rank past its deadline."""
    workdir = tmp_path / "run"
    run = Watched(launcher_command(workdir, sample_data, "--max-steps", "40", *COMMON, *STALL))
    wait_for_step(workdir, 3, run.process, timeout=300)
    os.kill(rank_pids(str(workdir))[0], signal.SIGSTOP)
    stopped = time.monotonic()
    code = run.finish(timeout=STALL_SECONDS + 120)
    took = time.monotonic() - stopped
    print(f"stopped to the launcher's exit: {took:.1f} s")  # pytest -s shows the figure
    assert code == EXIT_RESTART, run.text()[-5000:]
    assert took < STALL_SECONDS + MARGIN_SECONDS, took
    line = ended_by_stall(run, workdir, ranks=1)
    assert re.search(r"error: the run stalled: rank 0 made no progress for \d+ s in [\w-]+ at step \d+ \(its process is "
                     r"stopped\)", line), line
    assert "continuing training process" in run.text()
    resumes_exactly(workdir, straight_one, sample_data)


def test_a_bucket_that_stops_answering_ends_the_run_with_76_naming_the_upload(tmp_path, sample_data, straight_two,
                                                                            fault_proxy, new_bucket, own_processes):
    """Every request for the final checkpoint is read and never answered (the SDK would wait minutes per request);
    the run waits for that upload at its end."""
    workdir = tmp_path / "run"
    proxy = fault_proxy("s3")
    bucket = new_bucket("s3", through=proxy)
    proxy.inject(NO_ANSWER, path_regex=r"checkpoint-epoch\d+-step8-", times=100_000)
    layout = [*TWO_PROCESSES, "--checkpoint-bucket", bucket.url]
    run = Watched(launcher_command(workdir, sample_data, *layout, "--main-port", str(free_port()), "--max-steps", "8",
                                   *COMMON, *STALL), env=bucket.subprocess_env())
    run.wait_for("waiting for the upload of ")  # of step 8 (and maybe of step 6, still going up before it)
    waiting = time.monotonic()
    code = run.finish(timeout=STALL_SECONDS + 120)
    took = time.monotonic() - waiting
    print(f"upload wait to the launcher's exit: {took:.1f} s")
    assert code == EXIT_RESTART, run.text()[-5000:]
    assert took < STALL_SECONDS + MARGIN_SECONDS, took
    line = ended_by_stall(run, workdir, ranks=2)
    assert re.search(r"error: the run stalled: rank 0 made no progress for \d+ s in upload \(waiting for [^)]*"
                     rf"checkpoint-epoch0-step8-files\d+ to reach {bucket.url}\) at step 8; rank 1 waited in "
                     "collective", line), line
    assert checkpoints(workdir)[-1].startswith("checkpoint-epoch0-step8-")  # complete on disk, not in the bucket
    assert not (workdir / "bucket").exists()  # the stacks did not go to the bucket that stalled
    proxy.clear()
    resumes_exactly(workdir, straight_two, sample_data, *layout, "--main-port", str(free_port()),
                    env=bucket.subprocess_env())


def test_a_bucket_that_never_answers_its_write_check_ends_a_one_process_run_with_76(tmp_path, sample_data,
                                                                                  own_processes):
    """Before step 1: without the watchdog the write check's two attempts would each wait out the SDK's 120 s read
    timeout."""
    workdir, hole = tmp_path / "run", BlackHole()
    env = {**{k: v for k, v in os.environ.items() if k not in STORAGE_ENV_VARS}, **HERMETIC_ENV,
           **emulators.s3_env(hole.endpoint)}
    try:
        started = time.monotonic()
        result = launch(workdir, sample_data, "--checkpoint-bucket", "s3://never-answers/run", "--max-steps", "4",
                        *STALL, env=env, timeout=300)
        took = time.monotonic() - started
        print(f"launch to exit: {took:.1f} s")
    finally:
        hole.stop()
    assert result.returncode == EXIT_RESTART, result.stderr[-5000:]
    assert hole.accepted, "the run never reached the bucket"
    line = last_line(result.stderr)
    assert re.search(r"error: the run stalled: rank 0 made no progress for \d+ s in upload \(write check of "
                     r"s3://never-answers/run\) at step 0", line), line
    assert "Python stacks of rank 0" in result.stderr and "Traceback" not in result.stderr
    assert took < STALL_SECONDS + 90, took  # start-up included; the SDK alone would take 240 s and more
    assert survivors(str(workdir)) == []


def test_sigterm_during_a_stall_ends_the_run_within_the_grace_period(tmp_path, sample_data, own_processes):
    workdir, grace = tmp_path / "run", 10.0
    run = Watched(launcher_command(workdir, sample_data, *TWO_PROCESSES, "--main-port", str(free_port()),
                                   "--max-steps", "40", *COMMON, "--stall-timeout-minutes", "10",
                                   "--preemption-grace-seconds", str(grace)))
    wait_for_step(workdir, 3, run.process, timeout=300)
    pids = rank_pids(str(workdir))
    published = launch_folder_of(pids[0]) / progress_file(0)
    os.kill(pids[1], signal.SIGSTOP)
    deadline = time.monotonic() + 60
    while True:  # rank 0 is stuck once its published progress stops moving on while it still beats
        record = json.loads(published.read_text())
        if record["beat"] - record["moved_at"] > 2.0:
            break
        assert time.monotonic() < deadline, record
        time.sleep(0.1)
    kept = checkpoints(workdir)
    run.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = run.finish(timeout=grace + 60)
    took = time.monotonic() - signalled
    print(f"SIGTERM to the launcher's exit: {took:.1f} s")
    assert code == EXIT_PREEMPTED, run.text()[-5000:]
    # The ranks end SIGNAL_RESERVE_SECONDS (3 s) before the grace period does; the launcher's clean-up follows.
    assert took < grace + 2.0, took
    line = ended_by_stall(run, workdir, ranks=2)
    assert re.search(r"error: SIGTERM received \d+ s ago, but the run is stalled: rank 1 made no progress for \d+ s "
                     r"in [\w-]+ at step \d+ \(its process is stopped\).*no emergency checkpoint could be written within "
                     r"the grace period", line), line
    assert checkpoints(workdir) == kept  # no emergency checkpoint, and the last complete ones untouched
