"""The checkpoint format: names, writing a complete folder atomically, verifying it, loading it safely.

A folder is a checkpoint only when its manifest (written last, with sizes and CRC32C of every file) is present and
matches. Nothing read back can execute code: tensors come from safetensors or `torch.load(weights_only=True)`,
everything else from JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pretrain.checkpoint.train_state import StateFormatError, TrainState
from pretrain.files import file_digest, fsync_dir, fsync_file
from pretrain.progress import SAVE, progress

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^checkpoint-epoch(\d+)-step(\d+)-files(\d+)$")
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"  # only when the run keeps an EMA of the weights (--ema-decay)
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_states.pt"
STATE_FILE = "trainer_state.json"
TEMP_PREFIX = ".tmp-"
LOGS_PREFIX = "logs"  # the run's log folder in the bucket, beside the checkpoints
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint folder is incomplete or corrupt (the message names it and says what is wrong)."""


def checkpoint_name(epoch: int, step: int, files: int) -> str:
    return f"checkpoint-epoch{epoch}-step{step}-files{files}"


def step_of(name: str) -> int:
    match = NAME_PATTERN.match(name)
    if not match:
        raise ValueError(f"{name!r} is not a checkpoint name (expected checkpoint-epochE-stepS-filesF)")
    return int(match.group(2))


@dataclass
class CheckpointPayload:
    """What a checkpoint holds: full (unsharded) model and optimizer state, every rank's RNG, the typed state."""

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    rng_states: dict[str, Any]  # "rank0", "rank1", ...
    state: TrainState
    ema_state: dict[str, torch.Tensor] | None = None  # the EMA of the weights, keyed like model_state


def summary_of(state: TrainState) -> dict[str, Any]:
    """What listing and retention need to know of a checkpoint without reading its state: kept in the manifest, so
    the local folder and the bucket answer from the same small file."""
    return {"step": state.step, "epoch": state.epoch, "samples_consumed": state.samples_consumed,
            "eval_loss": state.eval_loss_here, "run_name": state.run_name}


def write_manifest(folder: Path, name: str, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "crc32c": file_digest(path, "crc32c")}
    manifest = {"format_version": FORMAT_VERSION, "name": name, "created_unix": time.time(), "files": files}
    if summary is not None:
        manifest["summary"] = summary
    manifest_path = folder / MANIFEST
    manifest_path.write_text(json.dumps(manifest, indent=1))
    fsync_file(manifest_path)
    return manifest


