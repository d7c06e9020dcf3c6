"""In-process: what a run on several machines says when one is preempted or gone, or when they never meet, and how a
lost connection is told from a crash on this machine (the journeys are in tests/test_machines.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch.distributed as dist
from accelerate.commands.launch import launch_command_parser

from pretrain.launch.accelerate_quietly import rendezvous_failure
from pretrain.machines import (
    Machines,
    lost_connection,
    lost_file,
    lost_machine_line,
    preempted_words,
    ranks_words,
)
from pretrain.preemption import PreemptionFlag
from pretrain.protocol import pid_file

GLOO = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
        "[127.0.0.1]:58511. This is typically caused by a remote worker crashing. Check the logs of the remote worker "
        "before reporting an error. GLHF!")
TWO_BY_TWO = Machines(rank=0, machine=0, count=2, local_size=2)


def raised(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:  # noqa: BLE001 - with its traceback, as train.py catches it
        return caught


@pytest.fixture
def launch_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PRETRAIN_LAUNCH_DIR", str(tmp_path))
    return tmp_path


def test_the_layout_comes_from_torchruns_environment(monkeypatch):
    for name, value in {"RANK": "3", "GROUP_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    machines = Machines.from_env()
    assert (machines.rank, machines.machine, machines.count, machines.local_size) == (3, 1, 2, 2)
    assert list(machines.ranks_of(0)) == [0, 1] and machines.machine_of(2) == 1 and machines.others() == [0]
    assert ranks_words([2]) == "rank 2" and ranks_words([2, 3]) == "ranks 2, 3" and ranks_words(range(8, 16)) == \
        "ranks 8-15"


def test_a_lost_connection_is_recognised_in_gloos_words_and_through_a_cleanup_error():
    assert lost_connection(RuntimeError(GLOO)) == "Connection closed by peer [127.0.0.1]:58511"
    reset = "[../pair.cc:598] Read error [127.0.0.1]:7573: Connection reset by peer"
    assert lost_connection(RuntimeError(reset)) == "Read error [127.0.0.1]:7573: Connection reset by peer"
    later = ValueError("a clean-up step failed after it")
    later.__context__ = RuntimeError(GLOO)  # raised while the lost connection was being handled
    assert lost_connection(later) is not None
    assert lost_connection(RuntimeError("CUDA out of memory")) is None
    assert lost_connection(ConnectionResetError("Connection reset by peer")) is None  # a bucket's, not a collective's


def test_a_lost_machine_is_one_line_on_every_survivor_naming_the_machine_and_exit_76(launch_folder):
    (launch_folder / pid_file(1)).write_text(f"{os.getpid()}\n")  # the other local rank: running
    line = lost_machine_line(raised(RuntimeError(GLOO)), TWO_BY_TWO, step=5)
    assert line.startswith("the training processes of machine 1 (ranks 2, 3) are gone: rank 0 on machine 0 lost its "
                           "connection to them after step 5 in tests/test_machine_loss.py raised (Connection closed by "
                           "peer [127.0.0.1]:58511)"), line
    assert "exit 76" in line and "--resume auto" in line and "\n" not in line
    assert (launch_folder / lost_file(0)).exists()  # the other local rank reads it before it concludes the same


def test_a_crash_on_this_machine_is_not_taken_for_a_lost_machine(launch_folder):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # reaped: its pid names no process
    (launch_folder / pid_file(1)).write_text(f"{ended.pid}\n")
    started = time.monotonic()
    assert lost_machine_line(raised(RuntimeError(GLOO)), TWO_BY_TWO) is None  # its own error and traceback stand
    assert time.monotonic() - started < 1.0  # a rank that ended is seen at once
    (launch_folder / lost_file(1)).write_text("1\n")  # it ended because it lost the connection too
    assert lost_machine_line(raised(RuntimeError(GLOO)), TWO_BY_TWO) is not None


def test_other_errors_and_one_machine_runs_keep_their_own_ending(launch_folder):
    assert lost_machine_line(raised(RuntimeError("CUDA error: an illegal memory access")), TWO_BY_TWO) is None
    one_machine = Machines(rank=0, machine=0, count=1, local_size=2)
    assert lost_machine_line(raised(RuntimeError(GLOO)), one_machine) is None  # torchrun names the rank that died
    three = Machines(rank=2, machine=1, count=3, local_size=2)
    assert lost_machine_line(raised(RuntimeError(GLOO)), three).startswith(
        "a training process of another machine (0, 2) is gone")


def test_the_machine_that_was_not_preempted_says_which_one_was():
    assert preempted_words([(2, "SIGTERM"), (3, "SIGTERM")], TWO_BY_TWO) == \
        "machine 1 was preempted (SIGTERM on ranks 2, 3)"
    assert preempted_words([(1, "SIGINT")], Machines(count=1, local_size=2)) == "the run was stopped (SIGINT on rank 1)"


def test_a_process_without_a_signal_counts_the_grace_period_from_the_agreement():
    flag = PreemptionFlag()
    time.sleep(0.2)
    flag.agree()
    assert not flag.requested and flag.agreed
    assert 24.5 < flag.grace_left(25.0) <= 25.0  # from now, not from when the flag was made


def rendezvous_args(machine_rank: int):
    return launch_command_parser().parse_args([
        "--multi_gpu", "--num_processes", "4", "--num_machines", "2", "--machine_rank", str(machine_rank),
        "--main_process_ip", "10.0.0.1", "--main_process_port", "29733", "--rdzv_conf", "timeout=30", "train.py"])


def test_machines_that_never_meet_end_the_start_up_with_one_line_and_76(launch_folder):
    waited = dist.DistStoreError("Timed out after 31 seconds waiting for clients. 1/2 clients joined.")
    line = rendezvous_failure(rendezvous_args(0), waited)
    assert line.startswith("not all 2 machines joined the rendezvous at 10.0.0.1:29733 within 30 s "
                           "(--rendezvous-timeout-seconds; Timed out after 31 seconds"), line
    assert line.endswith("exit 76: run the same command again")
    unanswered = dist.DistNetworkError("The client socket has timed out after 30000ms while trying to connect to "
                                       "(10.0.0.1, 29733).")
    assert rendezvous_failure(rendezvous_args(1), unanswered).startswith(
        "machine 0 did not answer the rendezvous at 10.0.0.1:29733 within 30 s")
    assert rendezvous_failure(rendezvous_args(0), ValueError("port taken")) is None
    (launch_folder / pid_file(0)).write_text("4242\n")  # training had started: not a start-up failure
    assert rendezvous_failure(rendezvous_args(0), waited) is None
