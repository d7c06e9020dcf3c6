"""Time a spot run loses to restarts (start-up, steps redone, upload lag, rollbacks), the progress record a dead run
leaves behind for the next one to read, and the Young-Daly save interval: pure functions and plain records."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

PROGRESS_FILE = "progress.json"  # beside the checkpoints, locally and in the bucket; not a checkpoint
# Before any preemption is seen, the mean time between preemptions is estimated as if one had come after this much
# running time on top of what was observed (a prior of one event in one hour): short enough that a fresh run saves
# often, and the estimate grows as the run survives.
PREEMPTION_PRIOR_SECONDS = 3600.0
MIN_AUTO_INTERVAL_SECONDS = 60.0
FIRST_AUTO_INTERVAL_SECONDS = 600.0  # until a save has been measured


@dataclass
class LostTime:
    """Totals over the run's restarts, kept in every checkpoint, and what the automatic save interval is measured on."""

    restarts: int = 0
    preemptions: int = 0  # restarts after a run that did not finish (a signal, a crash, a lost VM)
    startup_seconds: float = 0.0  # launch to the first step done, summed over restarts
    redone_steps: int = 0  # steps trained after the checkpoint a restart resumed from: done twice
    redone_seconds: float = 0.0
    upload_lag_seconds: float = 0.0  # a run's end (signal or last step) to its last checkpoint being in the bucket
    rollbacks: int = 0
    rollback_seconds: float = 0.0  # training time between a restored checkpoint and the rollback: thrown away
    wall_seconds: float = 0.0  # time the run's processes have existed, over all restarts (for the preemption rate)
    save_seconds: float = 0.0  # measured: the time one save blocks training (smoothed)
    upload_seconds: float = 0.0  # measured: the time one checkpoint takes to reach the bucket (smoothed)

    @property
    def total_seconds(self) -> float:
        return self.startup_seconds + self.redone_seconds + self.upload_lag_seconds + self.rollback_seconds

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any] | None) -> LostTime:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in known})

    def scalars(self) -> dict[str, float]:
        """For TensorBoard: totals in seconds, and the counts."""
        return {"lost/total_seconds": self.total_seconds, "lost/startup_seconds": self.startup_seconds,
                "lost/redone_seconds": self.redone_seconds, "lost/upload_lag_seconds": self.upload_lag_seconds,
                "lost/rollback_seconds": self.rollback_seconds, "lost/restarts": float(self.restarts),
                "lost/preemptions": float(self.preemptions)}

    def describe(self) -> str:
        return (f"{_duration(self.total_seconds)} lost over {self.restarts} restart(s) and {self.rollbacks} "
                f"rollback(s): start-up {_duration(self.startup_seconds)}, {self.redone_steps} step(s) redone "
                f"{_duration(self.redone_seconds)}, upload lag {_duration(self.upload_lag_seconds)}, rollbacks "
                f"{_duration(self.rollback_seconds)}")


@dataclass(frozen=True)
class Progress:
    """What a run last said about itself (progress.json): a run that dies without a word leaves the latest one."""

    run_name: str
    step: int
    elapsed_seconds: float  # the run's training clock at that step (TrainState.elapsed_seconds)
    wall_seconds: float  # LostTime.wall_seconds at that moment
    unix: float
    ended: str = ""  # "" (still running, or died), "preempted" or "finished"
    upload_lag_seconds: float = 0.0  # set when it ended: end of training to its last upload done
    save_seconds: float = 0.0  # its latest measurements (LostTime's), which its last checkpoint may predate
    upload_seconds: float = 0.0

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Progress | None:
        """None for anything unreadable: the record is advisory, a broken one only loses an estimate."""
        try:
            values = json.loads(data)
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in values.items() if k in known})
        except (ValueError, TypeError):
            return None


