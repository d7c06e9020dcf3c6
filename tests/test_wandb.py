"""W&B in offline mode: a run logs locally without an account, and a resumed run continues the same W&B run."""

import pytest

from pretrain.checkpoint.format import load_checkpoint
from tests.launcher import RUN_NAME, check, checkpoints, launch

pytestmark = pytest.mark.slow
pytest.importorskip("wandb", reason="W&B is an optional extra: ./setup.sh --wandb (./run_tests.sh installs it)")


def test_offline_wandb_run_is_continued_after_resume(tmp_path, sample_data):
    data_dir = sample_data
    common = ["--wandb", "--wandb-mode", "offline", "--wandb-project", "pretrain-tests", "--logging-steps", "1",
              "--eval-steps", "0", "--warmup-steps", "1", "--lr-decay-steps", "4", "--save-steps", "2"]
    env = {"WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    check(launch(tmp_path, data_dir, "--max-steps", "2", *common, env=env))
    run_id = load_checkpoint(tmp_path / "checkpoints" / checkpoints(tmp_path)[-1]).state.wandb_run_id
    assert run_id and len(run_id) >= 8
    check(launch(tmp_path, data_dir, "--resume", "latest", "--max-steps", "4", *common, env=env))

    runs = sorted((tmp_path / "logs" / RUN_NAME / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # one folder per process start...
    assert all(run.name.endswith(f"-{run_id}") for run in runs)  # ...both the same W&B run
    assert all(any(run.glob("*.wandb")) for run in runs)  # with the logged history in each
