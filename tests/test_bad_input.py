"""Bad input: one clear line naming the file or flag, exit code 2, no traceback, and the last good checkpoint intact.

Each case here is a row of the README's "When something is wrong" table. One case of each kind runs the way a user
runs it, through ./start_training.sh, whose last line of stderr must be that one line (no accelerate or torchrun
report after it); the other cases of the same kind run the same entry point in this process (train.main, or the
launcher's planner), which is what the launcher runs and reports, in a fraction of the time.
"""

from __future__ import annotations

import io
import logging
import os
import resource
import shutil
import signal
import subprocess
import zipfile
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
from accelerate.state import AcceleratorState

import train as entry_point
from pretrain.checkpoint.format import verify_checkpoint
from pretrain.launch import command as launch_command
from tests import emulators
from tests.launcher import REPO, checkpoints, free_port, isolated_args, last_line

FAKE_SECRET = "FAKESECRETdoNotPrint0123456789"


def train(workdir: Path, data_dir: Path, *args: str, env: dict[str, str] | None = None, file_limit_bytes: int = 0):
    """./start_training.sh on a tiny run; `file_limit_bytes` is a disk that fills up, for the launcher and every rank."""
    command = [str(REPO / "start_training.sh"), *isolated_args(workdir, data_dir, *args), "--eval-shards", "1",
               "--warmup-steps", "1", "--logging-steps", "1", "--eval-steps", "0", *args]

    def limit_file_size() -> None:  # writes past the limit fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit_bytes, file_limit_bytes))

    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, preexec_fn=limit_file_size if file_limit_bytes else None)


def train_here(workdir: Path, data_dir: Path, *args: str, env: dict[str, str] | None = None,
               monkeypatch: pytest.MonkeyPatch | None = None) -> subprocess.CompletedProcess:
    """The same run through train.main in this process (what each rank runs), its log as the stderr a user reads."""
    argv = [*isolated_args(workdir, data_dir, *args), "--eval-shards", "1", "--warmup-steps", "1", "--logging-steps",
            "1", "--eval-steps", "0", *args]
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    code, stderr = in_process(lambda: entry_point.main(argv))
    return subprocess.CompletedProcess(argv, code, "", stderr)


def plan_here(*args: str) -> subprocess.CompletedProcess:
    """The launcher's planner in this process: flags and configs are refused there, before anything starts."""
    argv = ["--config", "test", *args]
    code, stderr = in_process(lambda: launch_command.main(argv))
    return subprocess.CompletedProcess(argv, code, "", stderr)


def in_process(run) -> tuple[int, str]:
    """(exit code, what stderr and the log got), with the signal handlers, logging and Accelerate's global state as
    they were before: train.main installs the preemption handlers."""
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(logging.INFO)
    try:
        with redirect_stderr(captured):
            code = run()
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        for number, previous in handlers.items():
            signal.signal(number, previous)
        AcceleratorState._reset_state(reset_partial_state=True)
        entry_point._KEEP_UNTIL_EXIT.clear()
    return code, captured.getvalue()


