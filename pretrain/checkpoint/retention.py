"""Which checkpoints retention removes: a pure function of the names, so the local folder and the bucket share it and
a test can state the policy without touching a file; `prune` applies it to a store."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pretrain.checkpoint.store import CheckpointStore


def checkpoints_to_delete(complete_newest_first: list[str], keep: int, protected: Collection[str] = ()) -> list[str]:
    """All but the newest `keep` complete checkpoints (at least one always stays), never a protected one (a checkpoint
    still being uploaded, or the one just written)."""
    return [name for name in complete_newest_first[max(1, keep):] if name not in protected]


def prune(store: CheckpointStore, keep: int, protected: Collection[str] = ()) -> list[str]:
    """Deletes what checkpoints_to_delete names among the store's complete checkpoints; returns their names."""
    deleted = checkpoints_to_delete(store.complete(), keep, protected)
    for name in deleted:
        store.delete(name)
    return deleted
