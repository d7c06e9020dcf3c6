"""Separate working copies standing for separate VMs: each has its own empty data/, checkpoints/ and logs/ and shares
nothing with the others but the buckets. The virtual environment is linked, not rebuilt (it is not part of a VM's
state that a preemption loses; setup.sh would recreate it the same way)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.launcher import REPO


def new_vm(parent: Path, name: str) -> Path:
    """A copy of the project as a fresh clone of this working tree would have it (tracked and new, unignored files)."""
    vm = parent / name
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = REPO / relative
        if source.is_file():
            target = vm / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    os.symlink(REPO / ".venv", vm / ".venv")
    return vm


def vm_losses(*vms: Path, run_name: str) -> dict[int, float]:
    """Each step's loss as the user would read it across VMs: a later VM's value for a step replaces an earlier one's
    (work redone after a preemption)."""
    values: dict[int, float] = {}
    for vm in vms:
        path = vm / "logs" / run_name / "metrics.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last record of a killed run
            if "train/loss" in record:
                values[record["step"]] = record["train/loss"]
    return values
