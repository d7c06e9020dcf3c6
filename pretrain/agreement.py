"""What every process agrees on after each optimizer step (preempted, a save due, a failed write, non-finite steps),
exchanged in one small collective and read one step late, so the host never waits for the accelerator to drain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Signals:
    """The agreed values: any process's flag counts for all, so every rank takes the same branch."""

    preempted: bool = False
    save_due: bool = False
    write_failed: bool = False
    consecutive_nonfinite: int = 0


class Agreement:
    """One MAX all-reduce of a few numbers per step. On CUDA the result is copied to pinned host memory behind an
    event and read at the next step, when that event has long completed: reading it costs no drain of the queue.
    The price is one step of latency for a preemption or a time-based save, the same on every device.
    """

    def __init__(self, device: torch.device, num_processes: int) -> None:
        self.device = device
        self.distributed = num_processes > 1
        cuda = device.type == "cuda"
        self._host_in = torch.zeros(3, dtype=torch.int64, pin_memory=cuda)
        self._host_out = torch.zeros(4, dtype=torch.int64, pin_memory=cuda)
        self._ready: torch.cuda.Event | None = None
        self._pending = False

    def exchange(self, preempted: bool, save_due: bool, write_failed: bool,
                 consecutive_nonfinite: torch.Tensor) -> Signals:
        """Posts this step's local values and returns what all processes posted at the previous step."""
        previous = self._read()
        self._host_in[0], self._host_in[1], self._host_in[2] = int(preempted), int(save_due), int(write_failed)
        flags = self._host_in.to(self.device, non_blocking=True)
        values = torch.cat([flags, consecutive_nonfinite.reshape(1).to(torch.int64)])
        if self.distributed:
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        self._host_out.copy_(values, non_blocking=True)
        if self.device.type == "cuda":
            self._ready = torch.cuda.Event()
            self._ready.record()
        self._pending = True
        return previous

    def flush(self) -> Signals:
        """The values of the last exchange, now (at the end of training, or before a save that must know them)."""
        return self._read()

    def _read(self) -> Signals:
        if not self._pending:
            return Signals()
        if self._ready is not None:
            self._ready.synchronize()  # completed a step ago: returns at once
        self._pending = False
        preempted, save_due, write_failed, nonfinite = (int(v) for v in self._host_out.tolist())
        return Signals(bool(preempted), bool(save_due), bool(write_failed), nonfinite)
