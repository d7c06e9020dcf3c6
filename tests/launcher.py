"""Runs the real launcher (start_training.sh) on small data and reads back what a user would see."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
RUN_NAME = "run"


def launch(workdir: Path, data_dir: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`./start_training.sh --config test` with its outputs under `workdir` and a fixed run name."""
    command = [str(REPO / "start_training.sh"), *isolated_args(workdir, data_dir, *args), *args]
    return subprocess.run(command, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def isolated_args(workdir: Path, data_dir: Path, *args: str) -> list[str]:
    """The test config with every output (checkpoints, logs, the local-folder bucket) under `workdir`."""
    bucket = [] if "--checkpoint-bucket" in args else ["--checkpoint-bucket", str(workdir / "bucket")]
    return [
        "--config", "test", "--data-dir", str(data_dir), "--output-dir", str(workdir / "checkpoints"),
        "--logging-dir", str(workdir / "logs"), "--run-name", RUN_NAME, *bucket,
    ]


def check(result: subprocess.CompletedProcess, expected_code: int = 0) -> subprocess.CompletedProcess:
    assert result.returncode == expected_code, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def logged(workdir: Path, key: str = "train/loss") -> dict[int, float]:
    """The last value logged for each step (a resumed run overwrites what the dead run logged after its checkpoint)."""
    values = {}
    for line in (workdir / "logs" / RUN_NAME / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the partial last record of a run that was killed mid-write
        if key in record:
            values[record["step"]] = record[key]
    return values


def final_weights(workdir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(workdir / "checkpoints" / "final-model" / "model.safetensors"))


def checkpoints(workdir: Path) -> list[str]:
    folder = workdir / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-")) if folder.exists() else []


def free_port() -> int:
    """A rendezvous port for a multi-process run, so runs beside other test sessions do not collide on 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher_command(workdir: Path, data_dir: Path, *args: str) -> list[str]:
    return [str(REPO / "start_training.sh"), *isolated_args(workdir, data_dir, *args), *args]


class Watched:
    """A running process whose output is collected by a thread, so a test can wait for a line without sleeping.

    Started in its own session, as an orchestrator would start start_training.sh; with_stdout also collects stdout
    (where the `running:` line goes) into the same lines.
    """

    def __init__(self, command: list[str], with_stdout: bool = False, env: dict[str, str] | None = None) -> None:
        if with_stdout:
            streams = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
        else:
            streams = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
        self.process = subprocess.Popen(command, cwd=REPO, text=True, start_new_session=True, env=env, **streams)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        stream = self.process.stdout if self.process.stdout is not None else self.process.stderr
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, fragment: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(fragment in line for line in self.lines):
                left = deadline - time.monotonic()
                assert left > 0 and self.process.poll() is None, f"never saw {fragment!r}:\n{''.join(self.lines)[-3000:]}"
                self._changed.wait(timeout=min(left, 1.0))

    def finish(self, timeout: float) -> int:
        """The exit code; a run still going after `timeout` is killed whole and fails the test."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError(f"still running after {timeout:.0f} s:\n{self.text()[-3000:]}") from None

    def text(self) -> str:
        with self._changed:
            return "".join(self.lines)


def wait_for_step(workdir: Path, step: int, process: subprocess.Popen, timeout: float = 180) -> None:
    """Polls the metrics file the run writes (bounded; the run logs every step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        path = workdir / "logs" / RUN_NAME / "metrics.jsonl"
        if path.exists() and logged(workdir) and max(logged(workdir)) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run never reached step {step}")


def survivors(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (a test's own folder): what a run left behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited while we looked
        if marker in command:
            found.append(f"{entry.name}: {command}")
    return found


def rank_pids(marker: str) -> dict[int, int]:
    """rank -> pid of the training processes (train.py) of the run whose folder is `marker`, from their environment."""
    found = {}
    for line in survivors(marker):
        pid, command = line.split(": ", 1)
        if "train.py" in command and "accelerate" not in command:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue  # exited while we looked
            ranks = [int(entry[5:]) for entry in environ if entry.startswith(b"RANK=")]
            found[ranks[0] if ranks else 0] = int(pid)
    return found


def launch_folder_of(pid: int) -> Path:
    """The launch folder (PRETRAIN_LAUNCH_DIR) of a training process: where its progress and pid files are."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    marker = next(entry for entry in environ if entry.startswith(b"PRETRAIN_LAUNCH_DIR="))
    return Path(marker.split(b"=", 1)[1].decode())


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
