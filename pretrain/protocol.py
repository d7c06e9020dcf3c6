"""How the launcher and the training processes talk: exit codes, and the files in the launch folder.

A leaf shared by the entry point (train.py), the launcher (pretrain.launch) and signal handling (pretrain.preemption);
it imports only pretrain.files, so each side can use it without pulling in the other.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from pretrain.files import PARTIAL_SUFFIX, write_atomically

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
# The stall watchdog (pretrain/watchdog.py): the launcher's child records the limits the launcher watches by, each rank
# publishes its progress once a second, and the first process (a rank, or the launcher) to see a stall records the
# verdict that every rank then ends with.
LIMITS_FILE = "stall_limits"  # "START_UP_SECONDS GRACE_SECONDS"
STALL_FILE = "stalled"  # JSON {"code": exit code, "line": the one line every process ends with}

# Set (with TORCH_CPP_LOG_LEVEL=FATAL) by the launcher for its child when the user set no C++ log level: torchrun's
# agent runs there, and the child gives the training processes the user's setting back.
QUIET_AGENT_ENV = "PRETRAIN_QUIET_AGENT"


def pid_file(rank: int | str) -> str:
    """Written by each rank once its signal handler is installed: before that a signal would kill it."""
    return f"rank{rank}.pid"


def progress_file(rank: int | str) -> str:
    """JSON: rank, pid, phase, detail, step, moved_at, beat and deadline (time.monotonic(), one clock per machine)."""
    return f"rank{rank}.progress"


def launch_dir() -> Path | None:
    value = os.environ.get(LAUNCH_DIR_ENV)
    return Path(value) if value else None


def record(name: str, value: str, folder: Path | None = None) -> None:
    """One value and a newline in the launch folder (or `folder`), renamed into place so the launcher never reads half
    of it. A launcher that is already gone (its folder removed) reads nothing, so nothing is written."""
    folder = folder or launch_dir()
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


def record_first(name: str, value: str, folder: Path | None = None) -> str | None:
    """Records `value` under `name` unless a value is there already, and returns the one that is (this one or the
    earlier): of processes that record at once, exactly one wins. None without a launch folder."""
    folder = folder or launch_dir()
    if folder is None:
        return None
    target = folder / name
    if not target.exists():
        try:
            handle, temp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=PARTIAL_SUFFIX)
        except FileNotFoundError:
            return None  # the launcher is gone with its folder
        try:
            with os.fdopen(handle, "w") as out:
                out.write(f"{value}\n")
            os.link(temp, target)  # unlike a rename, fails when the target exists: the first one stays
        except FileExistsError:
            pass
        finally:
            os.unlink(temp)
    try:
        return target.read_text().strip()
    except FileNotFoundError:
        return None


def recorded_json(name: str, folder: Path | None = None) -> dict | None:
    folder = folder or launch_dir()
    try:
        return json.loads((folder / name).read_text()) if folder else None
    except (FileNotFoundError, ValueError):
        return None


def recorded_progress(folder: Path | None = None) -> list[dict]:
    """What every rank of this machine published last (pretrain.watchdog), in rank order."""
    folder = folder or launch_dir()
    if folder is None:
        return []
    found = (recorded_json(path.name, folder) for path in folder.glob(progress_file("*")))
    return sorted((record for record in found if record is not None), key=lambda record: record["rank"])


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat ('R' running, 'S' sleeping, 'T' stopped, 'Z' zombie, ...); '' if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return ""


def stall_words(record: dict, seconds: float, how: str = "") -> str:
    """'rank 1 made no progress for 63 s in step at step 7 (its process is stopped)': the stalled rank and phase,
    in the same words from the ranks' watchdog and the launcher."""
    where = f"{record['phase']} ({record['detail']})" if record.get("detail") else record["phase"]
    return (f"rank {record['rank']} made no progress for {seconds:.0f} s in {where} at step {record['step']}"
            + (f" ({how})" if how else ""))


def others_words(culprit: dict, records: list[dict]) -> str:
    """'; rank 0 waited in step': what the other ranks were doing, appended to stall_words by either reporter."""
    others = [record for record in records if record["rank"] != culprit["rank"]]
    return ("; " + ", ".join(f"rank {record['rank']} waited in {record['phase']}" for record in others[:4])
            if others else "")
