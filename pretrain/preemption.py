"""SIGTERM/SIGINT handling: the handler only sets a flag; the loop acts on it at the next step boundary."""

from __future__ import annotations

import os
import signal
import threading
import time

from pretrain.protocol import EXIT_INTERRUPTED


class Preempted(Exception):
    """Raised once the run has stopped for a signal (after its emergency checkpoint, if it had trained at all).
    `signalled`: (rank, signal name) of every process that got one, so a process that got none can say why."""

    def __init__(self, signal_name: str, signalled: list[tuple[int, str]] | None = None) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.signalled = signalled or []


class PreemptionFlag:
    def __init__(self, exit_code_file: str | None = None) -> None:
        self._exit_code_file = exit_code_file  # where the launcher reads our exit code (accelerate launch masks it)
        self._event = threading.Event()
        self.signal_name = ""
        self.received_at = 0.0  # time.monotonic() of the first signal: the grace period counts from here
        self.agreed = False  # the processes agreed to stop: this one, or another (on another machine) got a signal

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self._event.is_set() and signum == signal.SIGINT:
            # A second Ctrl-C means "now": exit without touching checkpoints (the last good one stays valid).
            os.write(2, b"second interrupt: exiting at once; the last complete checkpoint is kept\n")
            if self._exit_code_file:
                fd = os.open(self._exit_code_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.write(fd, str(EXIT_INTERRUPTED).encode())
                os.close(fd)
            os._exit(EXIT_INTERRUPTED)
        self.signal_name = signal.Signals(signum).name
        self.received_at = time.monotonic()
        self._event.set()
        # os.write, not print or logging: the handler may interrupt a write to the same stream.
        os.write(2, f"{self.signal_name} received: finishing this step, then writing an emergency checkpoint "
                    f"(Ctrl-C again to exit at once)\n".encode())

    @property
    def requested(self) -> bool:
        """A signal reached this process."""
        return self._event.is_set()

    @property
    def received(self) -> str:
        """The name of the signal that reached this process ('' while none did), for the others to read."""
        return (self.signal_name or "a signal") if self.requested else ""

    def agree(self) -> None:
        """The processes agreed to stop. One that got no signal itself (its machine was not the one preempted) counts
        the grace period from now, at most a step after the signal: the preempted machine waits for what this one
        still has to do (rank 0's upload) only as long as its own grace period lasts."""
        if not self.agreed and not self.requested:
            self.received_at = time.monotonic()
        self.agreed = True

    def grace_left(self, grace_seconds: float) -> float:
        return max(0.0, grace_seconds - (time.monotonic() - self.received_at))
