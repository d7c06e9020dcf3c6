"""The training position and run bookkeeping a checkpoint carries, as one typed, JSON-serialisable record."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

STATE_FORMAT_VERSION = 2


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
    data_consumed: dict[str, dict[str, int]] = field(default_factory=dict)  # per mixture source: samples, tokens, epoch

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
        return state
