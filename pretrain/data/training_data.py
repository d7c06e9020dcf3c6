"""The data room's facade: from a config (and, on resume, the frozen data) to the training and eval readers, with the
shards the first steps need local and validated and the rest fetched in the background; for one dataset or a
mixture of sources (each fetched into its own folder), grown on resume when asked.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from pretrain.data.fetch import (
    ReadyGate,
    ShardFetcher,
    inspect_local_headers,
    inspect_remote_shards,
)
from pretrain.data.format import (
    DATASET_JSON,
    DatasetManifest,
    ShardError,
    ShardInfo,
    discover_shards,
    list_shards,
    read_dataset_json,
    split_eval_shards,
)
from pretrain.data.mixture import (
    FLAG,
    MixtureSpec,
    derived_seed,
    format_share,
    parse_mixture,
)
from pretrain.data.order import LEGACY_ORDER, OrderSpec
from pretrain.data.samples import TokenSamples
from pretrain.data.sources import FrozenData, FrozenSource, MixtureOrder, Part, grown
from pretrain.distributed import on_local_main, on_main
from pretrain.files import file_digest
from pretrain.storage import ObjectInfo, Storage, open_storage, storage_options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrozenShards:
    """The shards and order of a single-dataset run as checkpoints before mixtures stored them (record version 1)."""

    train: tuple[ShardInfo, ...]
    eval: tuple[ShardInfo, ...]
    order: OrderSpec = field(default_factory=OrderSpec)

    @property
    def all(self) -> tuple[ShardInfo, ...]:
        return self.train + self.eval

    def to_json(self) -> dict:
        return {"train": [s.to_dict() for s in self.train], "eval": [s.to_dict() for s in self.eval],
                "order": self.order.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> FrozenShards:
        # Checkpoints written before the order was stored used blocks of two shards.
        order = OrderSpec.from_json(d["order"]) if "order" in d else LEGACY_ORDER
        return cls(train=tuple(ShardInfo.from_dict(s) for s in d["train"]),
                   eval=tuple(ShardInfo.from_dict(s) for s in d["eval"]), order=order)


def frozen_from_json(record: dict) -> FrozenData:
    """A checkpoint's data record, of any version (TrainState.data)."""
    return FrozenData.from_json(record)


@dataclass
class SourcePlace:
    """Where a source's shards are on this machine (`root`: what shard paths are relative to) and where they come
    from (`bucket`: a URL; '' when `root` is the data itself)."""

    name: str
    root: Path
    bucket: str = ""


class MixtureSamples(Dataset):
    """Samples by global index over several sources: MixtureOrder says which part and which of its samples, and
    that part's TokenSamples reads it (opening, fetching and validating its shards as for a single dataset)."""

    def __init__(self, order: MixtureOrder, parts: list[list[TokenSamples]]):
        self.order = order
        self.parts = parts

    def __getitem__(self, global_index: int):
        source, part, position = self.order.locate_part(global_index)
        return self.parts[source][part][position]


