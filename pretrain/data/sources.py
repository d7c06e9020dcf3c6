"""The frozen data of a run as sources (each one or more parts: shard lists with their own order) and the mixture's
global order over them: global sample -> source -> part -> SampleOrder, every step a pure function, O(1) at any
sample. Growth appends parts and sources at a global sample; everything before it keeps its order."""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction

from pretrain.data.format import ShardInfo
from pretrain.data.mixture import Interleave, derived_seed, format_share
from pretrain.data.order import LEGACY_ORDER, OrderSpec, SampleOrder

RECORD_VERSION = 2  # 1 (implicit): {"train", "eval", "order"}, one unnamed source of one part
SINGLE_SOURCE = "data"  # how the unnamed source of --data-dir is called where it needs a name


@dataclass(frozen=True)
class Part:
    """One stream of a source: a frozen shard list with its own SampleOrder, joined at source-local sample `since`.
    seed None: the run's seed (the single source's first part, as runs have always used it)."""

    train: tuple[ShardInfo, ...]
    order: OrderSpec
    seed: int | None = None
    since: int = 0

    def samples(self, seq_len: int) -> int:
        return sum(s.num_samples(seq_len) for s in self.train)

    def to_json(self) -> dict:
        return {"train": [s.to_dict() for s in self.train], "order": self.order.to_json(), "seed": self.seed,
                "since": self.since}

    @classmethod
    def from_json(cls, d: dict) -> Part:
        return cls(train=tuple(ShardInfo.from_dict(s) for s in d["train"]), order=OrderSpec.from_json(d["order"]),
                   seed=d.get("seed"), since=int(d.get("since", 0)))


@dataclass(frozen=True)
class FrozenSource:
    name: str
    url: str  # where its shards came from when frozen; on resume the mixture given names it again (it may move)
    parts: tuple[Part, ...]
    eval: tuple[ShardInfo, ...] = ()

    @property
    def train(self) -> tuple[ShardInfo, ...]:
        return tuple(s for part in self.parts for s in part.train)

    @property
    def all(self) -> tuple[ShardInfo, ...]:
        return self.train + self.eval

    def to_json(self) -> dict:
        return {"name": self.name, "url": self.url, "parts": [p.to_json() for p in self.parts],
                "eval": [s.to_dict() for s in self.eval]}

    @classmethod
    def from_json(cls, d: dict) -> FrozenSource:
        return cls(name=str(d["name"]), url=str(d["url"]), parts=tuple(Part.from_json(p) for p in d["parts"]),
                   eval=tuple(ShardInfo.from_dict(s) for s in d["eval"]))


@dataclass(frozen=True)
class Growth:
    """Data added to a resumed run at global sample `at` (optimizer step `step`), with its one line per source."""

    at: int
    step: int
    lines: tuple[str, ...]

    def to_json(self) -> dict:
        return {"at": self.at, "step": self.step, "lines": list(self.lines)}

    @classmethod
    def from_json(cls, d: dict) -> Growth:
        return cls(at=int(d["at"]), step=int(d["step"]), lines=tuple(d["lines"]))


@dataclass(frozen=True)
class FrozenData:
    """Everything the order of a run depends on besides (seed, seq_len), fixed at step 0 and stored in every
    checkpoint: the sources with their parts, and the weights over sources from each global sample on (stages and
    growth). `mixture` is False for the unnamed single source of --data-dir, which is written in the old record
    format while it has one part, so its checkpoints are those of runs before mixtures."""

    sources: tuple[FrozenSource, ...]
    segments: tuple[tuple[int, tuple[Fraction, ...]], ...]
    growth: tuple[Growth, ...] = ()
    mixture: bool = True

    @classmethod
    def single(cls, train, evaluation, order: OrderSpec, url: str = "") -> FrozenData:
        source = FrozenSource(SINGLE_SOURCE, url, (Part(tuple(train), order),), tuple(evaluation))
        return cls((source,), ((0, (Fraction(1),)),), mixture=False)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def is_plain(self) -> bool:
        """One source of one part: the order is that part's SampleOrder itself."""
        return len(self.sources) == 1 and len(self.sources[0].parts) == 1

    # The single source's view, as runs before mixtures had it.
    @property
    def train(self) -> tuple[ShardInfo, ...]:
        return self._only().parts[0].train

    @property
    def eval(self) -> tuple[ShardInfo, ...]:
        return self._only().eval

    @property
    def order(self) -> OrderSpec:
        return self._only().parts[0].order

    @property
    def all(self) -> tuple[ShardInfo, ...]:
        return tuple(s for source in self.sources for s in source.all)

    @property
    def train_files(self) -> int:
        return sum(len(source.train) for source in self.sources)

    def _only(self) -> FrozenSource:
        if not self.is_plain:
            raise AttributeError(f"the run's data has {len(self.sources)} sources; ask a source for its shards")
        return self.sources[0]

    def weights_at(self, index: int) -> tuple[Fraction, ...]:
        return [weights for start, weights in self.segments if start <= index][-1]

    def to_json(self) -> dict:
        if not self.mixture and self.is_plain and not self.growth:
            source = self.sources[0]
            return {"train": [s.to_dict() for s in source.parts[0].train], "eval": [s.to_dict() for s in source.eval],
                    "order": source.parts[0].order.to_json()}
        return {"version": RECORD_VERSION, "mixture": self.mixture, "sources": [s.to_json() for s in self.sources],
                "segments": [{"start": start, "weights": [str(w) for w in weights]}
                             for start, weights in self.segments],
                "growth": [g.to_json() for g in self.growth], "train_files": self.train_files}

    @classmethod
    def from_json(cls, d: dict) -> FrozenData:
        version = d.get("version", 1)
        if version == 1:
            # Checkpoints written before the order was stored used blocks of two shards.
            order = OrderSpec.from_json(d["order"]) if "order" in d else LEGACY_ORDER
            return cls.single([ShardInfo.from_dict(s) for s in d["train"]],
                              [ShardInfo.from_dict(s) for s in d["eval"]], order)
        if version != RECORD_VERSION:
            raise ValueError(f"the checkpoint's data record is version {version}, this code reads 1 and "
                             f"{RECORD_VERSION}; resume with the code version that wrote it")
        return cls(sources=tuple(FrozenSource.from_json(s) for s in d["sources"]),
                   segments=tuple((int(seg["start"]), tuple(Fraction(w) for w in seg["weights"]))
                                  for seg in d["segments"]),
                   growth=tuple(Growth.from_json(g) for g in d.get("growth", ())), mixture=bool(d["mixture"]))


