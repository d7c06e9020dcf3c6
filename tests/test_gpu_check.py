"""bench/gpu_check.sh --cpu-smoke: the GPU check's own code path on CPU, run as the offline GPU machine runs it (the
shell script with a given Python, no set-up step, no network), with the packages that machine lacks made absent: the
cloud SDKs, google_crc32c, TensorBoard, W&B and the data-preparation libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.launcher import REPO

ABSENT = ("boto3", "botocore", "s3transfer", "google.cloud", "google.api_core", "google.auth", "google.oauth2",
          "google_crc32c", "azure", "tensorboard", "wandb", "zstandard", "pyarrow")


def without_absent_packages(tmp_path) -> dict[str, str]:
    """An environment whose Python finds none of ABSENT: a sitecustomize puts None in sys.modules for each, which
    makes `import` fail and importlib.util.find_spec answer None, as for a package that is not installed."""
    (tmp_path / "sitecustomize.py").write_text(
        f"import sys\nfor name in {ABSENT!r}:\n    sys.modules[name] = None\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "PYTHON": sys.executable}


def test_the_training_loop_and_the_check_import_without_the_absent_packages(tmp_path):
    code = ("import sys, train, pretrain.loop, bench.gpu_check; "
            f"print(sorted(m for m in {ABSENT!r} if sys.modules.get(m) is not None))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=without_absent_packages(tmp_path),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_part_the_cpu_has(tmp_path):
    result_file = tmp_path / "gpu_check.json"
    run = subprocess.run([str(REPO / "bench" / "gpu_check.sh"), "--cpu-smoke", "--json", str(result_file)], cwd=REPO,
                         env=without_absent_packages(tmp_path), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(result_file.read_text())
    line = next(line for line in run.stdout.splitlines() if line.startswith("gpu_check.json "))
    assert json.loads(line.removeprefix("gpu_check.json ")) == summary
    for part in ("start-up", "eager", "adamw", "cap 40 GB", "cap 24 GB", "compiled", "total"):
        assert any(row.startswith(part) for row in run.stdout.splitlines()), part  # one row each in the table
    parts = summary["parts"]
    assert set(parts) == {"start-up", "eager", "adamw", "compiled"}  # the caps need a GPU
    for part in ("eager", "compiled"):
        assert parts[part]["tokens_per_s"] > 0 and parts[part]["loss"] > 0
        assert any("flash_attention" in kernel for kernel in parts[part]["attention_kernels"])
    assert parts["compiled"]["compiled"] is True  # compiled_with_fallback kept the compiled model
    assert parts["compiled"]["loss"] == pytest.approx(parts["eager"]["loss"], abs=1e-3)
    assert parts["adamw"]["product_ms"] > 0 and parts["adamw"]["foreach_ms"] > 0
    assert sum(summary["planned_s"].values()) <= 400  # the planned parts fit the 7-minute budget with its margins
