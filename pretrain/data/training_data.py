"""The data room's facade: from a config (and, on resume, the frozen shard list) to the training and eval readers,
with the shards the first steps need local and validated and the rest fetched in the background.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path

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
from pretrain.data.order import LEGACY_ORDER, OrderSpec
from pretrain.data.samples import TokenSamples
from pretrain.distributed import on_local_main, on_main
from pretrain.files import file_digest
from pretrain.storage import ObjectInfo, Storage, open_storage, storage_options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrozenShards:
    """The shards and order of a run, fixed at step 0 and stored in every checkpoint."""

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


@dataclass
class TrainingData:
    """What the loop reads: samples by global index. Shards not yet local are fetched by a background thread on
    each node's first process; a reader that gets ahead of it waits (bounded) for the shard it needs."""

    frozen: FrozenShards
    train: TokenSamples
    eval: TokenSamples | None
    samples_per_epoch: int
    source: str
    ready_at_start: int
    fetched_in_background: int
    tokenizer_dir: Path | None = None  # holds the tokenizer.json that dataset.json names, for the final export
    _fetcher: ShardFetcher | None = None

    def describe(self) -> str:
        order = self.frozen.order
        background = (f", {self.fetched_in_background} more checked or fetched in the background from {self.source}"
                      if self.fetched_in_background else "")
        return (f"data: {len(self.frozen.train)} training shards ({self.samples_per_epoch:,} samples of "
                f"{self.train.seq_len} tokens per epoch), {len(self.frozen.eval)} held out for evaluation; "
                f"order v{order.version}: blocks of {order.mix_shards} chunks, {order.shard_chunks} per shard; "
                f"{self.ready_at_start} shards ready before step 1{background}")

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close()
            self._fetcher = None


def prepare_training_data(config, accelerator, frozen: FrozenShards | None, start_sample: int = 0) -> TrainingData:
    """Freeze the shard list (fresh run: from dataset.json or shard headers, never the tokens), make the shards
    of the first steps and the eval shards ready, and start fetching the rest in the order training needs them.

    start_sample is the global sample training resumes at (0 on a fresh run): it decides which shards come first.
    Errors (bad or missing shard, bucket trouble) are one line and raised on every rank.
    """
    data_dir = Path(config.data_dir)
    if frozen is None:
        frozen = on_main(accelerator, lambda: freeze_shards(config))
    elif (frozen.order.mix_shards, frozen.order.shard_chunks) != (config.block_chunks, config.shard_chunks):
        log.warning("this run keeps the sample order frozen in its checkpoint (blocks of %d chunks, %d per shard); "
                    "--block-chunks and --shard-chunks apply to new runs", frozen.order.mix_shards,
                    frozen.order.shard_chunks)
    run_token = on_main(accelerator, lambda: uuid.uuid4().hex)
    gate = ReadyGate(data_dir, run_token, config.model.vocab_size)
    order = dict(mix_shards=frozen.order.mix_shards, shard_chunks=frozen.order.shard_chunks)
    train = TokenSamples(data_dir, list(frozen.train), config.seq_len, config.seed, gate=gate, **order)
    # The eval order has blocks of its own: its reads must not move the training fetcher's window.
    eval_gate = ReadyGate(data_dir, run_token, config.model.vocab_size, reports_progress=False)
    evaluation = (TokenSamples(data_dir, list(frozen.eval), config.seq_len, config.seed, gate=eval_gate, **order)
                  if frozen.eval else None)
    # The shards the first optimizer step reads are made ready before it; the rest follow in the order reads first
    # touch them (exact within the start block), so a wide block does not make step 1 wait for all of its shards.
    step_samples = config.per_device_train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    first_positions = train.order.shards_read_by(start_sample, step_samples)
    first = [frozen.train[p] for p in first_positions] + list(frozen.eval)
    at_start = set(first_positions)
    rest = [(frozen.train[p], block) for p, block in train.order.need_schedule(start_sample) if p not in at_start]
    start_mark = train.order.progress_mark(start_sample)
    fetcher = on_local_main(accelerator, lambda: start_fetching(config, gate, frozen, first, rest, start_mark))
    try:
        tokenizer_dir = on_main(accelerator, lambda: find_tokenizer(config))
    except BaseException:
        if fetcher is not None:
            fetcher.close()
        raise
    return TrainingData(frozen=frozen, train=train, eval=evaluation, samples_per_epoch=train.samples_per_epoch,
                        source=config.data_bucket or str(data_dir), ready_at_start=len(first),
                        fetched_in_background=len(rest), tokenizer_dir=tokenizer_dir, _fetcher=fetcher)


