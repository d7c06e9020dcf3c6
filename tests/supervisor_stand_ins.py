"""Stand-ins for the launcher's child (planning, then accelerate launch) and for the training processes: they speak
the launch protocol (pretrain.protocol) and start in a blink, so the supervisor's tests need no torch import.

    python -m tests.supervisor_stand_ins child TAG [--plan-seconds S] [--ranks N] [--ready K] [--stranger PID]
                                                   [--slow-rank S] [--die] [--stubborn] [--limits "START GRACE"]
                                                   [--publish S] [--deaf]
    python -m tests.supervisor_stand_ins rank TAG INDEX [--delay S] [--no-pid] [--publish S] [--deaf]
TAG only marks the command lines, so a test finds what its run left behind. --publish S: the rank publishes its
progress as pretrain.watchdog does (no progress after its start, so its deadline is S seconds later) and ends with a
recorded stall's code, as the real watchdog does, unless --deaf.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pretrain.protocol import (
    EXIT_CODE_FILE,
    EXIT_PREEMPTED,
    LAUNCH_DIR_ENV,
    LIMITS_FILE,
    LOCAL_RANKS_FILE,
    STALL_FILE,
    pid_file,
    progress_file,
    record,
    recorded_json,
    recorded_pids,
)

LIFETIME_SECONDS = 120  # how long a stand-in waits for a signal; a test ends far sooner


def publish(index: int, deadline_seconds: float, deaf: bool, published: threading.Event) -> None:
    """A beat every 0.2 s, no progress since the start; on a recorded stall: its line, its code, exit."""
    started = time.monotonic()
    while True:
        now = time.monotonic()
        record(progress_file(index), json.dumps({"rank": index, "pid": os.getpid(), "phase": "step", "detail": "",
                                                 "step": 3, "moved_at": started, "beat": now,
                                                 "deadline": started + deadline_seconds}))
        published.set()
        stall = recorded_json(STALL_FILE)
        if stall and not deaf:
            print(f"rank {index} ends: {stall['line']}", file=sys.stderr, flush=True)
            if index == 0:
                record(EXIT_CODE_FILE, str(stall["code"]))
            os._exit(stall["code"])
        time.sleep(0.2)


def rank(index: int, record_pid: bool, delay: float, publish_deadline: float | None = None, deaf: bool = False) -> None:
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
    if publish_deadline is not None:  # published before it says it is ready, as the real rank's watchdog starts
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # as the real rank: stacks when the launcher asks
        published = threading.Event()
        threading.Thread(target=publish, args=(index, publish_deadline, deaf, published), daemon=True).start()
        published.wait()
    if record_pid:
        record(pid_file(index), str(os.getpid()))
        print(f"rank {index} ready (pid {os.getpid()})", file=sys.stderr, flush=True)
    time.sleep(LIFETIME_SECONDS)


def child(tag: str, plan_seconds: float, ranks: int, ready: int, slow_rank: float, stranger: int | None, die: bool,
          stubborn: bool, limits: str = "", rank_args: tuple[str, ...] = ()) -> int:
    """Plans for `plan_seconds`, then accelerate launch: records how many ranks to expect, starts them (only `ready`
    of them record their pid, the last one `slow_rank` seconds late) and waits for them; 1 when one failed, as
    accelerate masks the code."""
    print(f"planning {tag}", file=sys.stderr, flush=True)
    time.sleep(plan_seconds)
    if limits:
        record(LIMITS_FILE, limits)
    record(LOCAL_RANKS_FILE, str(ranks))
    print(f"running: stand-in for {tag} in {os.environ[LAUNCH_DIR_ENV]}", flush=True)
    started = [subprocess.Popen([sys.executable, "-m", "tests.supervisor_stand_ins", "rank", tag, str(index),
                                 *([] if index < ready else ["--no-pid"]),
                                 *(["--delay", str(slow_rank)] if index == ranks - 1 else []), *rank_args])
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
    parser.add_argument("--limits", default="")
    parser.add_argument("--publish", type=float, default=None)
    parser.add_argument("--deaf", action="store_true")
    args = parser.parse_args()
    if args.role == "rank":
        rank(args.index, record_pid=not args.no_pid, delay=args.delay, publish_deadline=args.publish, deaf=args.deaf)
        return 0
    ready = args.ranks if args.ready is None else args.ready
    rank_args = (*(["--publish", str(args.publish)] if args.publish is not None else []),
                 *(["--deaf"] if args.deaf else []))
    return child(args.tag, args.plan_seconds, args.ranks, ready, args.slow_rank, args.stranger, args.die, args.stubborn,
                 args.limits, rank_args)


if __name__ == "__main__":
    sys.exit(main())
