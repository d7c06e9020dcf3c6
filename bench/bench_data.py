"""Data reader figures (not a test): start-up time when resuming near sample 10 vs 10**8, peak RSS while reading
a dataset vs one 10x larger, and a new VM's time to the first batch from a bucket holding a dataset vs one 10x
larger. Run from the repository root: python -m bench.bench_data
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from pretrain.data.format import discover_shards, inspect_shards
from pretrain.data.order import MIX_SHARDS, SHARD_CHUNKS
from pretrain.data.samples import TokenSamples, make_train_loader
from pretrain.data.training_data import prepare_training_data

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512
RESUME_SEQ_LEN = 128
RESUME_SHARDS = 8
RESUME_TOKENS_PER_SHARD = 65536
RSS_SEQ_LEN = 512
RSS_BATCH = 8
RSS_SHARDS = 8
RSS_TOKENS_PER_SHARD = 2**19
VM_SHARDS = 24
VM_TOKENS_PER_SHARD = 2**20
ONE_PROCESS = SimpleNamespace(is_main_process=True, is_local_main_process=True, num_processes=1)


def write_random_shards(out_dir: Path, num_shards: int, tokens_per_shard: int, compressed: bool, seed: int) -> None:
    """Uniform-format shards, so timing and memory differences come from position and size, not from format."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save = np.savez_compressed if compressed else np.savez
    for index in range(num_shards):
        ids = rng.integers(0, VOCAB, size=tokens_per_shard, dtype=np.uint16)
        save(out_dir / f"shard_{index:04d}.npz", input_ids=ids if index % 2 == 0 else ids.reshape(-1, 256))


def time_to_first_batch(data_dir: Path, start_sample: int, num_workers: int) -> float:
    shards = inspect_shards(data_dir, discover_shards(data_dir), RESUME_SEQ_LEN, VOCAB, check_token_range=False)
    began = time.perf_counter()
    dataset = TokenSamples(data_dir, shards, RESUME_SEQ_LEN, seed=0)
    # 64 samples open all 8 shards from either start (each misses one with odds of 1 in 5000), so both starts
    # open the same shards and the figure compares finding the place, not how many shards one batch happened to need.
    loader = make_train_loader(dataset, start_sample, 64, rank=0, world_size=1, num_workers=num_workers)
    iterator = iter(loader)
    next(iterator)
    elapsed = time.perf_counter() - began
    del iterator, loader
    return elapsed


def bench_resume(root: Path, repeats: int) -> None:
    print(f"resume start-up: {RESUME_SHARDS} shards x {RESUME_TOKENS_PER_SHARD} tokens, seq_len {RESUME_SEQ_LEN}, "
          f"median of {repeats}, constructing dataset + loader through the first batch of 64")
    for compressed in (False, True):
        data_dir = root / f"resume-{'compressed' if compressed else 'stored'}"
        write_random_shards(data_dir, RESUME_SHARDS, RESUME_TOKENS_PER_SHARD, compressed, seed=1)
        for num_workers in (0, 2):
            time_to_first_batch(data_dir, 10, num_workers)
            near, far = [], []
            for repeat in range(repeats):
                # Alternate which position goes first so drifting machine load hits both alike.
                for times, start in [(near, 10), (far, 10**8)][:: 1 if repeat % 2 == 0 else -1]:
                    times.append(time_to_first_batch(data_dir, start, num_workers))
            near_ms, far_ms = statistics.median(near) * 1e3, statistics.median(far) * 1e3
            print(f"  {'compressed' if compressed else 'stored':10s} workers={num_workers}: "
                  f"start 10: {near_ms:7.2f} ms   start 1e8: {far_ms:7.2f} ms   ratio {far_ms / near_ms:.3f}")


