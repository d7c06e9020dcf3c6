"""The stall watchdog's policy in-process on a fake clock (pretrain/progress.py, pretrain/watchdog.py), and the
launcher's part of it on stand-ins (pretrain/launch/supervisor.py, tests/supervisor_stand_ins.py). The real launcher's
stalls are tests/test_stalls.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pretrain.cli import parse_config
from pretrain.data.fetch import FetchFailed, ReadyGate
from pretrain.files import write_atomically
from pretrain.preemption import PreemptionFlag
from pretrain.progress import COLLECTIVE, DATA, SAVE, START_UP, STEP, UPLOAD, Progress
from pretrain.protocol import (
    EXIT_CODE_FILE,
    EXIT_PREEMPTED,
    EXIT_RESTART,
    STALL_FILE,
    progress_file,
    record_first,
    recorded_int,
    recorded_json,
)
from pretrain.watchdog import (
    BEAT_STALE_SECONDS,
    FLOOR_SECONDS,
    SIGNAL_RESERVE_SECONDS,
    STEP_FACTOR,
    StallLimits,
    Verdict,
    Watchdog,
)
from tests.launcher import survivors
from tests.test_supervisor import ready_pids, supervised

LIMITS = StallLimits(stall_seconds=60.0, startup_seconds=600.0, grace_seconds=25.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Ended(Exception):
    pass


def exit_stand_in(code: int) -> None:
    raise Ended(code)


def watchdog(folder: Path, clock: Clock, reported: Progress, limits: StallLimits = LIMITS, rank: int = 0,
             world_size: int = 1, preemption: PreemptionFlag | None = None) -> Watchdog:
    return Watchdog(limits, preemption or PreemptionFlag(), rank=rank, world_size=world_size, reported=reported,
                    folder=folder, clock=clock, exit=exit_stand_in, backstop=False)


def publish_peer(folder: Path, rank: int, pid: int, phase: str, moved_at: float, beat: float, step: int = 7) -> None:
    folder.joinpath(progress_file(rank)).write_text(json.dumps({
        "rank": rank, "pid": pid, "phase": phase, "detail": "", "step": step, "moved_at": moved_at, "beat": beat,
        "deadline": moved_at + 60.0}))


def signalled(clock: Clock, at: float) -> PreemptionFlag:
    flag = PreemptionFlag()
    flag._event.set()
    flag.signal_name, flag.received_at = "SIGTERM", at
    return flag


@pytest.fixture
def stopped_process():
    """A process of this test in the stopped state (as SIGSTOP leaves a rank): /proc says 'T'."""
    process = subprocess.Popen(["sleep", "60"])
    os.kill(process.pid, signal.SIGSTOP)
    os.waitpid(process.pid, os.WUNTRACED)  # returns once it is stopped: the signal is not delivered at once
    yield process.pid
    process.kill()
    process.wait()


def test_progress_reports_the_innermost_phase_and_each_move():
    clock = Clock()
    reported = Progress(clock)
    assert reported.snapshot().phase == START_UP and reported.snapshot().steps_done == 0
    clock.now += 5
    with reported.phase(SAVE, "the final checkpoint"):
        assert reported.snapshot().phase == SAVE and reported.snapshot().moved_at == 1005
        clock.now += 5
        with reported.phase(UPLOAD, "write check of s3://b/r"):
            assert (reported.snapshot().phase, reported.snapshot().detail) == (UPLOAD, "write check of s3://b/r")
        assert reported.snapshot().phase == SAVE and reported.snapshot().moved_at == 1010
    for step, seconds in enumerate([2.0, 7.0, 3.0], start=1):
        clock.now += seconds
        reported.step_done(step)
    snapshot = reported.snapshot()
    assert (snapshot.phase, snapshot.step, snapshot.steps_done, snapshot.moved_at) == (STEP, 3, 3, 1022)
    assert snapshot.slowest_step == 7.0  # between step ends: the first step (start-up) is not a step time
    batches = reported.watch(iter([10, 20]))
    assert next(batches) == 10 and list(batches) == [20]


def test_background_work_counts_only_while_the_main_thread_waits_for_it():
    clock = Clock()
    reported = Progress(clock)
    clock.now += 30
    reported.advanced(UPLOAD)  # an upload moving on while the main thread is elsewhere (stuck in data, say)
    assert reported.snapshot().moved_at == 1000
    with reported.phase(UPLOAD):
        clock.now += 30
        reported.advanced(UPLOAD)
        assert reported.snapshot().moved_at == 1060
        with reported.phase(COLLECTIVE):
            clock.now += 30
            reported.advanced(UPLOAD)
            assert reported.snapshot().moved_at == 1060


def test_the_allowance_before_and_after_the_first_step():
    clock = Clock()
    reported = Progress(clock)
    automatic = StallLimits(stall_seconds=0.0, startup_seconds=1800.0, grace_seconds=25.0)
    assert automatic.allowance(reported.snapshot()) == 1800.0  # start-up: download, data, compile, peers
    with reported.phase(UPLOAD, "write check"):  # a silent bucket is a stall before step 1 too
        assert automatic.allowance(reported.snapshot()) == FLOOR_SECONDS
    for step, seconds in enumerate([1.0, 1.0], start=1):
        clock.now += seconds
        reported.step_done(step)
    assert automatic.allowance(reported.snapshot()) == FLOOR_SECONDS  # fast steps: the floor
    clock.now += 45.0
    reported.step_done(3)
    assert automatic.allowance(reported.snapshot()) == STEP_FACTOR * 45.0  # 900 s: slow steps raise it
    clock.now += 600.0
    reported.step_done(4)
    assert automatic.allowance(reported.snapshot()) == 1800.0  # capped at the start-up allowance
    assert LIMITS.allowance(reported.snapshot()) == 60.0  # an explicit timeout is taken as given
    for limits in (automatic, LIMITS, StallLimits(7200.0, 60.0, 25.0)):
        longest = max(limits.startup_seconds, limits.stall_timeout(10_000.0))
        assert limits.process_group_seconds() > longest  # the process group never speaks before the watchdog


def test_a_process_without_progress_ends_at_its_deadline_naming_its_phase(tmp_path, capfd):
    clock = Clock()
    reported = Progress(clock)
    reported.step_done(1)
    dog = watchdog(tmp_path, clock, reported)
    copied = []
    dog.keep_stacks_in(tmp_path / "logs", copied.append)
    with reported.phase(DATA):
        clock.now += 59.5
        assert dog.tick() is None
        assert json.loads((tmp_path / progress_file(0)).read_text())["phase"] == DATA  # published for the others
        clock.now += 0.5
        verdict = dog.tick()
        assert verdict.code == EXIT_RESTART and verdict.phase == DATA
        assert "rank 0 made no progress for 60 s in data at step 1" in verdict.line
        with pytest.raises(Ended, match=str(EXIT_RESTART)):
            dog.end(verdict)
    err = capfd.readouterr().err
    assert re.search(r"Python stacks of rank 0 \(pid \d+\), every thread.*\n(.*\n)*.*most recent call first", err)
    assert err.rstrip().endswith(f"ERROR error: {verdict.line}")  # the line comes last, after the stacks
    assert recorded_int(EXIT_CODE_FILE, tmp_path) == EXIT_RESTART
    assert recorded_json(STALL_FILE, tmp_path)["line"] == verdict.line  # the other ranks end with the same line
    stacks = tmp_path / "logs" / "stacks-rank0.txt"
    assert copied == [stacks] and "most recent call first" in stacks.read_text()


def test_a_run_that_ended_leaves_nothing_published(tmp_path):
    """The launcher must not take a process on its way out (its watchdog stopped, its beat old) for a stopped one."""
    clock = Clock()
    dog = watchdog(tmp_path, clock, Progress(clock))
    dog.tick()
    assert (tmp_path / progress_file(0)).exists()
    dog.stop()
    assert not (tmp_path / progress_file(0)).exists()


def test_a_stopped_rank_is_named_before_the_rank_that_waits_for_it(tmp_path, stopped_process):
    clock = Clock()
    reported = Progress(clock)
    reported.step_done(7)
    dog = watchdog(tmp_path, clock, reported, world_size=2)
    publish_peer(tmp_path, 1, stopped_process, DATA, moved_at=1000.0, beat=1059.0)  # its beat is fresh: /proc tells
    clock.now += 60
    verdict = dog.tick()
    assert "rank 1 made no progress for 60 s in data at step 7 (its process is stopped); rank 0 waited in step" \
        in verdict.line, verdict.line
    publish_peer(tmp_path, 1, os.getpid(), STEP, moved_at=1000.0, beat=1060.0 - BEAT_STALE_SECONDS - 1)
    assert "rank 1 made no progress for 60 s in step at step 7 (its process has not run for 11 s)" in dog.tick().line


def test_local_work_is_named_before_a_step_and_a_collective(tmp_path):
    clock = Clock()
    reported = Progress(clock)
    reported.step_done(7)
    dog = watchdog(tmp_path, clock, reported, world_size=3)
    with reported.phase(COLLECTIVE):
        publish_peer(tmp_path, 1, os.getpid(), STEP, moved_at=990.0, beat=1059.9)  # waits in its gradient all-reduce
        publish_peer(tmp_path, 2, os.getpid(), SAVE, moved_at=1000.0, beat=1059.9)  # the disk under it is stuck
        clock.now += 60
        verdict = dog.tick()
    assert verdict.phase == SAVE and "rank 2 made no progress" in verdict.line, verdict.line
    assert "rank 1 waited in step, rank 0 waited in collective" in verdict.line, verdict.line


def test_a_reader_waiting_for_a_shard_that_never_comes_is_a_stall_in_data(tmp_path):
    """The real thread, while another thread waits in the data room's gate for a fetch that hangs (the fetcher beats,
    so the gate alone would wait an hour)."""
    gate = ReadyGate(tmp_path / "data", "run1", vocab_size=512)
    gate.checked_dir.mkdir(parents=True)
    gate.status_path("alive").touch()
    reported, ended, outcome = Progress(), [], []

    def exit_stand_in(code: int) -> None:
        ended.append(code)
        write_atomically(gate.status_path("error"), "released by the test\n")  # lets the reader go

    (tmp_path / "launch").mkdir()
    dog = Watchdog(StallLimits(1.0, 600.0, 25.0), PreemptionFlag(), rank=0, world_size=1, reported=reported,
                   folder=tmp_path / "launch", exit=exit_stand_in, backstop=False).start()
    reported.step_done(1)

    def read() -> None:
        with reported.phase(DATA):
            try:
                gate.wait_ready("part-0/shard_000.npz")
            except FetchFailed as error:
                outcome.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(timeout=30)
    dog.stop()
    assert ended == [EXIT_RESTART] and outcome, (ended, outcome)
    assert "rank 0 made no progress for 1 s in data at step 1" in recorded_json(STALL_FILE, tmp_path / "launch")["line"]


def test_every_rank_ends_with_the_first_verdict_recorded(tmp_path, capfd):
    first = Verdict(EXIT_RESTART, "the run stalled: rank 1 made no progress ...", DATA)
    assert record_first(STALL_FILE, first.to_json(), tmp_path) == first.to_json()
    later = Verdict(EXIT_RESTART, "the run stalled: rank 0 made no progress ...", STEP)
    assert record_first(STALL_FILE, later.to_json(), tmp_path) == first.to_json()
    assert [p.name for p in tmp_path.iterdir()] == [STALL_FILE]  # no temporary file left beside it
    clock = Clock()
    dog = watchdog(tmp_path, clock, Progress(clock), rank=1)
    assert dog.tick() == first  # long before its own deadline: another process saw the stall
    with pytest.raises(Ended):
        dog.end(later)
    assert f"rank1 ERROR error: {first.line}" in capfd.readouterr().err
    assert recorded_int(EXIT_CODE_FILE, tmp_path) is None  # rank 0 records the code


def test_an_error_on_the_main_thread_after_a_stall_ends_with_the_stall_s_line(tmp_path):
    clock = Clock()
    dog = watchdog(tmp_path, clock, Progress(clock))
    dog.end_if_stalled()  # no stall: the error is the run's own, raised as usual
    record_first(STALL_FILE, Verdict(EXIT_RESTART, "the run stalled: ...", STEP).to_json(), tmp_path)
    with pytest.raises(Ended, match=str(EXIT_RESTART)):
        dog.end_if_stalled()


def test_the_stacks_do_not_go_to_a_bucket_that_stalled(tmp_path):
    clock = Clock()
    reported = Progress(clock)
    dog = watchdog(tmp_path, clock, reported)
    copied = []
    dog.keep_stacks_in(tmp_path / "logs", copied.append)
    with reported.phase(UPLOAD, "write check of s3://bucket/run"):
        clock.now += 60
        verdict = dog.tick()
        assert "in upload (write check of s3://bucket/run) at step 0" in verdict.line, verdict.line
        with pytest.raises(Ended):
            dog.end(verdict)
    assert copied == [] and (tmp_path / "logs" / "stacks-rank0.txt").exists()


def test_a_signal_during_a_stall_ends_the_run_before_the_grace_period_does(tmp_path, stopped_process):
    clock = Clock()
    reported = Progress(clock)
    reported.step_done(5)
    limits = StallLimits(stall_seconds=3600.0, startup_seconds=600.0, grace_seconds=25.0)
    dog = watchdog(tmp_path, clock, reported, limits, world_size=2, preemption=signalled(clock, at=1010.0))
    publish_peer(tmp_path, 1, stopped_process, STEP, moved_at=1000.0, beat=1000.0, step=5)
    clock.now = 1010.0 + 25.0 - SIGNAL_RESERVE_SECONDS - 0.1
    assert dog.tick() is None
    clock.now += 0.1
    verdict = dog.tick()
    assert verdict.code == EXIT_PREEMPTED, verdict
    assert verdict.line.startswith("SIGTERM received 22 s ago, but the run is stalled: rank 1 made no progress for "
                                   "32 s in step at step 5 (its process is stopped)"), verdict.line
    assert "no emergency checkpoint could be written within the grace period" in verdict.line


def test_a_signal_while_the_run_moves_on_leaves_the_end_to_its_emergency_checkpoint(tmp_path):
    clock = Clock()
    reported = Progress(clock)
    reported.step_done(5)
    dog = watchdog(tmp_path, clock, reported, preemption=signalled(clock, at=1000.0))
    clock.now += 1.0
    with reported.phase(SAVE):  # moved on after the signal: the emergency checkpoint is under way
        clock.now = 1000.0 + 25.0
        assert dog.tick() is None  # its own waits are bounded by the grace period: they end it, with their own code
        clock.now += SIGNAL_RESERVE_SECONDS
        verdict = dog.tick()
    assert verdict.code == EXIT_PREEMPTED and "rank 0 is still in save at the end of the grace period" in verdict.line


def test_a_signal_during_start_up_ends_it_with_nothing_to_save(tmp_path):
    clock = Clock()
    reported = Progress(clock)
    dog = watchdog(tmp_path, clock, reported, preemption=signalled(clock, at=1000.0))
    with reported.phase(START_UP, "joining the other processes"):
        clock.now = 1000.0 + 25.0 - SIGNAL_RESERVE_SECONDS
        verdict = dog.tick()
    assert verdict.code == EXIT_PREEMPTED
    assert "stopped by SIGTERM during start-up (start-up (joining the other processes), 22 s after the signal); " \
           "nothing new to save" in verdict.line, verdict.line


@pytest.mark.parametrize("flag, value", [("--stall-timeout-minutes", "-1"), ("--startup-timeout-minutes", "0")])
def test_a_bad_timeout_is_one_line_naming_its_flag(flag, value):
    with pytest.raises(ValueError, match=f"^{flag} must"):
        parse_config(["--config", "test", flag, value])


def test_the_launcher_ends_a_stopped_rank_s_stall_and_leaves_nothing_behind(tmp_path):
    """A rank that cannot end the run itself (stopped): past its published deadline the launcher records the stall,
    continues the rank so it writes its stacks and ends with the stall's code."""
    run = supervised(tmp_path, "--ranks", "1", "--publish", "2", "--limits", "600 25")
    run.wait_for("rank 0 ready")
    pid = int(ready_pids(run.text())[0])
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    assert run.finish(timeout=30) == EXIT_RESTART, run.text()
    assert time.monotonic() - stopped < 2 + 10, run.text()  # its deadline, then a second's look or two
    text = run.text()
    assert f"continuing training process {pid} (stopped) so that it writes its stacks and ends" in text, text
    assert re.search(r"rank 0 ends: the run stalled: rank 0 made no progress for \d+ s in step at step 3 \(its process "
                     r"is stopped\)", text), text
    assert survivors(str(tmp_path)) == []


