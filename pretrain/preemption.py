"""SIGTERM/SIGINT handling: the handler only sets a flag; the loop acts on it at the next step boundary."""

from __future__ import annotations

import os
import signal
import sys
import threading

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", i.e. resume with --resume latest


class PreemptionFlag:
    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name = ""

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self._event.is_set() and signum == signal.SIGINT:
            # A second Ctrl-C means "now": exit without touching checkpoints (the last good one stays valid).
            sys.stderr.write("second interrupt: exiting at once; the last complete checkpoint is kept\n")
            os._exit(130)
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()