def within_segments(source: FrozenSource, seq_len: int) -> list[tuple[int, tuple[Fraction, ...]]]:
    """The interleave of a source's parts over its own samples. One part: it alone. When a part joins at source
    sample c, every part first gets what is left of its current epoch (a joining part: all of it), in proportion,
    so that all of them end that epoch at the same sample c + R; from there on each part's weight is its size, so
    they keep passing through their epochs together. Nothing a part has yielded in an epoch comes again in it."""
    sizes = [part.samples(seq_len) for part in source.parts]
    segments: list[tuple[int, tuple[Fraction, ...]]] = [(0, _padded(sizes[:1], len(sizes)))]
    for index in range(1, len(sizes)):
        joined_at = source.parts[index].since
        kept = [segment for segment in segments if segment[0] < joined_at]
        before = Interleave(kept, len(sizes)).counts(joined_at) if joined_at else [0] * len(sizes)
        left = [(-before[p]) % sizes[p] if before[p] else sizes[p] for p in range(index)] + [sizes[index]]
        kept.append((joined_at, _padded(left, len(sizes))))
        kept.append((joined_at + sum(left), _padded(sizes[: index + 1], len(sizes))))
        segments = _merged(kept)
    return segments


def _padded(weights: list[int], length: int) -> tuple[Fraction, ...]:
    return tuple(Fraction(w) for w in weights) + (Fraction(0),) * (length - len(weights))


def _merged(segments: list[tuple[int, tuple[Fraction, ...]]]) -> list[tuple[int, tuple[Fraction, ...]]]:
    """A segment at the start of the one before it replaces it (a part joining at sample 0)."""
    merged: list[tuple[int, tuple[Fraction, ...]]] = []
    for segment in segments:
        if merged and merged[-1][0] == segment[0]:
            merged[-1] = segment
        else:
            merged.append(segment)
    return merged


class MixtureOrder:
    """The global order of a FrozenData: global sample -> (source, part, sample of that part's SampleOrder).

    Pure and independent of the number of processes: sources are interleaved over global samples by the frozen
    weights (mixture.Interleave over `segments`), parts within a source over its own samples (within_segments),
    and each part reads its shards in its own SampleOrder, epoch after epoch. So a source that runs out starts its
    next epoch on its own, and the position of every source and part follows from the global sample alone."""

    def __init__(self, frozen: FrozenData, seq_len: int, seed: int,
                 part_orders: list[list[SampleOrder]] | None = None):
        self.frozen = frozen
        self.seq_len = seq_len
        self.between = Interleave(frozen.segments, len(frozen.sources))
        self.within = [Interleave(within_segments(source, seq_len), len(source.parts)) for source in frozen.sources]
        self.sizes = [[part.samples(seq_len) for part in source.parts] for source in frozen.sources]
        self.orders = part_orders or [
            [SampleOrder(list(part.train), seq_len, seed if part.seed is None else part.seed, part.order.mix_shards,
                         part.order.shard_chunks) for part in source.parts]
            for source in frozen.sources]

    def locate_part(self, index: int) -> tuple[int, int, int]:
        """(source, part, index in that part's SampleOrder) of a global sample."""
        source, within = self.between.locate(index)
        part, position = self.within[source].locate(within)
        return source, part, position

    def locate(self, index: int) -> tuple[int, int, int, int]:
        """(source, part, shard position in the part, sample within the shard) of a global sample."""
        source, part, position = self.locate_part(index)
        return (source, part, *self.orders[source][part].locate(position))

    def source_counts(self, consumed: int) -> list[int]:
        """Samples of each source among the first `consumed` global samples."""
        return self.between.counts(consumed)

    def part_counts(self, consumed: int) -> list[list[int]]:
        return [self.within[s].counts(count) for s, count in enumerate(self.source_counts(consumed))]

    def source_epochs(self, consumed: int) -> list[int]:
        """Full passes each source has made over all its parts (a part that joined late counts from its join)."""
        epochs = []
        for s, counts in enumerate(self.part_counts(consumed)):
            joined = [c // n for c, n, part in zip(counts, self.sizes[s], self.frozen.sources[s].parts)
                      if part.since <= sum(counts)]
            epochs.append(min(joined))
        return epochs

    def part_ranges(self, start: int, count: int) -> dict[tuple[int, int], tuple[int, int]]:
        """For global samples [start, start + count): (source, part) -> (first index in the part, how many)."""
        first, end = self.part_counts(start), self.part_counts(start + count)
        return {(s, p): (first[s][p], end[s][p] - first[s][p]) for s in range(len(first)) for p in range(len(first[s]))}

    def accounting(self, consumed: int) -> dict[str, dict[str, int]]:
        """Per source: samples and tokens consumed and the epoch it is in, for the first `consumed` global samples;
        from the order alone (no counting on the side)."""
        counts, epochs = self.source_counts(consumed), self.source_epochs(consumed)
        return {source.name: {"samples": n, "tokens": n * self.seq_len, "epoch": e}
                for source, n, e in zip(self.frozen.sources, counts, epochs)}