def test_a_launch_whose_ranks_never_start_ends_after_the_start_up_allowance(tmp_path):
    """As on a machine whose peers never join (torchrun waits for them before starting any rank)."""
    run = supervised(tmp_path, "--ranks", "1", "--ready", "0", "--limits", "2 25")
    run.wait_for("running:")
    began = time.monotonic()
    assert run.finish(timeout=30) == EXIT_RESTART, run.text()
    assert time.monotonic() - began < 2 + 10, run.text()
    assert "error: no training process started within 2 s of the launch (--startup-timeout-minutes)" in run.text()
    assert survivors(str(tmp_path)) == []


@pytest.mark.slow
def test_a_rank_that_does_not_end_after_a_stall_gives_its_stacks_and_is_killed(tmp_path):
    run = supervised(tmp_path, "--ranks", "1", "--publish", "2", "--deaf", "--limits", "600 25")
    run.wait_for("rank 0 ready")
    os.kill(int(ready_pids(run.text())[0]), signal.SIGSTOP)
    assert run.finish(timeout=90) == EXIT_RESTART, run.text()
    text = run.text()
    assert "did not end after the stall; their Python stacks follow (SIGUSR1), then they are killed" in text, text
    assert "most recent call first" in text, text  # faulthandler's, written without the rank's Python
    assert text.rstrip().splitlines()[-1].startswith("error: the run stalled: rank 0 made no progress"), text
    assert survivors(str(tmp_path)) == []
