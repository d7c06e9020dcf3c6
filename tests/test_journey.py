"""The preemptible-VM journey as users run it: one command, unchanged, on a brand-new VM after every preemption.

Each VM is a separate working copy with an empty data/ and checkpoints/; only the data and checkpoint buckets
survive. VM 1 starts on an empty checkpoint bucket and is preempted (SIGTERM) mid-run; VM 2 is killed outright
(SIGKILL) while saving; VM 3 runs to the end. Every step's loss and the final weights equal an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint.store import CheckpointStore
from pretrain.protocol import EXIT_PREEMPTED
from pretrain.storage import open_storage
from tests.launcher import Watched, survivors
from tests.vms import new_vm, vm_losses

pytestmark = pytest.mark.slow
RUN = "journey"
STEPS = 14
SCHEDULE = ["--max-steps", str(STEPS), "--save-steps", "4", "--logging-steps", "1", "--eval-steps", "0",
            "--warmup-steps", "2", "--run-name", RUN]


def the_command(vm: Path, data_url: str, checkpoint_url: str) -> list[str]:
    """What the orchestrator runs on every VM, word for word."""
    return [str(vm / "start_training.sh"), "--config", "test", "--data-bucket", data_url,
            "--checkpoint-bucket", checkpoint_url, "--resume", "auto", *SCHEDULE]


def upload_folder(url: str, folder: Path) -> None:
    storage = open_storage(url)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.upload(path, path.relative_to(folder).as_posix())


def vanish(vm: Path) -> None:
    """SIGKILL to every process of this VM (the launcher starts training in a session of its own)."""
    for _ in range(3):  # a launcher may still be starting a child while the first sweep runs
        for line in survivors(str(vm)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while survivors(str(vm)):
        assert time.monotonic() < deadline, survivors(str(vm))
        time.sleep(0.1)


def final_weights(vm: Path) -> dict[str, torch.Tensor]:
    return load_file(str(vm / "checkpoints" / "final-model" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, sample_data):
    """The same command on one VM that is never interrupted, with local folders as buckets."""
    parent = tmp_path_factory.mktemp("uninterrupted")
    vm = new_vm(parent, "vm")
    upload_folder((parent / "data-bucket").as_uri(), sample_data)
    run = Watched(the_command(vm, (parent / "data-bucket").as_uri(), (parent / "ckpt-bucket").as_uri()), with_stdout=True)
    assert run.finish(timeout=600) == 0, run.text()[-3000:]
    return vm


@pytest.mark.parametrize("cloud", ["s3", "gcs", "azure"])
def test_the_same_command_on_three_vms_ends_as_if_never_interrupted(cloud, tmp_path, sample_data, new_bucket,
                                                                     activate, uninterrupted, monkeypatch):
    data_bucket, checkpoint_bucket = new_bucket(cloud), new_bucket(cloud)
    activate(data_bucket)  # this test process uploads the dataset; the VMs get the SDK settings in their environment
    upload_folder(data_bucket.url, sample_data)
    for name, value in {**data_bucket.env, **checkpoint_bucket.env}.items():
        monkeypatch.setenv(name, value)  # Watched passes this environment on, as an orchestrator would

    def start(vm: Path) -> Watched:
        return Watched(the_command(vm, data_bucket.url, checkpoint_bucket.url), with_stdout=True)

    vm1 = new_vm(tmp_path, "vm1")
    run = start(vm1)
    run.wait_for("starting a new run")
    run.wait_for("step 3/")
    run.process.send_signal(signal.SIGTERM)  # the spot VM's preemption notice
    assert run.finish(timeout=300) == EXIT_PREEMPTED, run.text()[-3000:]
    assert "uploaded checkpoint-" in run.text()
    emergency = CheckpointStore(open_storage(checkpoint_bucket.url)).complete()[0]

    vm2 = new_vm(tmp_path, "vm2")
    run = start(vm2)
    run.wait_for(f"resuming from {Path('checkpoints') / emergency}")
    run.wait_for("handed to the writer")
    vanish(vm2)  # the VM is gone mid-save: every process at once, no handler runs, nothing is flushed
    run.process.wait(timeout=60)

    vm3 = new_vm(tmp_path, "vm3")
    run = start(vm3)
    assert run.finish(timeout=600) == 0, run.text()[-3000:]
    assert "resuming from" in run.text() and "starting a new run" not in run.text()

    expected = vm_losses(uninterrupted, run_name=RUN)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert vm_losses(vm1, vm2, vm3, run_name=RUN) == expected  # the same float at every step, not merely close
    a, b = final_weights(vm3), final_weights(uninterrupted)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
