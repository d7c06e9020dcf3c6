"""The launcher's supervisor (pretrain.launch.supervisor) on stand-ins for accelerate and the training processes
(tests/supervisor_stand_ins.py, no torch): signals reach every rank once it is ready, a pid that is not this run's is
never signalled, nothing is left behind. The real launcher's signal tests are tests/test_launcher_signals.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from pretrain.launch.supervisor import (
    Supervisor,
    exited,
    open_if_ours,
    send,
    start_ticks,
)
from pretrain.protocol import EXIT_INTERRUPTED, EXIT_PREEMPTED, LAUNCH_DIR_ENV
from tests.launcher import REPO, Watched, survivors

SUPERVISE = "import sys; from pretrain.launch.supervisor import supervise; sys.exit(supervise(sys.argv[1:]))"


def supervised(tag: Path, *child_args: str, sigint_ignored: bool = False) -> Watched:
    """The supervisor as start_training.sh runs it, with the stand-in child in place of planning and accelerate."""
    command = [sys.executable, "-c", SUPERVISE, sys.executable, "-m", "tests.supervisor_stand_ins", "child", str(tag),
               *child_args]
    if sigint_ignored:  # as a background job of a script starts it
        command = ["bash", "-c", 'trap "" INT; exec "$0" "$@"', *command]
    return Watched(command, with_stdout=True)


def pids_forwarded(text: str, name: str = "SIGTERM") -> list[str]:
    lines = re.findall(rf"forwarding {name} to training processes ([\d ]+)", text)
    return [pid for line in lines for pid in line.split()]


def ready_pids(text: str) -> list[str]:
    return re.findall(r"rank \d ready \(pid (\d+)\)", text)


def launch_folder(text: str) -> Path:
    return Path(re.search(r"running: stand-in for \S+ in (\S+)", text).group(1))


def test_the_supervisor_imports_no_torch():
    """torch is imported by the child that plans and runs accelerate, and by each rank: not a third time here."""
    code = ("import sys, pretrain.launch.supervisor; "
            "print(sorted(m for m in ('torch', 'accelerate', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_signal_mid_training_reaches_every_rank_once_and_the_run_ends_with_rank_0s_code(tmp_path):
    run = supervised(tmp_path, "--ranks", "2")
    run.wait_for("rank 0 ready")
    run.wait_for("rank 1 ready")
    run.process.send_signal(signal.SIGTERM)
    assert run.finish(timeout=30) == EXIT_PREEMPTED, run.text()
    text = run.text()
    assert sorted(pids_forwarded(text)) == sorted(ready_pids(text)), text
    assert "rank 0 got SIGTERM" in text and "rank 1 got SIGTERM" in text, text
    assert survivors(str(tmp_path)) == []
    assert not launch_folder(text).exists()


def test_a_signal_during_start_up_is_held_until_every_rank_is_ready(tmp_path):
    run = supervised(tmp_path, "--ranks", "2", "--slow-rank", "2")
    run.wait_for("rank 0 ready")
    run.process.send_signal(signal.SIGTERM)  # rank 1 has no handler yet: the signal would kill it
    assert run.finish(timeout=30) == EXIT_PREEMPTED, run.text()
    text = run.text()
    assert "SIGTERM received while starting up; the training processes get it as soon as they are ready" in text
    assert text.index("rank 1 ready") < text.index("forwarding SIGTERM") < text.index("rank 0 got SIGTERM"), text
    assert "rank 1 got SIGTERM" in text, text
    assert len(pids_forwarded(text)) == 2, text
    assert survivors(str(tmp_path)) == []


def test_a_signal_while_planning_stops_at_once_and_starts_nothing(tmp_path):
    run = supervised(tmp_path, "--plan-seconds", "60")
    run.wait_for("planning")
    run.process.send_signal(signal.SIGTERM)
    assert run.finish(timeout=10) == EXIT_PREEMPTED, run.text()
    assert "stopped by SIGTERM before the training started; nothing has changed" in run.text()
    assert "running:" not in run.text()
    assert survivors(str(tmp_path)) == []


def test_a_signal_before_anything_started_exits_75_without_starting_it(tmp_path):
    supervisor = Supervisor()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # to this process: the supervisor's handler records it
        code = supervisor.run([sys.executable, "-c", f"open({str(tmp_path / 'started')!r}, 'w')"])
    finally:
        supervisor.clean_up()
    assert code == EXIT_PREEMPTED
    assert supervisor.child is None and not (tmp_path / "started").exists()
    assert not supervisor.folder.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers it replaced are back


def test_a_second_ctrl_c_during_start_up_exits_130_at_once_and_leaves_nothing(tmp_path):
    run = supervised(tmp_path, "--ranks", "2", "--slow-rank", "60")
    run.wait_for("rank 0 ready")
    run.process.send_signal(signal.SIGINT)
    run.wait_for("SIGINT received while starting up")
    run.process.send_signal(signal.SIGINT)
    assert run.finish(timeout=15) == EXIT_INTERRUPTED, run.text()
    assert "second SIGINT before the training processes were ready: stopping them at once" in run.text()
    assert survivors(str(tmp_path)) == []


def test_ctrl_c_is_forwarded_when_the_launcher_started_with_sigint_ignored(tmp_path):
    run = supervised(tmp_path, "--ranks", "2", sigint_ignored=True)
    run.wait_for("rank 0 ready")
    run.wait_for("rank 1 ready")
    run.process.send_signal(signal.SIGINT)
    assert run.finish(timeout=30) == EXIT_PREEMPTED, run.text()
    text = run.text()
    assert len(pids_forwarded(text, "SIGINT")) == 2 and "rank 1 got SIGINT" in text, text
    assert "started with SIGINT ignored" not in text  # the training processes can be interrupted too


def test_a_recorded_pid_that_another_process_now_has_is_never_signalled(tmp_path):
    """A rank's pid file outlives the rank; the system may give its pid to any process, which must not be touched."""
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        run = supervised(tmp_path, "--ranks", "1", "--stranger", str(stranger.pid))
        run.wait_for("rank 0 ready")
        run.process.send_signal(signal.SIGTERM)
        assert run.finish(timeout=30) == EXIT_PREEMPTED, run.text()
        assert pids_forwarded(run.text()) == ready_pids(run.text()), run.text()
        assert stranger.poll() is None  # neither the forwarded SIGTERM nor the final clean-up reached it
    finally:
        stranger.kill()
        stranger.wait()
    assert survivors(str(tmp_path)) == []


