"""Small collectives every room may use: run on the main process and share the outcome, errors included."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from pretrain.progress import COLLECTIVE, progress

T = TypeVar("T")


def on_main(accelerator: Accelerator, compute: Callable[[], T]) -> T:
    """Runs `compute` on the main process and gives its result to all; an error there is raised everywhere.

    Without this, a bad shard or a full disk seen by rank 0 would leave the other ranks waiting at a collective.
    """
    outcome: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            outcome = [("ok", compute())]
        except Exception as error:  # noqa: BLE001 - re-raised below on every rank
            outcome = [("error", error)]
    if accelerator.num_processes > 1:
        with progress.phase(COLLECTIVE):  # the other ranks wait here for rank 0's work
            outcome = broadcast_object_list(outcome)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def gathered(accelerator: Accelerator, value: T) -> list[T]:
    """Every process's `value`, in rank order, on every process (one small collective)."""
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def signalled_ranks(accelerator: Accelerator, signal_name: str) -> list[tuple[int, str]]:
    """(rank, signal name) of every process a signal reached: whoever got none can then say why the run stops."""
    return [(rank, name) for rank, name in enumerate(gathered(accelerator, signal_name)) if name]


def on_local_main(accelerator: Accelerator, compute: Callable[[], T]) -> T | None:
    """Runs `compute` on each node's first process (work on a node's own disk); the others wait for it.

    Every process learns whether any node failed: a failure raises everywhere instead of a hang at the next collective.
    """
    error: Exception | None = None
    result = None
    if accelerator.is_local_main_process:
        try:
            result = compute()
        except Exception as caught:  # noqa: BLE001 - re-raised below on every rank
            error = caught
    if accelerator.num_processes > 1:
        errors = [error]
        from accelerate.utils import gather_object

        with progress.phase(COLLECTIVE):
            gathered = gather_object(errors)
        error = next((e for e in gathered if e is not None), None)
    if error is not None:
        raise error
    return result
