"""Launch-to-first-step on a brand-new VM (fresh working copy, only the buckets survive) with a data bucket vs one 10x
larger, for a fresh run and a resume, on the moto S3 emulator; prints the ratio (target <= 1.2) and the breakdown read
from the run's own log lines. Not a test. From the repository root: python -m bench.bench_new_vm [--shards 4 --shard-mib 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from pretrain.storage import open_storage
from tests import emulators
from tests.launcher import survivors
from tests.vms import new_vm

MiB = 1024 * 1024
VOCAB = 512
RUN_NAME = "bench"
DATASET_JSON = "dataset.json"
FIRST_STEP_TIMEOUT_SECONDS = 900.0
FINISH_TIMEOUT_SECONDS = 600.0
KILL_TIMEOUT_SECONDS = 30.0
COMMON = ["--logging-steps", "1", "--eval-steps", "0", "--run-name", RUN_NAME, "--export-final-model", "false"]

CHECKPOINT_DOWNLOADED = re.compile(r"downloaded \S+ \((\d+) MB\) in ([\d.]+) s")
RESUMED = re.compile(r"resuming from \S+ at step \d+ \(checkpoint fetched in ([\d.]+) s, loaded in ([\d.]+) s\)")
DATA_READY = re.compile(r"data: .*?(\d+) shards ready before step 1.*\(ready in ([\d.]+) s\)")
PLAN = re.compile(r"config \S+ on ")
COMPILED = re.compile(r"compiled the model in ([\d.]+) s")
STEP = re.compile(r"^step \d+/\d+")


@dataclass
class Launch:
    """One start_training.sh on a new VM: every output line with the seconds since Popen at which it arrived."""

    vm: Path
    command: list[str]
    lines: list[tuple[float, str]] = field(default_factory=list)
    load: float = 0.0

    def start(self) -> None:
        self.load = os.getloadavg()[0]
        self._changed = threading.Condition()
        self.started = time.monotonic()
        # Its own session, as an orchestrator starts it; stderr (the log) and stdout (the step lines) in one stream.
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True, stdin=subprocess.DEVNULL)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append((time.monotonic() - self.started, line.rstrip("\n")))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()  # end of output: a waiter stops looking

    def first(self, pattern: re.Pattern, after: float = -1.0) -> tuple[float, re.Match] | None:
        with self._changed:
            for seconds, line in self.lines:
                found = pattern.search(line) if seconds >= after else None
                if found:
                    return seconds, found
        return None

    def wait_for(self, pattern: re.Pattern, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        with self._changed:
            while (hit := self.first(pattern)) is None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    raise RuntimeError(f"{self.vm.name}: never printed {pattern.pattern!r} (exit {self.process.poll()}):\n"
                                       + "\n".join(line for _, line in self.lines[-40:]))
                self._changed.wait(timeout=min(left, 1.0))
        return hit[0]

    def finish(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            vanish(self.vm)
            raise RuntimeError(f"{self.vm.name}: still running after {timeout:.0f} s") from None

    def text(self) -> str:
        with self._changed:
            return "\n".join(line for _, line in self.lines)

    def save(self, folder: Path | None) -> None:
        """Every line with its arrival time, for reading where a slow launch spent its time."""
        if folder is not None:
            with self._changed:
                stamped = "".join(f"{seconds:7.2f} {line}\n" for seconds, line in self.lines)
            (folder / f"{self.vm.name}.log").write_text(stamped)


def vanish(vm: Path) -> None:
    """SIGKILL to every process of this VM (the launcher starts training in a session of its own)."""
    for _ in range(3):  # a launcher may still be starting a child while the first sweep runs
        for line in survivors(str(vm)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
    deadline = time.monotonic() + KILL_TIMEOUT_SECONDS
    while survivors(str(vm)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of {vm} survived SIGKILL: {survivors(str(vm))}")
        time.sleep(0.1)


@dataclass
class Breakdown:
    """Seconds since launch to the first step, and where they went, as the run's own log lines report them."""

    first_step: float
    load: float
    ckpt_download: float | None
    ckpt_mb: float | None
    ckpt_fetch: float | None
    ckpt_load: float | None
    data_ready: float
    shards_before_step1: int
    model_build: float
    compile: float | None
    start_up: float  # launcher, set-up check, accelerate, imports, bucket probe: before the checkpoint or data work
    rest: float  # optimizer, prepare(), restore, metrics set-up and the first step itself

    @property
    def after_start_up(self) -> float:
        return self.first_step - self.start_up

    @classmethod
    def of(cls, launch: Launch, first_step: float) -> Breakdown:
        def seconds(pattern: re.Pattern, group: int) -> float | None:
            hit = launch.first(pattern)
            return float(hit[1].group(group)) if hit else None

        data_at, data = launch.first(DATA_READY)
        plan_at, _ = launch.first(PLAN, after=data_at)  # the launcher prints the memory plan's first line too
        data_ready = float(data.group(2))
        fetch, loaded = seconds(RESUMED, 1), seconds(RESUMED, 2)
        return cls(first_step=first_step, load=launch.load, ckpt_download=seconds(CHECKPOINT_DOWNLOADED, 2),
                   ckpt_mb=seconds(CHECKPOINT_DOWNLOADED, 1), ckpt_fetch=fetch, ckpt_load=loaded,
                   data_ready=data_ready, shards_before_step1=int(data.group(1)),
                   # build_model (and load_model_state on a resume) runs between these two log lines.
                   model_build=plan_at - data_at, compile=seconds(COMPILED, 1),
                   start_up=data_at - data_ready - (fetch or 0.0) - (loaded or 0.0), rest=first_step - plan_at)


