"""Loss spikes: a step whose loss (or gradient norm) is far above a running window of the steps before it, detected on
the values every process agreed on one step late (no host sync), and the policy for one: warn, skip its update, or
roll back to the last checkpoint from before it and skip the samples that led to it."""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from configs import TrainingConfig
from pretrain.agreement import Signals
from pretrain.checkpoint.train_state import TrainState

log = logging.getLogger(__name__)

# The spread a window is judged by is at least this share of its mean: a loss that has sat still for a while (a
# tiny standard deviation) is not called a spike for moving by a few per cent.
MIN_RELATIVE_SPREAD = 0.01


class TooManySpikes(Exception):
    """Rollbacks did not help: the run stops with the non-finite exit code, keeping its checkpoints."""


@dataclass(frozen=True)
class Limits:
    """Above either, a step is a spike; infinite while the window fills up, or for a test that is off."""

    loss: float = math.inf
    grad_norm: float = math.inf

    def exceeded_by(self, loss: float, grad_norm: float) -> bool:
        return loss > self.loss or grad_norm > self.grad_norm

    @property
    def active(self) -> bool:
        return math.isfinite(self.loss) or math.isfinite(self.grad_norm)


@dataclass(frozen=True)
class Spike:
    step: int
    loss: float
    grad_norm: float
    limits: Limits

    def describe(self) -> str:
        parts = []
        if self.loss > self.limits.loss:
            parts.append(f"loss {self.loss:.4f} above the window's limit {self.limits.loss:.4f}")
        if self.grad_norm > self.limits.grad_norm:
            parts.append(f"gradient norm {self.grad_norm:.3f} above the limit {self.limits.grad_norm:.3f}")
        return f"loss spike at step {self.step}: {' and '.join(parts) or 'skipped on the device'}"


def window_limits(window: Sequence[Sequence[float]], size: int, loss_sigmas: float, grad_sigmas: float,
                  before_step: int) -> Limits:
    """The limits for a step from the newest `size` kept steps before `before_step` ([step, loss, grad norm] each):
    mean + sigmas x spread, where spread is the standard deviation, at least MIN_RELATIVE_SPREAD of the mean."""
    entries = [entry for entry in window if entry[0] < before_step][-size:]
    if len(entries) < size:
        return Limits()

    def limit(values: list[float], sigmas: float) -> float:
        if sigmas <= 0:
            return math.inf
        mean = statistics.fmean(values)
        return mean + sigmas * max(statistics.pstdev(values, mean), MIN_RELATIVE_SPREAD * abs(mean))

    return Limits(limit([e[1] for e in entries], loss_sigmas), limit([e[2] for e in entries], grad_sigmas))


def unskipped(position: int, windows: Sequence[Sequence[int]]) -> int:
    """The first global sample at or after `position` outside every skipped [start, end) window."""
    moved = True
    while moved:
        moved = False
        for start, end in windows:
            if start <= position < end:
                position, moved = end, True
    return position


def lr_scale(step: int, rollbacks: Sequence[dict], factor: float, steps: int) -> float:
    """The factor on the scheduled rate at optimizer step `step`: `factor` for `steps` steps after each restored
    checkpoint, else 1 (a pure function of the run's rollback records, so a resumed run lowers it the same)."""
    if factor == 1.0 or steps <= 0:
        return 1.0
    lowered = any(r["restored_step"] < step <= r["restored_step"] + steps for r in rollbacks)
    return factor if lowered else 1.0


