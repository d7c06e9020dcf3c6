"""Retention that keeps the best checkpoint and milestones, locally and in each bucket, and `python -m
pretrain.checkpoints` (list, verify, prune, delete, export) on a local folder and on each emulator; bad input is one
line and exit 2."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from configs import CONFIGS, as_dict
from pretrain import checkpoints as command
from pretrain.checkpoint.format import (
    EMA_FILE,
    MODEL_FILE,
    CheckpointPayload,
    checkpoint_name,
    step_of,
    write_checkpoint,
)
from pretrain.checkpoint.retention import (
    CheckpointRecord,
    RetentionPolicy,
    checkpoints_to_delete,
    reasons_to_keep,
)
from pretrain.checkpoint.store import CheckpointStore, upload_checkpoint
from pretrain.model.build import build_model
from pretrain.protocol import EXIT_BAD_INPUT
from pretrain.storage import open_storage
from tests.checkpointer_harness import harness, state_at, take_step
from tests.launcher import REPO, last_line

EVALS = {10: 3.0, 20: 2.5, 30: 2.7, 40: 2.9}  # the best is at 20; with milestones every 20: 20 and 40
POLICY = RetentionPolicy(keep=1, keep_best=True, keep_every_steps=20)


def name(step: int) -> str:
    return checkpoint_name(0, step, 1)


def evaluated_state(step: int, loss: float | None):
    state = state_at(step)
    state.config = as_dict(CONFIGS["test"])
    if loss is not None:
        state.last_eval_step, state.last_eval_loss = step, loss
    return state


def test_retention_keeps_the_newest_the_best_and_the_milestones():
    records = [CheckpointRecord(name(step), step, loss) for step, loss in sorted(EVALS.items(), reverse=True)]
    assert reasons_to_keep(records, POLICY) == {name(40): ["newest", "milestone"], name(30): [],
                                                name(20): ["best", "milestone"], name(10): []}
    assert checkpoints_to_delete(records, POLICY) == [name(30), name(10)]
    assert checkpoints_to_delete(records, RetentionPolicy(keep=1)) == [name(30), name(20), name(10)]
    assert checkpoints_to_delete(records, POLICY, protected={name(10)}) == [name(30)]
    unevaluated = [dataclasses.replace(r, eval_loss=None) for r in records]
    assert checkpoints_to_delete(unevaluated, RetentionPolicy(keep=2, keep_best=True)) == [name(20), name(10)]
    assert checkpoints_to_delete(records, RetentionPolicy(keep=0)) == [name(30), name(20), name(10)]  # one stays


def test_the_checkpointer_keeps_the_best_and_milestones_locally_and_in_the_bucket(tmp_path, bucket):
    """Through the real save path: local retention after each write, remote retention after each upload."""
    settings = dict(checkpoint_bucket=bucket.url, keep_best=True, keep_every_steps=20, save_total_limit=1,
                    remote_save_total_limit=1)
    with harness(tmp_path, **settings) as (checkpointer, model, optimizer):
        for step, loss in EVALS.items():
            take_step(model, optimizer)
            checkpointer.save(evaluated_state(step, loss), model, optimizer, "scheduled")
            assert checkpointer.writer.wait_idle(60) and checkpointer.uploader.wait_idle(120)
        checkpointer.finish(evaluated_state(40, EVALS[40]))
        for store in (checkpointer.local, checkpointer.remote):
            assert store.complete() == [name(40), name(20)], store.url
            assert {c.name: c.eval_loss for c in store.describe_all()} == {name(40): 2.9, name(20): 2.5}


def payload(step: int, with_ema: bool = False) -> CheckpointPayload:
    torch.manual_seed(step)
    weights = build_model(CONFIGS["test"].model).state_dict()
    return CheckpointPayload(
        model_state=weights, optimizer_state={"state": {}, "param_groups": []},
        rng_states={"rank0": {"torch": torch.get_rng_state()}}, state=evaluated_state(step, EVALS[step]),
        ema_state={k: v + 1 for k, v in weights.items() if k.endswith("weight")} if with_ema else None)


@pytest.fixture
def run_folders(tmp_path, bucket) -> tuple[Path, str]:
    """A run's checkpoints on local disk and uploaded to a fresh bucket of each provider."""
    local = tmp_path / "checkpoints"
    remote = CheckpointStore(open_storage(bucket.url))
    for step in EVALS:
        upload_checkpoint(write_checkpoint(local, name(step), payload(step, with_ema=step == 40)), remote,
                          backoff_seconds=0.01)
    return local, bucket.url


