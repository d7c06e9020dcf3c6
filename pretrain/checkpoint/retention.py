"""Which checkpoints retention keeps and why: a pure function of checkpoint records (name, step, eval loss), so the
local folder, the bucket and `python -m pretrain.checkpoints` share it and a test can state the policy without a
file; `prune` applies it to a store."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pretrain.checkpoint.store import CheckpointStore


@dataclass(frozen=True)
class CheckpointRecord:
    name: str
    step: int
    eval_loss: float | None = None  # measured at this checkpoint's step (the manifest's summary), if it was


@dataclass(frozen=True)
class RetentionPolicy:
    keep: int  # the newest this many (at least one always stays)
    keep_best: bool = False  # and the one with the lowest eval loss
    keep_every_steps: int = 0  # and every one whose step is a multiple of this (milestones); 0: none

    @classmethod
    def of(cls, config, remote: bool = False) -> RetentionPolicy:
        """A TrainingConfig's policy for its local folder (--save-total-limit) or its bucket (--remote-...)."""
        keep = config.remote_save_total_limit if remote else config.save_total_limit
        return cls(keep=keep, keep_best=config.keep_best, keep_every_steps=config.keep_every_steps)


def reasons_to_keep(newest_first: Sequence[CheckpointRecord], policy: RetentionPolicy) -> dict[str, list[str]]:
    """Every record's reasons to stay ("newest", "best", "milestone"); an empty list means retention removes it."""
    reasons: dict[str, list[str]] = {record.name: [] for record in newest_first}
    for record in newest_first[: max(1, policy.keep)]:
        reasons[record.name].append("newest")
    if policy.keep_best:
        best = best_record(newest_first)
        if best is not None:
            reasons[best.name].append("best")
    if policy.keep_every_steps > 0:
        for record in newest_first:
            if record.step % policy.keep_every_steps == 0:
                reasons[record.name].append("milestone")
    return reasons


def best_record(records: Sequence[CheckpointRecord]) -> CheckpointRecord | None:
    """The record with the lowest finite eval loss (the newest of equals), or None when none was evaluated."""
    evaluated = [r for r in records if r.eval_loss is not None and math.isfinite(r.eval_loss)]
    return min(evaluated, key=lambda r: (r.eval_loss, -r.step), default=None)


def checkpoints_to_delete(complete_newest_first: Sequence[CheckpointRecord], policy: RetentionPolicy,
                          protected: Collection[str] = ()) -> list[str]:
    """The complete checkpoints with no reason to stay, never a protected one (still uploading, just written)."""
    reasons = reasons_to_keep(complete_newest_first, policy)
    return [r.name for r in complete_newest_first if not reasons[r.name] and r.name not in protected]


def prune(store: CheckpointStore, policy: RetentionPolicy, protected: Collection[str] = ()) -> list[str]:
    """Deletes what checkpoints_to_delete names among the store's complete checkpoints; returns their names."""
    complete = [stored.record for stored in store.describe_all() if stored.complete]
    deleted = checkpoints_to_delete(complete, policy, protected)
    for name in deleted:
        store.delete(name)
    return deleted
