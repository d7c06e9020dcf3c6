"""The global sample order over a frozen shard list: a pure function of (seed, shard token counts, seq_len, order
parameters), independent of the number of processes, and O(1) to enter at any global sample index."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from pretrain.data.format import ShardInfo

# Chunks per block and chunks per shard of the order (the defaults of --block-chunks and --shard-chunks). Each shard
# is cut into SHARD_CHUNKS consecutive chunks; a block mixes MIX_SHARDS random chunks (from up to as many shards), and
# the blocks, each about eight shards' worth of samples, sweep the whole corpus 8 times per epoch even when each shard
# holds one stretch of it. A block needs several times more chunks than a global batch has samples, or batches keep
# drawing two samples from one place of the corpus: bench/bench_shuffle.py (32 corpus-order shards, 16-sample
# batches) against one fully shuffled shard, eval loss +0.042 nats with 16 chunks per block (5 seeds), +0.003 with 64
# (7 seeds; standard error 0.010), and 64 was better than 16 on each of the 5 seeds both ran. The costs: each reader
# keeps up to 66 shards open (memory maps; compressed ones through a decompressed copy on disk), the fetcher brings
# every shard within about the first eighth of the first epoch, and the first few steps of a block read most of its
# shards. Step 1 waits only for the shards its own samples read (need_schedule is exact in the start block).
MIX_SHARDS = 64
SHARD_CHUNKS = 8
LEGACY_MIX_SHARDS = 2  # the order of runs whose checkpoints predate OrderSpec: blocks of two whole shards
ORDER_VERSIONS = (1,)
EPOCH_PLANS_CACHED = 2
PERMUTATIONS_CACHED = 4
SEED_TAG_SHARD_ORDER = 0
SEED_TAG_BLOCK = 1


@dataclass(frozen=True)
class OrderSpec:
    """The parameters of the sample order, frozen with a run: a resumed run keeps the order it started with.

    version names the algorithm of SampleOrder.locate (1: shards cut into shard_chunks chunks, chunks shuffled and
    grouped mix_shards to a block, samples shuffled within a block); a change to that algorithm must come with a
    new version so old runs keep their order.
    """

    version: int = 1
    mix_shards: int = MIX_SHARDS
    shard_chunks: int = SHARD_CHUNKS

    def __post_init__(self):
        if self.version not in ORDER_VERSIONS:
            raise ValueError(
                f"sample order version {self.version} is unknown to this code (it knows {list(ORDER_VERSIONS)}); "
                f"resume with the code version that started the run"
            )
        if self.mix_shards < 1 or self.shard_chunks < 1:
            raise ValueError(
                f"mix_shards {self.mix_shards}, shard_chunks {self.shard_chunks}; expected at least 1 of each"
            )

    def to_json(self) -> dict:
        return {"version": self.version, "mix_shards": self.mix_shards, "shard_chunks": self.shard_chunks}

    @classmethod
    def from_json(cls, d: dict) -> OrderSpec:
        return cls(version=int(d["version"]), mix_shards=int(d["mix_shards"]),
                   shard_chunks=int(d.get("shard_chunks", 1)))


LEGACY_ORDER = OrderSpec(version=1, mix_shards=LEGACY_MIX_SHARDS, shard_chunks=1)


class SampleOrder:
    """The global order: a pure function of (seed, frozen shard list, seq_len, mix_shards, shard_chunks);
    independent of the number of processes, and O(1) to enter at any global index.

    Each shard is cut into shard_chunks consecutive chunks of its samples. Each epoch, the chunks are shuffled and
    grouped into blocks of mix_shards consecutive chunks; the samples of a block are then visited in a shuffled
    order of the block's combined samples. locate() finds the block by binary search over the epoch's cumulative
    block sizes (O(num_shards * shard_chunks), cached per epoch) and maps the position through the block's
    permutation (O(samples in the block), cached for a few blocks). Nothing depends on how many samples came
    before, so resuming at sample 10**8 costs what resuming at 10 does.

    Why blocks rather than one global shuffle: a reader touches at most mix_shards shards at a time, so an LRU of
    that many open shards per worker suffices, memory stays flat, a new VM can start once the first step's shards
    are local, and the rest arrive block by block rather than all at once. Chunking is what makes that mix well: a
    block holds pieces of mix_shards random places in the corpus rather than a few whole shards, so shards written
    in corpus order (one topic each) still give diverse batches, and the whole corpus is swept shard_chunks times
    per epoch. With shard_chunks 1 this is the original order
    (blocks of whole shards), which LEGACY_ORDER keeps for old runs.

    Permutations come from the raw PCG64 stream of a SeedSequence (argsort of random 64-bit keys), both of which
    numpy documents as stable across versions and platforms; Generator.permutation is not so guaranteed.
    """

    def __init__(self, shards: list[ShardInfo], seq_len: int, seed: int, mix_shards: int = MIX_SHARDS,
                 shard_chunks: int = SHARD_CHUNKS):
        if seq_len < 1:
            raise ValueError(f"seq_len is {seq_len}; expected a positive number of tokens per sample")
        if seed < 0:
            raise ValueError(f"seed is {seed}; expected a non-negative integer (numpy SeedSequence needs one)")
        if mix_shards < 1:
            raise ValueError(f"mix_shards is {mix_shards}; expected at least 1 shard per block")
        if shard_chunks < 1:
            raise ValueError(f"shard_chunks is {shard_chunks}; expected at least 1 chunk per shard")
        self.seq_len = seq_len
        self.seed = seed
        self.mix_shards = mix_shards
        self.shard_chunks = shard_chunks
        self.num_shards = len(shards)
        self._shard_samples = np.array([s.num_samples(seq_len) for s in shards], dtype=np.int64)
        self.samples_per_epoch = int(self._shard_samples.sum())
        if self.samples_per_epoch == 0:
            raise ValueError(
                f"the {len(shards)} shards hold no sample of seq_len {seq_len}; add shards or lower seq_len"
            )
        self._epoch_plans: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._permutations: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def epoch_of(self, global_index: int) -> int:
        _check_index(global_index)
        return global_index // self.samples_per_epoch

    def locate(self, global_index: int) -> tuple[int, int]:
        """(shard position in the shard list, sample index within that shard) of a global sample index."""
        epoch, block, block_start, members = self._block_of(global_index)
        index_in_epoch = global_index - epoch * self.samples_per_epoch
        position_in_block = int(self._block_permutation(epoch, block, members)[index_in_epoch - block_start])
        member_ends = np.cumsum(self._chunk_samples(members))
        member = int(np.searchsorted(member_ends, position_in_block, side="right"))
        member_start = int(member_ends[member - 1]) if member else 0
        chunk = int(members[member])
        shard = chunk // self.shard_chunks
        return shard, int(self._chunk_starts(np.array([chunk]))[0]) + position_in_block - member_start

    def block_shards(self, global_index: int) -> list[int]:
        """Positions of the shards of the block that holds global_index: what reading there needs first."""
        members = self._block_of(global_index)[3]
        return list(dict.fromkeys(int(chunk) // self.shard_chunks for chunk in members))

    def shards_in_need_order(self, global_index: int) -> list[int]:
        """Every shard position once, in the order a reader starting at global_index first needs it: the rest of
        this epoch block by block, then the next epoch's order for the shards this epoch has already passed."""
        return [position for position, _ in self.need_schedule(global_index)]

    def need_schedule(self, global_index: int) -> list[tuple[int, int]]:
        """shards_in_need_order with the block ordinal (see block_ordinal) at which each shard is first needed.

        Within the block holding global_index the order is exact (the order in which samples from there on first
        touch each shard), so a reader starting there waits only for what its first samples read; later blocks
        list their shards in chunk order, exact enough for a fetcher that has them local before reading enters
        their block. Costs one pass over the start block's permutation, which the first read computes anyway."""
        epoch, block, block_start, members = self._block_of(global_index)
        index_in_epoch = global_index - epoch * self.samples_per_epoch
        still_ahead = self._block_permutation(epoch, block, members)[index_in_epoch - block_start :]
        member_of = np.searchsorted(np.cumsum(self._chunk_samples(members)), still_ahead, side="right")
        touched = members[member_of] // self.shard_chunks
        this_block = touched[np.sort(np.unique(touched, return_index=True)[1])]
        per_epoch = self.blocks_per_epoch
        later = self._epoch_plan(epoch)[0][(block + 1) * self.mix_shards :]
        after = self._epoch_plan(epoch + 1)[0]
        chunks = np.concatenate([later, after])
        ordinals = np.concatenate([epoch * per_epoch + block + 1 + np.arange(len(later)) // self.mix_shards,
                                   (epoch + 1) * per_epoch + np.arange(len(after)) // self.mix_shards])
        read = self._chunk_samples(chunks) > 0  # a shard with fewer samples than chunks has empty ones
        shards = np.concatenate([this_block, chunks[read] // self.shard_chunks])
        ordinals = np.concatenate([np.full(len(this_block), epoch * per_epoch + block), ordinals[read]])
        first_need: dict[int, int] = {}
        for position, ordinal in zip(shards.tolist(), ordinals.tolist()):
            first_need.setdefault(position, ordinal)
        return list(first_need.items())

    def shards_read_by(self, global_index: int, count: int) -> list[int]:
        """Positions of the shards that samples [global_index, global_index + count) read, in first-use order:
        what one optimizer step starting at global_index needs local."""
        return list(dict.fromkeys(self.locate(index)[0] for index in range(global_index, global_index + count)))

    @property
    def blocks_per_epoch(self) -> int:
        return -(-self.num_shards * self.shard_chunks // self.mix_shards)

    def block_ordinal(self, global_index: int) -> int:
        """The block holding global_index, counted from the start of epoch 0."""
        epoch, block = self._block_of(global_index)[:2]
        return epoch * self.blocks_per_epoch + block

    def progress_mark(self, global_index: int) -> int:
        """How far reading has got, in half blocks: 2 * block_ordinal, plus 1 in the block's second half. A fetcher
        that brings the next block's shards once reading is past the middle of this one has half a block of time
        for them, and leaves the first steps alone."""
        epoch, block, block_start, members = self._block_of(global_index)
        position = global_index - epoch * self.samples_per_epoch - block_start
        in_second_half = 2 * position >= int(self._chunk_samples(members).sum())
        return 2 * (epoch * self.blocks_per_epoch + block) + int(in_second_half)

    def _block_of(self, global_index: int) -> tuple[int, int, int, np.ndarray]:
        """(epoch, block, first index in the epoch of that block, its chunks) of a global sample index."""
        _check_index(global_index)
        epoch, index_in_epoch = divmod(global_index, self.samples_per_epoch)
        chunk_order, block_ends = self._epoch_plan(epoch)
        block = int(np.searchsorted(block_ends, index_in_epoch, side="right"))
        block_start = int(block_ends[block - 1]) if block else 0
        return epoch, block, block_start, chunk_order[block * self.mix_shards : (block + 1) * self.mix_shards]

    def _chunk_starts(self, chunks: np.ndarray) -> np.ndarray:
        """First sample (within its shard) of each chunk: chunk c of a shard of n samples is [c*n//C, (c+1)*n//C)."""
        return (chunks % self.shard_chunks) * self._shard_samples[chunks // self.shard_chunks] // self.shard_chunks

    def _chunk_samples(self, chunks: np.ndarray) -> np.ndarray:
        ends = (chunks % self.shard_chunks + 1) * self._shard_samples[chunks // self.shard_chunks] // self.shard_chunks
        return ends - self._chunk_starts(chunks)

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's chunk order and the cumulative sample count at the end of each block."""
        if epoch not in self._epoch_plans:
            num_chunks = self.num_shards * self.shard_chunks
            chunk_order = _permutation(num_chunks, [self.seed, SEED_TAG_SHARD_ORDER, epoch]).astype(np.int64)
            block_starts = np.arange(0, num_chunks, self.mix_shards)
            block_sizes = np.add.reduceat(self._chunk_samples(chunk_order), block_starts)
            remember(self._epoch_plans, epoch, (chunk_order, np.cumsum(block_sizes)), EPOCH_PLANS_CACHED)
        self._epoch_plans.move_to_end(epoch)
        return self._epoch_plans[epoch]

    def _block_permutation(self, epoch: int, block: int, members: np.ndarray) -> np.ndarray:
        key = (epoch, block)
        if key not in self._permutations:
            block_samples = int(self._chunk_samples(members).sum())
            permutation = _permutation(block_samples, [self.seed, SEED_TAG_BLOCK, epoch, block])
            remember(self._permutations, key, permutation, PERMUTATIONS_CACHED)
        self._permutations.move_to_end(key)
        return self._permutations[key]


def _permutation(size: int, seed_words: list[int]) -> np.ndarray:
    keys = np.random.PCG64(np.random.SeedSequence(seed_words)).random_raw(size)
    permutation = np.argsort(keys, kind="stable")
    return permutation.astype(np.int32) if size < 2**31 else permutation


def remember(cache: OrderedDict, key, value, capacity: int) -> None:
    cache[key] = value
    while len(cache) > capacity:
        cache.popitem(last=False)


def _check_index(global_index: int) -> None:
    if global_index < 0:
        raise IndexError(f"global sample index is {global_index}; expected a non-negative index")
