"""The stall watchdog: a thread in every training process that publishes this process's progress (pretrain.progress)
and, when none is made for too long, ends the run: Python stacks of every process, one line naming the stalled rank
and phase on every rank, exit 76 (75 when a signal's grace period runs out first). The policy lives here."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from pretrain.preemption import PreemptionFlag
from pretrain.progress import COLLECTIVE, STEP, UPLOAD, Progress, Snapshot, progress
from pretrain.protocol import (
    EXIT_CODE_FILE,
    EXIT_PREEMPTED,
    EXIT_RESTART,
    STALL_FILE,
    launch_dir,
    others_words,
    process_state,
    progress_file,
    record,
    record_first,
    recorded_json,
    recorded_progress,
    stall_words,
)

log = logging.getLogger(__name__)

FLOOR_SECONDS = 600.0  # the automatic stall timeout's floor: NCCL's own default; no healthy step comes near it
STEP_FACTOR = 20  # the automatic timeout: this many times the slowest of the recent steps, when that is above the floor
TICK_SECONDS = 0.5  # how often the watchdog publishes a beat and looks (a stopped rank's last words are this old)
BEAT_STALE_SECONDS = 10.0  # a rank whose beat is this old is not running at all (stopped, or its GIL held)
SIGNAL_RESERVE_SECONDS = 3.0  # ending takes this long at most (stacks, one line, exit), within the grace period
STACKS_UPLOAD_SECONDS = 15.0  # the copy of the stacks to the bucket's log folder waits at most this long
# The descriptor, not sys.stderr: a replaced stderr (a test's capture, a redirect) may have no descriptor of its own.
STDERR_FD = 2
BACKSTOP_SECONDS = 60.0  # past its deadline, a process whose watchdog thread cannot run is ended by faulthandler
PROCESS_GROUP_MARGIN_SECONDS = 300.0  # the process group's own timeout: the longest allowance plus this
# How a rank's phase bears on naming the one that stalled the run: local work first, then a step (whose gradient
# all-reduce may be waiting for another rank), then a collective (waiting for the others by definition).
WAITING_ORDER = {STEP: 1, COLLECTIVE: 2}


@dataclass(frozen=True)
class StallLimits:
    """How long a phase may go without progress: `startup_seconds` before this process's first step (checkpoint
    download, data, compile, the other processes joining), the stall timeout after it and in the upload phase (a
    bucket that never answers is a stall before step 1 too). The stall timeout is `stall_seconds`, or when that is 0,
    STEP_FACTOR x the slowest recent step, at least FLOOR_SECONDS and at most the start-up allowance."""

    stall_seconds: float
    startup_seconds: float
    grace_seconds: float

    @classmethod
    def from_config(cls, config) -> StallLimits:
        return cls(60.0 * config.stall_timeout_minutes, 60.0 * config.startup_timeout_minutes,
                   config.preemption_grace_seconds)

    def stall_timeout(self, slowest_step: float) -> float:
        if self.stall_seconds:
            return self.stall_seconds
        return min(max(FLOOR_SECONDS, STEP_FACTOR * slowest_step), max(FLOOR_SECONDS, self.startup_seconds))

    def allowance(self, snapshot: Snapshot) -> float:
        if snapshot.steps_done or snapshot.phase == UPLOAD:
            return self.stall_timeout(snapshot.slowest_step)
        return self.startup_seconds

    def process_group_seconds(self) -> float:
        """Above every allowance, so the watchdog speaks first, with its one line, and not the process group."""
        longest = max(self.startup_seconds, self.stall_seconds or max(FLOOR_SECONDS, self.startup_seconds))
        return longest + PROCESS_GROUP_MARGIN_SECONDS


@dataclass(frozen=True)
class Verdict:
    code: int  # the exit code every process ends with
    line: str  # the one line every process ends with
    phase: str  # the stalled phase; "upload": the bucket stalled, so the stacks are not copied there

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, values: dict) -> Verdict:
        return cls(int(values["code"]), str(values["line"]), str(values.get("phase", "")))


def is_frozen(record: dict, now: float) -> bool:
    """Not running at all: stopped (SIGSTOP, a debugger), or its beat thread cannot run; a rank that waits in a
    collective still beats."""
    return now - record["beat"] > BEAT_STALE_SECONDS or process_state(record["pid"]) in ("T", "t")


def frozen_how(record: dict, now: float) -> str:
    if process_state(record["pid"]) in ("T", "t"):
        return "its process is stopped"
    if now - record["beat"] > BEAT_STALE_SECONDS:
        return f"its process has not run for {now - record['beat']:.0f} s"
    return ""


def stalled_rank(records: list[dict], now: float) -> dict:
    """The rank that stalled the run, from what every rank of this machine published: one that does not run at
    all, else one stuck in local work rather than waiting for the others, else the one that moved on least recently."""
    return min(records, key=lambda r: (not is_frozen(r, now), WAITING_ORDER.get(r["phase"], 0), r["moved_at"],
                                       r["rank"]))


def stall_line(words: str) -> str:
    return (f"the run stalled: {words}; the Python stacks of every process are above; exit {EXIT_RESTART}: run the "
            "same command again (--resume auto continues from the last complete checkpoint)")


def stalled_signal_line(name: str, age: float, words: str, grace: float) -> str:
    return (f"{name} received {age:.0f} s ago, but the run is stalled: {words}; no emergency checkpoint could be "
            f"written within the grace period (--preemption-grace-seconds {grace:g}); the last complete checkpoint is "
            f"kept; exit {EXIT_PREEMPTED}: run the same command with --resume auto")


class Watchdog:
    """One per training process, started before the process group (joining it can stall too), stopped after the
    run's last wait. `tick()` is one look; the thread calls it every TICK_SECONDS."""

    def __init__(self, limits: StallLimits, preemption: PreemptionFlag, rank: int | None = None,
                 world_size: int | None = None, reported: Progress = progress, folder: Path | None = None,
                 clock: Callable[[], float] = time.monotonic, exit: Callable[[int], None] = os._exit,
                 backstop: bool = True) -> None:
        self.limits = limits
        self.preemption = preemption
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
        self.progress = reported
        self.folder = launch_dir() if folder is None else folder  # None: run by hand, no launcher to share with
        self._clock = clock
        self._exit = exit
        self._backstop = backstop
        self._own: dict | None = None  # what this process published last (all there is without a launch folder)
        self._stacks_dir: Path | None = None
        self._copy_stacks: Callable[[Path], None] | None = None
        self._stop = threading.Event()
        self._ending = threading.Lock()
        self._thread: threading.Thread | None = None
        self._armed: float | None = None  # the deadline the faulthandler backstop was last armed for

    @classmethod
    def for_run(cls, config, preemption: PreemptionFlag) -> Watchdog:
        return cls(StallLimits.from_config(config), preemption)

    def start(self) -> Watchdog:
        # A process whose Python cannot run (stopped, its GIL held) still writes its stacks on SIGUSR1: the launcher
        # asks for them before it kills one (pretrain.launch.supervisor).
        faulthandler.register(signal.SIGUSR1, file=STDERR_FD, all_threads=True, chain=False)
        self.progress.restart()  # a run that starts now (tests run several in one process)
        self.tick()
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def keep_stacks_in(self, folder: Path, copy: Callable[[Path], None] | None = None) -> None:
        """Where a stall's stacks go besides the log: a file in the run's log folder, and `copy` takes it to the
        bucket's log folder."""
        self._stacks_dir, self._copy_stacks = folder, copy

    def stop(self) -> None:
        """After the run's last wait; one already ending for a stall holds this caller until it exits. What it
        published goes too: the launcher must not take a process on its way out for a stopped one."""
        with self._ending:
            self._stop.set()
        if self._backstop:
            faulthandler.cancel_dump_traceback_later()
        if self._thread is not None:
            self._thread.join(timeout=5.0)  # a look in progress must not publish again after this
        if self.folder is not None:
            (self.folder / progress_file(self.rank)).unlink(missing_ok=True)

    def end_if_stalled(self) -> None:
        """On the main thread, after an error: if the run is ending for a stall, that error is its consequence (a
        collective whose peer is gone), so the process ends with the stall's line instead of a traceback."""
        verdict = self._recorded()
        if verdict is not None:
            self.end(verdict)

    def tick(self) -> Verdict | None:
        """Publishes this process's progress and returns the verdict to end with, if there is one now."""
        now = self._clock()
        snapshot = self.progress.snapshot()
        deadline = snapshot.moved_at + self.limits.allowance(snapshot)
        self._publish(snapshot, now, deadline)
        self._arm_backstop(deadline, now)
        verdict = self._recorded()
        if verdict is not None:
            return verdict
        if now >= deadline:
            return self._stall_verdict(now)
        if self.preemption.requested:
            return self._signal_verdict(snapshot, now)
        return None

    def end(self, verdict: Verdict, unless_stopped: bool = False) -> None:
        """Stacks of this process (the log, the run's log folder, the bucket's), the line, the exit code, exit; once:
        a second caller waits here until the first has ended the process. unless_stopped: not if the run has just
        ended (the watchdog's own look raced its stop)."""
        self._ending.acquire()
        if unless_stopped and self._stop.is_set():
            self._ending.release()
            return
        if self._backstop:  # the ending itself is bounded too
            faulthandler.dump_traceback_later(STACKS_UPLOAD_SECONDS + 30.0, exit=True, file=STDERR_FD)
        won = record_first(STALL_FILE, verdict.to_json(), self.folder)
        if won is not None:
            verdict = Verdict.from_json(json.loads(won))  # the first process's verdict: every rank says the same
        stacks = self._write_stacks(verdict)
        if stacks is not None and self._copy_stacks is not None and verdict.phase != UPLOAD:
            self._copy_bounded(stacks, verdict)
        self._say(f"error: {verdict.line}")
        if self.rank == 0 and self.folder is not None:
            record(EXIT_CODE_FILE, str(verdict.code), self.folder)
        sys.stdout.flush()
        sys.stderr.flush()
        self._exit(verdict.code)
        self._ending.release()  # reached only where `exit` is a stand-in that returns (tests)

    def _run(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            try:
                verdict = self.tick()
            except Exception as error:  # noqa: BLE001 - a failed look (the launch folder gone) must not end watching
                log.debug("stall watchdog: %s", error)
                continue
            if verdict is not None:
                self.end(verdict, unless_stopped=True)
                return

    def _arm_backstop(self, deadline: float, now: float) -> None:
        """faulthandler's own thread (it needs no GIL) ends this process BACKSTOP_SECONDS past the deadline if this
        watchdog could not; re-armed only when the deadline moved a good deal, as each arming starts a thread."""
        if self._backstop and (self._armed is None or not 0 <= deadline - self._armed <= BACKSTOP_SECONDS / 2):
            faulthandler.dump_traceback_later(max(0.0, deadline - now) + BACKSTOP_SECONDS, exit=True, file=STDERR_FD)
            self._armed = deadline

    def _publish(self, snapshot: Snapshot, now: float, deadline: float) -> None:
        self._own = {"rank": self.rank, "pid": os.getpid(), "phase": snapshot.phase, "detail": snapshot.detail,
                     "step": snapshot.step, "moved_at": snapshot.moved_at, "beat": now, "deadline": deadline}
        if self.folder is not None:
            record(progress_file(self.rank), json.dumps(self._own), self.folder)

    def _records(self) -> list[dict]:
        found = recorded_progress(self.folder) if self.folder is not None else []
        return [r for r in found if r["rank"] != self.rank] + [self._own]

    def _recorded(self) -> Verdict | None:
        values = recorded_json(STALL_FILE, self.folder) if self.folder is not None else None
        return Verdict.from_json(values) if values else None

    def _stall_words(self, now: float) -> tuple[dict, str]:
        """The stalled rank's record and the words naming it, with what the other ranks were doing."""
        records = self._records()
        culprit = stalled_rank(records, now)
        words = stall_words(culprit, now - culprit["moved_at"], frozen_how(culprit, now))
        words += others_words(culprit, records)
        # On several machines a wait in any phase (a save gathers from every rank) may be for a process elsewhere.
        if self.world_size > len(records):
            words += f" ({self.world_size - len(records)} other processes are not visible from here: look at theirs)"
        return culprit, words

    def _stall_verdict(self, now: float) -> Verdict:
        culprit, words = self._stall_words(now)
        return Verdict(EXIT_RESTART, stall_line(words), culprit["phase"])

    def _signal_verdict(self, snapshot: Snapshot, now: float) -> Verdict | None:
        """A signal's grace period bounds the run's end: stuck since the signal, it ends SIGNAL_RESERVE_SECONDS before
        the grace period does (nothing can be saved); still busy at its end, it ends then."""
        name, grace = self.preemption.signal_name or "a signal", self.limits.grace_seconds
        age = now - self.preemption.received_at
        stuck = snapshot.moved_at <= self.preemption.received_at
        if age < grace - SIGNAL_RESERVE_SECONDS or (not stuck and age < grace + SIGNAL_RESERVE_SECONDS):
            return None  # busy: its own waits are bounded by the grace period, and they speak first
        again = f"exit {EXIT_PREEMPTED}: run the same command with --resume auto"
        where = f"{snapshot.phase} ({snapshot.detail})" if snapshot.detail else snapshot.phase
        if not snapshot.steps_done:
            return Verdict(EXIT_PREEMPTED, f"stopped by {name} during start-up ({where}, {age:.0f} s after the "
                           f"signal); nothing new to save; {again}", snapshot.phase)
        if stuck:
            culprit, words = self._stall_words(now)
            return Verdict(EXIT_PREEMPTED, stalled_signal_line(name, age, words, grace), culprit["phase"])
        return Verdict(EXIT_PREEMPTED, f"{name} received {age:.0f} s ago and rank {self.rank} is still in {where} at "
                       f"the end of the grace period (--preemption-grace-seconds {grace:g}); ending now; the last "
                       f"complete checkpoint is kept; {again}", snapshot.phase)

    def _write_stacks(self, verdict: Verdict) -> Path | None:
        """Every thread's Python stack to stderr and, once the run has a log folder, to stacks-rankN.txt in it."""
        names = ", ".join(f"0x{thread.ident:016x} {thread.name}" for thread in threading.enumerate())
        header = (f"Python stacks of rank {self.rank} (pid {os.getpid()}), every thread, as the run ends "
                  f"({datetime.now():%Y-%m-%d %H:%M:%S}); threads: {names}\n")
        os.write(2, header.encode())
        faulthandler.dump_traceback(file=STDERR_FD, all_threads=True)
        if self._stacks_dir is None:
            return None
        path = self._stacks_dir / f"stacks-rank{self.rank}.txt"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as out:
                out.write(f"{header}{verdict.line}\n")
                out.flush()
                faulthandler.dump_traceback(file=out.fileno(), all_threads=True)
        except OSError as error:
            os.write(2, f"could not write {path}: {error}\n".encode())
            return None
        return path

    def _copy_bounded(self, stacks: Path, verdict: Verdict) -> None:
        """To the bucket's log folder on a thread of its own: a slow bucket costs at most STACKS_UPLOAD_SECONDS
        (less of a signal's grace period), and the process ends whatever it does."""
        seconds = STACKS_UPLOAD_SECONDS
        if verdict.code == EXIT_PREEMPTED:
            left = self.preemption.grace_left(self.limits.grace_seconds)
            seconds = min(seconds, max(0.0, left - SIGNAL_RESERVE_SECONDS / 2))

        def copy() -> None:
            try:
                self._copy_stacks(stacks)
            except Exception as error:  # noqa: BLE001 - the stacks are in the log already
                os.write(2, f"could not copy {stacks.name} to the bucket: {error}\n".encode())

        copier = threading.Thread(target=copy, name="stacks-copy", daemon=True)
        copier.start()
        copier.join(seconds)

    def _say(self, line: str) -> None:
        """os.write, not logging: the main thread may be stuck holding a handler's lock. The same shape as train.py's
        log lines."""
        prefix = "" if self.rank == 0 else f"rank{self.rank} "
        os.write(2, f"{datetime.now():%H:%M:%S} {prefix}ERROR {line}\n".encode())
