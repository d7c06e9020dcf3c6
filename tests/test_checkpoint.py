"""Checkpoints are complete or absent, verified before use, pruned safely, and never execute code on load."""

import json
import os
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint.format import (
    MANIFEST,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointPayload,
    checkpoint_name,
    clean_temp_folders,
    load_checkpoint,
    verify_checkpoint,
    write_checkpoint,
)
from pretrain.checkpoint.retention import RetentionPolicy, prune
from pretrain.checkpoint.store import CheckpointStore
from pretrain.checkpoint.train_state import STATE_FORMAT_VERSION
from tests.checkpointer_harness import harness, state_at


def payload(step: int) -> CheckpointPayload:
    generator = torch.Generator().manual_seed(step)
    return CheckpointPayload(
        model_state={"layer.weight": torch.randn(64, 64, generator=generator), "layer.bias": torch.zeros(64)},
        optimizer_state={"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        rng_states={"rank0": {"torch": torch.get_rng_state()}},
        state=state_at(step),
    )


def resolve(tmp_path, mode: str) -> str | None:
    """What `--resume MODE` picks in tmp_path/checkpoints, through the product's Checkpointer."""
    with harness(tmp_path, resume=mode) as (checkpointer, _, _):
        return checkpointer._resolve(mode)


def save(output_dir: Path, step: int) -> Path:
    return write_checkpoint(output_dir, checkpoint_name(0, step, 3), payload(step))


def test_round_trip_restores_every_part(tmp_path):
    folder = save(tmp_path, 10)
    assert folder.name == "checkpoint-epoch0-step10-files3"
    assert verify_checkpoint(folder) is None
    loaded = load_checkpoint(folder)
    original = payload(10)
    assert torch.equal(loaded.model_state["layer.weight"], original.model_state["layer.weight"])
    assert torch.equal(loaded.optimizer_state["state"][0]["exp_avg"], torch.ones(3))
    assert loaded.state == state_at(10)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {MANIFEST}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_manifest", "delete_file"])
def test_damaged_checkpoints_are_detected_with_the_file_named(tmp_path, damage):
    folder = save(tmp_path, 10)
    target = folder / MODEL_FILE
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "flip_byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "drop_manifest":
        (folder / MANIFEST).unlink()
    else:
        target.unlink()
    problem = verify_checkpoint(folder)
    assert problem is not None
    assert (MANIFEST if damage == "drop_manifest" else MODEL_FILE) in problem


def test_resume_latest_skips_a_corrupt_newest_checkpoint(tmp_path, caplog):
    save(tmp_path / "checkpoints", 10)
    newest = save(tmp_path / "checkpoints", 20)
    (newest / MODEL_FILE).write_bytes(b"garbage")
    assert resolve(tmp_path, "latest") == "checkpoint-epoch0-step10-files3"
    assert "skipping checkpoint-epoch0-step20-files3" in caplog.text
    assert newest.exists()  # skipped, not deleted: the user may want to look at it


def test_resume_by_name_refuses_a_corrupt_checkpoint_instead_of_picking_another(tmp_path):
    save(tmp_path / "checkpoints", 10)
    broken = save(tmp_path / "checkpoints", 20)
    (broken / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        resolve(tmp_path, broken.name)


def test_resume_of_a_name_that_exists_nowhere_is_a_clear_error_and_auto_starts_fresh(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint in"):
        resolve(tmp_path, "checkpoint-epoch0-step99-files3")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve(tmp_path, "latest")
    assert resolve(tmp_path, "auto") is None
    save(tmp_path / "checkpoints", 10)
    assert resolve(tmp_path, "auto") == "checkpoint-epoch0-step10-files3"


@pytest.mark.parametrize("name", ["../checkpoint-epoch0-step1-files1", "a/b", "checkpoint-epoch0-step1-files1/..", "step-10"])
def test_resume_names_with_paths_or_other_shapes_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="use 'auto', 'latest' or a checkpoint folder name"):
        resolve(tmp_path, name)


def test_prune_keeps_newest_and_protected_and_ignores_incomplete(tmp_path):
    for step in (10, 20, 30, 40):
        save(tmp_path, step)
    incomplete = save(tmp_path, 50)
    (incomplete / MODEL_FILE).write_bytes(b"short")  # a size that does not match its manifest
    store = CheckpointStore.local(tmp_path)
    deleted = prune(store, RetentionPolicy(keep=2), protected={checkpoint_name(0, 10, 3)})
    assert deleted == [checkpoint_name(0, 20, 3)]
    assert set(store.names()) == {checkpoint_name(0, s, 3) for s in (10, 30, 40, 50)}
    assert store.complete() == [checkpoint_name(0, s, 3) for s in (40, 30, 10)]
    assert not (tmp_path / checkpoint_name(0, 20, 3)).exists()


def test_a_state_of_another_format_is_refused_in_one_line_naming_its_version(tmp_path):
    folder = save(tmp_path, 10)
    state = json.loads((folder / STATE_FILE).read_text())
    state["format_version"] = 1
    (folder / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=f"trainer state format 1, this version reads format {STATE_FORMAT_VERSION}"):
        load_checkpoint(folder)


def test_an_interrupted_save_leaves_the_previous_checkpoint_and_is_cleaned(tmp_path, monkeypatch):
    good = save(tmp_path, 10)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save(tmp_path, 20)
    monkeypatch.undo()
    assert verify_checkpoint(good) is None
    assert CheckpointStore.local(tmp_path).complete() == [good.name]
    clean_temp_folders(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_a_planted_pickle_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = save(tmp_path, 10)
    torch.save({"state": Exploit()}, folder / OPTIMIZER_FILE)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(folder)
    assert not (tmp_path / "pwned-by-checkpoint").exists()
