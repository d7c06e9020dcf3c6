"""Host memory of a resume on one node with 2 processes: both `load_checkpoint` the same ~350 M-parameter checkpoint
(target: both together <= 1.3x one state), against the former loader that gave each process its own copy.

Writes one checkpoint (weights + AdamW state after one real step), reads it once so the page cache is warm for
both loaders, then per loader starts 2 processes (spawn) that load it side by side. From /proc/PID/smaps_rollup
it sums, over both, the growth of PSS (shared pages split between the processes that map them) and of anonymous
(private) memory: right after the load, and after every tensor was read once, as copying it into the model and
optimizer does. Needs about 12 GB of RAM and 5 GB of disk under the temp folder.

    python -m bench.bench_resume_memory [--hidden-size 1024 --layers 20]
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import load_file  # noqa: E402

from bench.bench_save_stall import tensors_of  # noqa: E402
from configs import CONFIGS, with_changes  # noqa: E402
from pretrain.checkpoint import rng  # noqa: E402
from pretrain.checkpoint.format import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    CheckpointPayload,
    load_checkpoint,
    read_state,
    write_checkpoint,
)
from pretrain.checkpoint.state_dicts import clean_state_dict, full_optimizer_state  # noqa: E402
from pretrain.model.build import build_model  # noqa: E402
from pretrain.optim import build_optimizer  # noqa: E402
from tests.checkpointer_harness import state_at  # noqa: E402

PROCESSES = 2
WAIT_SECONDS = 900  # per phase; a child that dies or hangs ends the bench instead of blocking it


def copying_load(folder: Path) -> CheckpointPayload:
    """The loader before the change, kept here as the control: torch.load reads each file into private memory."""
    return CheckpointPayload(
        load_file(str(folder / MODEL_FILE)),
        torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True),
        torch.load(folder / RNG_FILE, map_location="cpu", weights_only=True),
        read_state(folder),
    )


LOADERS = {"copying (former)": copying_load, "mapped (load_checkpoint)": load_checkpoint}


def memory_of(pid: int) -> dict[str, int]:
    """PSS and anonymous bytes of a process, from /proc/PID/smaps_rollup."""
    found = {}
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            parts = line.split()
            if parts[0] in ("Pss:", "Anonymous:"):
                found[parts[0][:-1]] = int(parts[1]) * 1024
    return found


def rank(loader_name: str, folder: str, to_parent, from_parent) -> None:
    """One process of the resume: reports after start-up, after the load, after reading every tensor once."""
    to_parent.put("ready")
    if from_parent.get(timeout=WAIT_SECONDS) != "load":
        return
    payload = LOADERS[loader_name](Path(folder))
    to_parent.put("loaded")
    if from_parent.get(timeout=WAIT_SECONDS) != "touch":
        return
    for tensor in tensors_of([payload.model_state, payload.optimizer_state]):
        tensor.sum()  # reads every page, as the copy into the model and the optimizer does
    to_parent.put("touched")
    from_parent.get(timeout=WAIT_SECONDS)


def measure(loader_name: str, folder: Path) -> dict[str, dict[str, int]]:
    """Sum over the processes of each phase's memory minus their start-up memory."""
    context = multiprocessing.get_context("spawn")
    to_parent = [context.Queue() for _ in range(PROCESSES)]
    from_parent = [context.Queue() for _ in range(PROCESSES)]
    processes = [context.Process(target=rank, args=(loader_name, str(folder), to_parent[i], from_parent[i]))
                 for i in range(PROCESSES)]
    for process in processes:
        process.start()
    phases: dict[str, dict[str, int]] = {}
    try:
        for phase, command in (("ready", "load"), ("loaded", "touch"), ("touched", "exit")):
            for queue in to_parent:
                reported = queue.get(timeout=WAIT_SECONDS)
                if reported != phase:
                    raise RuntimeError(f"a resume process reported {reported!r}, expected {phase!r}")
            readings = [memory_of(process.pid) for process in processes]
            phases[phase] = {key: sum(r[key] for r in readings) for key in ("Pss", "Anonymous")}
            for queue in from_parent:
                queue.put(command)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
    return {phase: {key: value - phases["ready"][key] for key, value in phases[phase].items()}
            for phase in ("loaded", "touched")}


def write_bench_checkpoint(folder: Path, hidden_size: int, layers: int) -> int:
    """A checkpoint of a freshly stepped model; returns the bytes of its tensors (one state)."""
    config = with_changes(CONFIGS["test"], hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=16,
                          intermediate_size=4 * hidden_size, vocab_size=50257)
    torch.manual_seed(0)
    model = build_model(config.model)
    optimizer = build_optimizer(model, config)
    input_ids = torch.randint(0, config.model.vocab_size, (1, 32))
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    payload = CheckpointPayload(clean_state_dict(model.state_dict()), full_optimizer_state(model, optimizer),
                                {f"rank{i}": rng.capture() for i in range(PROCESSES)}, state_at(1))
    state_bytes = sum(t.numel() * t.element_size() for t in tensors_of([payload.model_state, payload.optimizer_state]))
    print(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters; one state (weights + AdamW) "
          f"{state_bytes / 2**30:.2f} GiB", flush=True)
    write_checkpoint(folder.parent, folder.name, payload)
    return state_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as scratch:
        folder = Path(scratch) / "checkpoint-epoch0-step1-files1"
        state_bytes = write_bench_checkpoint(folder, args.hidden_size, args.layers)
        gc.collect()
        for path in folder.iterdir():
            with open(path, "rb") as handle:  # warm page cache for both loaders alike
                while handle.read(64 << 20):
                    pass
        results = {}
        for name in LOADERS:
            results[name] = measure(name, folder)
            for phase, memory in results[name].items():
                print(f"{name:25s} {phase:8s}: PSS {memory['Pss'] / 2**30:5.2f} GiB = "
                      f"{memory['Pss'] / state_bytes:.2f}x one state, anonymous {memory['Anonymous'] / 2**30:5.2f} GiB "
                      f"(both processes); load average {os.getloadavg()[0]:.2f}", flush=True)
    for name, phases in results.items():
        print(f"ratio host RAM of the resume ({PROCESSES} processes, every tensor read) / one state, {name}: "
              f"{phases['touched']['Pss'] / state_bytes:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
