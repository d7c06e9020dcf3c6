"""Several machines through ./start_training.sh: two working copies on this host stand for two VMs (tests/vms.py)
that share only the buckets, each running the same command with its own --node-rank (torchrun's static rendezvous and
gloo work across "machines" on one host). A straight run trains like one machine with the same global batch; a
preempted machine stops both with 75 and two fresh machines resume bit-identical; a vanished machine ends the other
with 76 within a bound; a checkpoint moves from 2 machines to 1 and back; machines that never meet give up.

Every run keeps the global batch at 32 samples: 4 per device x 2 accumulation x 4 processes (2 machines x 2),
8 x 2 x 2 (2 machines x 1) or 16 x 2 x 1 (one machine, one process). Across layouts the losses agree within
LOSS_TOLERANCE, the float32 rounding bound tests/test_distributed.py explains; within one layout they are equal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint.format import load_checkpoint, verify_checkpoint
from pretrain.checkpoint.store import CheckpointStore
from pretrain.protocol import EXIT_PREEMPTED, EXIT_RESTART
from pretrain.storage import open_storage
from tests.launcher import Watched, free_port, last_line, survivors
from tests.vms import new_vm, vm_losses

pytestmark = pytest.mark.slow
RUN = "machines"
STEPS = 8
SCHEDULE = ["--max-steps", str(STEPS), "--save-steps", "4", "--logging-steps", "1", "--eval-steps", "0",
            "--warmup-steps", "2", "--run-name", RUN]
STEP4 = "checkpoint-epoch0-step4-files7"
TWO_PROCESSES_EACH = ["--cpu-processes", "2", "--per-device-train-batch-size", "4"]  # 4 x 2 x (2 machines x 2)
ONE_PROCESS_EACH: list[str] = []  # the test config's 8 per device: 8 x 2 x (2 machines x 1)
ONE_MACHINE = ["--per-device-train-batch-size", "16"]  # 16 x 2 x 1
LOSS_TOLERANCE = 2e-5
# From the first SIGKILL of a machine to the other machine's launcher exiting. Measured 1-2 s here: the survivors'
# next collective fails at once; the bound leaves room for a step (up to 5 s on this shared machine) and the clean-up.
VANISHED_BOUND_SECONDS = 60.0
RENDEZVOUS_TIMEOUT = 10
# A frozen machine is a stall for the others: their watchdog's timeout, and the margin tests/test_stalls.py explains.
FROZEN_STALL_SECONDS = 15.0
FROZEN_MARGIN_SECONDS = 20.0


def machine_command(vm: Path, node: int, port: int, checkpoint_bucket: str, data_bucket: str, *args: str) -> list[str]:
    """What runs on machine `node` of 2: the same command everywhere but --node-rank."""
    return [str(vm / "start_training.sh"), "--config", "test", "--nodes", "2", "--node-rank", str(node),
            "--main-address", "127.0.0.1", "--main-port", str(port), "--data-bucket", data_bucket,
            "--checkpoint-bucket", checkpoint_bucket, "--resume", "auto", *SCHEDULE, *args]


def start_machines(parent: Path, names: tuple[str, str], checkpoint_bucket: str, data_bucket: str,
                   *args: str) -> tuple[list[Path], list[Watched]]:
    """Two fresh VMs started at once, machine 0 and machine 1 of one run."""
    port = free_port()
    vms = [new_vm(parent, name) for name in names]
    runs = [Watched(machine_command(vm, node, port, checkpoint_bucket, data_bucket, *args), with_stdout=True)
            for node, vm in enumerate(vms)]
    return vms, runs


def one_machine(parent: Path, name: str, checkpoint_bucket: str, data_bucket: str, *args: str) -> Path:
    vm = new_vm(parent, name)
    run = Watched([str(vm / "start_training.sh"), "--config", "test", "--data-bucket", data_bucket,
                   "--checkpoint-bucket", checkpoint_bucket, "--resume", "auto", *SCHEDULE, *args], with_stdout=True)
    assert run.finish(timeout=600) == 0, run.text()[-3000:]
    return vm


def finish_all(runs: list[Watched], code: int, timeout: float = 600) -> None:
    for run in runs:
        assert run.finish(timeout=timeout) == code, run.text()[-4000:]


def processes_of(folder: Path) -> list[int]:
    """The live processes of a test's own folder: those working in it (the launcher) or naming it (everything the
    launcher starts runs the VM's .venv/bin/python). Nothing outside the folder is ever matched."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited while we looked, or not ours to read
        if Path(cwd).is_relative_to(folder) or str(folder) in command:
            found.append(int(entry.name))
    return found