def write_shard(path: Path, tokens: int, seed: int) -> None:
    ids = np.random.default_rng(seed).integers(0, VOCAB, size=tokens, dtype=np.uint16)
    np.savez(path, input_ids=ids)


def dataset_manifest(names: list[str], tokens: int, size_bytes: int) -> dict:
    """dataset.json as pretrain.prepare_data writes it, less the tokenizer entry (these shards have none)."""
    return {"format_version": 1, "vocab_size": VOCAB, "eos_token_id": 0, "dtype": "uint16",
            "shards": [{"path": name, "num_tokens": tokens, "size_bytes": size_bytes} for name in names]}


def fill_bucket(url: str, shard: Path, count: int, tokens: int, with_manifest: bool) -> None:
    """`count` shards (the same bytes under every key: the bench times transfers, not content), dataset.json last."""
    storage = open_storage(url)
    names = [f"shard_{i:05d}.npz" for i in range(count)]
    storage.upload_many([(shard, name) for name in names])
    if with_manifest:
        manifest = shard.parent / f"{DATASET_JSON}.{count}"
        manifest.write_text(json.dumps(dataset_manifest(names, tokens, shard.stat().st_size), indent=2) + "\n")
        storage.upload(manifest, DATASET_JSON)


def the_command(vm: Path, data_url: str, checkpoint_url: str, *schedule: str) -> list[str]:
    return [str(vm / "start_training.sh"), "--config", "test", "--data-bucket", data_url,
            "--checkpoint-bucket", checkpoint_url, "--resume", "auto", *COMMON, *schedule]


def run_pair(scratch: Path, tag: str, data_url: str, checkpoint_url: str, extra: list[str],
             log_dir: Path | None) -> tuple[Breakdown, Breakdown]:
    """A fresh run on an empty checkpoint bucket (it also writes the checkpoint at step 2), then a resume from that
    checkpoint on another new VM; each VM is removed afterwards (a large bucket fills its data/ in the background)."""
    vm = new_vm(scratch, f"{tag}-fresh")
    fresh = Launch(vm, the_command(vm, data_url, checkpoint_url, "--max-steps", "2", "--save-steps", "2", *extra))
    try:
        fresh.start()
        fresh_first = fresh.wait_for(STEP, FIRST_STEP_TIMEOUT_SECONDS)
        code = fresh.finish(FINISH_TIMEOUT_SECONDS)
        if code != 0 or "uploaded checkpoint-" not in fresh.text():
            raise RuntimeError(f"{vm.name}: exit {code} without uploading its checkpoint:\n{fresh.text()[-3000:]}")
    finally:
        vanish(vm)
        fresh.save(log_dir)
        shutil.rmtree(vm, ignore_errors=True)
    vm = new_vm(scratch, f"{tag}-resume")
    resume = Launch(vm, the_command(vm, data_url, checkpoint_url, "--max-steps", "4", *extra))
    try:
        resume.start()
        resume_first = resume.wait_for(STEP, FIRST_STEP_TIMEOUT_SECONDS)
        if resume.first(RESUMED) is None:
            raise RuntimeError(f"{vm.name}: did not resume:\n{resume.text()[-3000:]}")
    finally:
        vanish(vm)  # the first step is all we time; the rest of the run would only cost the shared cores
        resume.finish(KILL_TIMEOUT_SECONDS)
        resume.save(log_dir)
        shutil.rmtree(vm, ignore_errors=True)
    return Breakdown.of(fresh, fresh_first), Breakdown.of(resume, resume_first)


def cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_row(label: str, b: Breakdown) -> None:
    checkpoint = "-" if b.ckpt_fetch is None else (
        f"{cell(b.ckpt_fetch)} (dl {cell(b.ckpt_download)}, {cell(b.ckpt_mb, 0)} MB) + load {cell(b.ckpt_load)}")
    print(f"  {label:<22} {b.first_step:6.1f} s | start-up {b.start_up:5.1f} | checkpoint {checkpoint:<27} | "
          f"data {b.data_ready:5.1f} ({b.shards_before_step1} shards) | model {b.model_build:4.1f} | "
          f"compile {cell(b.compile):>4} | rest {b.rest:4.1f} | load avg {b.load:.1f}", flush=True)


