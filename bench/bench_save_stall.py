"""How long `Checkpointer.save` blocks the training thread on a ~350 M-parameter model, against one memcpy of the
same state (target <= 1.5x), and the host memory a save adds beyond training (target: about one state).

One process, the real Checkpointer (no bucket), a GPT-NeoX built with `build_model` and AdamW state made by one real
step. Each round times, side by side: `torch.empty_like(t).copy_(t)` of every tensor of the state, a `bytes` copy of
every tensor, one save, and a `copy_` into already touched buffers (the save's own, once written); the writer is waited for (untimed) before the next round, as training steps would cover
it. The first save allocates the reusable host buffers and is reported apart; ratios are medians over the others.
Needs about 13 GB of RAM and 10 GB of disk under the temp folder.

    python -m bench.bench_save_stall [--rounds 4] [--hidden-size 1024 --layers 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

from configs import CONFIGS, with_changes  # noqa: E402
from pretrain.checkpoint.checkpointer import Checkpointer  # noqa: E402
from pretrain.checkpoint.state_dicts import full_optimizer_state  # noqa: E402
from pretrain.model.build import build_model  # noqa: E402
from pretrain.optim import build_optimizer  # noqa: E402
from pretrain.preemption import PreemptionFlag  # noqa: E402
from tests.checkpointer_harness import state_at  # noqa: E402


def tensors_of(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for value in state.values() for t in tensors_of(value)]
    if isinstance(state, (list, tuple)):
        return [t for value in state for t in tensors_of(value)]
    return []


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Resets VmHWM (Linux 4.0+), so the next reading is the peak from here on."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def copy_with_torch(tensors: list[torch.Tensor]) -> float:
    """Allocate-and-copy of each tensor (what a save without reusable buffers costs); each copy is dropped at once,
    so the control does not hold a second state in this shared machine's memory."""
    return sum(timed(lambda: torch.empty_like(t).copy_(t)) for t in tensors)


def copy_into(buffers: list[torch.Tensor], tensors: list[torch.Tensor]) -> float:
    """copy_ into buffers already allocated and touched: the floor for a save that reuses its buffers."""
    if [b.shape for b in buffers] != [t.shape for t in tensors]:
        raise RuntimeError("the checkpointer's host buffers do not line up with the state's tensors")
    return sum(timed(lambda: b.copy_(t)) for b, t in zip(buffers, tensors))


def copy_as_bytes(tensors: list[torch.Tensor]) -> float:
    return sum(timed(lambda: t.reshape(-1).view(torch.uint8).numpy().tobytes()) for t in tensors)


def load() -> str:
    return f"load average {os.getloadavg()[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=20)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error(f"--rounds {args.rounds}: need at least 2 (the first save allocates its buffers and is apart)")
    with tempfile.TemporaryDirectory(prefix="bench-save-stall-") as scratch:
        config = with_changes(CONFIGS["test"], hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                              num_attention_heads=16, intermediate_size=4 * args.hidden_size, vocab_size=50257,
                              output_dir=str(Path(scratch) / "checkpoints"), checkpoint_bucket="", save_total_limit=1)
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = build_model(config.model)
        optimizer = build_optimizer(model, config)
        model, optimizer = accelerator.prepare(model, optimizer)
        input_ids = torch.randint(0, config.model.vocab_size, (1, 32))
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # gradients are not part of a checkpoint
        state = [accelerator.get_state_dict(model), full_optimizer_state(model, optimizer.optimizer)]
        tensors = tensors_of(state)
        state_bytes = sum(t.numel() * t.element_size() for t in tensors)
        del state
        params = sum(p.numel() for p in model.parameters())
        print(f"model {params / 1e6:.0f} M parameters; state to save (weights + AdamW) {state_bytes / 2**30:.2f} GiB "
              f"in {len(tensors)} tensors; {torch.get_num_threads()} threads; {load()}", flush=True)

        training_rss = rss_bytes()
        checkpointer = Checkpointer(config, accelerator, PreemptionFlag())
        stalls, torch_copies, byte_copies, warm_copies, peaks = [], [], [], [], []
        try:
            for round_index in range(args.rounds):
                torch_copies.append(copy_with_torch(tensors))
                byte_copies.append(copy_as_bytes(tensors))
                reset_peak()
                stalls.append(timed(lambda: checkpointer.save(state_at(round_index + 1), model, optimizer, "bench")))
                save_peak = peak_bytes()
                if not checkpointer.writer.wait_idle(1800):
                    raise TimeoutError("the checkpoint writer did not finish in 1800 s")
                checkpointer._raise_write_failure()
                peaks.append((save_peak - training_rss, peak_bytes() - training_rss))
                # The checkpointer's own buffers, now that its writer is done with them: no second state in memory.
                warm_copies.append(copy_into(tensors_of(list(checkpointer.host._buffers.values())), tensors))
                print(f"round {round_index + 1}: save blocked {stalls[-1]:.2f} s, empty_like+copy_ "
                      f"{torch_copies[-1]:.2f} s, bytes copy {byte_copies[-1]:.2f} s, copy_ into warm buffers "
                      f"{warm_copies[-1]:.2f} s; peak RSS beyond training "
                      f"{peaks[-1][0] / 2**30:.2f} GiB during the save, {peaks[-1][1] / 2**30:.2f} GiB until "
                      f"written; {load()}", flush=True)
        finally:
            checkpointer.close()
            AcceleratorState._reset_state(reset_partial_state=True)

    stall = statistics.median(stalls[1:])
    torch_copy = statistics.median(torch_copies[1:])
    byte_copy = statistics.median(byte_copies[1:])
    warm_copy = statistics.median(warm_copies[1:])
    peak = max(p[1] for p in peaks)
    print(f"save stall {stall:.2f} s (median of rounds 2-{args.rounds}; the first, allocating its buffers: "
          f"{stalls[0]:.2f} s), {state_bytes / 2**30 / stall:.2f} GiB/s")
    print(f"ratio stall / empty_like+copy_ = {stall / torch_copy:.2f} ({torch_copy:.2f} s) (target <= 1.5)")
    print(f"ratio stall / bytes copy = {stall / byte_copy:.2f} ({byte_copy:.2f} s) (target <= 1.5)")
    print(f"ratio stall / copy_ into warm buffers = {stall / warm_copy:.2f} ({warm_copy:.2f} s) (the same memcpy "
          "without allocating; the save reuses its buffers the same way)")
    print(f"peak RSS beyond training over a save and its write: {peak / 2**30:.2f} GiB = "
          f"{peak / state_bytes:.2f}x one state (target about 1x); {load()}")


if __name__ == "__main__":
    main()
