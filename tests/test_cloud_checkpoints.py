"""Checkpoints in real (emulated) buckets: background upload through faults, resume from the bucket after the
local disk is gone, exactly as if never interrupted."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

from pretrain.checkpoint import checkpointer as checkpointer_module
from pretrain.checkpoint.checkpointer import CheckpointNotUploaded
from pretrain.checkpoint.format import (
    CheckpointPayload,
    checkpoint_name,
    verify_checkpoint,
    write_checkpoint,
)
from pretrain.checkpoint.retention import RetentionPolicy, prune
from pretrain.checkpoint.store import (
    CheckpointStore,
    download_checkpoint,
    upload_checkpoint,
)
from pretrain.storage import StorageOptions, open_storage
from tests.checkpointer_harness import harness, state_at, take_step
from tests.fault_proxy import CONNECTION_RESET, SERVICE_UNAVAILABLE
from tests.launcher import check, checkpoints, final_weights, launch, logged

CLOUDS = ("s3", "gcs", "azure")
FAST_RETRIES = StorageOptions(max_retries=4, retry_backoff_seconds=0.05, multipart_chunk_bytes=5 * 1024 * 1024)
STEPS = ["--logging-steps", "1", "--eval-steps", "0", "--warmup-steps", "2", "--lr-decay-steps", "9", "--save-steps", "3"]


def big_payload(step: int) -> CheckpointPayload:
    """About 12 MiB of weights, so the upload goes in several 5 MiB parts."""
    generator = torch.Generator().manual_seed(step)
    return CheckpointPayload(
        model_state={"w": torch.randn(3 * 1024 * 1024, generator=generator)},
        optimizer_state={"state": {}, "param_groups": []},
        rng_states={"rank0": {"torch": torch.get_rng_state()}},
        state=state_at(step),
    )


@pytest.mark.parametrize("cloud", CLOUDS)
def test_uploads_land_intact_through_503s_and_resets(cloud, tmp_path, new_bucket, activate, fault_proxy):
    proxy = fault_proxy(cloud)
    bucket = activate(new_bucket(cloud, through=proxy))
    # Faults on uploads of every kind: part uploads, single puts, the manifest.
    proxy.inject(SERVICE_UNAVAILABLE, method="PUT", times=2)
    proxy.inject(CONNECTION_RESET, method="PUT", times=1)
    proxy.inject(SERVICE_UNAVAILABLE, method="POST", times=1)
    remote = CheckpointStore(open_storage(bucket.url, FAST_RETRIES))
    local = tmp_path / "checkpoints"
    names = []
    for step in (10, 20, 30):
        folder = write_checkpoint(local, checkpoint_name(0, step, 1), big_payload(step))
        upload_checkpoint(folder, remote, backoff_seconds=0.05)
        prune(remote, RetentionPolicy(keep=2))
        names.append(folder.name)
    assert proxy.count(faulted=True) >= 3  # the faults really happened
    assert remote.complete() == [names[2], names[1]]  # retention kept the newest two
    for name in remote.names():
        fetched = download_checkpoint(remote, name, tmp_path / "fetched")
        assert verify_checkpoint(fetched) is None
        assert (fetched / "model.safetensors").read_bytes() == (local / name / "model.safetensors").read_bytes()


def test_one_upload_in_flight_and_the_newest_pending_wins(tmp_path, monkeypatch, caplog):
    """Saves come faster than uploads: the checkpointer never queues more than one upload behind the running one."""
    first_running, release_first = threading.Event(), threading.Event()
    real_upload = checkpointer_module.upload_checkpoint

    def first_one_slow(folder, remote, **kwargs):
        if folder.name == "checkpoint-epoch0-step1-files1":
            first_running.set()
            release_first.wait(timeout=60)
        return real_upload(folder, remote, **kwargs)

    monkeypatch.setattr(checkpointer_module, "upload_checkpoint", first_one_slow)
    with harness(tmp_path, checkpoint_bucket=str(tmp_path / "bucket")) as (checkpointer, model, optimizer):
        checkpointer.save(state_at(1), model, optimizer, "scheduled")
        assert first_running.wait(timeout=60)
        for step in (2, 3):  # written while step 1 is still uploading: 3 replaces 2 in the queue
            take_step(model, optimizer)
            checkpointer.save(state_at(step), model, optimizer, "scheduled")
            assert checkpointer.writer.wait_idle(60)
            assert "checkpoint-epoch0-step1-files1" in CheckpointStore.local(tmp_path / "checkpoints").names()
        release_first.set()
        checkpointer.finish(state_at(3))
        assert "checkpoint-epoch0-step2-files1 will not be uploaded" in caplog.text
        assert checkpointer.remote.complete() == ["checkpoint-epoch0-step3-files1", "checkpoint-epoch0-step1-files1"]


def test_a_failed_upload_is_reported_and_the_next_one_still_goes(tmp_path, new_bucket, activate, fault_proxy, caplog):
    proxy = fault_proxy("s3")
    bucket = activate(new_bucket("s3", through=proxy))
    with harness(tmp_path, weights=3 * 1024 * 1024, checkpoint_bucket=bucket.url, storage_max_retries=0) as (
            checkpointer, model, optimizer):
        proxy.inject(SERVICE_UNAVAILABLE, method="PUT", times=1000)
        checkpointer.save(state_at(1), model, optimizer, "scheduled")
        with pytest.raises(CheckpointNotUploaded, match="checkpoint-epoch0-step1-files1 is only on this machine"):
            checkpointer.finish(state_at(1))
        assert checkpointer.upload_failures == 1
        assert "checkpoint-epoch0-step1-files1" not in checkpointer.remote.names()  # no manifest: not a checkpoint
        proxy.clear()
        take_step(model, optimizer)
        checkpointer.save(state_at(2), model, optimizer, "scheduled")
        checkpointer.finish(state_at(2))
        assert checkpointer.remote.complete() == ["checkpoint-epoch0-step2-files1"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, sample_data):
    workdir = tmp_path_factory.mktemp("straight")
    check(launch(workdir, sample_data, "--max-steps", "9", *STEPS))
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("cloud", CLOUDS)
def test_resume_from_the_bucket_after_losing_the_local_disk(cloud, tmp_path, new_bucket, activate, sample_data,
                                                             straight_run):
    bucket = activate(new_bucket(cloud))
    url, env = bucket.url, bucket.subprocess_env()
    first = check(launch(tmp_path, sample_data, "--max-steps", "6", "--checkpoint-bucket", url, *STEPS, env=env))
    assert "uploaded checkpoint-epoch0-step6-files7" in first.stderr
    shutil.rmtree(tmp_path / "checkpoints")  # the VM is gone, and its disk with it

    resumed = check(launch(tmp_path, sample_data, "--resume", "latest", "--max-steps", "9", "--checkpoint-bucket", url,
                           *STEPS, env=env))
    assert "resuming from" in resumed.stderr and "checkpoint-epoch0-step6-files7" in resumed.stderr
    assert logged(tmp_path) == logged(straight_run)
    a, b = final_weights(tmp_path), final_weights(straight_run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoints(tmp_path)[-1] == "checkpoint-epoch0-step9-files7"
    assert CheckpointStore(open_storage(url)).complete()[0] == "checkpoint-epoch0-step9-files7"
