"""Checkpoints in real (emulated) buckets: background upload through faults, resume from the bucket after the
local disk is gone, exactly as if never interrupted."""

from __future__ import annotations

import shutil

import pytest
import torch

from pretrain.checkpoint import CheckpointPayload, checkpoint_name, verify_checkpoint, write_checkpoint
from pretrain.checkpoint_sync import BackgroundUploader, download_checkpoint, remote_checkpoints
from pretrain.storage import StorageOptions, open_storage
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
        trainer_state={"step": step},
    )


@pytest.mark.parametrize("cloud", CLOUDS)
def test_background_uploads_land_intact_through_503s_and_resets(cloud, tmp_path, new_bucket, activate, fault_proxy):
    proxy = fault_proxy(cloud)
    bucket = activate(new_bucket(cloud, through=proxy))
    # Faults on uploads of every kind: part uploads, single puts, the manifest.
    proxy.inject(SERVICE_UNAVAILABLE, method="PUT", times=2)
    proxy.inject(CONNECTION_RESET, method="PUT", times=1)
    proxy.inject(SERVICE_UNAVAILABLE, method="POST", times=1)
    storage = open_storage(bucket.url, FAST_RETRIES)
    uploader = BackgroundUploader(storage, keep_remote=2, retry_backoff_seconds=0.05)
    local = tmp_path / "checkpoints"
    names = []
    for step in (10, 20, 30):
        names.append(write_checkpoint(local, checkpoint_name(0, step, 1), big_payload(step)).name)
        uploader.submit(local / names[-1])
        assert uploader.wait(timeout_seconds=120)
    report = uploader.take_report()
    uploader.close()
    assert report.failed == [] and report.uploaded == names
    assert proxy.count(faulted=True) >= 3  # the faults really happened
    assert remote_checkpoints(storage) == [names[2], names[1]]  # retention kept the newest two
    for name in remote_checkpoints(storage):
        fetched = download_checkpoint(storage, name, tmp_path / "fetched")
        assert verify_checkpoint(fetched) is None
        assert (fetched / "model.safetensors").read_bytes() == (local / name / "model.safetensors").read_bytes()


def test_one_upload_in_flight_and_the_newest_pending_wins(tmp_path, new_bucket, activate, fault_proxy):
    proxy = fault_proxy("s3")
    bucket = activate(new_bucket("s3", through=proxy))
    storage = open_storage(bucket.url, FAST_RETRIES)
    uploader = BackgroundUploader(storage, keep_remote=5)
    local = tmp_path / "checkpoints"
    folders = [write_checkpoint(local, checkpoint_name(0, step, 1), big_payload(step)) for step in (1, 2, 3)]
    for folder in folders:  # submitted back to back: the first is in flight, 2 is replaced by 3 while pending
        uploader.submit(folder)
        assert uploader.protected() >= {folder.name}
    assert uploader.wait(timeout_seconds=120)
    report = uploader.take_report()
    uploader.close()
    assert report.failed == []
    assert report.uploaded[-1] == folders[2].name and folders[1].name not in report.uploaded
    assert remote_checkpoints(storage)[0] == folders[2].name


def test_a_failed_upload_is_reported_and_the_next_one_still_goes(tmp_path, new_bucket, activate, fault_proxy):
    proxy = fault_proxy("s3")
    bucket = activate(new_bucket("s3", through=proxy))
    storage = open_storage(bucket.url, StorageOptions(max_retries=0, retry_backoff_seconds=0.01))
    uploader = BackgroundUploader(storage, keep_remote=5, retry_backoff_seconds=0.01)
    local = tmp_path / "checkpoints"
    proxy.inject(SERVICE_UNAVAILABLE, method="PUT", times=1000)
    first = write_checkpoint(local, checkpoint_name(0, 1, 1), big_payload(1))
    uploader.submit(first)
    assert uploader.wait(timeout_seconds=120)
    failed = uploader.take_report().failed
    assert len(failed) == 1 and failed[0].startswith(first.name)
    assert first.name not in remote_checkpoints(storage)  # no manifest: not a checkpoint
    proxy.clear()
    second = write_checkpoint(local, checkpoint_name(0, 2, 1), big_payload(2))
    uploader.submit(second)
    assert uploader.wait(timeout_seconds=120)
    assert uploader.take_report().uploaded == [second.name]
    uploader.close()



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
    assert remote_checkpoints(open_storage(url))[0] == "checkpoint-epoch0-step9-files7"