def grown(frozen: FrozenData, at: int, step: int, seq_len: int, seed: int, order: OrderSpec,
          current: dict[str, tuple[str, list[ShardInfo], list[ShardInfo]]],
          segments_from: list[tuple[int, dict[str, Fraction]]] | None) -> FrozenData:
    """`frozen` with the data of `current` (name -> (url, training shards, eval shards) as listed now) that it lacks,
    joined at global sample `at`: new shards of a source become a new part (it joins at the source's sample count
    there), a new source joins with its shards. When sources join, the weights from `at` on are those of
    `segments_from` (the mixture given, its stages re-frozen from `at`; a frozen source it does not name gets 0).
    Returns `frozen` itself when nothing is new. Samples before `at` keep their order: every segment, part and
    source before it is unchanged."""
    mixture_order = MixtureOrder(frozen, seq_len, seed)
    counts = mixture_order.source_counts(at)
    sources, lines, added = list(frozen.sources), [], []
    for index, source in enumerate(frozen.sources):
        if source.name not in current:
            continue
        _, train, _ = current[source.name]
        known = {s.path for s in source.all}
        new = tuple(s for s in train if s.path not in known)
        if not new:
            continue
        part = Part(new, source.parts[0].order, derived_seed(seed, source.name, len(source.parts)), counts[index])
        sources[index] = replace(source, parts=source.parts + (part,))
        lines.append(f"{_label(frozen, source.name)}: +{len(new)} shards ({part.samples(seq_len):,} samples) as part "
                     f"{len(source.parts) + 1}, joining at its sample {counts[index]:,}; it reads what is left of its "
                     f"current epoch and the new shards together, then both in step")
    for name, (url, train, evaluation) in current.items():
        if name in frozen.names:
            continue
        part = Part(tuple(train), order, derived_seed(seed, name, 0), 0)
        sources.append(FrozenSource(name, url, (part,), tuple(evaluation)))
        added.append(name)
        lines.append(f"{name}: new source, {len(train)} shards ({part.samples(seq_len):,} samples), "
                     f"{len(evaluation)} held out for evaluation")
    if not lines:
        return frozen
    segments = [segment for segment in frozen.segments]
    if added:
        names = [s.name for s in sources]
        padded = [(start, weights + (Fraction(0),) * len(added)) for start, weights in segments]
        active = [(start, weights) for start, weights in segments_from if start <= at][-1][1]
        later = [(start, weights) for start, weights in segments_from if start > at]
        if not any(active.get(name, 0) for name in names):
            raise ValueError(f"the mixture gives every source weight 0 at sample {at:,}, where the new source(s) "
                             f"{', '.join(added)} join; give one of them a positive weight")
        new_segments = [(at, active), *later]
        segments = [(start, weights) for start, weights in padded if start < at]
        segments += [(start, tuple(weights.get(name, Fraction(0)) for name in names))
                     for start, weights in new_segments]
        weights = segments[-len(new_segments)][1]
        described = ", ".join(f"{n} {format_share(w, weights)}" for n, w in zip(names, weights))
        lines.append(f"weights from sample {at:,} on: {described}" +
                     (f"; {len(later)} later stage(s)" if later else ""))
    growth = Growth(at, step, tuple(lines))
    return FrozenData(tuple(sources), tuple(segments), frozen.growth + (growth,), frozen.mixture)


def _label(frozen: FrozenData, name: str) -> str:
    return name if frozen.mixture else f"{name} (--data-dir)"

