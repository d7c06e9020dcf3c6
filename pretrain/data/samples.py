"""Readers on the global order: a dataset indexed by global sample index, per-rank micro-batch index lists, and the
train/eval loaders. Resuming at any sample costs O(1): nothing before it is read."""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from pretrain.data.format import ShardInfo, TokenStream
from pretrain.data.order import MIX_SHARDS, SHARD_CHUNKS, SampleOrder, remember


class ShardGate(Protocol):
    """Says when a shard may be opened; the data room's fetcher implements it (pretrain.data.fetch.ReadyGate).
    note_progress hears the progress mark (SampleOrder.progress_mark) of every read, which tells a fetcher that
    keeps a window ahead of the readers where they are."""

    def note_progress(self, mark: int) -> None: ...

    def wait_ready(self, rel_path: str) -> None: ...


class TokenSamples(Dataset):
    """Samples of seq_len token ids indexed by global sample index (unbounded: index // samples_per_epoch is the
    epoch). Shards open lazily, at most cache_shards at a time per process; safe in DataLoader workers because
    each process opens its own mappings and pickling drops them. With a gate, opening a shard first waits until
    the gate says it has arrived and passed validation (shards fetched in the background).
    """

    def __init__(
        self,
        data_dir: Path,
        shards: list[ShardInfo],
        seq_len: int,
        seed: int,
        cache_shards: int | None = None,
        mix_shards: int = MIX_SHARDS,
        gate: ShardGate | None = None,
        shard_chunks: int = SHARD_CHUNKS,
    ):
        if cache_shards is None:
            cache_shards = mix_shards + 2  # a block's shards, plus room for the next block's first ones
        if cache_shards < mix_shards:
            raise ValueError(
                f"cache_shards is {cache_shards} but the order reads {mix_shards} shards at a time; "
                f"set cache_shards >= {mix_shards} or every sample would reopen a shard"
            )
        self.data_dir = data_dir
        self.shards = list(shards)
        self.seq_len = seq_len
        self.cache_shards = cache_shards
        self.gate = gate
        self.order = SampleOrder(self.shards, seq_len, seed, mix_shards, shard_chunks)
        self._streams: OrderedDict[int, TokenStream] = OrderedDict()
        self._owner_pid = os.getpid()

    @property
    def samples_per_epoch(self) -> int:
        return self.order.samples_per_epoch

    @property
    def open_shard_positions(self) -> list[int]:
        """Positions of the shards this process holds open, least recently used first."""
        return list(self._streams)

    def __getitem__(self, global_index: int) -> torch.Tensor:
        if self.gate is not None:
            self.gate.note_progress(self.order.progress_mark(global_index))
        position, sample = self.order.locate(global_index)
        tokens = self._stream(position, global_index).read(sample * self.seq_len, self.seq_len)
        return torch.from_numpy(tokens)

    def _stream(self, position: int, global_index: int) -> TokenStream:
        if os.getpid() != self._owner_pid:
            # A forked worker inherits the parent's cache; start its own instead of sharing decompressed arrays.
            self._streams = OrderedDict()
            self._owner_pid = os.getpid()
        if position not in self._streams:
            if self.gate is not None:
                self.gate.wait_ready(self.shards[position].path)
            stream = TokenStream(self.data_dir / self.shards[position].path)
            remember(self._streams, position, stream, self.cache_shards)
        self._streams.move_to_end(position)
        return self._streams[position]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_streams"] = OrderedDict()
        return state


def rank_batches(start_sample: int, per_device_batch: int, rank: int, world_size: int) -> Iterator[list[int]]:
    """Infinite global sample indices of one rank's micro-batches: micro-batch m covers global samples
    [start + m*G, start + (m+1)*G) with G = per_device_batch * world_size, and rank r takes the r-th slice of b."""
    _check_layout(start_sample, per_device_batch, rank, world_size)
    global_batch = per_device_batch * world_size
    first = start_sample + rank * per_device_batch
    for micro_batch in itertools.count():
        begin = first + micro_batch * global_batch
        yield list(range(begin, begin + per_device_batch))


class RankBatchSampler:
    """rank_batches as a DataLoader batch_sampler; every iter() restarts at start_sample."""

    def __init__(self, start_sample: int, per_device_batch: int, rank: int, world_size: int):
        _check_layout(start_sample, per_device_batch, rank, world_size)
        self.start_sample = start_sample
        self.per_device_batch = per_device_batch
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[list[int]]:
        return rank_batches(self.start_sample, self.per_device_batch, self.rank, self.world_size)


def make_train_loader(
    dataset: TokenSamples,
    start_sample: int,
    per_device_batch: int,
    rank: int,
    world_size: int,
    num_workers: int,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> Iterable[torch.Tensor]:
    """An infinite, in-order loader of long tensors [per_device_batch, seq_len] starting at global sample
    start_sample; create one iterator per run segment (each iter() starts over at start_sample)."""
    return DataLoader(
        dataset,
        batch_sampler=RankBatchSampler(start_sample, per_device_batch, rank, world_size),
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )


def make_eval_batches(
    dataset: TokenSamples, per_device_batch: int, rank: int, world_size: int, max_batches: int
) -> Iterator[torch.Tensor]:
    """The same batches at every evaluation: the first micro-batches of epoch 0 of the eval order, split across
    ranks like training. Capped to what fits in one epoch so no sample is counted twice."""
    _check_layout(0, per_device_batch, rank, world_size)
    if max_batches < 1:
        raise ValueError(f"max_batches is {max_batches}; expected at least 1 evaluation micro-batch")
    global_batch = per_device_batch * world_size
    fitting = dataset.samples_per_epoch // global_batch
    if fitting == 0:
        raise ValueError(
            f"eval shards hold {dataset.samples_per_epoch} samples, fewer than one global micro-batch of "
            f"{global_batch} ({per_device_batch} x {world_size} ranks); hold out more eval shards or lower the batch"
        )
    batches = itertools.islice(rank_batches(0, per_device_batch, rank, world_size), min(max_batches, fitting))
    return (torch.stack([dataset[index] for index in indices]) for indices in batches)


def _check_layout(start_sample: int, per_device_batch: int, rank: int, world_size: int) -> None:
    if start_sample < 0:
        raise ValueError(f"start_sample is {start_sample}; expected a non-negative global sample index")
    if per_device_batch < 1:
        raise ValueError(f"per_device_batch is {per_device_batch}; expected at least 1 sample")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world_size {world_size}; expected 0 <= rank < world_size")
