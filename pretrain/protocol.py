"""How the launcher and the training processes talk: exit codes, and the files in the launch folder.

A leaf shared by the entry point (train.py), the launcher (pretrain.launch) and signal handling (pretrain.preemption);
it imports only pretrain.files, so each side can use it without pulling in the other.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pretrain.files import write_atomically

EXIT_OK = 0
EXIT_UNEXPECTED = 1  # a bug, or a process killed by the system
EXIT_BAD_INPUT = 2  # config, flag, data, checkpoint, bucket, disk: the last line names it
EXIT_NONFINITE = 3  # too many non-finite steps in a row, or loss spikes that rollbacks did not cure
EXIT_NOT_UPLOADED = 4  # the newest checkpoint is only on this machine's disk
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal; run the same command with --resume auto
EXIT_RESTART = 76  # the run ended itself: a process stalled or a machine vanished; run the same command again
EXIT_INTERRUPTED = 130  # a second Ctrl-C: the shell's convention for death by SIGINT

# The launch folder: the launcher creates it and names it in this variable; the training processes write into it.
LAUNCH_DIR_ENV = "PRETRAIN_LAUNCH_DIR"
# When start_training.sh started (unix seconds): a restart's start-up time counts from there.
LAUNCHED_ENV = "PRETRAIN_LAUNCHED_UNIX"
_PROCESS_STARTED_UNIX = time.time()  # for a train.py started without the launcher: about when this process started
EXIT_CODE_FILE = "exit_code"  # rank 0's exit code (accelerate launch masks it), one number and a newline
LOCAL_RANKS_FILE = "local_ranks"  # how many training processes this machine starts
# Set (with TORCH_CPP_LOG_LEVEL=FATAL) by the launcher for its child when the user set no C++ log level: torchrun's
# agent runs there, and the child gives the training processes the user's setting back.
QUIET_AGENT_ENV = "PRETRAIN_QUIET_AGENT"


def pid_file(rank: int | str) -> str:
    """Written by each rank once its signal handler is installed: before that a signal would kill it."""
    return f"rank{rank}.pid"


def launch_dir() -> Path | None:
    value = os.environ.get(LAUNCH_DIR_ENV)
    return Path(value) if value else None


def record(name: str, value: str) -> None:
    """One value and a newline in the launch folder, renamed into place so the launcher never reads half of it. A
    launcher that is already gone (its folder removed) reads nothing, so nothing is written."""
    folder = launch_dir()
    if folder is None:
        return
    try:
        write_atomically(folder / name, f"{value}\n", make_parents=False)
    except FileNotFoundError:
        pass


def recorded_int(name: str, folder: Path | None = None) -> int | None:
    """What record() wrote under `name` (in $PRETRAIN_LAUNCH_DIR unless `folder` is given); None before it did."""
    folder = folder or launch_dir()
    try:
        return int((folder / name).read_text().strip()) if folder else None
    except (FileNotFoundError, ValueError):
        return None


def recorded_exit_code(folder: Path | None = None) -> int | None:
    return recorded_int(EXIT_CODE_FILE, folder)


def recorded_pids(folder: Path) -> list[int]:
    """The pids the ranks recorded so far, in the order of their pid files."""
    pids = (recorded_int(path.name, folder) for path in sorted(folder.glob(pid_file("*"))))
    return [pid for pid in pids if pid is not None]


def launched_unix() -> float:
    """When this run was launched: the launcher's start, else this process's."""
    try:
        return float(os.environ[LAUNCHED_ENV])
    except (KeyError, ValueError):
        return _PROCESS_STARTED_UNIX
