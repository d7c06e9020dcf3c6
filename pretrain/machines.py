"""Which machine each training process runs on (torchrun's environment), and what a run on several machines says
when one of them is preempted or gone: the one line every surviving rank ends with.
"""

from __future__ import annotations

import os
import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from pretrain.errors import one_line
from pretrain.protocol import EXIT_RESTART, launch_dir, pid_file, record, recorded_int

# What a collective raises when the process at the other end of its connection is gone (its sockets closed by the
# kernel at its death): gloo's words, and the c10d store's when the machine that held it is gone.
LOST_CONNECTION_WORDS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")
# A rank of this machine that crashed closes its connections too; it is told from a lost machine by its having
# ended without noting a lost connection. It may close them a moment before it ends (destroying its process group).
LOCAL_CRASH_WAIT_SECONDS = 2.0


def lost_file(rank: int | str) -> str:
    """Written by a rank that lost its connection to another machine, before it ends: its local peers then know that
    it did not crash on its own."""
    return f"rank{rank}.lost"


@dataclass(frozen=True)
class Machines:
    """The layout of a run: every machine runs local_size processes, machine k holds ranks [k * local_size, ...)."""

    rank: int = 0
    machine: int = 0
    count: int = 1
    local_size: int = 1

    @classmethod
    def from_env(cls) -> Machines:
        """torchrun sets these for every process it starts; a process started alone is one machine of one."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world))) or 1
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("GROUP_RANK", "0")), max(1, world // local),
                   local)

    def machine_of(self, rank: int) -> int:
        return rank // self.local_size

    def ranks_of(self, machine: int) -> range:
        return range(machine * self.local_size, (machine + 1) * self.local_size)

    def others(self) -> list[int]:
        return [machine for machine in range(self.count) if machine != self.machine]


def ranks_words(ranks: list[int] | range) -> str:
    ranks = sorted(ranks)
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return f"ranks {', '.join(map(str, ranks))}"


def preempted_words(signalled: list[tuple[int, str]], machines: Machines) -> str:
    """Why a rank that got no signal stops: `signalled` is (rank, signal name) of every rank that got one."""
    if not signalled:
        return "a signal on another process"
    by_machine: dict[int, list[tuple[int, str]]] = {}
    for rank, name in signalled:
        by_machine.setdefault(machines.machine_of(rank), []).append((rank, name))
    parts = []
    for machine, received in sorted(by_machine.items()):
        names = " or ".join(sorted({name for _, name in received}))
        where = f"machine {machine} was preempted" if machines.count > 1 else "the run was stopped"
        parts.append(f"{where} ({names} on {ranks_words([rank for rank, _ in received])})")
    return "; ".join(parts)


def lost_connection(error: BaseException) -> str | None:
    """The library's words when `error` (or what it was raised from) is a collective or store call that lost its
    connection to another process; None for anything else."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if isinstance(error, RuntimeError) and any(words in text for words in LOST_CONNECTION_WORDS):
            # gloo's "[.../pair.cc:553] Connection closed by peer [10.0.0.2]:4567. This is typically caused by ..."
            return one_line(re.sub(r"^\[[^\]]*\] *", "", text.strip()).split(". This is typically caused")[0])
        error = error.__cause__ or error.__context__
    return None


def where_raised(error: BaseException) -> str:
    """The innermost call of this project the error passed through ("pretrain/loop.py train_step")."""
    root = Path(__file__).resolve().parent.parent
    found = ""
    for frame in traceback.extract_tb(error.__traceback__):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(root) and ".venv" not in path.parts and "site-packages" not in path.parts:
            found = f"{path.relative_to(root).as_posix()} {frame.name}"
    return found


def _ended(pid: int) -> bool:
    """The process is gone or a zombie (its sockets are closed either way). Only read, never signalled."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


def crashed_here(machines: Machines, folder: Path | None, wait_seconds: float = LOCAL_CRASH_WAIT_SECONDS) -> int | None:
    """A rank of this machine that ended without noting a lost connection: the connection was lost to a crash here,
    not to another machine. Waits up to wait_seconds for local ranks that are still running and have noted nothing
    (one may be on its way out). None without a launch folder to read the local ranks from."""
    if folder is None:
        return None
    deadline = time.monotonic() + wait_seconds
    while True:
        undecided = False
        for rank in machines.ranks_of(machines.machine):
            pid = recorded_int(pid_file(rank), folder)
            if rank == machines.rank or pid is None or (folder / lost_file(rank)).exists():
                continue
            if _ended(pid):
                return rank
            undecided = True
        if not undecided or time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def lost_machine_line(error: BaseException, machines: Machines | None = None, step: int | None = None) -> str | None:
    """The one line for a collective that lost its connection to another machine's processes (they were killed, or
    the machine is gone): every surviving rank ends with it and exit EXIT_RESTART. None when `error` is anything
    else, when the run has one machine, or when a rank of this machine crashed (its own error is the story)."""
    words = lost_connection(error)
    machines = machines or Machines.from_env()
    if words is None or machines.count == 1:
        return None
    folder = launch_dir()
    record(lost_file(machines.rank), "1")  # before looking at the others: they look at this one
    if crashed_here(machines, folder) is not None:
        return None
    others = machines.others()
    if len(others) == 1:
        who = (f"the training processes of machine {others[0]} ({ranks_words(machines.ranks_of(others[0]))}) are "
               "gone")
    else:
        who = f"a training process of another machine ({', '.join(map(str, others))}) is gone"
    place = where_raised(error)
    at = f" after step {step}" if step is not None else ""
    return (f"{who}: rank {machines.rank} on machine {machines.machine} lost its connection to them{at}"
            f"{f' in {place}' if place else ''} ({words}); the machine was lost, or a process there ended (its own "
            "log says why). "
            f"This machine stops too (exit {EXIT_RESTART}): run the same command on every machine again; "
            "--resume auto continues from the newest checkpoint")