def test_ours_is_a_later_process_carrying_this_launch_folder_and_a_pidfd_never_reaches_a_reused_pid(tmp_path):
    marker = f"{LAUNCH_DIR_ENV}={tmp_path}".encode()
    env = {**os.environ, LAUNCH_DIR_ENV: str(tmp_path)}
    before = subprocess.Popen(["sleep", "60"], env=env)  # there before the launcher: never its own
    time.sleep(0.05)  # a few clock ticks
    ours = subprocess.Popen(["sleep", "60"], env=env)
    other_run = subprocess.Popen(["sleep", "60"], env={**os.environ, LAUNCH_DIR_ENV: f"{tmp_path}-other"})
    since = start_ticks(ours.pid)
    try:
        assert start_ticks(before.pid) < since
        assert open_if_ours(before.pid, marker, since) is None
        assert open_if_ours(other_run.pid, marker, since) is None
        assert open_if_ours(os.getpid(), marker, since) is None
        fd = open_if_ours(ours.pid, marker, since)
        assert fd is not None and not exited(fd)
        ours.kill()
        ours.wait()  # reaped: from here the system may give its pid to anyone
        assert exited(fd)
        send(fd, signal.SIGKILL)  # through the pidfd: reaches no process, raises nothing
        os.close(fd)
    finally:
        for process in (before, other_run):
            process.kill()
            process.wait()


def test_a_killed_accelerate_leaves_nothing_behind_and_its_ranks_stop_as_if_preempted(tmp_path):
    run = supervised(tmp_path, "--ranks", "1", "--die", "--stubborn")
    assert run.finish(timeout=30) == EXIT_PREEMPTED, run.text()
    text = run.text()
    assert re.search(r"the launcher ended \(status 137\) before training processes \d+; stopping them", text), text
    assert "rank 0 got SIGTERM" in text, text
    assert "still running after the launcher ended; killing them" in text, text  # the process that ignores SIGTERM
    assert survivors(str(tmp_path)) == []
