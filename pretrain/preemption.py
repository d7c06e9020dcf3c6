"""SIGTERM/SIGINT handling: the handler only sets a flag; the loop acts on it at the next step boundary."""

from __future__ import annotations

import os
import signal
import threading
import time

from pretrain.protocol import EXIT_INTERRUPTED


class Preempted(Exception):
    """Raised once the run has stopped for a signal (after its emergency checkpoint, if it had trained at all)."""


class PreemptionFlag:
    def __init__(self, exit_code_file: str | None = None) -> None:
        self._exit_code_file = exit_code_file  # where the launcher reads our exit code (accelerate launch masks it)
        self._event = threading.Event()
        self.signal_name = ""
        self.received_at = 0.0  # time.monotonic() of the first signal: the grace period counts from here

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
        return self._event.is_set()

    def grace_left(self, grace_seconds: float) -> float:
        return max(0.0, grace_seconds - (time.monotonic() - self.received_at))