def vanish(folder: Path) -> None:
    """SIGKILL to every process of this VM at once: the machine is gone, no handler runs."""
    for _ in range(3):  # a process may be starting a child while a sweep runs
        for pid in processes_of(folder):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while processes_of(folder):
        assert time.monotonic() < deadline, processes_of(folder)
        time.sleep(0.1)


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path):
    """Every test's runs are gone when it ends, also when it fails half-way (only this test's own processes)."""
    yield
    left = survivors(str(tmp_path))
    vanish(tmp_path)
    assert left == [], left


def bucket_checkpoints(url: str) -> list[str]:
    return CheckpointStore(open_storage(url)).complete()


def final_weights(vm: Path) -> dict[str, torch.Tensor]:
    return load_file(str(vm / "checkpoints" / "final-model" / "model.safetensors"))


def max_difference(a: dict[int, float], b: dict[int, float]) -> float:
    assert sorted(a) == sorted(b), (a, b)
    return max(abs(a[step] - b[step]) for step in a)


def copy_checkpoint(bucket: Path, name: str, into: Path) -> str:
    """A bucket holding only checkpoint `name` of another run's bucket (a local folder): the one to resume."""
    shutil.copytree(bucket / name, into / name)
    return into.as_uri()


@pytest.fixture(scope="module")
def straight(tmp_path_factory, sample_data):
    """2 machines x 2 processes, never interrupted: (machine 0's VM, machine 1's VM, the checkpoint bucket)."""
    parent = tmp_path_factory.mktemp("straight")
    vms, runs = start_machines(parent, ("vm0", "vm1"), (parent / "bucket").as_uri(), sample_data.as_uri(),
                               *TWO_PROCESSES_EACH)
    finish_all(runs, 0)
    return vms[0], vms[1], parent / "bucket"


@pytest.fixture(scope="module")
def alone(tmp_path_factory, sample_data):
    """One machine, one process, the same global batch: (its VM, its checkpoint bucket)."""
    parent = tmp_path_factory.mktemp("alone")
    vm = one_machine(parent, "vm", (parent / "bucket").as_uri(), sample_data.as_uri(), *ONE_MACHINE)
    return vm, parent / "bucket"


def test_two_machines_train_as_one_with_the_same_global_batch_each_fetching_its_own_data(straight, alone,
                                                                                        sample_data):
    machine0, machine1, bucket = straight
    two, one = vm_losses(machine0, run_name=RUN), vm_losses(alone[0], run_name=RUN)
    assert sorted(two) == list(range(1, STEPS + 1))
    assert max_difference(two, one) <= LOSS_TOLERANCE, (two, one)
    assert two[STEPS] < two[1] - 0.5  # it learns: the comparison is between moving numbers

    # Each machine's first process fetched the shards into its own data folder.
    for vm in (machine0, machine1):
        fetched = sorted(path.relative_to(vm / "data") for path in (vm / "data").glob("part-*/shard_*.npz"))
        assert fetched, vm
        assert all((vm / "data" / path).read_bytes() == (sample_data / path).read_bytes() for path in fetched)
    # Only global rank 0 wrote checkpoints, logs and the export, and uploaded; once, with every rank's RNG.
    assert not list((machine1 / "checkpoints").glob("checkpoint-*")) and not (machine1 / "logs" / RUN).exists()
    assert not (machine1 / "checkpoints" / "final-model").exists()
    assert bucket_checkpoints(bucket.as_uri()) == ["checkpoint-epoch0-step8-files7", STEP4]
    saved = load_checkpoint(bucket / STEP4)
    assert sorted(saved.rng_states) == ["rank0", "rank1", "rank2", "rank3"]
    assert saved.state.num_processes == 4 and saved.state.global_batch_samples == 32


