"""The data room's facade: a fresh run starts after only the first block's shards, the rest arrive in the background
in need order; resume on an empty disk fetches the frozen shards; failures are one line and end every wait."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pretrain.data.fetch as shard_fetch
import pretrain.data.format as shard_format
import pretrain.data.training_data as dataset_module
from configs import TrainingConfig
from pretrain.data.fetch import (
    FetchFailed,
    RangeFile,
    ReadyGate,
    ShardFetcher,
    inspect_remote_shards,
)
from pretrain.data.format import DATASET_JSON as DATASET_MANIFEST
from pretrain.data.format import (
    ShardError,
    ShardInfo,
    array_header_from_head,
    read_array_header,
)
from pretrain.data.order import (
    LEGACY_ORDER,
    MIX_SHARDS,
    SHARD_CHUNKS,
    OrderSpec,
    SampleOrder,
)
from pretrain.data.samples import make_train_loader
from pretrain.data.training_data import FrozenShards, prepare_training_data
from pretrain.storage import open_storage
from pretrain.storage.local import LocalStorage

SEQ_LEN = 8
VOCAB = 1000
NUM_SHARDS = 40
MIX = 4  # a small window, so 40 shards make ten blocks
STEP_SAMPLES = 4  # samples per optimizer step
ONE_PROCESS = SimpleNamespace(is_main_process=True, is_local_main_process=True, num_processes=1)


def write_shards(folder: Path, count: int, samples: int = 5, first_id: int = 0) -> None:
    """Shard i holds ids counting up from first_id + i*samples*SEQ_LEN (mod VOCAB), in mixed formats."""
    for index in range(count):
        start = first_id + index * samples * SEQ_LEN
        ids = (np.arange(start, start + samples * SEQ_LEN) % VOCAB).astype(np.uint16 if index % 2 else np.int32)
        if index % 3 == 1:
            ids = ids.reshape(-1, SEQ_LEN)
        path = folder / ("part" if index % 4 == 0 else "") / f"shard_{index:03d}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        (np.savez_compressed if index % 5 == 2 else np.savez)(path, input_ids=ids)


def config(data_dir: Path, bucket: str = "", **changes) -> SimpleNamespace:
    fields = dict(data_dir=str(data_dir), data_bucket=bucket, max_files=0, seq_len=SEQ_LEN, seed=7, eval_shards=2,
                  model=SimpleNamespace(vocab_size=VOCAB), generate_sample_data=False, gcs_credentials="",
                  gcp_project="", s3_endpoint_url="", storage_max_retries=1, storage_retry_backoff_seconds=0.1,
                  block_chunks=MIX, shard_chunks=1, per_device_train_batch_size=STEP_SAMPLES,
                  gradient_accumulation_steps=1)
    fields.update(changes)
    return SimpleNamespace(**fields)


class HeldStorage(LocalStorage):
    """A file:// bucket that records downloads as they start; while `hold` is set, the background fetcher's
    downloads wait for `release`, so a test sees exactly what set-up fetched before returning."""

    def __init__(self, url, options):
        super().__init__(url, options)
        self.downloads: list[str] = []
        self.hold = threading.Event()
        self.release = threading.Event()

    def download(self, key, local_path):
        self.downloads.append(key)
        if self.hold.is_set() and threading.current_thread().name.startswith("shard-fetch-"):
            assert self.release.wait(30), "test never released the held downloads"
        super().download(key, local_path)


@dataclass
class Bucket:
    url: str
    storage: HeldStorage


@pytest.fixture
def bucket(tmp_path, monkeypatch) -> Bucket:
    root = tmp_path / "bucket"
    write_shards(root, NUM_SHARDS)
    storage = HeldStorage(root.as_uri(), None)
    monkeypatch.setattr(dataset_module, "open_storage", lambda url, options: storage)
    return Bucket(root.as_uri(), storage)


def local_npz(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.npz")}


def wait_until(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_fresh_run_starts_after_the_first_steps_shards_and_fetches_the_rest_in_need_order(tmp_path, bucket,
                                                                                          monkeypatch):
    # One fetch worker, so the order downloads start in is the order the fetcher takes shards in.
    monkeypatch.setattr(shard_fetch, "FETCH_WORKERS", 1)
    data_dir = tmp_path / "data"
    bucket.storage.hold.set()  # set-up may fetch only what it must; the background fetcher waits for release
    training = prepare_training_data(config(data_dir, bucket.url, block_chunks=12), ONE_PROCESS, None)
    try:
        order = training.train.order
        path_of = {p: training.frozen.train[p].path for p in range(len(training.frozen.train))}
        first_step = {path_of[p] for p in order.shards_read_by(0, STEP_SAMPLES)}
        first_block = {path_of[p] for p in order.block_shards(0)}
        eval_paths = {s.path for s in training.frozen.eval}
        assert len(first_step) < len(first_block) == 12 and len(training.frozen.train) == NUM_SHARDS - 2
        # Only the first step's shards and the eval shards are local at return (downloads in flight are partial),
        # not the whole first block: a wide block costs step 1 nothing.
        assert local_npz(data_dir) == first_step | eval_paths
        first_samples = [training.train[i] for i in range(STEP_SAMPLES)]  # readable without waiting for anything else
        assert len(first_samples) == STEP_SAMPLES

        bucket.storage.release.set()
        far = training.samples_per_epoch - 1  # the last block: the reader waits for the fetcher, then reads
        shard, within = order.locate(far)
        expected = np.load(bucket.storage.root / training.frozen.train[shard].path)["input_ids"].reshape(-1)
        np.testing.assert_array_equal(training.train[far].numpy(), expected[within * SEQ_LEN:(within + 1) * SEQ_LEN])
        wait_until(lambda: local_npz(data_dir) == {s.path for s in training.frozen.all})
        background = [k for k in bucket.storage.downloads if k not in first_step | eval_paths]
        # The first block's other shards in the exact order reads first touch them (a scan of the order), then
        # the later blocks' shards block by block.
        first_touch = list(dict.fromkeys(path_of[order.locate(i)[0]] for i in range(order.samples_per_epoch)))
        rest_of_first_block = [p for p in first_touch if p in first_block - first_step]
        assert background[: len(rest_of_first_block)] == rest_of_first_block
        assert background == [path_of[p] for p in order.shards_in_need_order(0) if path_of[p] not in first_step]
        assert training.eval is not None and "order v1: blocks of 12 chunks, 1 per shard" in training.describe()
    finally:
        bucket.storage.release.set()
        training.close()


def test_background_fetch_brings_the_next_block_from_the_middle_of_this_one_in_this_and_in_worker_processes(
        tmp_path, bucket):
    data_dir = tmp_path / "data"
    training = prepare_training_data(config(data_dir, bucket.url), ONE_PROCESS, None)
    try:
        order, fetcher = training.train.order, training._fetcher
        schedule = order.need_schedule(0)
        eval_paths = {s.path for s in training.frozen.eval}

        def fetched_once_idle(last_block: int) -> bool:
            expected = eval_paths | {training.frozen.train[p].path for p, block in schedule if block <= last_block}
            return fetcher.waiting_for_readers.is_set() and local_npz(data_dir) == expected

        at_mark = {order.progress_mark(i): i for i in reversed(range(training.samples_per_epoch))}
        assert shard_fetch.AHEAD_MARKS == 1 and order.progress_mark(0) == 0
        wait_until(lambda: fetched_once_idle(0))  # the first half of block 0: block 0 only, not block 1 yet
        training.train[at_mark[1]]  # a reader in this process reaches the middle of block 0
        wait_until(lambda: fetched_once_idle(1))
        training.train[at_mark[6]]  # it jumps to the start of block 3
        wait_until(lambda: fetched_once_idle(3))
        training.train[at_mark[7]]  # the middle of block 3
        wait_until(lambda: fetched_once_idle(4))
        loader = make_train_loader(training.train, at_mark[13], 4, 0, 1, num_workers=1)
        next(iter(loader))  # a DataLoader worker (another process) reads the middle of block 6
        wait_until(lambda: fetched_once_idle(7))
        assert len(local_npz(data_dir)) < NUM_SHARDS, "the window covered the whole bucket: nothing shown"
    finally:
        training.close()


def test_order_flags_shape_a_fresh_run_and_a_resumed_run_keeps_its_frozen_order(tmp_path, caplog):
    data_dir = tmp_path / "data"
    write_shards(data_dir, 12)
    first = prepare_training_data(config(data_dir, block_chunks=3, shard_chunks=2), ONE_PROCESS, None)
    first.close()
    assert first.frozen.order == OrderSpec(mix_shards=3, shard_chunks=2)
    assert "blocks of 3 chunks, 2 per shard" in first.describe()
    frozen = FrozenShards.from_json(json.loads(json.dumps(first.frozen.to_json())))
    resumed = prepare_training_data(config(data_dir, block_chunks=5, shard_chunks=4), ONE_PROCESS, frozen, 17)
    resumed.close()
    assert resumed.frozen.order == first.frozen.order
    assert [resumed.train.order.locate(i) for i in range(60)] == [first.train.order.locate(i) for i in range(60)]
    assert "keeps the sample order frozen in its checkpoint (blocks of 3 chunks, 2 per shard)" in caplog.text


def test_resume_on_an_empty_disk_fetches_the_frozen_shards_and_reads_the_same_samples(tmp_path, bucket):
    first_vm = prepare_training_data(config(tmp_path / "vm1", bucket.url), ONE_PROCESS, None)
    frozen = FrozenShards.from_json(json.loads(json.dumps(first_vm.frozen.to_json())))
    first_vm.train[first_vm.samples_per_epoch - 1]  # a reader in the last block: the window covers every shard
    wait_until(lambda: len(local_npz(tmp_path / "vm1")) == NUM_SHARDS)
    k = first_vm.samples_per_epoch // 2 + 3
    reference = [first_vm.train[k + i] for i in range(40)]
    first_vm.close()
    write_shards(bucket.storage.root / "added_later", 3)  # not part of the frozen run

    second_vm = prepare_training_data(config(tmp_path / "vm2", bucket.url), ONE_PROCESS, frozen, start_sample=k)
    try:
        assert second_vm.frozen.to_json() == frozen.to_json()  # the record checkpoints of runs before mixtures hold
        batches = itertools.islice(make_train_loader(second_vm.train, k, 4, 0, 1, num_workers=0), 10)
        assert torch.equal(torch.cat(list(batches)), torch.stack(reference))
        second_vm.train[2 * second_vm.samples_per_epoch - 1]  # the last shard of the schedule is in epoch 1
        wait_until(lambda: local_npz(tmp_path / "vm2") == {s.path for s in frozen.all})
        # The shards of the resumed step came first, before anything else.
        first = {frozen.train[p].path for p in second_vm.train.order.shards_read_by(k, STEP_SAMPLES)}
        first |= {s.path for s in frozen.eval}
        assert set(bucket.storage.downloads[-NUM_SHARDS:][:len(first)]) == first
    finally:
        second_vm.close()


def test_resume_without_a_shard_in_the_bucket_is_one_line_naming_it(tmp_path, bucket):
    training = prepare_training_data(config(tmp_path / "vm1", bucket.url), ONE_PROCESS, None)
    training.close()
    lost = training.frozen.train[-1].path
    (bucket.storage.root / lost).unlink()

    with pytest.raises(FileNotFoundError) as caught:
        prepare_training_data(config(tmp_path / "vm2", bucket.url), ONE_PROCESS, training.frozen)
    message = str(caught.value)
    assert "\n" not in message and lost in message and "missing from the data bucket" in message


def test_resume_without_bucket_or_local_shard_names_it(tmp_path):
    write_shards(tmp_path / "data", 4)
    training = prepare_training_data(config(tmp_path / "data", eval_shards=1), ONE_PROCESS, None)
    training.close()
    (tmp_path / "data" / training.frozen.train[1].path).unlink()
    with pytest.raises(FileNotFoundError, match=f"{training.frozen.train[1].path}: shard recorded in the checkpoint"):
        prepare_training_data(config(tmp_path / "data", eval_shards=1), ONE_PROCESS, training.frozen)


def test_a_bad_shard_late_in_the_order_does_not_delay_start_and_fails_its_reader(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    write_shards(data_dir, 12)
    frozen = dataset_module.freeze_shards(config(data_dir, eval_shards=1, block_chunks=2))
    order = SampleOrder(list(frozen.train), SEQ_LEN, 7, mix_shards=2, shard_chunks=1)
    bad = frozen.train[order.shards_in_need_order(0)[-1]]  # the last shard the order needs
    original = np.load(data_dir / bad.path)["input_ids"]
    np.savez(data_dir / bad.path, input_ids=np.full_like(original, VOCAB + 5))  # same size, ids past the vocab
    scanned, scanned_at_start = [], []
    real_range, real_start = shard_format.token_id_range, ShardFetcher.start
    monkeypatch.setattr(shard_format, "token_id_range", lambda p, h: scanned.append(p) or real_range(p, h))
    monkeypatch.setattr(ShardFetcher, "start",
                        lambda self, *args: scanned_at_start.extend(scanned) or real_start(self, *args))

    training = prepare_training_data(config(data_dir, eval_shards=1, block_chunks=2), ONE_PROCESS, None)
    try:
        assert training.frozen.to_json() == frozen.to_json()
        assert len(scanned_at_start) == 2 + 1, "start-up read more than the first block and the eval shard"
        position = frozen.train.index(bad)
        index = next(i for i in range(training.samples_per_epoch) if order.locate(i)[0] == position)
        with pytest.raises(FetchFailed) as caught:
            training.train[index]
        message = str(caught.value)
        assert bad.path in message and str(VOCAB + 5) in message and "\n" not in message
    finally:
        training.close()


def test_a_waiting_reader_learns_the_fetcher_died(tmp_path):
    gate = ReadyGate(tmp_path, "run1", VOCAB, wait_seconds=30, stale_seconds=0.5)
    gate.checked_dir.mkdir(parents=True)
    gate.status_path("alive").touch()  # a fetcher that was alive, then stopped beating
    began = time.monotonic()
    with pytest.raises(FetchFailed, match="shard_x.npz: waiting for this shard, but the shard fetcher stopped"):
        gate.wait_ready("shard_x.npz")
    assert time.monotonic() - began < 5

    quiet = ReadyGate(tmp_path, "run2", VOCAB, wait_seconds=0.5)
    with pytest.raises(FetchFailed, match="still not fetched after"):
        quiet.wait_ready("shard_x.npz")

    reported = ReadyGate(tmp_path, "run3", VOCAB)
    reported.status_path("error").write_text("data/a.npz: token ids ... too large\n")
    with pytest.raises(FetchFailed, match="data/a.npz: token ids"):
        reported.wait_ready("shard_x.npz")


def test_a_fetcher_that_dies_fails_readers_in_dataloader_workers(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    write_shards(data_dir, 12)
    real_make_ready = ShardFetcher._make_ready
    background = threading.Event()

    def dying(self, shard):
        if background.is_set():
            raise OSError(f"{data_dir / shard.path}: disk went away")
        real_make_ready(self, shard)

    monkeypatch.setattr(ShardFetcher, "_make_ready", dying)
    real_start = ShardFetcher.start
    monkeypatch.setattr(ShardFetcher, "start", lambda self, *args: background.set() or real_start(self, *args))
    training = prepare_training_data(config(data_dir, eval_shards=1, block_chunks=2), ONE_PROCESS, None)
    try:
        loader = iter(make_train_loader(training.train, 0, 4, 0, 1, num_workers=1))
        began = time.monotonic()
        with pytest.raises(Exception, match="disk went away"):
            for _ in range(training.samples_per_epoch):
                next(loader)
        assert time.monotonic() - began < 30
    finally:
        training.close()


def test_dataset_manifest_gives_token_counts_without_reading_headers(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    write_shards(data_dir, 6)
    rel = sorted(local_npz(data_dir))
    entries = [{"path": p, "num_tokens": int(np.load(data_dir / p)["input_ids"].size),
                "size_bytes": (data_dir / p).stat().st_size} for p in rel]
    (data_dir / "tokenizer.json").write_text("{}")
    digest = hashlib.sha256(b"{}").hexdigest()
    manifest = {"format_version": 1, "tokenizer": {"file": "tokenizer.json", "sha256": digest}, "vocab_size": VOCAB,
                "eos_token_id": 0, "dtype": "uint16", "shards": entries}
    (data_dir / DATASET_MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr(dataset_module, "inspect_local_headers", lambda d, paths, s: [] if not paths else 1 / 0)

    frozen = dataset_module.freeze_shards(config(data_dir, eval_shards=1))
    assert [s.path for s in frozen.all] == rel and [s.num_tokens for s in frozen.all] == [e["num_tokens"] for e in entries]
    assert dataset_module.find_tokenizer(config(data_dir)) == data_dir

    with pytest.raises(ValueError, match=f"{DATASET_MANIFEST}: the shards were tokenized with vocab_size {VOCAB}.*"
                                         f"--vocab-size {VOCAB - 1}"):
        dataset_module.freeze_shards(config(data_dir, model=SimpleNamespace(vocab_size=VOCAB - 1)))


@pytest.mark.parametrize("compressed, shape, order", [(False, (2**18,), "C"), (True, (2**18,), "C"),
                                                      (False, (2**9, 2**9), "F"), (True, (2**9, 2**9), "C")])
def test_remote_headers_come_from_a_few_ranged_reads(tmp_path, compressed, shape, order):
    ids = np.random.default_rng(0).integers(0, VOCAB, size=shape, dtype=np.int32)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "s.npz", input_ids=np.asarray(ids, order=order))
    storage = open_storage(tmp_path.as_uri())
    size = (tmp_path / "s.npz").stat().st_size
    assert size > 4 * shard_fetch.RANGE_CHUNK_BYTES
    ranged = RangeFile(storage, "s.npz", size)

    header = shard_fetch.read_array_header_from("s.npz", io.BufferedReader(ranged), size)

    assert header == read_array_header(tmp_path / "s.npz")
    assert ranged.requests <= 3  # the zip directory at the end, the local and .npy headers at the start
    [info] = inspect_remote_shards(storage, storage.list(), SEQ_LEN)
    assert info == ShardInfo("s.npz", 2**18, size)


def test_remote_bad_header_is_one_line_naming_the_object(tmp_path):
    np.savez(tmp_path / "a.npz", input_ids=np.zeros(64, np.float32))
    storage = open_storage(tmp_path.as_uri())
    with pytest.raises(ShardError, match=r"a\.npz: input_ids has dtype float32"):
        inspect_remote_shards(storage, storage.list(), SEQ_LEN)


def test_frozen_shards_round_trip_and_old_checkpoints_keep_their_order():
    frozen = FrozenShards((ShardInfo("a.npz", 80, 900),), (ShardInfo("b.npz", 64, 700),), OrderSpec(mix_shards=8))
    assert FrozenShards.from_json(json.loads(json.dumps(frozen.to_json()))) == frozen
    old = {"train": [{"path": "a.npz", "num_tokens": 80, "size_bytes": 900}], "eval": []}
    assert FrozenShards.from_json(old).order == LEGACY_ORDER == OrderSpec(version=1, mix_shards=2, shard_chunks=1)
    assert OrderSpec().mix_shards == MIX_SHARDS == TrainingConfig().block_chunks
    assert OrderSpec().shard_chunks == SHARD_CHUNKS == TrainingConfig().shard_chunks
    with pytest.raises(ValueError, match=r"^sample order version 9 is unknown to this code \(it knows \[1\]\)"):
        FrozenShards.from_json({**frozen.to_json(), "order": {"version": 9, "mix_shards": 8}})


@pytest.mark.parametrize("compressed", [False, True])
def test_a_savez_shard_header_needs_one_request(tmp_path, compressed):
    (np.savez_compressed if compressed else np.savez)(tmp_path / "s.npz", input_ids=np.arange(2**18, dtype=np.int32))
    size = (tmp_path / "s.npz").stat().st_size
    head = (tmp_path / "s.npz").read_bytes()[: shard_fetch.HEAD_BYTES]
    assert array_header_from_head("s.npz", head, size) == read_array_header(tmp_path / "s.npz")
    assert array_header_from_head("s.npz", head[:40], size) is None  # cut short: the caller falls back
    other_first = tmp_path / "other.npz"
    np.savez(other_first, a_mask=np.ones(8), input_ids=np.arange(64))
    assert array_header_from_head("o", other_first.read_bytes()[:4096], other_first.stat().st_size) is None