def anonymous_rss_kib() -> int:
    """This process's anonymous resident memory (heap, decompressed arrays) from /proc: what grows if a reader holds
    data. Mapped shard pages are file-backed page cache, shared and reclaimable, and are reported apart."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))


def peak_rss_child(data_dir: Path, batches: int, load_all: bool) -> None:
    """Runs in a fresh process: validate every shard, then read `batches` batches; prints the peak anonymous RSS
    (sampled after every batch) and the peak RSS including mapped files, in KiB.

    load_all is the control: it also holds every shard in RAM, showing the measurement would catch that.
    """
    shards = inspect_shards(data_dir, discover_shards(data_dir), RSS_SEQ_LEN, VOCAB)
    held = [np.load(data_dir / s.path)["input_ids"] for s in shards] if load_all else []
    dataset = TokenSamples(data_dir, shards, RSS_SEQ_LEN, seed=0)
    checksum, peak_anonymous = 0, anonymous_rss_kib()
    for _, batch in zip(range(batches), make_train_loader(dataset, 0, RSS_BATCH, 0, 1, num_workers=0)):
        checksum += int(batch[:, 0].sum())
        peak_anonymous = max(peak_anonymous, anonymous_rss_kib())
    del held
    print(peak_anonymous, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def measure_peak_rss(data_dir: Path, batches: int, load_all: bool = False) -> tuple[int, int]:
    command = [sys.executable, "-m", "bench.bench_data", "--rss-child", str(data_dir), "--batches", str(batches)]
    command += ["--load-all"] if load_all else []
    result = subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, text=True)
    anonymous, total = result.stdout.split()[-2:]
    return int(anonymous), int(total)


def bench_rss(root: Path, batches: int) -> None:
    shard_mib = RSS_TOKENS_PER_SHARD * 2 / 2**20
    print(f"peak RSS: {batches} batches of {RSS_BATCH} x {RSS_SEQ_LEN} tokens after validating every shard "
          f"(num_workers 0, fresh process each); shards of {shard_mib:.0f} MiB of uint16 ids; anonymous memory "
          f"(heap, arrays held) and, apart, all RSS including mapped shard pages (page cache, reclaimable)")

    def growth(small: int, large: int) -> str:
        return f"{small / 1024:6.1f} -> {large / 1024:6.1f} MiB ({100 * (large - small) / small:+.1f}%)"

    for compressed in (False, True):
        kind = "compressed" if compressed else "stored"
        small, large = root / f"rss-{kind}-1x", root / f"rss-{kind}-10x"
        write_random_shards(small, RSS_SHARDS, RSS_TOKENS_PER_SHARD, compressed, seed=2)
        write_random_shards(large, 10 * RSS_SHARDS, RSS_TOKENS_PER_SHARD, compressed, seed=2)
        (small_anon, small_all), (large_anon, large_all) = measure_peak_rss(small, batches), measure_peak_rss(large, batches)
        print(f"  {kind:10s}: {RSS_SHARDS} -> {10 * RSS_SHARDS} shards: anonymous {growth(small_anon, large_anon)}   "
              f"with mapped pages {growth(small_all, large_all)}")
    (small_anon, small_all), (large_anon, large_all) = (measure_peak_rss(small, batches, True),
                                                        measure_peak_rss(large, batches, True))
    print(f"  control, every shard also loaded into RAM: anonymous {growth(small_anon, large_anon)}   "
          f"with mapped pages {growth(small_all, large_all)}")


def new_vm_config(bucket: Path, data_dir: Path) -> SimpleNamespace:
    return SimpleNamespace(
        data_dir=str(data_dir), data_bucket=bucket.as_uri(), max_files=0, seq_len=RSS_SEQ_LEN, seed=0, eval_shards=1,
        model=SimpleNamespace(vocab_size=VOCAB), generate_sample_data=False, gcs_credentials="", gcp_project="",
        s3_endpoint_url="", storage_max_retries=1, storage_retry_backoff_seconds=0.1,
        block_chunks=MIX_SHARDS, shard_chunks=SHARD_CHUNKS, per_device_train_batch_size=RSS_BATCH,
        gradient_accumulation_steps=1,
    )


def time_new_vm(bucket: Path, data_dir: Path, frozen=None, start_sample: int = 0):
    """Seconds from nothing local to the first batch: freeze (fresh run) or not (resume), fetch, read."""
    began = time.perf_counter()
    training = prepare_training_data(new_vm_config(bucket, data_dir), ONE_PROCESS, frozen, start_sample)
    next(iter(make_train_loader(training.train, start_sample, RSS_BATCH, 0, 1, num_workers=0)))
    elapsed = time.perf_counter() - began
    local = sum(1 for _ in data_dir.rglob("*.npz"))
    training.close()
    return elapsed, training.frozen, local


def bench_new_vm(root: Path, repeats: int) -> None:
    shard_mib = VM_TOKENS_PER_SHARD * 2 / 2**20
    print(f"new VM, file:// bucket to first batch (empty data dir; median of {repeats}); shards of {shard_mib:.0f} MiB")
    figures = {}
    for scale in (1, 10):
        bucket = root / f"vm-bucket-{scale}x"
        write_random_shards(bucket, scale * VM_SHARDS, VM_TOKENS_PER_SHARD, compressed=False, seed=3)
        fresh, resumed = [], []
        for repeat in range(repeats):
            seconds, frozen, local = time_new_vm(bucket, root / f"vm-{scale}x-fresh-{repeat}")
            fresh.append(seconds)
            middle = scale * VM_SHARDS * VM_TOKENS_PER_SHARD // RSS_SEQ_LEN // 2
            seconds, _, local_resumed = time_new_vm(bucket, root / f"vm-{scale}x-resume-{repeat}", frozen, middle)
            resumed.append(seconds)
        figures[scale] = statistics.median(fresh), statistics.median(resumed)
        print(f"  {scale * VM_SHARDS:4d} shards: fresh run {figures[scale][0]:6.2f} s ({local} shards local at the "
              f"first batch)   resume mid-epoch {figures[scale][1]:6.2f} s ({local_resumed} local)")
    print(f"  10x data / 1x: fresh {figures[10][0] / figures[1][0]:.2f}x   resume {figures[10][1] / figures[1][1]:.2f}x "
          f"(target <= 1.2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--load-all", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child is not None:
        peak_rss_child(args.rss_child, args.batches, args.load_all)
        return
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        bench_new_vm(Path(tmp), min(args.repeats, 3))
        bench_resume(Path(tmp), args.repeats)
        bench_rss(Path(tmp), args.batches)


if __name__ == "__main__":
    main()
