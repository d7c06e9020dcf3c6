"""What this process is doing and when it last moved on (the phase it waits in, the step), reported by the loop and the
rooms in a few attribute writes and read by the stall watchdog (pretrain/watchdog.py). A leaf: every room may use it."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

START_UP = "start-up"  # the phase outside the others until this process's first step is done
STEP = "step"  # the phase outside the others after it: forward, backward, update, with the gradient all-reduce
DATA = "data"  # waiting for the next batch (a shard read, a fetch, a DataLoader worker)
COLLECTIVE = "collective"  # waiting for the other processes (the step boundary's agreement, rank 0's outcome)
SAVE = "save"  # a checkpoint's snapshot, or a wait for the previous one's write
UPLOAD = "upload"  # waiting for the bucket (its write check, the uploads at the end)
EVALUATION = "evaluation"
EXPORT = "export"
RECENT_STEPS = 100  # the step times the automatic stall timeout looks at


@dataclass(frozen=True)
class Snapshot:
    phase: str
    detail: str  # what the phase waits for, in words ("write check of s3://..."); may be empty
    step: int  # the last step this process finished
    steps_done: int  # steps finished by this process since it started (0: still starting up)
    moved_at: float  # clock() of the last progress: a phase entered or left, a step done, background work advanced
    slowest_step: float  # seconds, the slowest of the recent steps (0 before two steps)


class Progress:
    """Thread-safe: the main thread enters and leaves phases (nested; the innermost is reported), background threads
    report work done for a phase the main thread waits in (`advanced`), the watchdog reads a `snapshot`. Each call
    is a lock and a clock read: no device access, no host sync."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._stack: list[tuple[str, str]] = []
        self.restart()

    def restart(self) -> None:
        """Progress of a run that starts now; the phases entered stay (there are none at the start of a run)."""
        with self._lock:
            self._step = 0
            self._steps_done = 0
            self._moved_at = self._clock()
            self._step_ended_at: float | None = None
            self._step_seconds: deque[float] = deque(maxlen=RECENT_STEPS)

    @contextmanager
    def phase(self, name: str, detail: str = "") -> Iterator[None]:
        with self._lock:
            self._stack.append((name, detail))
            self._moved_at = self._clock()
        try:
            yield
        finally:
            with self._lock:
                self._stack.pop()
                self._moved_at = self._clock()

    def watch(self, iterator: Iterator, name: str = DATA) -> Iterator:
        """The items of `iterator`, each waited for in phase `name` (a loader's next batch)."""
        while True:
            with self.phase(name):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item

    def step_done(self, step: int) -> None:
        with self._lock:
            now = self._clock()
            if self._step_ended_at is not None:
                self._step_seconds.append(now - self._step_ended_at)
            self._step_ended_at = now
            self._step = step
            self._steps_done += 1
            self._moved_at = now

    def advanced(self, phase: str) -> None:
        """Background work (an upload's file) moved on; it counts as progress only while the main thread waits for
        it in `phase`, so a busy uploader never hides a main thread stuck elsewhere."""
        with self._lock:
            if self._stack and self._stack[-1][0] == phase:
                self._moved_at = self._clock()

    def snapshot(self) -> Snapshot:
        with self._lock:
            name, detail = self._stack[-1] if self._stack else (STEP if self._steps_done else START_UP, "")
            return Snapshot(name, detail, self._step, self._steps_done, self._moved_at,
                            max(self._step_seconds, default=0.0))


progress = Progress()  # this process's: the loop and the rooms report here, the watchdog reads it