@dataclass
class TrainingData:
    """What the loop reads: samples by global index. Shards not yet local are fetched by background threads on
    each node's first process; a reader that gets ahead of them waits (bounded) for the shard it needs."""

    frozen: FrozenData
    train: TokenSamples | MixtureSamples
    eval: TokenSamples | dict[str, TokenSamples] | None  # a mixture: the sources that have eval shards, by name
    samples_per_epoch: int  # a mixture: its sources' together (informational)
    source: str
    ready_at_start: int
    fetched_in_background: int
    tokenizer_dir: Path | None = None  # holds the tokenizer.json that dataset.json names, for the final export
    order: MixtureOrder | None = None
    grew: bool = False  # this resume added data: the checkpoints from here record it
    _fetchers: list[ShardFetcher] = field(default_factory=list)

    @property
    def _fetcher(self) -> ShardFetcher | None:
        return self._fetchers[0] if self._fetchers else None

    def describe(self) -> str:
        background = (f", {self.fetched_in_background} more checked or fetched in the background from {self.source}"
                      if self.fetched_in_background else "")
        frozen = self.frozen
        if frozen.is_plain and not frozen.mixture:
            order = frozen.order
            return (f"data: {len(frozen.train)} training shards ({self.samples_per_epoch:,} samples of "
                    f"{self.train.seq_len} tokens per epoch), {len(frozen.eval)} held out for evaluation; "
                    f"order v{order.version}: blocks of {order.mix_shards} chunks, {order.shard_chunks} per shard; "
                    f"{self.ready_at_start} shards ready before step 1{background}")
        if not frozen.mixture:
            source = frozen.sources[0]
            return (f"data: {len(source.train)} training shards in {len(source.parts)} parts (grown at step "
                    f"{', '.join(str(g.step) for g in frozen.growth)}; {sum(self.order.sizes[0]):,} samples of "
                    f"{self.order.seq_len} tokens per epoch), {len(source.eval)} held out for evaluation; "
                    f"{self.ready_at_start} shards ready before step 1{background}")
        parts, weights = [], frozen.weights_at(0)
        for source, weight in zip(frozen.sources, weights):
            samples = sum(part.samples(self.order.seq_len) for part in source.parts)
            pieces = f", {len(source.parts)} parts" if len(source.parts) > 1 else ""
            parts.append(f"{source.name} {format_share(weight, weights)} ({len(source.train)} shards{pieces}, "
                         f"{samples:,} samples, {len(source.eval)} eval)")
        stages = len(frozen.segments) - 1
        return (f"data: mixture of {len(frozen.sources)} sources, weights at step 1: {'; '.join(parts)}"
                f"{f'; {stages} later change(s) of the weights' if stages else ''}; "
                f"{self.ready_at_start} shards ready before step 1{background}")

    def epoch_at(self, consumed: int) -> int:
        """The epoch of the next sample; a mixture: the most passes any source has made."""
        if self.order is None:
            return consumed // self.samples_per_epoch
        return max(self.order.source_epochs(consumed))

    def epochs_at(self, consumed: int) -> float:
        if self.order is None:
            return consumed / self.samples_per_epoch
        counts = self.order.source_counts(consumed)
        return max(count / sum(sizes) for count, sizes in zip(counts, self.order.sizes))

    def accounting(self, consumed: int) -> dict[str, dict[str, int]]:
        """Per source of a mixture: samples, tokens and epoch consumed so far, from the order; {} for one dataset."""
        return self.order.accounting(consumed) if self.order is not None and self.frozen.mixture else {}

    def metric_values(self, consumed: int) -> dict[str, float]:
        """data/tokens/NAME and data/epoch/NAME for the logged metrics."""
        values = {}
        for name, numbers in self.accounting(consumed).items():
            values[f"data/tokens/{name}"] = float(numbers["tokens"])
            values[f"data/epoch/{name}"] = float(numbers["epoch"])
        return values

    def epoch_lines(self, before: dict, now: dict, step: int) -> list[str]:
        """A line for each source that ran out and started its next epoch since `before`."""
        return [f"source {name} ran out of samples and starts its epoch {numbers['epoch']} at step {step} "
                f"({numbers['tokens']:,} tokens read from it so far)"
                for name, numbers in now.items() if numbers["epoch"] > before.get(name, {}).get("epoch", 0)]

    def close(self) -> None:
        for fetcher in self._fetchers:
            fetcher.close()
        self._fetchers = []


