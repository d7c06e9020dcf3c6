"""The global sample order, O(1) resume, rank partitioning, the LRU of open shards, and the loaders built on them."""

from __future__ import annotations

import gc
import hashlib
import itertools
import pickle
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain.data.order as order_module
import pretrain.data.samples as samples_module
from pretrain.data.format import ShardInfo, discover_shards, inspect_shards
from pretrain.data.order import SampleOrder
from pretrain.data.samples import (
    TokenSamples,
    make_eval_batches,
    make_train_loader,
    rank_batches,
)

SEQ_LEN = 8
SEED = 1234
# Uneven shard sizes (in samples, some with a ragged tail) so shard and block boundaries fall at odd indices.
SHARD_LAYOUTS = [
    (13 * SEQ_LEN + 3, np.uint16, 1, False),
    (7 * SEQ_LEN, np.int32, 2, True),
    (20 * SEQ_LEN, np.int64, 2, False),
    (5 * SEQ_LEN + 7, np.uint16, 1, True),
    (11 * SEQ_LEN, np.int32, 1, False),
    (9 * SEQ_LEN, np.uint16, 2, True),
    (4 * SEQ_LEN, np.int64, 1, True),
]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """Shards whose token ids count up across the dataset, so every sample is unique and recognisable."""
    root = tmp_path_factory.mktemp("shards")
    next_id = 0
    for index, (num_tokens, dtype, ndim, compressed) in enumerate(SHARD_LAYOUTS):
        ids = np.arange(next_id, next_id + num_tokens).astype(dtype)
        next_id += num_tokens
        if ndim == 2:
            ids = ids[: num_tokens - num_tokens % SEQ_LEN].reshape(-1, SEQ_LEN)
        path = root / ("nested" if index % 3 == 0 else "") / f"shard_{index:02d}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        (np.savez_compressed if compressed else np.savez)(path, input_ids=ids)
    return root


@pytest.fixture(scope="module")
def shards(dataset_dir) -> list[ShardInfo]:
    return inspect_shards(dataset_dir, discover_shards(dataset_dir), SEQ_LEN, vocab_size=2**16)


def expected_sample(dataset_dir: Path, shard: ShardInfo, sample: int) -> np.ndarray:
    flat = np.load(dataset_dir / shard.path)["input_ids"].reshape(-1).astype(np.int64)
    return flat[sample * SEQ_LEN : (sample + 1) * SEQ_LEN]


def synthetic_shards(samples: list[int]) -> list[ShardInfo]:
    return [ShardInfo(f"s{i}.npz", n * SEQ_LEN, 0) for i, n in enumerate(samples)]


def epoch_locations(order: SampleOrder, epoch: int) -> list[tuple[int, int]]:
    start = epoch * order.samples_per_epoch
    return [order.locate(i) for i in range(start, start + order.samples_per_epoch)]


def take_samples(loader, count: int) -> list[torch.Tensor]:
    samples = []
    for batch in loader:
        samples.extend(batch)
        if len(samples) >= count:
            return samples[:count]
    raise AssertionError("loader ended")


@pytest.mark.parametrize("mix_shards, shard_chunks", [(1, 1), (2, 1), (3, 1), (2, 3), (4, 8), (16, 8), (16, 32)])
def test_every_sample_appears_once_per_epoch(mix_shards, shard_chunks):
    shards = synthetic_shards([5, 1, 0, 12, 7, 3, 9])
    order = SampleOrder(shards, SEQ_LEN, SEED, mix_shards, shard_chunks)
    expected = sorted((s, i) for s, shard in enumerate(shards) for i in range(shard.num_samples(SEQ_LEN)))

    assert order.samples_per_epoch == len(expected)
    for epoch in range(3):
        assert sorted(epoch_locations(order, epoch)) == expected


def test_order_is_pure_reshuffled_per_epoch_and_seeded():
    shards = synthetic_shards([30, 20, 25, 40])
    first = epoch_locations(SampleOrder(shards, SEQ_LEN, SEED), 0)

    assert epoch_locations(SampleOrder(shards, SEQ_LEN, SEED), 0) == first
    assert epoch_locations(SampleOrder(shards, SEQ_LEN, SEED), 1) != first
    assert epoch_locations(SampleOrder(shards, SEQ_LEN, SEED + 1), 0) != first
    single = SampleOrder(synthetic_shards([50]), SEQ_LEN, SEED, mix_shards=1)
    assert epoch_locations(single, 0) != epoch_locations(single, 1)


