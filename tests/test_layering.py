"""The house rules for imports: each room imports only the rooms below it (entry points -> loop -> {checkpoint, data,
model, metrics} -> storage), so a change stays in its room. Read from the source, not from a running process."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LEAVES = {"pretrain.files", "pretrain.errors", "pretrain.protocol", "pretrain.progress"}
# room -> what it may import besides itself and the leaves
ALLOWED = {
    "pretrain.files": set(),
    "pretrain.errors": set(),
    "pretrain.protocol": set(),
    "pretrain.progress": set(),
    "pretrain.storage": set(),
    "pretrain.distributed": set(),
    "pretrain.preemption": set(),
    "pretrain.agreement": set(),
    # the stall watchdog reads the preemption flag: a signal's grace period bounds a stalled run's end
    "pretrain.watchdog": {"pretrain.preemption"},
    "pretrain.machines": set(),
    "pretrain.data": {"pretrain.storage", "pretrain.distributed"},
    "pretrain.prepare": {"pretrain.data.format", "pretrain.data.synthetic", "pretrain.storage"},
    "pretrain.checkpoint": {"pretrain.storage", "pretrain.distributed", "pretrain.preemption", "pretrain.agreement"},
    # the export writes the weights as the checkpoint does, with the data's tokenizer
    "pretrain.model": {"pretrain.checkpoint.state_dicts", "pretrain.prepare.tokenizer"},
    "pretrain.memory": {"pretrain.model.families", "pretrain.model.family"},
    # the shape from a preset or a parameter target; a cooldown branch's step from its checkpoint's name; the mixture
    # flag is checked where every flag is (pretrain.data.mixture is standard library only)
    "pretrain.cli": {"pretrain.model.families", "pretrain.model.family", "pretrain.model.sizing",
                     "pretrain.checkpoint.format", "pretrain.data.mixture"},
    "pretrain.plan": {"pretrain.model"},
    "pretrain.optim": set(),
    "pretrain.metrics": set(),
    "pretrain.evaluation": {"pretrain.data"},
    # the spike policy reads the agreed values into the run's state; the EMA saves through the state-dict helpers
    "pretrain.spikes": {"pretrain.agreement", "pretrain.checkpoint.train_state"},
    "pretrain.ema": {"pretrain.checkpoint.state_dicts"},
    # the launcher ends a stall its ranks cannot (one stopped) by the watchdog's rules and words
    "pretrain.launch": {"pretrain.cli", "pretrain.memory", "pretrain.plan", "pretrain.model", "pretrain.watchdog"},
}
NOBODY_IMPORTS = ("train", "pretrain.launch")  # the entry points


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pretrain import rng`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "train" or name.startswith("pretrain.")}


def room_of(module: str) -> str | None:
    return next((room for room in sorted(ALLOWED, key=len, reverse=True)
                 if module == room or module.startswith(room + ".")), None)


def within(module: str, prefixes: set[str]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


MODULES = sorted(p for p in (REPO / "pretrain").rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_a_room_imports_only_the_rooms_below_it(path):
    module = module_name(path)
    room = room_of(module)
    if room is None:
        return  # the loop, the commands and the entry points: above every room
    allowed = {room, *LEAVES, *ALLOWED[room]}
    if module in LEAVES:
        allowed = {module, "pretrain.files"}
    wrong = sorted(name for name in imports_of(path) if room_of(name) is not None and not within(name, allowed)
                   and module_name(path) != name and not (module == "pretrain.launch.__main__"))
    wrong += sorted(name for name in imports_of(path) if within(name, set(NOBODY_IMPORTS))
                    and not (module == "pretrain.launch.__main__" or module.startswith("pretrain.launch.")))
    assert not wrong, f"{module} ({room}) imports {wrong}; it may import {sorted(allowed)}"


def test_the_launcher_plans_without_transformers_or_a_cloud_sdk():
    """start_training.sh imports these before anything starts: transformers alone costs seconds there."""
    code = ("import sys, pretrain.launch.command, pretrain.memory, pretrain.cli, pretrain.model.families; "
            "print(sorted(m for m in ('transformers', 'boto3', 'google.cloud.storage', 'azure.storage.blob') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
