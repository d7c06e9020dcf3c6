"""Mixing figure (not a test): the same short training run on real text cut into shards in corpus order versus one
shard (which the order shuffles fully); eval loss after about 1.5 epochs. Run: python -m bench.bench_shuffle

The text is the standard library's docstrings and comments (pretrain.sample_text), byte-level tokens (256 = end of
document), in module order, so neighbouring shards share a topic: the case a narrow shard window trains badly on.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from pretrain.prepare.sample_text import write_sample_text

REPO_ROOT = Path(__file__).resolve().parents[1]
EOS = 256
SEQ_LEN = 128
GLOBAL_BATCH = 16  # the test config: 8 per device x 2 accumulation x 1 process
EVAL_EVERY = 10  # every 10th document (up to a tenth of the tokens) is held out, so eval covers the whole corpus


def byte_documents(text_dir: Path) -> list[np.ndarray]:
    docs = []
    for path in sorted(text_dir.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            raw = json.loads(line)["text"].encode("utf-8")
            docs.append(np.append(np.frombuffer(raw, dtype=np.uint8).astype(np.uint16), np.uint16(EOS)))
    return docs


def write_datasets(root: Path, text_bytes: int, num_shards: int) -> tuple[Path, Path, int, int]:
    """(corpus-order dir, one-shard dir, training samples, eval samples); both hold the same samples."""
    docs = byte_documents(root / "text") if (root / "text").is_dir() else None
    if docs is None:
        write_sample_text(root / "text", text_bytes)
        docs = byte_documents(root / "text")
    budget = sum(len(d) for d in docs) / EVAL_EVERY
    train_docs, eval_docs, held = [], [], 0
    for index, doc in enumerate(docs):
        if index % EVAL_EVERY == EVAL_EVERY - 1 and held + len(doc) <= budget:
            eval_docs.append(doc)
            held += len(doc)
        else:
            train_docs.append(doc)
    train, evaluation = np.concatenate(train_docs), np.concatenate(eval_docs)
    shard_tokens = len(train) // (num_shards * SEQ_LEN) * SEQ_LEN
    train = train[: shard_tokens * num_shards]  # every shard a whole number of samples: no tail differs
    ordered, single = root / "corpus-order", root / "one-shard"
    for folder in (ordered, single):
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "zz_eval.npz", input_ids=evaluation)  # sorts last: the held-out shard of both runs
    for index in range(num_shards):
        np.savez(ordered / f"shard_{index:03d}.npz", input_ids=train[index * shard_tokens : (index + 1) * shard_tokens])
    np.savez(single / "shard_000.npz", input_ids=train)
    return ordered, single, len(train) // SEQ_LEN, len(evaluation) // SEQ_LEN


# The reference shuffles its one shard fully (one block of one chunk is the whole epoch); the control is the order
# runs had before chunking (blocks of two whole shards).
FULL_SHUFFLE = ["--block-chunks", "1", "--shard-chunks", "1"]
OLD_ORDER = ["--block-chunks", "2", "--shard-chunks", "1"]


def train_command(data_dir: Path, work: Path, steps: int, eval_batches: int, extra: list[str]) -> list[str]:
    return [
        str(REPO_ROOT / "start_training.sh"), "--gpus", "0", "--config", "test", "--data-dir", str(data_dir),
        "--output-dir", str(work / "checkpoints"), "--logging-dir", str(work / "logs"),
        "--checkpoint-bucket", str(work / "bucket"), "--max-steps", str(steps), "--save-steps", str(10 * steps),
        "--logging-steps", str(max(1, steps // 5)), "--eval-shards", "1", "--eval-steps", "0",
        "--eval-batches", str(eval_batches), "--dataloader-num-workers", "0", "--export-final-model", "false",
        *extra,
    ]


def final_eval_loss(command: list[str]) -> tuple[float, float]:
    began = time.monotonic()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"training failed ({result.returncode}): {shlex.join(command)}\n{result.stderr[-3000:]}")
    losses = re.findall(r"eval loss ([0-9.]+)", result.stdout + result.stderr)
    if not losses:
        sys.exit(f"no eval loss in the output of {shlex.join(command)}")
    return float(losses[-1]), time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-bytes", type=int, default=300_000, help="size of the text corpus")
    parser.add_argument("--shards", type=int, default=32, help="shards of the corpus-order dataset")
    parser.add_argument("--epochs", type=float, default=1.5)
    parser.add_argument("--seeds", default="7,42,1,2,3,4,5",
                        help="comma-separated training seeds; each changes the init and every order, and the "
                             "figure is the mean difference over them (one seed's is noisy)")
    parser.add_argument("--work", type=Path, default=None, help="keep data and runs here (default: a temp folder)")
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=False,
                        help="also train the corpus-order shards with the old order (blocks of 2 whole shards)")
    parser.add_argument("extra", nargs="*",
                        help="more training flags for the corpus-order runs, after -- (e.g. --block-chunks 32)")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_shuffle_") as tmp:
        root = args.work or Path(tmp)
        ordered, single, train_samples, eval_samples = write_datasets(root, args.text_bytes, args.shards)
        steps = math.ceil(args.epochs * train_samples / GLOBAL_BATCH)
        eval_batches = max(1, eval_samples // 8)  # the whole eval shard, in micro-batches of 8
        print(f"corpus: {train_samples * SEQ_LEN:,} training tokens ({train_samples} samples of {SEQ_LEN}), "
              f"{eval_samples * SEQ_LEN:,} eval tokens; {steps} steps = {args.epochs} epochs; seeds {seeds}")
        runs = [("corpus order", ordered, args.extra), ("one shard, fully shuffled", single, FULL_SHUFFLE)]
        runs += [("control: corpus order, old order", ordered, OLD_ORDER)] if args.control else []
        differences: dict[str, list[float]] = {}
        for seed in seeds:
            losses = {}
            for name, data_dir, flags in runs:
                work = root / f"run-{seed}-{len(losses)}"
                command = train_command(data_dir, work, steps, eval_batches, [*flags, "--seed", str(seed)])
                losses[name], seconds = final_eval_loss(command)
                print(f"seed {seed} {name}: eval loss {losses[name]:.4f} nats/token ({seconds:.0f} s)  "
                      f"{shlex.join(command)}", flush=True)
            for name in losses:
                if name != "one shard, fully shuffled":
                    differences.setdefault(name, []).append(losses[name] - losses["one shard, fully shuffled"])
        for name, values in differences.items():
            mean = sum(values) / len(values)
            print(f"{name} minus one fully shuffled shard: mean {mean:+.4f} nats over {len(values)} seeds "
                  f"({', '.join(f'{v:+.4f}' for v in values)})" + (" (target <= 0.01)" if name == "corpus order" else ""))
        print(f"reproduce: python -m bench.bench_shuffle --text-bytes {args.text_bytes} --shards {args.shards} "
              f"--epochs {args.epochs} --seeds {args.seeds}" + (f" -- {shlex.join(args.extra)}" if args.extra else ""))


if __name__ == "__main__":
    main()