class SpikeGuard:
    """Folds each agreed step into the running window kept in TrainState, and applies --on-loss-spike.

    warn: the spike is logged, counted and kept in the window (so a lasting change of level stops warning);
    skip: the update was not applied on the device (see `device_limits`); the step stays out of the window;
    rollback: the spike is held for the loop (`take_rollback`), which restores the last checkpoint from before it.
    """

    def __init__(self, config: TrainingConfig, state: TrainState, say: Callable[[str], None]) -> None:
        self.config = config
        self.policy = config.on_loss_spike
        self.say = say
        self._seen_step = state.step  # the state's window already holds every step up to here
        self._rollback: Spike | None = None
        self._step_starts: deque[tuple[int, int]] = deque(maxlen=config.loss_spike_skip_steps + 2)

    def limits(self, state: TrainState, before_step: int) -> Limits:
        c = self.config
        return window_limits(state.spike_window, c.loss_spike_window, c.loss_spike_sigmas, c.grad_spike_sigmas,
                             before_step)

    def device_limits(self, state: TrainState, step: int) -> Limits | None:
        """--on-loss-spike skip: the limits optimizer step `step` is checked against on the device before its update:
        from the kept steps before step - 1, the window the host always has when the step starts (so the verdict does
        not depend on the save schedule). The host then takes the device's verdict (Signals.spike_skipped)."""
        return self.limits(state, step - 1) if self.policy == "skip" else None

    def note_step_start(self, step: int, first_sample: int) -> None:
        """Where each recent step's samples begin: what a rollback skips is counted in samples."""
        self._step_starts.append((step, first_sample))

    def observe(self, signals: Signals, state: TrainState) -> None:
        """One agreed step (or the same one again: it is folded in once)."""
        if signals.step <= self._seen_step:
            return
        self._seen_step = signals.step
        if not (math.isfinite(signals.loss) and math.isfinite(signals.grad_norm)):
            return  # a non-finite step: skipped and counted by the non-finite guard, never part of the window
        limits = self.limits(state, signals.step)
        spiked = signals.spike_skipped if self.policy == "skip" else limits.exceeded_by(signals.loss, signals.grad_norm)
        if spiked:
            state.loss_spikes += 1
            spike = Spike(signals.step, signals.loss, signals.grad_norm, limits)
            if self.policy == "rollback":
                self._rollback = self._rollback or spike
                return
            self.say(f"{spike.describe()}; --on-loss-spike {self.policy}: "
                     f"{'its update was skipped' if self.policy == 'skip' else 'training on'}")
            if self.policy == "skip":
                return
        state.spike_window.append([signals.step, signals.loss, signals.grad_norm])
        del state.spike_window[: -(self.config.loss_spike_window + 1)]  # one more: the newest may be excluded

    def take_rollback(self) -> Spike | None:
        """A spike the loop must roll back for now, once."""
        spike, self._rollback = self._rollback, None
        return spike

    def check_budget(self, spike: Spike, state: TrainState) -> None:
        c = self.config
        recent = [r for r in state.rollbacks if r["spike_step"] > spike.step - c.rollback_window_steps]
        if len(recent) >= c.max_rollbacks:
            raise TooManySpikes(
                f"{spike.describe()}, after {len(recent)} rollbacks within {c.rollback_window_steps} steps "
                f"(--max-rollbacks {c.max_rollbacks}); stopping. The checkpoints are kept: lower --learning-rate, "
                "check the data near these steps, or raise --loss-spike-skip-steps, then --resume auto"
            )

    def record_rollback(self, spike: Spike, state: TrainState, restored_step: int, restored_name: str,
                        step_samples: int) -> list[int] | None:
        """Records the rollback in the run's state (what is skipped, so a resumed run skips it too); returns the
        skipped [start, end) window of global samples: the samples of loss_spike_skip_steps steps ending with the
        spike's, as far back as this process saw steps start (never before the restored checkpoint)."""
        first_step = max(spike.step - self.config.loss_spike_skip_steps + 1, restored_step + 1)
        starts = dict(self._step_starts)
        known = [step for step in starts if first_step <= step <= spike.step]
        window = [starts[min(known)], starts[spike.step] + step_samples] if spike.step in starts else None
        if window is not None:
            state.skipped_samples.append(window)
        state.rollbacks.append({"spike_step": spike.step, "restored_step": restored_step, "restored": restored_name,
                                "loss": spike.loss, "grad_norm": spike.grad_norm, "skipped": window,
                                "unix": time.time()})
        state.lost_time.rollbacks += 1
        self._seen_step = restored_step
        self._step_starts.clear()
        return window

    def lr_scale(self, state: TrainState, step: int) -> float:
        return lr_scale(step, state.rollbacks, self.config.loss_spike_lr_factor, self.config.loss_spike_lr_steps)