def checkpoints_command(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = command.main(list(argv), out=out)
    return code, out.getvalue()


def test_list_verify_prune_delete_export_on_a_folder_and_a_bucket(run_folders, tmp_path, capsys):
    local, url = run_folders
    where = ["--output-dir", str(local), "--checkpoint-bucket", url]
    policy = ["--keep", "1", "--keep-best", "true", "--keep-every-steps", "20"]
    code, listing = checkpoints_command("list", *where, *policy)
    assert code == 0, capsys.readouterr().err
    rows = {line.split()[0]: line for line in listing.splitlines() if line.startswith("checkpoint-")}
    assert list(rows) == [name(40), name(30), name(20), name(10)]
    assert rows[name(20)].endswith("complete    uploaded       2.5000  best, milestone")
    assert rows[name(40)].split()[1] == "40" and rows[name(40)].endswith("2.9000  newest, milestone")
    assert rows[name(30)].endswith("2.7000  -")  # what prune removes
    assert f"bucket {url}: 4 checkpoints" in listing and f"local {local}: 4 checkpoints" in listing

    code, verified = checkpoints_command("verify", *where)
    assert code == 0 and verified.count(": ok") == 8, verified
    broken = local / name(10) / MODEL_FILE
    data = bytearray(broken.read_bytes())
    data[len(data) // 2] ^= 0xFF
    broken.write_bytes(bytes(data))
    code, verified = checkpoints_command("verify", *where)
    assert code == EXIT_BAD_INPUT and "checksum does not match the manifest" in verified
    assert "1 checkpoint(s) failed verification" in capsys.readouterr().err
    code, _ = checkpoints_command("verify", *where, "--only", "bucket", name(10))  # the bucket's copy is intact
    assert code == 0

    code, dry = checkpoints_command("prune", *where, *policy)
    assert code == 0 and "would delete" in dry and "dry run: nothing was deleted" in dry
    assert len(CheckpointStore(open_storage(url)).names()) == len(CheckpointStore.local(local).names()) == 4
    code, pruned = checkpoints_command("prune", *where, *policy, "--apply")
    assert code == 0 and pruned.count("deleted") == 4  # 10 and 30, in both
    for store in (CheckpointStore(open_storage(url)), CheckpointStore.local(local)):
        assert store.complete() == store.names() == [name(40), name(20)]

    assert checkpoints_command("delete", *where, name(20))[0] == EXIT_BAD_INPUT  # not without --yes
    assert "pass --yes" in capsys.readouterr().err
    code, deleted = checkpoints_command("delete", *where, name(20), "--yes")
    assert code == 0 and deleted.count("deleted") == 2 and name(20) not in CheckpointStore(open_storage(url)).names()

    for weights in ("live", "ema"):
        out = tmp_path / f"export-{weights}"
        code, said = checkpoints_command("export", "latest", "--only", "bucket", "--checkpoint-bucket", url,
                                         "--out", str(out), "--weights", weights)
        assert code == 0 and f"exported {name(40)}" in said, capsys.readouterr().err
        exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
        expected = payload(40, with_ema=True)
        source = {**expected.model_state, **(expected.ema_state if weights == "ema" else {})}
        assert all(torch.equal(exported[k], source[k]) for k in source)


def test_export_of_the_best_checkpoint_and_its_ema_refusal(tmp_path, capsys):
    local = tmp_path / "checkpoints"
    for step in EVALS:
        write_checkpoint(local, name(step), payload(step))
    code, said = checkpoints_command("export", "best", "--output-dir", str(local), "--out", str(tmp_path / "best"))
    assert code == 0 and f"exported {name(20)}" in said
    code, _ = checkpoints_command("export", "best", "--output-dir", str(local), "--out", str(tmp_path / "x"),
                                  "--weights", "ema")
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and f"no {EMA_FILE}" in err[-1] and "export its live weights" in err[-1]
    assert (local / name(20) / MODEL_FILE).is_file()


@pytest.mark.parametrize("argv, fragment", [
    (["bogus"], "invalid choice: 'bogus'"),
    ([], "name what to do"),
    (["list", "--output-dir", "{tmp}/nowhere"], "--output-dir {tmp}/nowhere: no such folder"),
    (["export", "latest", "--output-dir", "{tmp}"], "the following arguments are required: --out"),
    (["delete", "../checkpoint-epoch0-step1-files1", "--output-dir", "{tmp}", "--yes"], "is not a checkpoint name"),
    (["delete", "checkpoint-epoch0-step99-files1", "--output-dir", "{tmp}", "--yes"], "no such checkpoint in"),
    (["prune", "--output-dir", "{tmp}", "--keep", "0"], "--keep must be at least 1"),
    (["list", "--output-dir", "{tmp}", "--keep-best", "maybe"], "expected true or false"),
    (["export", "checkpoint-epoch0-step10-files1", "--output-dir", "{tmp}", "--out", "{tmp}/x"],
     "no complete checkpoint"),
    (["list", "--only", "bucket", "--output-dir", "{tmp}"], "--only bucket: pass --checkpoint-bucket"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, fragment):
    code, _ = checkpoints_command(*[arg.format(tmp=tmp_path) for arg in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_BAD_INPUT and len(err) == 1, err
    assert err[0].startswith("error: ") and fragment.format(tmp=tmp_path) in err[0], err


def test_an_unreachable_bucket_is_one_line(tmp_path, new_bucket, activate, capsys):
    activate(new_bucket("s3"))
    code, _ = checkpoints_command("list", "--checkpoint-bucket", "s3://no-such-bucket-here/run", "--only", "bucket")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_BAD_INPUT and len(err) == 1 and "s3://no-such-bucket-here" in err[0], err


def test_the_command_line_exits_2_with_the_line_last(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pretrain.checkpoints", "delete", name(10), "--output-dir",
                             str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_BAD_INPUT and "Traceback" not in result.stderr
    assert last_line(result.stderr) == f"error: {name(10)}: no such checkpoint in {tmp_path}; `list` shows them"
    assert step_of(name(10)) == 10