def find_tokenizer(config) -> Path | None:
    """The folder holding the tokenizer file dataset.json names (fetched from the bucket when missing and checked
    against its sha256), or None when the data has no manifest or it names no tokenizer."""
    data_dir = Path(config.data_dir)
    manifest_path = data_dir / DATASET_JSON
    storage = open_storage(config.data_bucket, storage_options(config)) if config.data_bucket else None
    if not manifest_path.is_file() and storage is not None:
        read_manifest_from_bucket(storage, data_dir)
    manifest = read_dataset_json(manifest_path)
    if manifest is None or manifest.tokenizer_file is None:
        return None
    path = data_dir / manifest.tokenizer_file
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


def start_fetching(config, gate: ReadyGate, frozen: FrozenShards, first: list[ShardInfo],
                   rest: list[tuple[ShardInfo, int]], start_mark: int) -> ShardFetcher:
    """On each node's first process: check every shard can be had (local or in the bucket; stat and listing only),
    make `first` ready now, then start the background fetcher on `rest` (each with the block that first needs it)
    as the readers approach."""
    storage, remote = None, {}
    if config.data_bucket:
        storage = open_storage(config.data_bucket, storage_options(config))
        remote = {info.key: info for info in list_shards(storage)}
    check_obtainable(gate.data_dir, frozen.all, storage, remote)
    fetcher = ShardFetcher(gate, config.seq_len, storage, remote)
    fetcher.ensure(first)
    fetcher.start(rest, start_mark)
    return fetcher


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


def freeze_shards(config) -> FrozenShards:
    """A fresh run's shard list: the bucket's shards (or the local folder's), token counts from dataset.json where
    it lists a shard, else from each shard's header; the last eval_shards held out."""
    data_dir = Path(config.data_dir)
    max_files = config.max_files or None
    objects: list[ObjectInfo] = []
    if config.data_bucket:
        storage = open_storage(config.data_bucket, storage_options(config))
        objects = list_shards(storage)[:max_files]
    if objects:
        manifest = read_manifest_from_bucket(storage, data_dir)
        known = manifest.counts_for({o.key: o.size for o in objects}) if manifest else {}
        unknown = [o for o in objects if o.key not in known]
        inspected = {s.path: s for s in inspect_remote_shards(storage, unknown, config.seq_len)}
        shards = [known.get(o.key) or inspected[o.key] for o in objects]
        manifest_name = storage.object_url(DATASET_JSON)
    else:
        rel_paths = discover_shards(data_dir, max_files)
        manifest = read_dataset_json(data_dir / DATASET_JSON)
        sizes = {p: (data_dir / p).stat().st_size for p in rel_paths}
        known = manifest.counts_for(sizes) if manifest else {}
        inspected = {s.path: s for s in inspect_local_headers(data_dir, [p for p in rel_paths if p not in known],
                                                               config.seq_len)}
        shards = [known.get(p) or inspected[p] for p in rel_paths]
        manifest_name = str(data_dir / DATASET_JSON)
    if manifest is not None:
        manifest.check_vocab(manifest_name, config.model.vocab_size)
    for shard in shards:
        if shard.num_samples(config.seq_len) == 0:
            raise ShardError(
                f"{data_dir / shard.path}: {manifest_name} lists {shard.num_tokens} tokens, fewer than seq_len "
                f"{config.seq_len}, so it yields no sample; remove the shard, merge it into another, or lower seq_len"
            )
    train, evaluation = split_eval_shards(shards, config.eval_shards)
    # The order a fresh run freezes; a resumed run keeps the one in its checkpoint.
    order = OrderSpec(mix_shards=config.block_chunks, shard_chunks=config.shard_chunks)
    return FrozenShards(train=tuple(train), eval=tuple(evaluation), order=order)


def read_manifest_from_bucket(storage: Storage, data_dir: Path) -> DatasetManifest | None:
    """dataset.json from the bucket, kept beside the local shards too."""
    if not storage.exists(DATASET_JSON):
        return None
    storage.download(DATASET_JSON, data_dir / DATASET_JSON)
    return read_dataset_json(data_dir / DATASET_JSON, storage.object_url(DATASET_JSON))