def test_a_preempted_machine_stops_both_with_75_and_two_fresh_machines_resume_bit_identical(tmp_path, sample_data,
                                                                                           straight):
    bucket = (tmp_path / "bucket").as_uri()
    (vm0, vm1), runs = start_machines(tmp_path, ("vm0", "vm1"), bucket, sample_data.as_uri(), *TWO_PROCESSES_EACH)
    runs[0].wait_for("step 3/")
    runs[1].process.send_signal(signal.SIGTERM)  # the spot notice reaches machine 1 only
    finish_all(runs, EXIT_PREEMPTED, timeout=180)
    preempted, other = runs[1].text(), runs[0].text()
    assert "forwarding SIGTERM" in preempted and "stopped by SIGTERM" in last_line(preempted), preempted[-3000:]
    assert "forwarding" not in other and "SIGTERM received" not in other
    assert "stopped because machine 1 was preempted (SIGTERM on ranks 2, 3)" in last_line(other), other[-3000:]
    emergency = bucket_checkpoints(bucket)[0]
    assert f"checkpoint {emergency} handed to the writer (emergency" in other

    vms, runs = start_machines(tmp_path, ("vm2", "vm3"), bucket, sample_data.as_uri(), *TWO_PROCESSES_EACH)
    finish_all(runs, 0)
    assert f"resuming from {Path('checkpoints') / emergency}" in runs[0].text()
    for vm in vms:  # each machine's first process fetched its own copy from the bucket
        assert verify_checkpoint(vm / "checkpoints" / emergency) is None, vm
    assert vm_losses(vm0, vms[0], run_name=RUN) == vm_losses(straight[0], run_name=RUN)  # equal, not close
    a, b = final_weights(vms[0]), final_weights(straight[0])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_vanished_machine_ends_the_other_with_76_within_the_bound_and_the_run_resumes(tmp_path, sample_data,
                                                                                       straight):
    """Machine 0 (the checkpoint writer, and the rendezvous store) is killed whole while it saves."""
    bucket = (tmp_path / "bucket").as_uri()
    (vm0, _), runs = start_machines(tmp_path, ("vm0", "vm1"), bucket, sample_data.as_uri(), *ONE_PROCESS_EACH,
                                    "--save-steps", "2")
    runs[0].wait_for(f"{STEP4} handed to the writer", timeout=300)
    killed = time.monotonic()
    vanish(vm0)
    assert runs[1].finish(timeout=VANISHED_BOUND_SECONDS + 30) == EXIT_RESTART, runs[1].text()[-4000:]
    seconds = time.monotonic() - killed
    print(f"machine 1 ended {seconds:.1f} s after machine 0 was killed")
    assert seconds <= VANISHED_BOUND_SECONDS
    line = last_line(runs[1].text())
    assert "the training processes of machine 0 (rank 0) are gone: rank 1 on machine 1 lost its connection" in line
    assert line.endswith("--resume auto continues from the newest checkpoint"), line
    assert "Traceback" not in runs[1].text()

    saved = bucket_checkpoints(bucket)
    assert saved and saved[-1] == "checkpoint-epoch0-step2-files7", saved  # step 4's upload may or may not be there
    for name in saved:
        assert verify_checkpoint(tmp_path / "bucket" / name) is None, name

    vms, runs = start_machines(tmp_path, ("vm2", "vm3"), bucket, sample_data.as_uri(), *ONE_PROCESS_EACH,
                               "--save-steps", "2")
    finish_all(runs, 0)
    assert f"resuming from {Path('checkpoints') / saved[0]}" in runs[0].text()
    resumed = vm_losses(vm0, vms[0], run_name=RUN)
    assert max_difference(resumed, vm_losses(straight[0], run_name=RUN)) <= LOSS_TOLERANCE


def freeze(folder: Path) -> None:
    """SIGSTOP to every process of this VM: a hung host, whose sockets stay open, so no collective fails."""
    for _ in range(3):
        for pid in processes_of(folder):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)