@pytest.mark.parametrize("mix_shards", [1, 2, 3])
def test_whole_shard_blocks_move_through_mix_shards_at_a_time(mix_shards):
    order = SampleOrder(synthetic_shards([6, 9, 4, 8, 5]), SEQ_LEN, SEED, mix_shards, shard_chunks=1)
    for epoch in range(3):
        positions = [shard for shard, _ in epoch_locations(order, epoch)]
        for shard in set(positions):
            visits = [i for i, s in enumerate(positions) if s == shard]
            assert len(set(positions[visits[0] : visits[-1] + 1])) <= mix_shards


@pytest.mark.parametrize("mix_shards, shard_chunks", [(2, 3), (4, 8), (16, 8), (16, 32)])
def test_chunked_blocks_touch_at_most_mix_shards_shards_and_sweep_the_corpus(mix_shards, shard_chunks):
    shards = synthetic_shards([40, 33, 57, 48, 21, 64, 39, 45, 50, 30] * 4)
    order = SampleOrder(shards, SEQ_LEN, SEED, mix_shards, shard_chunks)
    locations = epoch_locations(order, 0)
    _, block_ends = order._epoch_plan(0)
    starts = [0, *block_ends[:-1].tolist()]
    for start, end in zip(starts, block_ends.tolist()):
        in_block = {shard for shard, _ in locations[start:end]}
        assert len(in_block) <= mix_shards
        assert in_block <= set(order.block_shards(start)) and order.block_shards(start) == order.block_shards(end - 1)
    # Every shard is visited in up to shard_chunks separate stretches of the epoch, not all at once.
    first_half = {shard for shard, _ in locations[: len(locations) // 2]}
    assert len(first_half) == len(shards) if shard_chunks >= 8 else len(first_half) > len(shards) // 2


def test_legacy_order_is_the_order_runs_started_with_before_order_specs():
    # Digest of 3 epochs of locate() by the code before OrderSpec (commit 511b3bb, blocks of 2 whole shards).
    shards = [ShardInfo(f"s{i}.npz", n * 8, 0) for i, n in enumerate([5, 1, 0, 12, 7, 3, 9, 30, 2, 2, 11])]
    spec = order_module.LEGACY_ORDER
    order = SampleOrder(shards, 8, 1234, spec.mix_shards, spec.shard_chunks)
    locations = [order.locate(i) for i in range(3 * order.samples_per_epoch)]
    digest = hashlib.sha256(repr(locations).encode()).hexdigest()
    assert digest == "96656fd2e3bfec8f29f0ac5d9d6ab8ed08acd21a96deeeef2879fe35245b6c2a"


def test_order_of_runs_started_with_16_chunk_blocks_of_8_chunk_shards_is_pinned():
    # Runs started since commit d91e566 froze OrderSpec(1, 16, 8); their checkpoints must keep reading this order.
    shards = [ShardInfo(f"s{i}.npz", n * 8, 0) for i, n in enumerate([5, 1, 0, 12, 7, 3, 9, 30, 2, 2, 11, 40, 64, 17])]
    order = SampleOrder(shards, 8, 1234, mix_shards=16, shard_chunks=8)
    locations = [order.locate(i) for i in range(3 * order.samples_per_epoch)]
    digest = hashlib.sha256(repr(locations).encode()).hexdigest()
    assert digest == "57e80e57202aca23ed87465317eb1e0610e9872d51f409cd5b7dc5ae6a352a33"


@pytest.mark.parametrize("trial", range(40))
def test_need_schedule_matches_a_scan_of_the_order_and_is_exact_in_the_start_block(trial):
    rng = np.random.default_rng(trial)
    shards = synthetic_shards([int(n) for n in rng.integers(0, 20, size=rng.integers(1, 12))] + [3])
    order = SampleOrder(shards, SEQ_LEN, trial, mix_shards=int(rng.integers(1, 7)), shard_chunks=int(rng.integers(1, 5)))
    start = int(rng.integers(0, 2 * order.samples_per_epoch))
    first_read: dict[int, tuple[int, int]] = {}  # shard -> (first index read from start on, its block ordinal)
    for index in range(start, (order.epoch_of(start) + 2) * order.samples_per_epoch):
        first_read.setdefault(order.locate(index)[0], (index, order.block_ordinal(index)))
    schedule = order.need_schedule(start)

    assert dict(schedule) == {shard: block for shard, (_, block) in first_read.items()}
    in_start_block = [shard for shard, (_, block) in sorted(first_read.items(), key=lambda kv: kv[1][0])
                      if block == order.block_ordinal(start)]
    assert [shard for shard, _ in schedule[: len(in_start_block)]] == in_start_block  # exact first-use order
    count = int(rng.integers(1, 40))
    assert order.shards_read_by(start, count) == list(dict.fromkeys(order.locate(i)[0] for i in range(start, start + count)))


def test_locating_far_past_costs_one_permutation(monkeypatch):
    order = SampleOrder(synthetic_shards([50, 70, 30]), SEQ_LEN, SEED, mix_shards=2)
    expected = SampleOrder(synthetic_shards([50, 70, 30]), SEQ_LEN, SEED, mix_shards=2).locate(10**15 + 17)
    calls = []
    real_permutation = order_module._permutation
    monkeypatch.setattr(order_module, "_permutation", lambda size, words: calls.append(size) or real_permutation(size, words))

    assert order.locate(10**15 + 17) == expected
    assert order.epoch_of(10**15 + 17) == (10**15 + 17) // 150
    assert len(calls) == 2 and max(calls) <= 120


def test_samples_are_the_right_tokens(dataset_dir, shards):
    dataset = TokenSamples(dataset_dir, shards, SEQ_LEN, SEED)
    seen = set()
    for index in range(dataset.samples_per_epoch + 5):
        sample = dataset[index]
        shard, within = dataset.order.locate(index)
        assert sample.dtype == torch.long and sample.shape == (SEQ_LEN,)
        np.testing.assert_array_equal(sample.numpy(), expected_sample(dataset_dir, shards[shard], within))
        seen.add(int(sample[0]))
    assert len(seen) == dataset.samples_per_epoch


@pytest.mark.parametrize("cache_shards, mix_shards", [(2, 2), (3, 1), (4, 2)])
def test_open_shards_stay_within_cache_bound(dataset_dir, shards, cache_shards, mix_shards):
    dataset = TokenSamples(dataset_dir, shards, SEQ_LEN, SEED, cache_shards=cache_shards, mix_shards=mix_shards)
    streams_ever_opened = []
    for index in range(3 * dataset.samples_per_epoch):
        dataset[index]
        assert len(dataset.open_shard_positions) <= cache_shards
        for stream in dataset._streams.values():
            if not any(ref() is stream for ref in streams_ever_opened):
                streams_ever_opened.append(weakref.ref(stream))
    gc.collect()
    assert len(streams_ever_opened) > cache_shards
    assert sum(ref() is not None for ref in streams_ever_opened) <= cache_shards


def test_each_shard_is_opened_once_per_epoch(dataset_dir, shards, monkeypatch):
    opened = []
    real_stream = samples_module.TokenStream
    monkeypatch.setattr(samples_module, "TokenStream", lambda path: opened.append(path) or real_stream(path))
    dataset = TokenSamples(dataset_dir, shards, SEQ_LEN, SEED, cache_shards=2, mix_shards=2, shard_chunks=1)

    for index in range(dataset.samples_per_epoch):
        dataset[index]

    assert sorted(opened) == sorted(dataset_dir / s.path for s in shards)
    opened.clear()
    chunked = TokenSamples(dataset_dir, shards, SEQ_LEN, SEED, cache_shards=3, mix_shards=3, shard_chunks=4)
    for index in range(chunked.samples_per_epoch):
        chunked[index]
    assert set(opened) == {dataset_dir / s.path for s in shards}
    assert all(opened.count(dataset_dir / s.path) <= 4 for s in shards)  # at most once per chunk


@pytest.mark.parametrize("num_workers, mix_shards, shard_chunks",
                         [(0, 2, 1), (2, 2, 1), (0, 3, 4), (2, order_module.MIX_SHARDS, order_module.SHARD_CHUNKS), (0, 4, 8)])
def test_loader_resumed_at_k_continues_the_run_from_zero(dataset_dir, shards, num_workers, mix_shards, shard_chunks):
    dataset = TokenSamples(dataset_dir, shards, SEQ_LEN, SEED, mix_shards=mix_shards, shard_chunks=shard_chunks)
    spe = dataset.samples_per_epoch
    block_end = int(dataset.order._epoch_plan(0)[1][0])
    window = 12
    reference = take_samples(make_train_loader(dataset, 0, 3, 0, 1, num_workers=0), 2 * spe + window + 1)
    direct = [dataset[i] for i in range(len(reference))]
    assert all(torch.equal(a, b) for a, b in zip(reference, direct))

    for k in [1, 5, block_end - 2, spe - 4, spe, 2 * spe + 1]:
        fresh = TokenSamples(dataset_dir, shards, SEQ_LEN, SEED, mix_shards=mix_shards, shard_chunks=shard_chunks)
        resumed = take_samples(make_train_loader(fresh, k, 3, 0, 1, num_workers=num_workers), window)
        assert torch.equal(torch.stack(resumed), torch.stack(reference[k : k + window])), f"resume at {k}"

    far = 10**9 + 7
    fresh = TokenSamples(dataset_dir, shards, SEQ_LEN, SEED, mix_shards=mix_shards, shard_chunks=shard_chunks)
    resumed = take_samples(make_train_loader(fresh, far, 4, 0, 1, num_workers=num_workers), 8)
    assert torch.equal(torch.stack(resumed), torch.stack([dataset[far + i] for i in range(8)]))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_partition_each_micro_batch(world_size):
    start, per_device = 17, 4
    global_batch = per_device * world_size
    streams = [rank_batches(start, per_device, rank, world_size) for rank in range(world_size)]

    for micro_batch in range(50):
        per_rank = [next(stream) for stream in streams]
        union = [index for indices in per_rank for index in indices]
        begin = start + micro_batch * global_batch
        assert union == list(range(begin, begin + global_batch))


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_loaders_together_equal_one_process(dataset_dir, shards, world_size):
    dataset = TokenSamples(dataset_dir, shards, SEQ_LEN, SEED)
    start, per_device, steps = 40, 2, 30
    single = itertools.islice(make_train_loader(dataset, start, per_device * world_size, 0, 1, 0), steps)
    ranks = [
        itertools.islice(make_train_loader(dataset, start, per_device, rank, world_size, 0), steps)
        for rank in range(world_size)
    ]
    for whole, *parts in zip(single, *ranks):
        assert all(part.shape == (per_device, SEQ_LEN) and part.dtype == torch.long for part in parts)
        assert torch.equal(torch.cat(parts), whole)


def test_eval_batches_are_fixed_disjoint_and_capped(dataset_dir, shards):
    dataset = TokenSamples(dataset_dir, shards, SEQ_LEN, SEED)
    per_device, world_size = 5, 2
    runs = [
        [list(make_eval_batches(dataset, per_device, rank, world_size, 1000)) for rank in range(world_size)]
        for _ in range(2)
    ]

    assert all(torch.equal(a, b) for rank_a, rank_b in zip(*runs) for a, b in zip(rank_a, rank_b))
    fitting = dataset.samples_per_epoch // (per_device * world_size)
    assert all(len(batches) == fitting for batches in runs[0])
    first_tokens = [int(t) for batches in runs[0] for batch in batches for t in batch[:, 0]]
    assert len(set(first_tokens)) == len(first_tokens)
    assert len(list(make_eval_batches(dataset, per_device, 0, world_size, 3))) == 3

    with pytest.raises(ValueError, match="fewer than one global micro-batch"):
        make_eval_batches(dataset, dataset.samples_per_epoch, 0, 2, 1)


def test_pickled_dataset_carries_no_open_shards(dataset_dir, shards):
    dataset = TokenSamples(dataset_dir, shards, SEQ_LEN, SEED)
    first = dataset[3]
    assert dataset.open_shard_positions

    copy = pickle.loads(pickle.dumps(dataset))

    assert copy.open_shard_positions == []
    assert torch.equal(copy[3], first)


def test_invalid_arguments_are_rejected(dataset_dir, shards):
    with pytest.raises(ValueError, match="seed is -1"):
        SampleOrder(shards, SEQ_LEN, -1)
    with pytest.raises(ValueError, match="cache_shards is 1"):
        TokenSamples(dataset_dir, shards, SEQ_LEN, SEED, cache_shards=1, mix_shards=2)
    with pytest.raises(ValueError, match="hold no sample"):
        SampleOrder(synthetic_shards([0, 0]), SEQ_LEN, SEED)
    with pytest.raises(ValueError, match="rank 2 of world_size 2"):
        next(rank_batches(0, 4, 2, 2))
    with pytest.raises(ValueError, match="start_sample is -5"):
        make_train_loader(TokenSamples(dataset_dir, shards, SEQ_LEN, SEED), -5, 4, 0, 1, 0)
    with pytest.raises(IndexError):
        SampleOrder(shards, SEQ_LEN, SEED).locate(-1)
