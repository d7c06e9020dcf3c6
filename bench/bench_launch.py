"""Launch-to-first-step of `./start_training.sh --config test` with the launcher of a git ref (default c9c8287: the bash
supervisor, a planner and accelerate's launcher each importing torch) against this working tree's, run alternately on
the same small data, each from a fresh copy; prints the medians and the ratio new/old. Not a test. From the repository
root: .venv/bin/python -m bench.bench_launch [--ref c9c8287] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.launcher import REPO, survivors
from tests.vms import new_vm

RUN_TIMEOUT_SECONDS = 600.0
STEP = re.compile(r"^step 1/\d+")
RUNNING = re.compile(r"^running: ")


def old_copy(scratch: Path, ref: str) -> Path:
    """The project as it was at `ref` (git archive), with this working tree's virtual environment linked in."""
    folder = scratch / "old"
    folder.mkdir()
    archive = subprocess.Popen(["git", "archive", ref], cwd=REPO, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(folder)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive {ref} failed")
    os.symlink(REPO / ".venv", folder / ".venv")
    return folder


def cpu_seconds_of_children() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def launch(copy: Path, data_dir: Path, work: Path) -> dict[str, float]:
    """One run of `copy`'s start_training.sh to its end: seconds from Popen to its `running:` line and to step 1, and
    the CPU seconds of the whole run (every process of it that was waited for), which a loaded machine skews less."""
    command = [str(copy / "start_training.sh"), "--config", "test", "--data-dir", str(data_dir), "--max-steps", "1",
               "--logging-steps", "1", "--eval-steps", "0", "--run-name", "bench", "--output-dir", str(work / "ckpt"),
               "--logging-dir", str(work / "logs"), "--checkpoint-bucket", str(work / "bucket"),
               "--export-final-model", "false"]
    seen: dict[str, float] = {}
    lines: list[str] = []
    cpu_before = cpu_seconds_of_children()
    started = time.monotonic()
    # Its own session, as an orchestrator starts it; stdout (running:, the step lines) and stderr in one stream.
    process = subprocess.Popen(command, cwd=copy, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, start_new_session=True)

    def read() -> None:
        for line in process.stdout:
            arrived = time.monotonic() - started
            lines.append(line)
            for name, pattern in (("running", RUNNING), ("first step", STEP)):
                if name not in seen and pattern.search(line):
                    seen[name] = arrived

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=RUN_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        vanish(work)
    reader.join(timeout=10)
    seen["cpu"] = cpu_seconds_of_children() - cpu_before
    if code != 0 or "first step" not in seen:
        raise RuntimeError(f"{copy.name}: exit {code} after {time.monotonic() - started:.0f} s:\n"
                           + "".join(lines[-40:]))
    return seen


def vanish(work: Path) -> None:
    """SIGKILL to whatever of a run is left (the old launcher starts accelerate in a session of its own)."""
    for line in survivors(str(work)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ref", default="c9c8287", help="the git ref of the old launcher")
    parser.add_argument("--rounds", type=int, default=3, help="timed launches of each; the medians are reported")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-launch-"))
    try:
        copies = {"old": old_copy(scratch, args.ref), "new": new_vm(scratch, "new")}
        data_dir = scratch / "data"
        subprocess.run([sys.executable, "-m", "pretrain.sample_data", "--out", str(data_dir)], cwd=REPO, check=True,
                       capture_output=True)
        print(f"old: {args.ref}, new: this working tree; {os.cpu_count()} CPUs; load average at start "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        for name, copy in copies.items():  # untimed: writes each copy's bytecode and warms the page cache
            launch(copy, data_dir, scratch / f"warm-{name}")
        results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
        for round_ in range(args.rounds):
            order = ["old", "new"] if round_ % 2 == 0 else ["new", "old"]  # alternated, so drift hits both alike
            for name in order:
                seen = launch(copies[name], data_dir, scratch / f"{name}-{round_}")
                results[name].append(seen)
                print(f"  {name} #{round_ + 1}: running: line at {seen.get('running', float('nan')):5.2f} s, "
                      f"step 1 at {seen['first step']:6.2f} s, CPU {seen['cpu']:5.1f} s  "
                      f"(load avg {os.getloadavg()[0]:.1f})", flush=True)
        median = {name: statistics.median(seen["first step"] for seen in runs) for name, runs in results.items()}
        running = {name: statistics.median(seen.get("running", float("nan")) for seen in runs)
                   for name, runs in results.items()}
        # The two runs of a round ran back to back: their ratio cancels most of a shared machine's drift.
        paired = statistics.median(new["first step"] / old["first step"]
                                   for new, old in zip(results["new"], results["old"]))
        print(f"\nmedians of {args.rounds}: launch to first step old {median['old']:.2f} s, new {median['new']:.2f} s; "
              f"ratio new/old {median['new'] / median['old']:.3f} (median of the rounds' own ratios {paired:.3f})")
        cpu = {name: statistics.median(seen["cpu"] for seen in runs) for name, runs in results.items()}
        print(f"to the running: line: old {running['old']:.2f} s, new {running['new']:.2f} s; CPU seconds of a whole "
              f"run: old {cpu['old']:.1f}, new {cpu['new']:.1f} (ratio {cpu['new'] / cpu['old']:.3f})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
