"""Where numbers go: console line, progress bar, TensorBoard, JSON lines and optional W&B; rank 0 writes.

The loss is reduced across processes only on logging steps: that reduction is a host sync, paid
once per `logging_steps`, not once per step. Tokens/s and MFU count training time only (saves and evaluations excluded).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThroughputModel:
    tokens_per_step: int
    flops_per_token: float
    peak_flops_total: float | None  # all processes together; None where the device's peak is unknown


class Metrics:
    """Accumulates per-step values on device and publishes them every `logging_steps`."""

    def __init__(
        self,
        run_dir: Path,
        is_main: bool,
        logging_steps: int,
        max_steps: int,
        start_step: int,
        throughput: ThroughputModel,
        wandb_settings: dict[str, Any] | None = None,
        history: list[dict[str, float]] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.is_main = is_main
        self.logging_steps = logging_steps
        self.max_steps = max_steps
        self.throughput = throughput
        # The run's logged points, kept in the checkpoint (the caller's list, appended to in place).
        self.history: list[dict[str, float]] = history if history is not None else []
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._window_start_time = time.perf_counter()
        self._window_start_step = start_step
        self._window_excluded = 0.0
        self._writer = None
        self._jsonl = None
        self._progress = None
        self._wandb = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides what a run that died wrote after the step this one starts from (its last checkpoint,
        # or 0 for a restart from scratch), so the curves continue cleanly.
        self._writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_step + 1)
        self._jsonl = _open_jsonl(run_dir / "metrics.jsonl")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._progress = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)
        if wandb_settings:
            self._wandb = _start_wandb(run_dir, **wandb_settings)

    def start_window(self, step: int) -> None:
        """Restarts the throughput clock (after set-up, and at each logging step)."""
        self._window_start_time = time.perf_counter()
        self._window_start_step = step
        self._window_excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """Time in the current window that was not training (an evaluation, a checkpoint save): tokens/s, MFU and
        the ETA are of the training steps alone, whichever steps a save or an evaluation fell on."""
        self._window_excluded += seconds

    def restart_at(self, step: int) -> None:
        """After a rollback: the losses summed since the last log line belong to abandoned steps."""
        self._loss_sum, self._loss_count = None, 0
        self.start_window(step)

    def end_step(self, step: int, loss_sum: torch.Tensor, micro_steps: int, accelerator) -> dict[str, float] | None:
        """Records one optimizer step; on logging steps reduces across processes and publishes. Returns what was logged."""
        self._loss_sum = loss_sum if self._loss_sum is None else self._loss_sum + loss_sum
        self._loss_count += micro_steps
        if self._progress is not None:
            self._progress.update(1)
        if step % self.logging_steps and step != self.max_steps:
            return None
        return self._publish(step, accelerator)

    def _publish(self, step: int, accelerator) -> dict[str, float]:
        mean_loss = accelerator.reduce(self._loss_sum / self._loss_count, reduction="mean")
        loss = mean_loss.item()  # host sync, once per logging window
        elapsed = time.perf_counter() - self._window_start_time - self._window_excluded
        steps = max(1, step - self._window_start_step)
        tokens_per_second = steps * self.throughput.tokens_per_step / max(elapsed, 1e-9)
        self._loss_sum, self._loss_count = None, 0
        self.start_window(step)
        values = {
            "train/loss": loss,
            "train/perplexity": math.exp(min(loss, 50.0)),
            "perf/tokens_per_second": tokens_per_second,
            "perf/steps_per_second": steps / max(elapsed, 1e-9),
        }
        if self.throughput.peak_flops_total:
            values["perf/mfu"] = tokens_per_second * self.throughput.flops_per_token / self.throughput.peak_flops_total
        values["time/eta_seconds"] = (self.max_steps - step) * elapsed / steps
        peak = peak_memory(accelerator.device)
        if peak is not None:
            values[peak[0]] = peak[1]
        return values

    def publish(self, step: int, values: dict[str, float], console: bool = True) -> None:
        """Writes values everywhere (rank 0); other ranks return at once."""
        if not self.is_main:
            return
        self.history.append({"step": step, **{k: v for k, v in values.items() if k in ("train/loss", "train/lr", "eval/loss")}})
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if console:
            self.console(format_line(step, self.max_steps, values))

    def console(self, line: str) -> None:
        if not self.is_main:
            return
        if self._progress is not None:
            self._progress.write(line)
        else:
            print(line, flush=True)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()


def peak_memory(device: torch.device) -> tuple[str, float] | None:
    """This process's peak so far, in GiB: on a GPU the tensors allocated (torch.cuda.max_memory_allocated, what the
    memory plan's peak is without its overhead; no host sync), on a CPU the peak resident set (VmHWM, Linux)."""
    if device.type == "cuda":
        return "memory/peak_allocated_gib", torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return "memory/peak_rss_gib", int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    return None


def _open_jsonl(path: Path):
    """Appends; a run killed mid-write leaves a partial last line, which is ended here so records stay one per line."""
    ends_cleanly = True
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as existing:
            existing.seek(-1, os.SEEK_END)
            ends_cleanly = existing.read(1) == b"\n"
    handle = open(path, "a", buffering=1)
    if not ends_cleanly:
        handle.write("\n")
    return handle


def _start_wandb(run_dir: Path, project: str, run_id: str, name: str, mode: str, config: dict[str, Any]):
    try:
        import wandb
    except ImportError as error:
        raise ValueError("--wandb is on but wandb is not installed: pip install -r requirements-wandb.txt") from error
    # resume="allow" with the id kept in the checkpoint continues the same W&B run after a preemption.
    return wandb.init(project=project, id=run_id, name=name, resume="allow", mode=mode, dir=str(run_dir), config=config)


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_line(step: int, max_steps: int, values: dict[str, float]) -> str:
    parts = [f"step {step}/{max_steps}"]
    if "train/loss" in values:
        parts.append(f"loss {values['train/loss']:.4f}")
    if "eval/loss" in values:
        parts.append(f"eval loss {values['eval/loss']:.4f} ppl {values['eval/perplexity']:.2f}")
    if "train/lr" in values:
        parts.append(f"lr {values['train/lr']:.3e}")
    if "train/grad_norm" in values:
        parts.append(f"grad {values['train/grad_norm']:.3f}")
    if "perf/tokens_per_second" in values:
        parts.append(f"{values['perf/tokens_per_second']:,.0f} tok/s")
    if "perf/mfu" in values:
        parts.append(f"mfu {100 * values['perf/mfu']:.1f}%")
    if "time/elapsed_seconds" in values:
        parts.append(f"elapsed {format_duration(values['time/elapsed_seconds'])}")
    if "time/eta_seconds" in values:
        parts.append(f"eta {format_duration(values['time/eta_seconds'])}")
    return " | ".join(parts)
