"""Capture and restore the RNG state of every library, in a form `torch.load(weights_only=True)` accepts."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    captured: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        captured["cuda"] = torch.cuda.get_rng_state_all()
    return captured


def restore(captured: dict[str, Any]) -> None:
    python = captured["python"]
    random.setstate((python["version"], tuple(int(x) for x in python["state"].tolist()), python["gauss"]))
    numpy_state = captured["numpy"]
    np.random.set_state((
        numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
        numpy_state["has_gauss"], numpy_state["gauss"],
    ))
    torch.set_rng_state(captured["torch"])
    if "cuda" in captured and torch.cuda.is_available() and len(captured["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(captured["cuda"])
