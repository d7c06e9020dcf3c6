"""Data preparation figures (not a test): prepare_data's throughput against the tokenizers library's own
encode_batch over the same text and cores, and peak RSS on a corpus vs one 10x larger.
Run from the repository root: python -m bench.bench_prepare
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from pretrain.prepare.sample_text import write_sample_text
from pretrain.prepare.tokenizer import train_byte_level_bpe
from pretrain.prepare.tokenizing import default_workers

REPO_ROOT = Path(__file__).resolve().parents[1]
RSS_POLL_SECONDS = 0.02

# Runs in a fresh interpreter so the baseline pays for nothing the prep does not: the texts are loaded before the
# clock starts, and encode_batch uses the library's own threads on every core.
BASELINE = """
import json, sys, time
from pathlib import Path
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[1])
texts = [json.loads(line)["text"] for path in sorted(Path(sys.argv[2]).glob("*.jsonl")) for line in open(path)]
began = time.perf_counter()
tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
print(json.dumps({"seconds": time.perf_counter() - began, "tokens": tokens}))
"""


def make_corpus(sample: list[Path], folder: Path, copies: int) -> Path:
    """`copies` renamed copies of the sample files: the same text per byte, a corpus of the size asked."""
    folder.mkdir(parents=True, exist_ok=True)
    for copy in range(copies):
        for path in sample:
            shutil.copyfile(path, folder / f"copy{copy:03d}_{path.name}")
    return folder


def run_prep(corpus: Path, tokenizer: Path, out: Path, workers: int | None, extra: list[str]) -> tuple[float, int]:
    """Wall seconds of the whole command and the peak RSS (bytes) of its process tree, polled; workers None: the
    command's default."""
    command = [sys.executable, "-m", "pretrain.prepare_data", str(corpus), "--out", str(out), "--tokenizer",
               str(tokenizer), *(["--workers", str(workers)] if workers else []), *extra]
    began = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(RSS_POLL_SECONDS)
    seconds = time.perf_counter() - began
    stderr = process.stderr.read().decode()
    if process.returncode != 0:
        raise SystemExit(f"prepare_data failed ({process.returncode}): {stderr.strip()}")
    return seconds, peak


def baseline(tokenizer: Path, corpus: Path) -> tuple[float, int]:
    result = subprocess.run([sys.executable, "-c", BASELINE, str(tokenizer), str(corpus)], capture_output=True,
                            text=True, check=True, cwd=REPO_ROOT)
    figures = json.loads(result.stdout)
    return figures["seconds"], figures["tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample-bytes", type=int, default=1_000_000, help="stdlib text per corpus copy")
    parser.add_argument("--throughput-copies", type=int, default=6, help="copies of the sample for the speed test")
    parser.add_argument("--rss-copies", type=int, default=2, help="copies in the small RSS corpus (large: 10x)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as scratch:
        root = Path(scratch)
        sample = write_sample_text(root / "sample", args.sample_bytes)
        texts = [json.loads(line)["text"] for path in sample for line in path.read_text().splitlines()]
        tokenizer = root / "tokenizer.json"
        train_byte_level_bpe(texts, args.vocab_size, tokenizer)
        corpus = make_corpus(sample, root / "speed", args.throughput_copies)
        megabytes = sum(p.stat().st_size for p in corpus.iterdir()) / 1e6
        print(f"throughput: {megabytes:.1f} MB of stdlib text (jsonl), byte-level BPE of {args.vocab_size}, "
              f"{cores} cores")
        base_seconds, tokens = baseline(tokenizer, corpus)
        print(f"  tokenizers encode_batch (texts in memory, all cores): {base_seconds:6.2f} s  "
              f"{tokens / base_seconds:12,.0f} tok/s")
        for workers in dict.fromkeys([None, cores, 1]):
            seconds, _ = run_prep(corpus, tokenizer, root / f"out-w{workers}", workers, [])
            flag = f"(default: --workers {default_workers()})" if workers is None else f"--workers {workers}"
            print(f"  prepare_data {flag}, whole command: {seconds:6.2f} s  {tokens / seconds:12,.0f} tok/s  "
                  f"ratio {base_seconds / seconds:.2f}x{' (target >= 0.8x)' if workers is None else ''}")
        rss_args = ["--bucket-tokens", str(1 << 18), "--shard-tokens", str(1 << 18)]
        peaks = []
        for copies in (args.rss_copies, 10 * args.rss_copies):
            corpus = make_corpus(sample, root / f"rss-{copies}", copies)
            size = sum(p.stat().st_size for p in corpus.iterdir()) / 1e6
            seconds, peak = run_prep(corpus, tokenizer, root / f"rss-out-{copies}", None, rss_args)
            peaks.append(peak)
            print(f"peak RSS (process tree, default --workers, --bucket-tokens 2^18): {size:6.1f} MB corpus "
                  f"{peak / 2**20:7.1f} MiB ({seconds:.1f} s)")
            shutil.rmtree(corpus)
        print(f"  growth with a 10x corpus: {100 * (peaks[1] / peaks[0] - 1):+.1f}% (target <= 10%)")


if __name__ == "__main__":
    main()