def test_a_frozen_machine_ends_the_other_with_76_within_the_stall_timeout(tmp_path, sample_data):
    """Machine 1 stops whole (launcher and ranks): nothing fails on machine 0, its ranks wait in the step's
    all-reduce for a peer that never answers, and their own watchdog ends them by the stall timeout."""
    bucket = (tmp_path / "bucket").as_uri()
    vms, runs = start_machines(tmp_path, ("vm0", "vm1"), bucket, sample_data.as_uri(), *ONE_PROCESS_EACH,
                               "--max-steps", "200", "--save-steps", "2", "--stall-timeout-minutes",
                               str(FROZEN_STALL_SECONDS / 60))
    runs[0].wait_for("step 6/", timeout=300)
    frozen = time.monotonic()
    freeze(vms[1])
    code = runs[0].finish(timeout=FROZEN_STALL_SECONDS + 120)
    seconds = time.monotonic() - frozen
    print(f"machine 0 ended {seconds:.1f} s after machine 1 froze")
    assert code == EXIT_RESTART, runs[0].text()[-4000:]
    assert seconds <= FROZEN_STALL_SECONDS + FROZEN_MARGIN_SECONDS, seconds
    line = last_line(runs[0].text())
    assert "error: the run stalled: rank 0 made no progress for " in line, line
    assert "1 other processes are not visible from here" in line and "exit 76" in line, line
    assert "Traceback" not in runs[0].text()
    vanish(vms[1])  # the hung host is replaced
    for name in bucket_checkpoints(bucket):
        assert verify_checkpoint(tmp_path / "bucket" / name) is None, name


def test_a_checkpoint_moves_from_two_machines_to_one_and_back_with_the_same_samples(tmp_path, sample_data, straight,
                                                                                   alone):
    # 2 machines x 2 processes -> 1 machine x 1 process
    bucket = copy_checkpoint(straight[2], STEP4, tmp_path / "from-two")
    vm = one_machine(tmp_path, "one", bucket, sample_data.as_uri(), *ONE_MACHINE, "--resume", STEP4)
    resumed, before = vm_losses(vm, run_name=RUN), vm_losses(straight[0], run_name=RUN)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert max_difference(resumed, {step: before[step] for step in resumed}) <= LOSS_TOLERANCE
    state = load_checkpoint(vm / "checkpoints" / "checkpoint-epoch0-step8-files7").state
    assert (state.num_processes, state.samples_consumed) == (1, 256)

    # 1 machine x 1 process -> 2 machines x 2 processes
    bucket = copy_checkpoint(alone[1], STEP4, tmp_path / "from-one")
    vms, runs = start_machines(tmp_path, ("vm0", "vm1"), bucket, sample_data.as_uri(), *TWO_PROCESSES_EACH,
                               "--resume", STEP4)
    finish_all(runs, 0)
    resumed, before = vm_losses(vms[0], run_name=RUN), vm_losses(alone[0], run_name=RUN)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert max_difference(resumed, {step: before[step] for step in resumed}) <= LOSS_TOLERANCE
    state = load_checkpoint(vms[0] / "checkpoints" / "checkpoint-epoch0-step8-files7").state
    assert (state.num_processes, state.samples_consumed) == (4, 256)


def test_machines_that_never_meet_give_up_after_the_rendezvous_timeout_with_76(tmp_path, sample_data):
    """Machine 0 whose partner never comes, and machine 1 whose machine 0 never answers (two separate runs)."""
    timeout = ["--rendezvous-timeout-seconds", str(RENDEZVOUS_TIMEOUT)]
    started = time.monotonic()
    runs = [Watched(machine_command(new_vm(tmp_path, f"vm{node}"), node, free_port(), (tmp_path / "bucket").as_uri(),
                                    sample_data.as_uri(), *timeout), with_stdout=True) for node in (0, 1)]
    ended = []
    for run in runs:
        assert run.finish(timeout=5 * RENDEZVOUS_TIMEOUT + 120) == EXIT_RESTART, run.text()[-3000:]
        ended.append(time.monotonic() - started)
    print(f"machine 0 gave up after {ended[0]:.1f} s, machine 1 after {ended[1]:.1f} s "
          f"(--rendezvous-timeout-seconds {RENDEZVOUS_TIMEOUT})")
    lines = [last_line(run.text()) for run in runs]
    assert lines[0].startswith("error: not all 2 machines joined the rendezvous at 127.0.0.1:") and \
        f"within {RENDEZVOUS_TIMEOUT} s" in lines[0], lines[0]
    assert lines[1].startswith("error: machine 0 did not answer the rendezvous at 127.0.0.1:"), lines[1]
    for run, line in zip(runs, lines):
        assert line.endswith("exit 76: run the same command again")
        assert len(run.text().splitlines()) <= 6, run.text()  # the plan, the command and that line: no C++ log
    assert ended[0] >= RENDEZVOUS_TIMEOUT and ended[1] <= 3 * RENDEZVOUS_TIMEOUT + 60
