"""Stand-ins for the launcher's child (planning, then accelerate launch) and for the training processes: they speak
the launch protocol (pretrain.protocol) and start in a blink, so the supervisor's tests need no torch import.

    python -m tests.supervisor_stand_ins child TAG [--plan-seconds S] [--ranks N] [--ready K] [--stranger PID]
                                                   [--slow-rank S] [--die] [--stubborn]
    python -m tests.supervisor_stand_ins rank TAG INDEX [--delay S] [--no-pid]
TAG only marks the command lines, so a test finds what its run left behind.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pretrain.protocol import (
    EXIT_CODE_FILE,
    EXIT_PREEMPTED,
    LAUNCH_DIR_ENV,
    LOCAL_RANKS_FILE,
    pid_file,
    record,
    recorded_pids,
)

LIFETIME_SECONDS = 120  # how long a stand-in waits for a signal; a test ends far sooner


def rank(index: int, record_pid: bool, delay: float) -> None:
    """A training process: after `delay` (its set-up) it installs its handler and records its pid; on SIGTERM/SIGINT
    it says so, rank 0 records 75, and it exits 75."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        print(f"rank {index} started with SIGINT ignored", file=sys.stderr, flush=True)
    time.sleep(delay)  # a signal now would kill it: the supervisor must hold it

    def stop(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
        print(f"rank {index} got {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        if index == 0:
            record(EXIT_CODE_FILE, str(EXIT_PREEMPTED))
        os._exit(EXIT_PREEMPTED)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if record_pid:
        record(pid_file(index), str(os.getpid()))
        print(f"rank {index} ready (pid {os.getpid()})", file=sys.stderr, flush=True)
    time.sleep(LIFETIME_SECONDS)


def child(tag: str, plan_seconds: float, ranks: int, ready: int, slow_rank: float, stranger: int | None, die: bool,
          stubborn: bool) -> int:
    """Plans for `plan_seconds`, then accelerate launch: records how many ranks to expect, starts them (only `ready`
    of them record their pid, the last one `slow_rank` seconds late) and waits for them; 1 when one failed, as
    accelerate masks the code."""
    print(f"planning {tag}", file=sys.stderr, flush=True)
    time.sleep(plan_seconds)
    record(LOCAL_RANKS_FILE, str(ranks))
    print(f"running: stand-in for {tag} in {os.environ[LAUNCH_DIR_ENV]}", flush=True)
    started = [subprocess.Popen([sys.executable, "-m", "tests.supervisor_stand_ins", "rank", tag, str(index),
                                 *([] if index < ready else ["--no-pid"]),
                                 *(["--delay", str(slow_rank)] if index == ranks - 1 else [])])
               for index in range(ranks)]
    if stranger is not None:  # a rank that exited, and its pid since taken by a process outside the run
        record(pid_file(ranks), str(stranger))
    if stubborn:  # something a rank started that records no pid and ignores SIGTERM
        subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          f"time.sleep({LIFETIME_SECONDS})", tag])
    if die:  # killed (the OOM killer) once its ranks are training, leaving them behind
        while len(recorded_pids(Path(os.environ[LAUNCH_DIR_ENV]))) < ready:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    return 1 if any(process.wait() for process in started) else 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["child", "rank"])
    parser.add_argument("tag")
    parser.add_argument("index", type=int, nargs="?", default=0)
    parser.add_argument("--plan-seconds", type=float, default=0.0)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--ready", type=int, default=None)
    parser.add_argument("--slow-rank", type=float, default=0.0)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--stranger", type=int, default=None)
    parser.add_argument("--die", action="store_true")
    parser.add_argument("--stubborn", action="store_true")
    parser.add_argument("--no-pid", action="store_true")
    args = parser.parse_args()
    if args.role == "rank":
        rank(args.index, record_pid=not args.no_pid, delay=args.delay)
        return 0
    ready = args.ranks if args.ready is None else args.ready
    return child(args.tag, args.plan_seconds, args.ranks, ready, args.slow_rank, args.stranger, args.die, args.stubborn)


if __name__ == "__main__":
    sys.exit(main())
