"""One background thread that runs jobs one at a time, keeps their failures for the caller, and never hangs a waiter.

Used twice by the checkpointer: to write snapshots to disk and to upload complete folders.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Job:
    name: str  # what the job is about (a checkpoint name), for logs and for `protected`
    run: Callable[[], None]


class Worker:
    """At most one job running and one pending.

    `submit(job, replace=False)` waits (bounded) until nothing is pending, so memory holds at most one queued
    snapshot; `replace=True` swaps a newer job for a pending one instead (uploads: only the newest matters).
    Any exception a job raises is kept and handed over by `take_failures`; the thread itself survives it.
    """

    def __init__(self, name: str) -> None:
        self._condition = threading.Condition()
        self._pending: Job | None = None
        self._running: Job | None = None
        self._failures: list[tuple[str, BaseException]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job, replace: bool = False, timeout_seconds: float | None = None) -> Job | None:
        """Queues `job`; returns a pending job it replaced (replace=True). Raises TimeoutError if the queue stayed full."""
        with self._condition:
            if not replace and not self._wait_until(lambda: self._pending is None, timeout_seconds):
                raise TimeoutError(f"{self._thread.name}: {self._running.name if self._running else 'a job'} "
                                   f"still running after {timeout_seconds:.0f} s")
            dropped, self._pending = self._pending, job
            self._condition.notify_all()
            return dropped

    def wait_idle(self, timeout_seconds: float | None = None) -> bool:
        """True once nothing is running or pending; False at the timeout or if the thread is gone."""
        with self._condition:
            return self._wait_until(lambda: self._pending is None and self._running is None, timeout_seconds)

    def busy_with(self) -> list[str]:
        with self._condition:
            return [job.name for job in (self._running, self._pending) if job is not None]

    def take_failures(self) -> list[tuple[str, BaseException]]:
        with self._condition:
            failures, self._failures = self._failures, []
            return failures

    def has_failed(self) -> bool:
        with self._condition:
            return bool(self._failures)

    def close(self, timeout_seconds: float = 5.0) -> None:
        """Stops after the running job; a pending one is dropped."""
        with self._condition:
            self._stopping = True
            self._pending = None
            self._condition.notify_all()
        self._thread.join(timeout=timeout_seconds)

    def _wait_until(self, done: Callable[[], bool], timeout_seconds: float | None) -> bool:
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        while not done():
            if not self._thread.is_alive():
                return False
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            # Woken by every state change; the periodic wake-up notices a thread that died without notifying.
            self._condition.wait(timeout=1.0 if left is None else min(left, 1.0))
        return True

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and self._pending is None:
                    self._condition.wait()
                if self._stopping:
                    return
                self._running, self._pending = self._pending, None
                job = self._running
            try:
                job.run()
            except BaseException as error:  # noqa: BLE001 - any failure, even a RuntimeError from torch.save, is kept
                with self._condition:
                    self._failures.append((job.name, error))
            finally:
                with self._condition:
                    self._running = None
                    self._condition.notify_all()