def refused(result: subprocess.CompletedProcess, fragment: str) -> str:
    """Exit 2, and the last line the user reads is the one error line that names the problem."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    for noise in ("Traceback", "CalledProcessError", "ChildFailedError"):
        assert noise not in result.stderr, result.stderr[-3000:]
    last = last_line(result.stderr)
    assert "error" in last.lower() and fragment in last, result.stderr[-2000:]
    return result.stderr


def write_shard(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, input_ids=ids)


@pytest.fixture(scope="module")
def good_data(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("good-data")
    ids = np.random.default_rng(0).integers(0, 512, size=(2, 40 * 128), dtype=np.int64)
    write_shard(data_dir / "a.npz", ids[0])
    write_shard(data_dir / "b.npz", ids[1])
    return data_dir


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, good_data) -> Path:
    """A run that stopped at step 2 with one complete checkpoint: what every case below must leave untouched."""
    workdir = tmp_path_factory.mktemp("good-run")
    result = train_here(workdir, good_data, "--max-steps", "2", "--save-steps", "2", "--lr-decay-steps", "20")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(checkpoints(workdir)) == 1 and "-step2-" in checkpoints(workdir)[0], checkpoints(workdir)
    return workdir


@pytest.fixture(scope="module")
def good(good_run) -> str:
    return checkpoints(good_run)[0]


@pytest.fixture
def workdir(tmp_path, good_run) -> Path:
    shutil.copytree(good_run / "checkpoints", tmp_path / "checkpoints")
    if (good_run / "bucket").exists():
        shutil.copytree(good_run / "bucket", tmp_path / "bucket")
    return tmp_path


def still_good(workdir: Path, good: str) -> None:
    assert good in checkpoints(workdir)
    assert verify_checkpoint(workdir / "checkpoints" / good) is None


BAD_SHARDS = {
    "not-a-zip": (lambda p: p.write_bytes(b"this is not a zip file"), "not a valid .npz"),
    "empty-npz": (lambda p: zipfile.ZipFile(p, "w").close(), "no input_ids"),
    "no-input-ids": (lambda p: np.savez(p, tokens=np.arange(4096)), "no input_ids"),
    "float-ids": (lambda p: np.savez(p, input_ids=np.ones(4096, dtype=np.float32)), "dtype float32"),
    "ids-past-vocab": (lambda p: np.savez(p, input_ids=np.full(4096, 9999, dtype=np.int32)), "9999"),
    "too-short": (lambda p: np.savez(p, input_ids=np.arange(10, dtype=np.int32)), "no sample"),
}


def with_bad_shard(tmp_path: Path, good_data: Path, case: str) -> tuple[Path, str]:
    data_dir = tmp_path / "data"
    shutil.copytree(good_data, data_dir)
    make, fragment = BAD_SHARDS[case]
    (data_dir / "nested").mkdir()
    make(data_dir / "nested" / "bad.npz")
    return data_dir, fragment


@pytest.mark.slow
def test_a_bad_shard_stops_the_launched_run_before_training_naming_the_file(tmp_path, good_data):
    data_dir, fragment = with_bad_shard(tmp_path, good_data, "ids-past-vocab")
    stderr = refused(train(tmp_path, data_dir, "--max-steps", "2"), fragment)
    assert "nested/bad.npz" in stderr
    assert checkpoints(tmp_path) == []  # stopped before step 1


@pytest.mark.parametrize("case", sorted(BAD_SHARDS))
def test_a_bad_shard_stops_the_run_before_training_naming_the_file(case, tmp_path, good_data):
    data_dir, fragment = with_bad_shard(tmp_path, good_data, case)
    stderr = refused(train_here(tmp_path, data_dir, "--max-steps", "2"), fragment)
    assert "nested/bad.npz" in stderr
    assert checkpoints(tmp_path) == []  # stopped before step 1


BAD_FLAGS = [
    (["--config", "nope"], "--config 'nope' is not a known config; choose one of: test, production"),
    (["--sav-steps", "3"], "unknown flag --sav-steps: did you mean --save-steps"),
    (["--save-steps", "three"], "argument --save-steps: invalid int value: 'three'"),
]
BAD_RESUME_NAMES = [
    (["--resume", "../checkpoint-epoch0-step2-files1"], "(no '/' or '..')"),
    (["--resume", "checkpoints/x/.."], "(no '/' or '..')"),
    (["--resume", "checkpoint-epoch0-step999-files1"], "no such checkpoint in"),
]


@pytest.mark.slow
def test_a_bad_flag_is_refused_by_the_launcher(workdir, good_data, good):
    refused(train(workdir, good_data, *BAD_FLAGS[0][0]), BAD_FLAGS[0][1])
    still_good(workdir, good)


@pytest.mark.parametrize("args, fragment", BAD_FLAGS)
def test_bad_flags_are_refused_before_anything_starts(args, fragment):
    refused(plan_here(*args), fragment)


@pytest.mark.parametrize("args, fragment", BAD_RESUME_NAMES)
def test_bad_resume_names_are_refused(args, fragment, workdir, good_data, good):
    refused(train_here(workdir, good_data, *args), fragment)
    still_good(workdir, good)


@pytest.mark.slow
def test_two_processes_end_with_the_same_one_line_and_no_torchrun_report(workdir, good_data, good):
    """torchrun's agent would add a ChildFailedError report and its own log lines after the training's error."""
    stderr = refused(train(workdir, good_data, "--cpu-processes", "2", "--main-port", str(free_port()), "--resume",
                           "checkpoint-epoch0-step999-files1"), "no such checkpoint in")
    assert "closing signal" not in stderr and "failed (exitcode" not in stderr
    still_good(workdir, good)


def test_a_fresh_run_will_not_write_over_an_earlier_runs_checkpoints(workdir, good_data, good):
    refused(train_here(workdir, good_data, "--max-steps", "4"), "already holds checkpoints")
    still_good(workdir, good)


@pytest.mark.slow
def test_a_full_disk_while_saving_keeps_the_last_good_checkpoint(workdir, good_data, good):
    stderr = refused(
        train(workdir, good_data, "--resume", "latest", "--max-steps", "4", "--save-steps", "2", "--lr-decay-steps", "20",
              file_limit_bytes=1_000_000),  # the logs fit, the 3.7 MB weights of the next checkpoint do not
        "could not write checkpoint checkpoint-epoch",
    )
    assert f"the last complete checkpoint, {good}, is intact" in last_line(stderr)
    still_good(workdir, good)
    assert not [p for p in (workdir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture
def s3_endpoint(request) -> str:
    return request.getfixturevalue("s3_emulator").endpoint


def s3_env(endpoint: str) -> dict[str, str]:
    return {**emulators.s3_env(endpoint), "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}


def test_an_unreachable_bucket_fails_in_seconds_before_step_one(workdir, good_data, good, isolated_env):
    endpoint = f"http://127.0.0.1:{emulators.closed_port()}"
    stderr = refused(train_here(workdir, good_data, "--resume", "latest", "--max-steps", "4",
                                "--checkpoint-bucket", "s3://unreachable/runs", env=s3_env(endpoint),
                                monkeypatch=isolated_env), "s3://unreachable/runs")
    assert FAKE_SECRET not in stderr
    still_good(workdir, good)


def test_a_nonexistent_bucket_is_named(workdir, good_data, good, s3_endpoint, isolated_env):
    stderr = refused(train_here(workdir, good_data, "--resume", "latest", "--max-steps", "4",
                                "--checkpoint-bucket", "s3://no-such-bucket-here/runs", env=s3_env(s3_endpoint),
                                monkeypatch=isolated_env), "s3://no-such-bucket-here/runs")
    assert FAKE_SECRET not in stderr
    still_good(workdir, good)


@pytest.mark.slow
def test_wrong_credentials_are_refused_without_printing_them(workdir, good_data, good, new_bucket):
    bucket = new_bucket("azure")
    good_string = bucket.env["AZURE_STORAGE_CONNECTION_STRING"]
    key = good_string.split("AccountKey=")[1].split(";")[0]
    wrong = good_string.replace(key, FAKE_SECRET + "==")
    env = {**bucket.subprocess_env(), "AZURE_STORAGE_CONNECTION_STRING": wrong}
    stderr = refused(train(workdir, good_data, "--resume", "latest", "--max-steps", "4", "--checkpoint-bucket",
                           bucket.url, env=env), bucket.url)
    assert FAKE_SECRET not in stderr and key not in stderr
    still_good(workdir, good)


@pytest.mark.slow
def test_secrets_never_reach_logs_or_checkpoints(tmp_path, good_data, new_bucket):
    bucket = new_bucket("s3")
    env = {**bucket.subprocess_env(), "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
    result = subprocess.run(
        [str(REPO / "start_training.sh"), "--config", "test", "--data-dir", str(good_data),
         "--output-dir", str(tmp_path / "checkpoints"), "--logging-dir", str(tmp_path / "logs"), "--max-steps", "2",
         "--save-steps", "1", "--warmup-steps", "1", "--checkpoint-bucket", bucket.url, "--sync-logs-every-minutes",
         "0.0001"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "uploaded checkpoint-epoch0-step2" in result.stderr
    assert FAKE_SECRET not in result.stdout + result.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "trainer_state.json" for p in written)
    for path in written:
        assert FAKE_SECRET.encode() not in path.read_bytes(), path
