"""The launcher process (`python -m pretrain.launch`, which start_training.sh execs): starts the planning-and-accelerate
child in a session of its own, passes SIGTERM/SIGINT to the training processes, ends a stalled run whose ranks cannot
end it themselves, signals no pid that is not this run's, leaves nothing behind and exits with the code of its
machine's first rank (rank 0's on machine 0). It imports no torch: the child does, once."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pretrain.protocol import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    EXIT_RESTART,
    EXIT_UNEXPECTED,
    LAUNCH_DIR_ENV,
    LIMITS_FILE,
    LOCAL_RANKS_FILE,
    QUIET_AGENT_ENV,
    STALL_FILE,
    others_words,
    process_state,
    record_first,
    recorded_exit_code,
    recorded_int,
    recorded_json,
    recorded_pids,
    recorded_progress,
    stall_words,
)
from pretrain.watchdog import (
    SIGNAL_RESERVE_SECONDS,
    Verdict,
    frozen_how,
    is_frozen,
    stall_line,
    stalled_signal_line,
)

ORPHAN_GRACE_SECONDS = 90.0  # above the default preemption grace (25 s) plus a step and a save
RANK_POLL_SECONDS = 0.2  # once a signal came: how often to look for ranks that started after it
KILLED_EXIT_SECONDS = 10.0  # how long a SIGKILLed process may take to be gone before the launcher ends anyway
WATCH_POLL_SECONDS = 1.0  # how often the launcher looks at the ranks' progress (pretrain.watchdog publishes it)
# After a stall's verdict the ranks end themselves (stacks, line, exit) in a second or two; one still running after
# this long is asked for its stacks (SIGUSR1, written by faulthandler even when its Python cannot run) and killed.
STALL_END_SECONDS = 30.0
STACKS_WAIT_SECONDS = 1.0  # between that SIGUSR1 and the SIGKILL


def say(message: str) -> None:
    print(f"start_training.sh: {message}", file=sys.stderr, flush=True)


def start_ticks(pid: int) -> int:
    """When the process started, in clock ticks since boot (field 22 of /proc/PID/stat, after the command name)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return int(stat.read().rsplit(b")", 1)[1].split()[19])


