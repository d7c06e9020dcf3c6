"""What every process agrees on after each optimizer step (preempted, a save due, a failed write, non-finite steps, the
step's loss and gradient norm), exchanged in one small collective and read one step late, so the host never waits for
the accelerator to drain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Signals:
    """The agreed values of one step: any process's flag counts for all, so every rank takes the same branch."""

    preempted: bool = False
    save_due: bool = False
    write_failed: bool = False
    consecutive_nonfinite: int = 0
    step: int = 0  # the optimizer step these values were posted after; 0: nothing was posted yet
    loss: float = math.nan  # that step's loss: the mean over its micro-batches and all processes
    grad_norm: float = math.nan  # the norm of all processes' gradients (the same on every rank)
    spike_skipped: bool = False  # --on-loss-spike skip: the update was not applied


class Agreement:
    """One SUM all-reduce of a few float64 numbers per step. On CUDA the result is copied to pinned host memory behind
    an event and read at the next step, when that event has long completed: reading it costs no drain of the queue.
    The price is one step of latency for a preemption, a time-based save or a loss spike, the same on every device.

    Flags are summed (any non-zero counts); the consecutive non-finite count, the gradient norm and the skip verdict
    are the same on every rank (they follow from the all-reduced gradients), so the sum divided by the process count
    is each of them exactly; the loss is each rank's mean, summed and divided: the mean over all processes.
    """

    def __init__(self, device: torch.device, num_processes: int) -> None:
        self.device = device
        self.num_processes = num_processes
        cuda = device.type == "cuda"
        self._host_in = torch.zeros(3, dtype=torch.float64, pin_memory=cuda)
        self._host_out = torch.zeros(7, dtype=torch.float64, pin_memory=cuda)
        self._ready: torch.cuda.Event | None = None
        self._pending_step = 0  # the step of values posted and not yet read; 0: none
        self._read_values = Signals()

    def exchange(self, step: int, preempted: bool, save_due: bool, write_failed: bool,
                 consecutive_nonfinite: torch.Tensor, loss: torch.Tensor, grad_norm: torch.Tensor,
                 spike_skipped: torch.Tensor) -> Signals:
        """Posts this step's local values and returns what all processes posted at the previous step."""
        previous = self._read()
        self._host_in[0], self._host_in[1], self._host_in[2] = float(preempted), float(save_due), float(write_failed)
        flags = self._host_in.to(self.device, non_blocking=True)
        measured = torch.stack([value.detach().reshape(()).to(torch.float64)
                                for value in (consecutive_nonfinite, loss, grad_norm, spike_skipped)])
        values = torch.cat([flags, measured])
        if self.num_processes > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        self._host_out.copy_(values, non_blocking=True)
        if self.device.type == "cuda":
            self._ready = torch.cuda.Event()
            self._ready.record()
        self._pending_step = step
        return previous

    def settle(self) -> Signals:
        """The values of the last exchange, now: a wait for the device, paid only where it is waited for anyway (before
        a save). The next exchange returns them again, so nothing is lost to the one-step-late protocol."""
        return self._read()

    def forget(self) -> None:
        """After a rollback: the last step's measurements belong to the abandoned steps; its flags still count."""
        read = self._read()
        self._read_values = Signals(read.preempted, read.save_due, read.write_failed)

    def _read(self) -> Signals:
        if not self._pending_step:
            return self._read_values
        if self._ready is not None:
            self._ready.synchronize()  # completed a step ago: returns at once
        n = self.num_processes
        preempted, save_due, write_failed, nonfinite, loss, grad_norm, skipped = self._host_out.tolist()
        self._read_values = Signals(preempted > 0, save_due > 0, write_failed > 0, round(nonfinite / n),
                                    self._pending_step, loss / n, grad_norm / n, skipped > 0)
        self._pending_step = 0
        return self._read_values