def write_checkpoint(output_dir: Path, name: str, payload: CheckpointPayload) -> Path:
    """Writes into a temporary folder, fsyncs, writes the manifest last, then renames into place.

    A crash at any point leaves either the previous checkpoints untouched plus a temp folder
    (ignored and cleaned later), or a complete new checkpoint.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / name
    if final.exists() and verify_checkpoint(final, check_contents=False) is None:
        log.info("%s already exists and is complete; not writing it again", name)
        return final
    temp = output_dir / f"{TEMP_PREFIX}{name}-{os.getpid()}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    try:
        _write_files(temp, name, payload)
    except BaseException:
        # Whatever failed (torch.save reports a full disk as RuntimeError, safetensors as SafetensorError),
        # the half-written folder goes; the caller decides what the failure means.
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if final.exists():
        # An incomplete folder of the same name (a crash mid-copy of a download, say): set it aside, never mix.
        stale = output_dir / f"{TEMP_PREFIX}stale-{name}-{os.getpid()}"
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(temp, final)
    fsync_dir(output_dir)
    return final


def _write_files(temp: Path, name: str, payload: CheckpointPayload) -> None:
    save_file(payload.model_state, str(temp / MODEL_FILE), metadata={"format": "pt"})
    if payload.ema_state is not None:
        save_file(payload.ema_state, str(temp / EMA_FILE), metadata={"format": "pt"})
    progress.advanced(SAVE)  # a file written is progress for the stall watchdog, while the run waits for the writer
    torch.save(payload.optimizer_state, temp / OPTIMIZER_FILE)
    progress.advanced(SAVE)
    torch.save(payload.rng_states, temp / RNG_FILE)
    (temp / STATE_FILE).write_text(json.dumps(payload.state.to_json(), indent=1))
    for path in temp.iterdir():
        fsync_file(path)
    write_manifest(temp, name, summary_of(payload.state))
    fsync_dir(temp)


def read_manifest(folder: Path) -> dict[str, Any]:
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (the save did not finish); not a checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({error})") from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path}: unreadable manifest (no file list)")
    return manifest


def verify_checkpoint(folder: Path, check_contents: bool = True) -> str | None:
    """None when the folder is a complete checkpoint; otherwise a one-line reason naming the bad file."""
    try:
        manifest = read_manifest(folder)
    except CheckpointError as error:
        return str(error)
    for relative, expected in manifest["files"].items():
        path = folder / relative
        if not path.is_file():
            return f"{path}: listed in the manifest but missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path}: {size} bytes, the manifest says {expected['size']} (truncated or overwritten)"
        if check_contents and file_digest(path, "crc32c") != expected["crc32c"]:
            return f"{path}: checksum does not match the manifest (corrupted)"
    return None


def load_checkpoint(folder: Path) -> CheckpointPayload:
    """Loads without executing any pickled code: safetensors, weights_only torch.load, JSON.

    Every tensor is a copy-on-write map of its file (MAP_PRIVATE), not a private copy: the ranks of a node share one
    copy of the checkpoint in the page cache instead of each holding its own, pages are read only when touched, and a
    rank that changes a tensor in place gets a private page, never a change to the file. Safe because a checkpoint's
    files are never rewritten in place (written under a temp name and renamed; removed by unlink).
    """
    model_state = load_file(str(folder / MODEL_FILE), backend="mmap")
    try:
        optimizer_state = _load_tensors(folder / OPTIMIZER_FILE)
        rng_states = _load_tensors(folder / RNG_FILE)
    except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError and friends; all mean "refused"
        raise CheckpointError(
            f"{folder}: refused to load {OPTIMIZER_FILE}/{RNG_FILE}: it holds something other than tensors and "
            f"plain data ({type(error).__name__}); the checkpoint may have been tampered with"
        ) from error
    ema_state = load_file(str(folder / EMA_FILE), backend="mmap") if (folder / EMA_FILE).is_file() else None
    return CheckpointPayload(model_state, optimizer_state, rng_states, read_state(folder), ema_state)


def load_weights(folder: Path, weights: str = "live") -> dict[str, torch.Tensor]:
    """The model's whole state from safetensors only (no pickle), for an export: live, or with the EMA of every
    parameter in place of the parameter (buffers, which have no average, stay)."""
    if weights not in ("live", "ema"):
        raise ValueError(f"weights {weights!r}: expected live or ema")
    state = load_file(str(folder / MODEL_FILE))
    if weights == "ema":
        if not (folder / EMA_FILE).is_file():
            raise CheckpointError(f"{folder}: no {EMA_FILE} (the run kept no EMA: it had no --ema-decay); export its "
                                  "live weights instead")
        state.update(load_file(str(folder / EMA_FILE)))
    return state


def _load_tensors(path: Path) -> Any:
    """A torch.save file with its tensors mapped from the file (see load_checkpoint); weights_only refuses code."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def read_state(folder: Path) -> TrainState:
    try:
        return TrainState.from_json(json.loads((folder / STATE_FILE).read_text()), str(folder / STATE_FILE))
    except StateFormatError as error:
        raise CheckpointError(str(error)) from None


def clean_temp_folders(output_dir: Path) -> None:
    """Removes temp folders left by a save or download that a crash interrupted."""
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if path.is_dir() and path.name.startswith(TEMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