def open_if_ours(pid: int, marker: bytes, since: int) -> int | None:
    """A pidfd for `pid` if it is a process of this run, else None: its environment holds `marker` (the launch
    folder), and it started no earlier than `since` (the launcher's start_ticks), so no process that was there before
    the launcher is ever taken for one of its own. Both are read after the pidfd is open, so the fd is the process
    that was checked, or one already gone, which no signal through it reaches: a reused pid is never signalled."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone, or not a pid at all
        return None
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            if marker in environ.read().split(b"\0") and start_ticks(pid) >= since:
                return fd
    except (OSError, ValueError, IndexError):
        pass  # another user's process, or it exited while we looked
    os.close(fd)
    return None


def exited(fd: int) -> bool:
    """A pidfd turns readable when its process has exited (a zombie included: it can hold nothing any more)."""
    return bool(select.select([fd], [], [], 0)[0])


def send(fd: int, signum: int) -> None:
    try:
        signal.pidfd_send_signal(fd, signum)
    except ProcessLookupError:
        pass  # exited since we looked


class Supervisor:
    """One launch: the launch folder the training processes write their pids and exit code into, the child that plans
    and runs accelerate, and the signals received so far."""

    def __init__(self) -> None:
        self.signals: list[signal.Signals] = []  # every SIGTERM/SIGINT received, in order
        self._wake_read, wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(wake_write, False)
        self._wake_write = wake_write
        # A handler only records; the wakeup fd ends the wait in run() at once. Python can install a handler also
        # for a SIGINT ignored at entry (a background job of a script), which bash could not.
        self._previous = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
        self._previous_wakeup = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        self.folder = Path(tempfile.mkdtemp(prefix="pretrain-launch-"))
        self.marker = f"{LAUNCH_DIR_ENV}={self.folder}".encode()
        self.started = start_ticks(os.getpid())
        self.child: subprocess.Popen | None = None
        self.ranks: dict[int, int] = {}  # pid -> pidfd: the ranks that recorded their pid and are ours
        self.strangers: set[int] = set()  # recorded pids that are not ours (reused, or not a pid at all)
        self.told: dict[int, int] = {}  # pid -> how many signals it has been sent
        self._acted_on = 0  # how many of self.signals run() has answered
        self.forwarded_at: float | None = None  # time.monotonic() when a signal first went to the ranks
        self.launch_began: float | None = None  # when accelerate launch began (the local ranks file appeared)
        self.stall: Verdict | None = None  # the stall the run ends with (a rank's verdict, or the launcher's own)
        self.stall_seen_at = 0.0
        self.stacks_asked_at: float | None = None  # the SIGUSR1 to ranks still running long after the stall
        self.killed = False  # ranks were killed after a stall: the launcher repeats its line last

    def _on_signal(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.signals.append(signal.Signals(signum))

    def run(self, child_command: list[str]) -> int:
        """Starts the child and waits for it and its training processes; the exit code for the user."""
        if self.signals:
            say(f"stopped by {self.signals[-1].name} before the training started; nothing has changed")
            return EXIT_PREEMPTED
        # Its own session, so a terminal's Ctrl-C reaches only this process, which passes it to the training
        # processes (not to accelerate or torchrun, which would stop them before their emergency checkpoint).
        env = {**os.environ, LAUNCH_DIR_ENV: str(self.folder)}
        if "TORCH_CPP_LOG_LEVEL" not in env:
            # torch reads it once, at import: the child (torchrun's agent) is quiet, its training processes are not.
            env.update({"TORCH_CPP_LOG_LEVEL": "FATAL", QUIET_AGENT_ENV: "1"})
        self.child = subprocess.Popen(child_command, env=env, start_new_session=True)
        child_fd = os.pidfd_open(self.child.pid)
        try:
            while not exited(child_fd):
                self._wait([child_fd], RANK_POLL_SECONDS if self.signals else WATCH_POLL_SECONDS)
                if len(self.signals) > self._acted_on:
                    code = self._answer_signals()
                    if code is not None:
                        return code
                self._deliver()
                code = self._watch()
                if code is not None:
                    return code
        finally:
            os.close(child_fd)
        status = self.child.wait()
        return self._after_the_child(status)

    def _wait(self, fds: list[int], timeout: float | None) -> None:
        """Until a signal comes, one of `fds` turns readable or `timeout` passes."""
        select.select([self._wake_read, *fds], [], [], timeout)
        try:
            while os.read(self._wake_read, 512):
                pass
        except BlockingIOError:
            pass

    def _answer_signals(self) -> int | None:
        """An exit code when the signal ends the launch here, else None: it goes to the ranks (now or once ready)."""
        self._acted_on = len(self.signals)
        latest = self.signals[-1]
        if recorded_int(LOCAL_RANKS_FILE, self.folder) is None:
            if self.child.poll() is not None:
                return None  # done already (a dry run, a bad flag): its own code stands
            # Still planning: nothing was started that could need a checkpoint.
            self.child.kill()  # not yet reaped, so its pid is still its own
            self.child.wait()
            say(f"stopped by {latest.name} before the training started; nothing has changed")
            return EXIT_PREEMPTED
        if self.told or self._all_ready():
            return None  # _deliver passes it on now
        if latest == signal.SIGINT and signal.SIGINT in self.signals[:-1]:
            say("second SIGINT before the training processes were ready: stopping them at once")
            return EXIT_INTERRUPTED  # clean_up kills what started
        say(f"{latest.name} received while starting up; the training processes get it as soon as they are ready")
        return None

    def _live_ranks(self) -> dict[int, int]:
        """pid -> pidfd of each rank that recorded its pid (so its signal handler is installed), is ours and runs."""
        for pid in recorded_pids(self.folder):
            if pid not in self.ranks and pid not in self.strangers:
                fd = open_if_ours(pid, self.marker, self.started)
                if fd is None:
                    self.strangers.add(pid)
                else:
                    self.ranks[pid] = fd
        return {pid: fd for pid, fd in self.ranks.items() if not exited(fd)}

    def _all_ready(self) -> bool:
        """Every local rank has recorded its pid: a signal from start-up reaches them all at once."""
        expected = recorded_int(LOCAL_RANKS_FILE, self.folder)
        self._live_ranks()
        return expected is not None and len(self.ranks) >= expected

    def _deliver(self) -> None:
        """The latest signal to every rank that has not had as many as came; runs until the launcher ends, so a rank
        that starts after the signal gets it too."""
        if not self.signals or not (self.told or self._all_ready()):
            return
        fresh = {pid: fd for pid, fd in self._live_ranks().items() if self.told.get(pid, 0) < len(self.signals)}
        if not fresh:
            return
        latest = self.signals[-1]
        self.forwarded_at = self.forwarded_at or time.monotonic()
        say(f"forwarding {latest.name} to training processes {' '.join(map(str, fresh))}")
        for pid, fd in fresh.items():
            self.told[pid] = len(self.signals)
            send(fd, latest)

    def _after_the_child(self, status: int) -> int:
        """accelerate waits for its ranks, so they outlive it only when it was killed: they stop as if preempted,
        within ORPHAN_GRACE_SECONDS, and clean_up kills what is still there."""
        shell_status = status if status >= 0 else 128 - status
        strays = self._live_ranks()
        if strays:
            say(f"the launcher ended (status {shell_status}) before training processes "
                f"{' '.join(map(str, strays))}; stopping them")
            for fd in strays.values():
                send(fd, signal.SIGTERM)
            deadline = time.monotonic() + ORPHAN_GRACE_SECONDS
            while self._live_ranks() and time.monotonic() < deadline:
                self._wait([], RANK_POLL_SECONDS)  # a signal meanwhile (a second Ctrl-C) still reaches them
                self._deliver()
        recorded = recorded_exit_code(self.folder)
        if recorded is not None:
            return recorded
        stall = self.stall or self._recorded_stall()
        if stall is not None:
            if self.killed:  # the ranks' own lines are above the launcher's since
                print(f"error: {stall.line}", file=sys.stderr, flush=True)
            return stall.code
        if status < 0:
            print(f"error: the launcher (accelerate) was killed by signal {-status} before the training reported how "
                  "it ended; run the same command with --resume auto", file=sys.stderr, flush=True)
            return EXIT_UNEXPECTED
        return status

    def _watch(self) -> int | None:
        """The launcher's part of the stall watchdog (pretrain.watchdog is the ranks'): once a rank has recorded a
        stall, or a rank that cannot record one (stopped, its Python not running) is past its deadline, or no rank
        started within the start-up allowance, it sees that every rank ends. An exit code when the launch ends here."""
        now = time.monotonic()
        if self.launch_began is None and recorded_int(LOCAL_RANKS_FILE, self.folder) is not None:
            self.launch_began = now
        if self.stall is None:
            self.stall = self._recorded_stall() or self._stall_seen(now)
            if self.stall is None:
                return None
            self.stall_seen_at = now
            if not recorded_pids(self.folder):  # nothing started: nothing to wait for
                print(f"error: {self.stall.line}", file=sys.stderr, flush=True)
                self.child.kill()  # not yet reaped, so its pid is still its own
                self.child.wait()
                return self.stall.code
            for pid, fd in self._live_ranks().items():
                if process_state(pid) in ("T", "t"):
                    say(f"continuing training process {pid} (stopped) so that it writes its stacks and ends")
                    send(fd, signal.SIGCONT)
        self._end_stalled_ranks(now)
        return None

    def _recorded_stall(self) -> Verdict | None:
        values = recorded_json(STALL_FILE, self.folder)
        return Verdict.from_json(values) if values else None

    def _stall_seen(self, now: float) -> Verdict | None:
        """A stall only the launcher can see, recorded (unless a rank just recorded one) for every rank to end with."""
        try:
            startup, grace = (float(value) for value in (self.folder / LIMITS_FILE).read_text().split())
        except (OSError, ValueError):  # not recorded (yet): a child of another shape, or still planning
            startup = grace = None
        verdict = None
        if startup is not None and self.launch_began is not None and not recorded_pids(self.folder) \
                and now - self.launch_began > startup:
            verdict = Verdict(EXIT_RESTART, f"no training process started within {startup:.0f} s of the launch "
                              "(--startup-timeout-minutes): the launch is waiting for machines that have not joined "
                              f"(--nodes, --main-address); exit {EXIT_RESTART}: run the same command again", "start-up")
        records = {record["pid"]: record for record in recorded_progress(self.folder)}
        for pid in self._live_ranks():
            record = records.get(pid)
            if verdict is not None or record is None or not is_frozen(record, now):
                continue
            words = stall_words(record, now - record["moved_at"], frozen_how(record, now))
            words += others_words(record, list(records.values()))
            if now >= record["deadline"]:
                verdict = Verdict(EXIT_RESTART, stall_line(words), record["phase"])
            elif grace is not None and self.forwarded_at is not None \
                    and now >= self.forwarded_at + grace - SIGNAL_RESERVE_SECONDS:
                verdict = Verdict(EXIT_PREEMPTED, stalled_signal_line(self.signals[-1].name, now - self.forwarded_at,
                                                                      words, grace), record["phase"])
        if verdict is None:
            return None
        won = record_first(STALL_FILE, verdict.to_json(), self.folder)
        return Verdict.from_json(json.loads(won)) if won else verdict

    def _end_stalled_ranks(self, now: float) -> None:
        """Ranks still running long after the stall's verdict write their stacks (faulthandler, on SIGUSR1) and are
        killed: accelerate would otherwise wait for them for the whole shutdown timeout."""
        live = self._live_ranks()
        if not live:
            return
        allowed = SIGNAL_RESERVE_SECONDS if self.stall.code == EXIT_PREEMPTED else STALL_END_SECONDS
        if self.stacks_asked_at is None and now - self.stall_seen_at > allowed:
            say(f"training processes {' '.join(map(str, live))} did not end after the stall; their Python stacks "
                "follow (SIGUSR1), then they are killed")
            for fd in live.values():
                send(fd, signal.SIGUSR1)
            self.stacks_asked_at = now
        elif self.stacks_asked_at is not None and now - self.stacks_asked_at >= STACKS_WAIT_SECONDS:
            for fd in live.values():
                send(fd, signal.SIGKILL)
            self.killed = True

    def _ours_still_running(self) -> dict[int, int]:
        """pid -> pidfd of every live process that carries this run's launch folder: the child, the ranks and
        whatever they started, found in /proc whether or not it recorded a pid."""
        found = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                fd = open_if_ours(int(entry.name), self.marker, self.started)
                if fd is not None:
                    found[int(entry.name)] = fd
        return found

    def clean_up(self) -> None:
        """Nothing of this run outlives it, and the folder the ranks write to goes only after they are gone."""
        strays = self._ours_still_running()
        if strays:
            say(f"training processes {' '.join(map(str, strays))} still running after the launcher ended; killing them")
            for fd in strays.values():
                send(fd, signal.SIGKILL)
            deadline = time.monotonic() + KILLED_EXIT_SECONDS
            while (dying := [fd for fd in strays.values() if not exited(fd)]) and time.monotonic() < deadline:
                select.select(dying, [], [], max(0.0, deadline - time.monotonic()))
        for fd in [*strays.values(), *self.ranks.values()]:
            os.close(fd)
        self.ranks.clear()
        if self.child is not None and self.child.poll() is None:
            self.child.kill()  # not yet reaped, so its pid is still its own
            self.child.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
        signal.set_wakeup_fd(self._previous_wakeup)
        for signum, handler in self._previous.items():
            if handler is not None:  # None: installed from C, which Python cannot restore
                signal.signal(signum, handler)
        os.close(self._wake_read)
        os.close(self._wake_write)


def supervise(child_command: list[str]) -> int:
    supervisor = Supervisor()
    try:
        return supervisor.run(child_command)
    finally:
        supervisor.clean_up()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return supervise([sys.executable, "-m", "pretrain.launch.command", *argv])