def median_of(runs: list[Breakdown], name: str) -> float:
    return statistics.median(getattr(b, name) for b in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, default=24, help="shards in the small bucket (the large one has 10x)")
    parser.add_argument("--factor", type=int, default=10, help="large bucket shards / small bucket shards")
    parser.add_argument("--shard-mib", type=float, default=16.0, help="size of every shard")
    parser.add_argument("--repeats", type=int, default=2, help="launches of each kind; the median is reported")
    parser.add_argument("--variants", default="manifest",
                        help="comma-separated: manifest (dataset.json in the bucket), headers (none: ranged reads)")
    parser.add_argument("--log-dir", type=Path, help="keep each launch's output, every line with its arrival time")
    parser.add_argument("--compile", action="store_true", help="torch.compile on (the test config has it off)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if args.factor < 2 or args.shards < 2 or not set(variants) <= {"manifest", "headers"}:
        parser.error("--shards and --factor must be at least 2; --variants takes manifest and/or headers")
    extra = ["--compile-model", "true"] if args.compile else []
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    tokens = int(args.shard_mib * MiB) // 2
    sizes = {"small": args.shards, "large": args.shards * args.factor}

    scratch = Path(tempfile.mkdtemp(prefix="bench-new-vm-"))
    moto = emulators.start_moto()
    try:
        os.environ.update(emulators.s3_env(moto.endpoint))  # for this process's uploads and every launch
        shard = scratch / "shard.npz"
        write_shard(shard, tokens, seed=0)
        shard_mb = shard.stat().st_size / 1e6
        for size, count in sizes.items():
            emulators.create_s3_bucket(moto.endpoint, f"data-{size}")
            started = time.monotonic()
            fill_bucket(f"s3://data-{size}", shard, count, tokens, with_manifest=True)
            print(f"uploaded {size}: {count} shards x {shard_mb:.1f} MB = {count * shard_mb / 1e3:.2f} GB in "
                  f"{time.monotonic() - started:.0f} s", flush=True)
        print(f"{os.cpu_count()} CPUs; load average at start {os.getloadavg()[0]:.1f}; torch.compile "
              f"{'on' if args.compile else 'off'}", flush=True)

        summary = []
        for variant in variants:
            if variant == "headers":
                for size in sizes:
                    open_storage(f"s3://data-{size}").delete(DATASET_JSON)
            print(f"\n{variant}: launch to first step (s) and its breakdown (s), each a new VM", flush=True)
            results: dict[tuple[str, str], list[Breakdown]] = {}
            for repeat in range(args.repeats):
                for size in sizes:  # interleaved, so a change in the shared machine's load hits both sizes alike
                    bucket = f"ckpt-{variant}-{size}-{repeat}"
                    emulators.create_s3_bucket(moto.endpoint, bucket)
                    fresh, resume = run_pair(scratch, f"{variant}-{size}-{repeat}", f"s3://data-{size}",
                                             f"s3://{bucket}", extra, args.log_dir)
                    for kind, b in (("fresh", fresh), ("resume", resume)):
                        results.setdefault((size, kind), []).append(b)
                        print_row(f"{size} {kind} #{repeat + 1}", b)
            for kind in ("fresh", "resume"):
                small, large = results[("small", kind)], results[("large", kind)]
                ratio = median_of(large, "first_step") / median_of(small, "first_step")
                # Start-up (launcher, imports) does not touch the data bucket and carries most of the load noise.
                small_after, large_after = median_of(small, "after_start_up"), median_of(large, "after_start_up")
                summary.append(f"  {variant:<8} {kind:<6} small {median_of(small, 'first_step'):6.1f} s  large "
                               f"{median_of(large, 'first_step'):6.1f} s  ratio {ratio:.2f} "
                               f"({'meets' if ratio <= 1.2 else 'misses'} <= 1.2); after start-up {small_after:.1f} -> "
                               f"{large_after:.1f} s ({large_after / small_after:.2f}); data ready "
                               f"{median_of(small, 'data_ready'):.1f} -> {median_of(large, 'data_ready'):.1f} s; rest "
                               f"{median_of(small, 'rest'):.1f} -> {median_of(large, 'rest'):.1f} s")
        print(f"\nmedians of {args.repeats}: small {sizes['small']} shards ({sizes['small'] * shard_mb / 1e3:.2f} GB), "
              f"large {sizes['large']} shards ({sizes['large'] * shard_mb / 1e3:.2f} GB); load average now "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print("\n".join(summary))
    finally:
        moto.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
