"""Runs the real launcher (start_training.sh) on small data and reads back what a user would see."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
RUN_NAME = "run"


def launch(workdir: Path, data_dir: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`./start_training.sh --config test` with its outputs under `workdir` and a fixed run name."""
    command = [str(REPO / "start_training.sh"), *isolated_args(workdir, data_dir, *args), *args]
    return subprocess.run(command, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def isolated_args(workdir: Path, data_dir: Path, *args: str) -> list[str]:
    """The test config with every output (checkpoints, logs, the local-folder bucket) under `workdir`."""
    bucket = [] if "--checkpoint-bucket" in args else ["--checkpoint-bucket", str(workdir / "bucket")]
    return [
        "--config", "test", "--data-dir", str(data_dir), "--output-dir", str(workdir / "checkpoints"),
        "--logging-dir", str(workdir / "logs"), "--run-name", RUN_NAME, *bucket,
    ]


def check(result: subprocess.CompletedProcess, expected_code: int = 0) -> subprocess.CompletedProcess:
    assert result.returncode == expected_code, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def logged(workdir: Path, key: str = "train/loss") -> dict[int, float]:
    """The last value logged for each step (a resumed run overwrites what the dead run logged after its checkpoint)."""
    values = {}
    for line in (workdir / "logs" / RUN_NAME / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the partial last record of a run that was killed mid-write
        if key in record:
            values[record["step"]] = record[key]
    return values


def final_weights(workdir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(workdir / "checkpoints" / "final-model" / "model.safetensors"))


def checkpoints(workdir: Path) -> list[str]:
    folder = workdir / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-")) if folder.exists() else []