@dataclass(frozen=True)
class Restart:
    """The time one restart lost, for its log line and the totals."""

    startup_seconds: float
    redone_steps: int
    redone_seconds: float
    upload_lag_seconds: float
    down_seconds: float | None  # the previous run's last word to this launch (not counted: no VM was running)
    preempted: bool
    known: bool  # whether the previous run left a progress record for this run

    def add_to(self, totals: LostTime) -> None:
        totals.restarts += 1
        totals.preemptions += int(self.preempted)
        totals.startup_seconds += self.startup_seconds
        totals.redone_steps += self.redone_steps
        totals.redone_seconds += self.redone_seconds
        totals.upload_lag_seconds += self.upload_lag_seconds

    def describe(self, resumed_from: str) -> str:
        lost = self.startup_seconds + self.redone_seconds + self.upload_lag_seconds
        redone = (f"{self.redone_steps} step(s) redone since {resumed_from} ({_duration(self.redone_seconds)})"
                  if self.known else f"steps redone since {resumed_from} unknown (no progress record)")
        down = f"; the previous run was gone {_duration(self.down_seconds)} before this launch" if (
            self.down_seconds is not None) else ""
        return (f"this restart lost {_duration(lost)}: launch to first step {_duration(self.startup_seconds)}, "
                f"{redone}, upload lag {_duration(self.upload_lag_seconds)}{down}")


def restart_cost(resumed_step: int, resumed_elapsed: float, run_name: str, previous: Progress | None,
                 launched_unix: float, first_step_unix: float) -> Restart:
    """What a restart lost, from the checkpoint it resumed from and the previous run's last progress record (None
    when it left none, or one of another run or an older timeline)."""
    startup = max(0.0, first_step_unix - launched_unix)
    usable = previous is not None and previous.run_name == run_name and previous.step >= resumed_step
    if not usable:
        return Restart(startup, 0, 0.0, 0.0, None, preempted=True, known=False)
    return Restart(
        startup_seconds=startup,
        redone_steps=previous.step - resumed_step,
        redone_seconds=max(0.0, previous.elapsed_seconds - resumed_elapsed),
        upload_lag_seconds=previous.upload_lag_seconds,
        down_seconds=max(0.0, launched_unix - previous.unix),
        preempted=previous.ended != "finished",
        known=True,
    )


def young_daly_interval(checkpoint_cost_seconds: float, mean_time_between_failures_seconds: float) -> float:
    """Daly's (2006) optimum checkpoint interval for a checkpoint that costs delta seconds and failures M seconds
    apart on average: sqrt(2 delta M) [1 + sqrt(delta / 2M) / 3 + delta / 18M] - delta for delta < 2M, else M.
    To first order this is Young's sqrt(2 delta M)."""
    delta, mtbf = max(0.0, checkpoint_cost_seconds), max(1e-9, mean_time_between_failures_seconds)
    if delta >= 2 * mtbf:
        return mtbf
    return math.sqrt(2 * delta * mtbf) * (1 + math.sqrt(delta / (2 * mtbf)) / 3 + delta / (18 * mtbf)) - delta


def auto_save_interval(totals: LostTime) -> tuple[float, str]:
    """(seconds, why) for --save-every-minutes auto: Young-Daly on the measured cost of a save and the observed
    preemption rate, never shorter than an upload (a checkpoint is safe only once in the bucket, and one saved while
    the previous is still uploading only replaces it in the queue) or a minute."""
    if totals.save_seconds <= 0:
        return FIRST_AUTO_INTERVAL_SECONDS, "no save measured yet"
    mtbf = (totals.wall_seconds + PREEMPTION_PRIOR_SECONDS) / (totals.preemptions + 1)
    interval = max(young_daly_interval(totals.save_seconds, mtbf), totals.upload_seconds, MIN_AUTO_INTERVAL_SECONDS)
    why = (f"a save costs {totals.save_seconds:.2f} s, an upload {totals.upload_seconds:.1f} s, "
           f"{totals.preemptions} preemption(s) in {_duration(totals.wall_seconds)}: one every {_duration(mtbf)}")
    return interval, why


def smoothed(previous: float, value: float) -> float:
    """A measurement folded into its running estimate (recent ones weigh more: disks and networks change)."""
    return value if previous <= 0 else 0.7 * previous + 0.3 * value


def _duration(seconds: float | None) -> str:
    seconds = max(0.0, seconds or 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"
