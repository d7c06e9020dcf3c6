"""Tokens/s of our training loop against a bare PyTorch loop on the same model and batches (target ratio >= 0.97).

Our figure is the steady-state throughput the loop itself logs (windows after the first, which holds
start-up); the bare loop is timed over the same steps with the same model, optimizer, accumulation
and clipping, without logging, checkpoints or Accelerate. Which runs first alternates by round, and the
ratio is the median of back-to-back pairs, which cancels most drift of a shared machine.

    python -m bench.bench_train_throughput [--steps 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs import CONFIGS, with_changes  # noqa: E402
from pretrain.cli import validate  # noqa: E402
from pretrain.data.format import discover_shards, inspect_shards, split_eval_shards  # noqa: E402
from pretrain.data.samples import TokenSamples, make_train_loader  # noqa: E402
from pretrain.data.synthetic import generate_sample_data  # noqa: E402
from pretrain.loop import Trainer  # noqa: E402
from pretrain.model.build import build_model  # noqa: E402
from pretrain.optim import build_optimizer  # noqa: E402
from pretrain.preemption import PreemptionFlag  # noqa: E402

WINDOW = 10


def ours(config, workdir: Path) -> float:
    run = with_changes(config, output_dir=str(workdir / "ck"), logging_dir=str(workdir / "logs"), run_name="bench",
                       checkpoint_bucket="",
                       logging_steps=WINDOW, save_steps=10**9, eval_steps=0, export_final_model=False, eval_shards=1)
    Trainer(validate(run), PreemptionFlag()).run()
    records = [json.loads(line) for line in (workdir / "logs" / "bench" / "metrics.jsonl").read_text().splitlines()]
    windows = [r["perf/tokens_per_second"] for r in records if "perf/tokens_per_second" in r]
    return statistics.mean(windows[1:])  # the first window holds start-up and the first (slow) iterations


def bare(config, data_dir: Path) -> float:
    torch.manual_seed(config.seed)
    model = build_model(config.model)
    optimizer = build_optimizer(model, config)
    shards = inspect_shards(data_dir, discover_shards(data_dir), config.seq_len, config.model.vocab_size)
    train, _ = split_eval_shards(shards, 1)
    batches = iter(make_train_loader(TokenSamples(data_dir, train, config.seq_len, config.seed), 0,
                                     config.per_device_train_batch_size, 0, 1, config.dataloader_num_workers))
    model.train()
    accumulation = config.gradient_accumulation_steps
    tokens_per_step = config.per_device_train_batch_size * accumulation * config.seq_len

    def step() -> None:
        for _ in range(accumulation):
            input_ids = next(batches)
            loss = model(input_ids=input_ids, labels=input_ids).loss
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(WINDOW):  # the same steps our first (discarded) window covers
        step()
    started = time.perf_counter()
    for _ in range(config.max_steps - WINDOW):
        step()
    return (config.max_steps - WINDOW) * tokens_per_step / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        data_dir = Path(temp) / "data"
        generate_sample_data(data_dir, vocab_size=CONFIGS["test"].model.vocab_size, seed=0)
        config = with_changes(CONFIGS["test"], data_dir=str(data_dir), max_steps=args.steps, warmup_steps=5)
        ours_runs, bare_runs = [], []
        for round_index in range(args.rounds):
            # Alternate which loop goes first, so drift on a shared machine does not favour either.
            if round_index % 2:
                ours_runs.append(ours(config, Path(temp) / f"ours{round_index}"))
                bare_runs.append(bare(config, data_dir))
            else:
                bare_runs.append(bare(config, data_dir))
                ours_runs.append(ours(config, Path(temp) / f"ours{round_index}"))
            print(f"round {round_index + 1}: ours {ours_runs[-1]:,.0f} tok/s, bare {bare_runs[-1]:,.0f} tok/s, "
                  f"ratio {ours_runs[-1] / bare_runs[-1]:.3f}", flush=True)
    paired = statistics.median(o / b for o, b in zip(ours_runs, bare_runs))
    print(f"test model, {args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} threads")
    print(f"ours  {statistics.median(ours_runs):,.0f} tok/s (median)")
    print(f"bare  {statistics.median(bare_runs):,.0f} tok/s (median)")
    print(f"ratio ours/bare = {paired:.3f}, median of the back-to-back pairs (target >= 0.97)")


if __name__ == "__main__":
    main()