def prepare_training_data(config, accelerator, frozen: FrozenData | FrozenShards | None, start_sample: int = 0,
                          start_step: int = 0) -> TrainingData:
    """Freeze the data (fresh run: from dataset.json or shard headers, never the tokens), grow it on resume when
    --data-growth asks and there is more, make the shards of the first steps and the eval shards ready, and start
    fetching the rest in the order training needs them.

    start_sample is the global sample training resumes at (0 on a fresh run): it decides which shards come first
    and where added data joins. Errors (bad or missing shard, bucket trouble, a bad mixture) are one line and raised
    on every rank.
    """
    spec = parse_mixture(_setting(config, "data_mixture", ""))
    step_samples = config.per_device_train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    if isinstance(frozen, FrozenShards):
        frozen = FrozenData.single(frozen.train, frozen.eval, frozen.order)
    grew = False
    if frozen is None:
        frozen = on_main(accelerator, lambda: freeze_data(config, spec, step_samples))
    else:
        _check_resumed_mixture(config, spec, frozen, step_samples)
        if _setting(config, "data_growth", False):
            before = len(frozen.growth)
            frozen = on_main(accelerator, lambda: grow_data(config, spec, frozen, start_sample, start_step,
                                                            step_samples))
            grew = len(frozen.growth) > before
            if grew:
                for line in frozen.growth[-1].lines:
                    _log_main(accelerator, f"data growth at step {start_step}: {line}")
    places = [source_place(config, spec, source, frozen.mixture) for source in frozen.sources]
    run_token = on_main(accelerator, lambda: uuid.uuid4().hex)
    plain = frozen.is_plain and not frozen.mixture
    vocab = config.model.vocab_size
    # Each part reads in its own order, so it reports its progress (and moves its fetcher's window) on its own token.
    tokens = [[run_token if plain else f"{run_token}-{s}-{p}" for p in range(len(source.parts))]
              for s, source in enumerate(frozen.sources)]
    gates = [[ReadyGate(place.root, token, vocab) for token in source_tokens]
             for place, source_tokens in zip(places, tokens)]
    parts = [[TokenSamples(place.root, list(part.train), config.seq_len, _seed(config, part), gate=gate,
                           mix_shards=part.order.mix_shards, shard_chunks=part.order.shard_chunks)
              for part, gate in zip(source.parts, source_gates)]
             for source, place, source_gates in zip(frozen.sources, places, gates)]
    # The eval order has blocks of its own: its reads must not move the training fetchers' windows.
    evals: dict[str, TokenSamples] = {}
    for source, place, source_tokens in zip(frozen.sources, places, tokens):
        if source.eval:
            first = source.parts[0]
            evals[source.name] = TokenSamples(
                place.root, list(source.eval), config.seq_len, _seed(config, first),
                gate=ReadyGate(place.root, source_tokens[0], vocab, reports_progress=False),
                mix_shards=first.order.mix_shards, shard_chunks=first.order.shard_chunks)
    order = None if plain else MixtureOrder(frozen, config.seq_len, config.seed,
                                            part_orders=[[ts.order for ts in source] for source in parts])
    # The shards the first optimizer step reads are made ready before it; the rest follow in the order reads first
    # touch them (exact within the start block), so a wide block does not make step 1 wait for all of its shards.
    if order is None:
        ranges = {(0, 0): (start_sample, step_samples)}
    else:
        ranges = order.part_ranges(start_sample, step_samples)
    plans: list[list[tuple[list[ShardInfo], list[tuple[ShardInfo, int]], int]]] = []
    ready, background = 0, 0
    for s, source in enumerate(frozen.sources):
        source_plans = []
        for p, part in enumerate(source.parts):
            first_index, count = ranges[(s, p)]
            samples_order = parts[s][p].order
            first_positions = samples_order.shards_read_by(first_index, count) if count else []
            first = [part.train[i] for i in first_positions] + (list(source.eval) if p == 0 else [])
            at_start = set(first_positions)
            rest = [(part.train[i], block) for i, block in samples_order.need_schedule(first_index)
                    if i not in at_start]
            source_plans.append((first, rest, samples_order.progress_mark(first_index)))
            ready += len(first)
            background += len(rest)
        plans.append(source_plans)
    flat_gates = [gate for source_gates in gates for gate in source_gates]
    fetchers = on_local_main(accelerator, lambda: start_fetching(config, frozen, places, flat_gates, plans)) or []
    try:
        tokenizer_dir = on_main(accelerator, lambda: find_tokenizer(config, places))
    except BaseException:
        for fetcher in fetchers:
            fetcher.close()
        raise
    if plain:
        train, evaluation, per_epoch = parts[0][0], evals.get(frozen.sources[0].name), parts[0][0].samples_per_epoch
    else:
        global_micro_batch = config.per_device_train_batch_size * accelerator.num_processes
        for name, samples in list(evals.items()):
            if samples.samples_per_epoch < global_micro_batch:  # make_eval_batches would stop the run mid-way
                _log_main(accelerator, f"source {name}: its eval shards hold {samples.samples_per_epoch} samples, "
                                       f"fewer than one global micro-batch ({global_micro_batch}); not evaluated")
                del evals[name]
        train, evaluation = MixtureSamples(order, parts), (evals or None)
        per_epoch = sum(sum(sizes) for sizes in order.sizes)
    where = ", ".join(place.bucket or str(place.root) for place in places)
    return TrainingData(frozen=frozen, train=train, eval=evaluation, samples_per_epoch=per_epoch, source=where,
                        ready_at_start=ready, fetched_in_background=background, tokenizer_dir=tokenizer_dir,
                        order=order, grew=grew, _fetchers=fetchers)


