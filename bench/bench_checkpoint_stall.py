"""Training time lost to a checkpoint: background upload (ours) against uploading synchronously (target <= 10%).

Runs the real Trainer against a moto S3 server on 127.0.0.1. "Synchronous" is the same save followed by
waiting for its write and upload, which is what a loop without background I/O does. Reported per save:
the time the training thread is blocked, and the whole run's wall time against a run with no bucket.
On this 2-core machine the emulator shares the CPU with training, so the wall-time figure also holds
the cost of serving the upload, which a real bucket does elsewhere.

    python -m bench.bench_checkpoint_stall [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import CONFIGS, with_changes  # noqa: E402
from pretrain.cli import validate  # noqa: E402
from pretrain.data.synthetic import generate_sample_data  # noqa: E402
from pretrain.loop import Trainer  # noqa: E402
from pretrain.preemption import PreemptionFlag  # noqa: E402
from tests import emulators  # noqa: E402

# About 19 M parameters: 76 MB of weights and 150 MB of AdamW moments per checkpoint.
MODEL = {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "intermediate_size": 2048}


def run(mode: str, base, workdir: Path, bucket_url: str) -> tuple[float, list[float]]:
    """Times how long each save blocks the training thread; "sync" also waits for the write and the upload."""
    config = with_changes(base, output_dir=str(workdir / "checkpoints"), logging_dir=str(workdir / "logs"),
                          checkpoint_bucket=bucket_url if mode != "none" else "",
                          save_steps=base.save_steps if mode != "none" else 10**9)
    trainer = Trainer(validate(config), PreemptionFlag())
    blocked: list[float] = []
    with trainer.cleanup:
        trainer.set_up()
        checkpointer = trainer.checkpointer
        save = checkpointer.save

        def timed_save(*args, **kwargs) -> None:
            started = time.perf_counter()
            save(*args, **kwargs)
            if mode == "sync" and checkpointer.uploader is not None:
                checkpointer.writer.wait_idle(3600)
                checkpointer.uploader.wait_idle(3600)
            blocked.append(time.perf_counter() - started)

        checkpointer.save = timed_save
        started = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - started
    return elapsed, blocked[:-1]  # the last save is the end-of-run one, after the clock matters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save-steps", type=int, default=10)
    args = parser.parse_args()
    emulator = emulators.start_moto()
    try:
        os.environ.update(emulators.s3_env(emulator.endpoint))
        with tempfile.TemporaryDirectory(prefix="bench-stall-") as scratch:
            data_dir = Path(scratch) / "data"
            generate_sample_data(data_dir, vocab_size=512, seed=0)
            base = with_changes(CONFIGS["test"], **MODEL, data_dir=str(data_dir), max_steps=args.steps,
                                save_steps=args.save_steps, warmup_steps=2, logging_steps=10**6, eval_steps=0,
                                export_final_model=False, run_name="bench", remote_save_total_limit=2)
            totals: dict[str, list[float]] = {"none": [], "background": [], "sync": []}
            blocked: dict[str, list[float]] = {"background": [], "sync": []}
            for round_index in range(args.rounds):
                for mode in ("none", "background", "sync"):
                    bucket = f"bench-{uuid.uuid4().hex[:10]}"
                    emulators.create_s3_bucket(emulator.endpoint, bucket)
                    elapsed, saves = run(mode, base, Path(scratch) / f"{mode}{round_index}", f"s3://{bucket}/run")
                    totals[mode].append(elapsed)
                    if mode in blocked:
                        blocked[mode].extend(saves)
                    print(f"round {round_index + 1} {mode:10s} {elapsed:6.1f} s for {args.steps} steps"
                          + (f", saves blocked {', '.join(f'{s:.2f}' for s in saves)} s" if saves else ""), flush=True)
    finally:
        emulator.stop()
    background, sync = statistics.median(blocked["background"]), statistics.median(blocked["sync"])
    baseline = statistics.median(totals["none"])
    lost_background = statistics.median(totals["background"]) - baseline
    lost_sync = statistics.median(totals["sync"]) - baseline
    print("checkpoint of a 19 M-parameter model (about 230 MB), S3 (moto on loopback), median over saves")
    print(f"blocked per save: background {background:.2f} s, synchronous {sync:.2f} s, "
          f"ratio {background / sync:.3f} (target <= 0.10)")
    print(f"wall time lost over the run: background {lost_background:.1f} s, synchronous {lost_sync:.1f} s "
          f"(the emulator shares this machine's 2 cores with training)")


if __name__ == "__main__":
    main()
