"""The training position and run bookkeeping a checkpoint carries, as one typed, JSON-serialisable record."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pretrain.checkpoint.lost_time import LostTime

# Fields added since format 2 all have defaults, so checkpoints written before them still load as format 2.
STATE_FORMAT_VERSION = 2
# What a rollback restores from the checkpoint it goes back to; every other field is the run's own record and stays.
TIMELINE_FIELDS = ("step", "samples_consumed", "epoch", "scaler", "best_eval_loss", "nonfinite_steps", "spike_window",
                   "last_eval_step", "last_eval_loss", "evals_without_improvement")


class StateFormatError(ValueError):
    """A checkpoint's trainer_state.json is of a format this version cannot read."""


@dataclass
class TrainState:
    """Everything but tensors: where training is, what it trains on, and what it has seen so far.

    The sample order is a pure function of (seed, seq_len, data), so `samples_consumed` is the whole data position.
    """

    seed: int
    seq_len: int
    global_batch_samples: int
    num_processes: int
    data: dict[str, Any]  # the data room's frozen shard lists and order (FrozenShards.to_json()): opaque here
    run_name: str
    config: dict[str, Any]
    versions: dict[str, str]
    step: int = 0
    samples_consumed: int = 0
    epoch: int = 0
    scaler: dict[str, Any] | None = None  # torch GradScaler state (fp16 only)
    best_eval_loss: float = math.inf
    nonfinite_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # logged loss/lr/eval points, for plots after resume
    wandb_run_id: str | None = None
    elapsed_seconds: float = 0.0
    init_from: dict[str, Any] | None = None  # the Hugging Face folder a --init-from run started from
    branch: dict[str, Any] | None = None  # a cooldown branch's start: the main run's checkpoint, run name and step
    saved_unix: float = 0.0  # when the checkpoint holding this state was taken
    last_eval_step: int = -1  # the step of the latest evaluation, and its loss
    last_eval_loss: float | None = None
    evals_without_improvement: int = 0  # for --early-stop-patience
    spike_window: list[list[float]] = field(default_factory=list)  # [step, loss, grad norm] of recent kept steps
    loss_spikes: int = 0  # spikes detected over the whole run
    rollbacks: list[dict[str, Any]] = field(default_factory=list)  # spike_step, restored_step, skipped, unix
    skipped_samples: list[list[int]] = field(default_factory=list)  # [start, end) sample windows no step reads
    lost_time: LostTime = field(default_factory=LostTime)
    data_consumed: dict[str, dict[str, int]] = field(default_factory=dict)  # per mixture source: samples, tokens, epoch

    @property
    def eval_loss_here(self) -> float | None:
        """The eval loss measured at this very step, if an evaluation ran there."""
        return self.last_eval_loss if self.last_eval_step == self.step else None

    def rewind_to(self, restored: TrainState) -> None:
        """A rollback: the training position and what depends on it come from `restored`; the run's own record
        (history, rollbacks, skipped samples, lost time, clocks) stays."""
        for name in TIMELINE_FIELDS:
            setattr(self, name, copy.deepcopy(getattr(restored, name)))

    def to_json(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["best_eval_loss"] = self.best_eval_loss if math.isfinite(self.best_eval_loss) else None
        return {"format_version": STATE_FORMAT_VERSION, **values}

    @classmethod
    def from_json(cls, values: dict[str, Any], source: str) -> TrainState:
        version = values.get("format_version")
        if version != STATE_FORMAT_VERSION:
            raise StateFormatError(
                f"{source}: trainer state format {version}, this version reads format {STATE_FORMAT_VERSION}; "
                f"resume it with the version that wrote it (see 'versions' in that file) or start a new run"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{key: value for key, value in values.items() if key in known})
        if state.best_eval_loss is None:
            state.best_eval_loss = math.inf
        if not isinstance(state.lost_time, LostTime):
            state.lost_time = LostTime.from_json(state.lost_time)
        return state