def _setting(config, name: str, default):
    """Config-like objects of tests and benchmarks may predate a field."""
    return getattr(config, name, default)


def _seed(config, part: Part) -> int:
    return config.seed if part.seed is None else part.seed


def _log_main(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        log.info(message)


def source_place(config, spec: MixtureSpec | None, source: FrozenSource, mixture: bool) -> SourcePlace:
    """A source of the mixture given (or, when it no longer names it, as frozen): a bucket URL is fetched into
    <data-dir>/NAME, a local folder is read where it is. The unnamed single source is --data-dir/--data-bucket."""
    if not mixture:
        return SourcePlace(source.name, Path(config.data_dir), config.data_bucket)
    given = spec.source(source.name) if spec is not None else None
    url = given.url if given is not None else source.url
    if url.startswith(("gs://", "s3://", "az://", "file://")):
        return SourcePlace(source.name, Path(config.data_dir) / source.name, url)
    return SourcePlace(source.name, Path(url))


def find_tokenizer(config, places: list[SourcePlace] | None = None) -> Path | None:
    """The folder holding the tokenizer file dataset.json names (fetched from the bucket when missing and checked
    against its sha256), or None when the data has no manifest or it names no tokenizer. A mixture: the first
    source whose dataset.json names one (freezing checked that they agree)."""
    if places is None:
        places = _places_of_config(config)
    for place in places:
        found = _tokenizer_of(config, place)
        if found is not None:
            return found
    return None


def _places_of_config(config) -> list[SourcePlace]:
    spec = parse_mixture(_setting(config, "data_mixture", ""))
    if spec is None:
        return [SourcePlace("data", Path(config.data_dir), config.data_bucket)]
    return [source_place(config, spec, FrozenSource(s.name, s.url, ()), True) for s in spec.sources]


def _tokenizer_of(config, place: SourcePlace) -> Path | None:
    manifest_path = place.root / DATASET_JSON
    storage = open_storage(place.bucket, storage_options(config)) if place.bucket else None
    if not manifest_path.is_file() and storage is not None:
        read_manifest_from_bucket(storage, place.root)
    manifest = read_dataset_json(manifest_path)
    if manifest is None or manifest.tokenizer_file is None:
        return None
    path = place.root / manifest.tokenizer_file
    expected = manifest.tokenizer_sha256
    if storage is not None and (not path.is_file() or (expected and file_digest(path) != expected)):
        storage.download(manifest.tokenizer_file, path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: {manifest_path} names this tokenizer file but it is missing; copy it beside the shards or "
            f"re-create the data with `python -m pretrain.prepare_data`"
        )
    if expected and file_digest(path) != expected:
        raise ValueError(
            f"{path}: sha256 differs from the one {manifest_path} records; the shards were made with another "
            f"tokenizer: restore the right file or re-create the data with `python -m pretrain.prepare_data`"
        )
    return path.parent


def start_fetching(config, frozen: FrozenData, places: list[SourcePlace], gates: list[ReadyGate],
                   plans: list[list[tuple[list[ShardInfo], list[tuple[ShardInfo, int]], int]]]) -> list[ShardFetcher]:
    """On each node's first process: check every shard of every source can be had (local or in its bucket; stat and
    listing only), make the first step's shards of every part ready now, then start one background fetcher per
    part (each shard with the block that first needs it) as the readers approach. First everything step 1 needs,
    across sources, and only then any background fetch, so no source's background competes with another's start."""
    fetchers: list[ShardFetcher] = []
    gate_iter = iter(gates)
    try:
        for source, place, source_plans in zip(frozen.sources, places, plans):
            storage, remote = None, {}
            if place.bucket:
                storage = open_storage(place.bucket, storage_options(config))
                remote = {info.key: info for info in list_shards(storage)}
            check_obtainable(place.root, source.all, storage, remote)
            for first, _, _ in source_plans:
                fetcher = ShardFetcher(next(gate_iter), config.seq_len, storage, remote)
                fetcher.ensure(first)
                fetchers.append(fetcher)
        schedules = [(rest, mark) for source_plans in plans for _, rest, mark in source_plans]
        for fetcher, (rest, mark) in zip(fetchers, schedules):
            fetcher.start(rest, mark)
    except BaseException:
        for fetcher in fetchers:
            fetcher.close()
        raise
    return fetchers


def check_obtainable(data_dir: Path, shards: tuple[ShardInfo, ...], storage: Storage | None,
                     remote: dict[str, ObjectInfo]) -> None:
    """Before step 1, a shard the run can never get is an error, not a stall hours later."""
    for shard in shards:
        path = data_dir / shard.path
        local_size = path.stat().st_size if path.is_file() else None
        if local_size == shard.size_bytes:
            continue
        info = remote.get(shard.path)
        if info is not None and info.size == shard.size_bytes:
            continue
        if storage is None and local_size is None:
            raise FileNotFoundError(
                f"{path}: shard recorded in the checkpoint is missing; resuming needs the exact shards the run "
                f"started with, so restore them (or pass --data-bucket to fetch them) or start a new run"
            )
        if info is None and local_size is None:
            raise FileNotFoundError(
                f"{storage.object_url(shard.path)}: shard recorded in the checkpoint is missing from the data bucket "
                f"(and from {data_dir}); restore it in the bucket or start a new run"
            )
        seen, where = (info.size, storage.object_url(shard.path)) if info is not None else (local_size, str(path))
        raise ShardError(
            f"{where}: shard has {seen} bytes but the checkpoint recorded {shard.size_bytes}; resuming needs the "
            f"exact shards the run started with, so restore the original file or start a new run"
        )


@dataclass
class Listed:
    """A source's shards as found now: training and eval shards with their counts, and its dataset.json."""

    train: list[ShardInfo]
    eval: list[ShardInfo]
    manifest: DatasetManifest | None
    manifest_name: str
    split_from_manifest: bool


def list_source(config, place: SourcePlace, strict_eval: bool = True) -> Listed:
    """Every shard of a source (the bucket's, or the local folder's), token counts from dataset.json where it lists
    a shard, else from each shard's header. The eval split is the one dataset.json lists (preparation's held-out
    documents); without one, the last --eval-shards shards, where they leave a training shard (strict_eval: else
    the one-line error of runs before mixtures). --max-files keeps the first N training shards."""
    data_dir = place.root
    max_files = config.max_files or None
    objects: list[ObjectInfo] = []
    storage = None
    if place.bucket:
        storage = open_storage(place.bucket, storage_options(config))
        objects = list_shards(storage)
    if objects:
        manifest = read_manifest_from_bucket(storage, data_dir)
        manifest_name = storage.object_url(DATASET_JSON)
        sizes = {o.key: o.size for o in objects}
    else:
        if place.bucket and not data_dir.is_dir():
            raise FileNotFoundError(f"{storage.url}: no .npz shards found under this URL (searched recursively); "
                                    f"check the URL or prepare the data there with `python -m pretrain.prepare_data`")
        paths = discover_shards(data_dir)
        manifest = read_dataset_json(data_dir / DATASET_JSON)
        manifest_name = str(data_dir / DATASET_JSON)
        sizes = {p: (data_dir / p).stat().st_size for p in paths}
    keys = list(sizes)
    eval_listed = [s.path for s in manifest.eval_shards] if manifest is not None else []
    if eval_listed:
        missing = [path for path in eval_listed if path not in sizes]
        if missing:
            raise FileNotFoundError(f"{manifest_name}: lists eval shard {missing[0]}, which is not there; restore it "
                                    f"or re-create the data with `python -m pretrain.prepare_data`")
        held = set(eval_listed)
        keys = [k for k in keys if k not in held][:max_files] + eval_listed
    else:
        keys = keys[:max_files]
    known = manifest.counts_for(sizes) if manifest else {}
    unknown = [k for k in keys if k not in known]
    if storage is not None and objects:
        by_key = {o.key: o for o in objects}
        inspected = {s.path: s for s in inspect_remote_shards(storage, [by_key[k] for k in unknown], config.seq_len)}
    else:
        inspected = {s.path: s for s in inspect_local_headers(data_dir, unknown, config.seq_len)}
    shards = [known.get(k) or inspected[k] for k in keys]
    if manifest is not None:
        manifest.check_vocab(manifest_name, config.model.vocab_size)
    for shard in shards:
        if shard.num_samples(config.seq_len) == 0:
            raise ShardError(
                f"{data_dir / shard.path}: {manifest_name} lists {shard.num_tokens} tokens, fewer than seq_len "
                f"{config.seq_len}, so it yields no sample; remove the shard, merge it into another, or lower seq_len"
            )
    if eval_listed:
        cut = len(shards) - len(eval_listed)
        return Listed(shards[:cut], shards[cut:], manifest, manifest_name, True)
    if not strict_eval and config.eval_shards >= len(shards):
        log.info("%s: %d shard(s), no eval split in dataset.json: none held out for evaluation", place.name,
                 len(shards))
        return Listed(shards, [], manifest, manifest_name, False)
    train, evaluation = split_eval_shards(shards, config.eval_shards)
    return Listed(train, evaluation, manifest, manifest_name, False)


def freeze_shards(config) -> FrozenShards:
    """A fresh single-dataset run's shard list: the bucket's shards (or the local folder's), token counts from
    dataset.json where it lists a shard, else from each shard's header; held out: dataset.json's eval split, else
    the last eval_shards."""
    listed = list_source(config, SourcePlace("data", Path(config.data_dir), config.data_bucket))
    # The order a fresh run freezes; a resumed run keeps the one in its checkpoint.
    order = OrderSpec(mix_shards=config.block_chunks, shard_chunks=config.shard_chunks)
    return FrozenShards(train=tuple(listed.train), eval=tuple(listed.eval), order=order)


def freeze_data(config, spec: MixtureSpec | None, global_batch_samples: int) -> FrozenData:
    """A fresh run's data: the single dataset of --data-dir, or every source of the mixture with its own shard
    list, order and eval shards, and the weights of each stage as global sample indices."""
    if spec is None:
        single = freeze_shards(config)
        return FrozenData.single(single.train, single.eval, single.order)
    order = OrderSpec(mix_shards=config.block_chunks, shard_chunks=config.shard_chunks)
    sources, listings = [], {}
    for source in spec.sources:
        place = source_place(config, spec, FrozenSource(source.name, source.url, ()), True)
        listed = _list_mixture_source(config, place, source.url)
        listings[source.name] = listed
        part = Part(tuple(listed.train), order, derived_seed(config.seed, source.name, 0), 0)
        sources.append(FrozenSource(source.name, source.url, (part,), tuple(listed.eval)))
    check_same_tokenizer(listings)
    segments = tuple((start, tuple(weights[name] for name in spec.names))
                     for start, weights in spec.segments(config.seq_len, global_batch_samples))
    return FrozenData(tuple(sources), segments, mixture=True)


def _list_mixture_source(config, place: SourcePlace, url: str) -> Listed:
    if not place.bucket and not place.root.is_dir():
        raise FileNotFoundError(f"{FLAG}: source {place.name} ({url}) does not exist; check its path or URL")
    try:
        return list_source(config, place, strict_eval=False)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{FLAG}: source {place.name}: {error}") from None


def check_same_tokenizer(listings: dict[str, Listed]) -> None:
    """Every source must have been tokenized alike: one line naming the first two that differ."""
    described = [(name, listed) for name, listed in listings.items() if listed.manifest is not None]
    for (name_a, a), (name_b, b) in zip(described, described[1:]):
        ma, mb = a.manifest, b.manifest
        sha_differs = ma.tokenizer_sha256 and mb.tokenizer_sha256 and ma.tokenizer_sha256 != mb.tokenizer_sha256
        vocab_differs = ma.vocab_size is not None and mb.vocab_size is not None and ma.vocab_size != mb.vocab_size
        if sha_differs or vocab_differs:
            raise ValueError(
                f"{FLAG}: sources {name_a} and {name_b} were tokenized differently ({a.manifest_name}: vocab_size "
                f"{ma.vocab_size}, tokenizer sha256 {(ma.tokenizer_sha256 or '?')[:12]}; {b.manifest_name}: "
                f"vocab_size {mb.vocab_size}, tokenizer sha256 {(mb.tokenizer_sha256 or '?')[:12]}); prepare every "
                f"source with the same --tokenizer")


def grow_data(config, spec: MixtureSpec | None, frozen: FrozenData, at: int, step: int,
              global_batch_samples: int) -> FrozenData:
    """On resume with --data-growth: the sources and shards found now that the frozen data lacks, joined at global
    sample `at` (sources.grown); `frozen` itself when there is nothing new."""
    current: dict[str, tuple[str, list, list]] = {}
    listings: dict[str, Listed] = {}
    if spec is None:
        if frozen.mixture:
            return frozen
        place = source_place(config, None, frozen.sources[0], False)
        listings[frozen.sources[0].name] = list_source(config, place, strict_eval=False)
        urls = {frozen.sources[0].name: place.bucket or str(place.root)}
    else:
        for source in spec.sources:
            place = source_place(config, spec, FrozenSource(source.name, source.url, ()), True)
            listings[source.name] = _list_mixture_source(config, place, source.url)
        urls = {source.name: source.url for source in spec.sources}
        check_same_tokenizer(listings)
    for name, listed in listings.items():
        if name in frozen.names:
            # Shards held out by the rule rather than by dataset.json are new training shards here: the frozen
            # eval shards stay what they were.
            candidates = listed.train + ([] if listed.split_from_manifest else listed.eval)
            current[name] = (urls[name], candidates, [])
        else:
            current[name] = (urls[name], listed.train, listed.eval)
    segments = spec.segments(config.seq_len, global_batch_samples) if spec is not None else None
    order = OrderSpec(mix_shards=config.block_chunks, shard_chunks=config.shard_chunks)
    return grown(frozen, at, step, config.seq_len, config.seed, order, current, segments)


def _check_resumed_mixture(config, spec: MixtureSpec | None, frozen: FrozenData, global_batch: int) -> None:
    """A resumed run keeps its frozen data; a mixture that names sources the run lacks needs --data-growth."""
    if not frozen.mixture:
        if spec is not None:
            raise ValueError(f"{FLAG}: this run was started on --data-dir alone, and a mixture cannot take its place "
                             f"on resume; start a new run for the mixture")
        if frozen.is_plain and (frozen.order.mix_shards, frozen.order.shard_chunks) != (config.block_chunks,
                                                                                          config.shard_chunks):
            log.warning("this run keeps the sample order frozen in its checkpoint (blocks of %d chunks, %d per "
                        "shard); --block-chunks and --shard-chunks apply to new runs", frozen.order.mix_shards,
                        frozen.order.shard_chunks)
        return
    if spec is None:
        raise ValueError(f"{FLAG} is empty, but this run was started on a mixture of {', '.join(frozen.names)}; pass "
                         f"the mixture it was started with")
    new = [name for name in spec.names if name not in frozen.names]
    if new and not _setting(config, "data_growth", False):
        raise ValueError(f"{FLAG}: source(s) {', '.join(new)} are not in this run's frozen mixture "
                         f"({', '.join(frozen.names)}); pass --data-growth true to add them from the resumed step on")
    if not new and not frozen.growth:
        given = [(start, tuple(weights.get(name, 0) for name in frozen.names))
                 for start, weights in spec.segments(config.seq_len, global_batch)]
        if given != list(frozen.segments):
            log.warning("this run keeps the mixture weights and stages frozen in its checkpoint; other weights or "
                        "stages in %s apply to new runs (or from a growth on, with --data-growth)", FLAG)


def read_manifest_from_bucket(storage: Storage, data_dir: Path) -> DatasetManifest | None:
    """dataset.json from the bucket, kept beside the local shards too."""
    if not storage.exists(DATASET_JSON):
        return None
    storage.download(DATASET_JSON, data_dir / DATASET_JSON)
    return read_dataset_json(data_dir / DATASET_JSON, storage.object_url(DATASET_JSON))
