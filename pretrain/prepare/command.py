"""Raw text to shuffled, packed token shards: `python -m pretrain.prepare_data INPUT... --out DIR_OR_URL ...`.

Reads txt, jsonl(.gz/.zst) and parquet, local or in a bucket; tokenizes on every core; survives SIGKILL (a re-run
continues and writes byte-identical shards); writes dataset.json beside the shards.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import gzip
import io
import itertools
import json
import math
import multiprocessing
import os
import queue
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pretrain.data.format import (
    DATASET_JSON,
    DatasetManifest,
    ShardInfo,
    read_array_header,
    write_shard,
)
from pretrain.errors import one_line
from pretrain.files import (
    PARTIAL_SUFFIX,
    atomic_path,
    bytes_digest,
    file_digest,
    write_atomically,
    write_json_atomically,
)
from pretrain.prepare.tokenizer import (
    LoadedTokenizer,
    TokenizerError,
    load_tokenizer,
    train_byte_level_bpe,
)
from pretrain.storage import Storage, StorageError, StorageOptions, open_storage, redact
from pretrain.storage.local import local_root

FORMAT_VERSION = 1
WORK_NAME = ".prepare-work"
TOKENIZER_JSON = "tokenizer.json"
DEFAULT_SHARD_TOKENS = 1 << 26
DEFAULT_BUCKET_TOKENS = 1 << 25
# A worker process per this many cores, each running the tokenizers library's threads on its share: the library's
# batch encoding scales over threads by itself, and a process costs its start-up and imports (on 2 cores one process
# was 0.90x of bare encode_batch against 0.88x for two single-threaded ones; bench/bench_prepare.py), while the
# per-token Python work (ids to arrays, sorting, writing parts) needs more than one process on a large machine.
CORES_PER_WORKER = 4
DEFAULT_SAMPLE_BYTES = 1 << 28
# Input bytes per work unit: small enough to spread a few large files over every core and to lose little work
# to a kill, large enough that per-unit files stay few.
UNIT_BYTES = 32 << 20
# A unit's tokens are written out in parts of about this many tokens, so a worker's memory is bounded even for
# a single multi-gigabyte .jsonl.gz.
PART_TOKENS = 1 << 22
ENCODE_BATCH_CHARS = 1 << 20
READ_CHUNK_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 1024
UINT16_VOCAB_LIMIT = 1 << 16
KINDS = {".jsonl.gz": "jsonl.gz", ".jsonl.zst": "jsonl.zst", ".jsonl": "jsonl", ".parquet": "parquet", ".txt": "txt"}
GLOB_CHARS = "*?["


class InputError(ValueError):
    """Bad user input; the message is one line naming the file or flag, what was seen and what to do."""


def kind_of(name: str) -> str | None:
    lowered = name.lower()
    return next((kind for suffix, kind in KINDS.items() if lowered.endswith(suffix)), None)


@dataclass(frozen=True)
class Source:
    index: int
    url: str  # as the user named it (a path or a bucket URL); recorded in dataset.json
    path: str  # local file read by the workers (a downloaded copy for bucket inputs)
    kind: str
    size: int


@dataclass(frozen=True)
class Unit:
    """One piece of tokenization work: several whole .txt files, a byte range of a .jsonl, or a parquet row group."""

    index: int
    sources: tuple[int, ...]
    start: int = 0
    end: int | None = None
    row_group: int | None = None
    first_row: int = 0
    size: int = 0


@dataclass(frozen=True)
class Settings:
    """What the workers need; everything here but `workers` is fixed for the life of a work folder."""

    work: str
    sources: tuple[Source, ...]
    seed: int
    text_field: str
    separator: str | None
    dtype: str


# Document order. Every document gets a 64-bit key from (seed, source index, position in its source: byte offset
# of its line or separator-delimited piece, or its parquet row), and the output is all documents sorted by key.
# The keys are a hash, so this is a seeded uniform shuffle of the whole corpus that depends neither on how the
# work was split nor on how many workers ran.

_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _MIX_1
        x = (x ^ (x >> np.uint64(27))) * _MIX_2
        return x ^ (x >> np.uint64(31))


def document_keys(seed: int, source_indices: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The sort key of each document: a hash of (seed, its source's index, its position in the source)."""
    base = _splitmix64(np.array([seed % (1 << 64)], dtype=np.uint64))
    per_source = _splitmix64(base ^ np.asarray(source_indices, dtype=np.uint64))
    return _splitmix64(per_source ^ np.asarray(positions, dtype=np.uint64))


# Reading documents. Each reader yields (source index, position, text, source bytes consumed since the last
# yield); bad bytes in text become U+FFFD rather than stopping a long run.

def _json_text(source: Source, line: bytes, where: str, text_field: str) -> str | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line.decode("utf-8", errors="replace"))
    except ValueError as error:
        raise InputError(f"{source.url} ({where}): not valid JSON ({error}); expected one JSON object per line") from None
    if not isinstance(record, dict) or text_field not in record:
        fields = ", ".join(sorted(record)[:8]) if isinstance(record, dict) else type(record).__name__
        raise InputError(
            f"{source.url} ({where}): no {text_field!r} field (it has: {fields}); pass --text-field NAME"
        )
    text = record[text_field]
    if text is None:
        return None
    if not isinstance(text, str):
        raise InputError(
            f"{source.url} ({where}): field {text_field!r} holds {type(text).__name__}, not text; "
            f"pass --text-field naming a string field"
        )
    return text


def _open_decompressed(source: Source, raw: io.BufferedReader) -> io.BufferedReader:
    if source.kind == "jsonl.gz":
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), READ_CHUNK_BYTES)
    import zstandard

    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return io.BufferedReader(reader, READ_CHUNK_BYTES)


def _read_jsonl(source: Source, unit: Unit, text_field: str) -> Iterator[tuple[int, int, str | None, int]]:
    with open(source.path, "rb") as raw:
        if source.kind == "jsonl":
            # A unit owns the lines that start in [start, end): skip the line the previous unit owns.
            if unit.start > 0:
                raw.seek(unit.start - 1)
                if raw.read(1) != b"\n":
                    raw.readline()
            position = raw.tell()
            end = unit.end if unit.end is not None else math.inf
            while position < end:
                line = raw.readline()
                if not line:
                    break
                yield source.index, position, _json_text(source, line, f"byte {position}", text_field), len(line)
                position += len(line)
            return
        stream = _open_decompressed(source, raw)
        position, consumed = 0, 0
        for number, line in enumerate(stream, start=1):
            text = _json_text(source, line, f"line {number}", text_field)
            now = raw.tell()
            yield source.index, position, text, now - consumed
            consumed = now
            position += len(line)


def _read_parquet(source: Source, unit: Unit, text_field: str) -> Iterator[tuple[int, int, str | None, int]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(source.path)
    group = parquet.metadata.row_group(unit.row_group)
    bytes_per_row = group.total_byte_size / max(1, group.num_rows)
    row = unit.first_row
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[unit.row_group], columns=[text_field]):
        for text in batch.column(0).to_pylist():
            yield source.index, row, text, int(bytes_per_row)
            row += 1


def _read_txt(source: Source, separator: str | None) -> Iterator[tuple[int, int, str | None, int]]:
    with open(source.path, "rb") as handle:
        if separator is None:
            data = handle.read()
            yield source.index, 0, data.decode("utf-8", errors="replace"), len(data)
            return
        marker = separator.encode("utf-8")
        buffer, buffer_start = b"", 0
        while True:
            chunk = handle.read(READ_CHUNK_BYTES)
            buffer += chunk
            pieces = buffer.split(marker)
            complete = pieces if not chunk else pieces[:-1]
            for piece in complete:
                yield source.index, buffer_start, piece.decode("utf-8", errors="replace"), len(piece) + len(marker)
                buffer_start += len(piece) + len(marker)
            if not chunk:
                return
            buffer = pieces[-1]


def read_unit(settings: Settings, unit: Unit) -> Iterator[tuple[int, int, str | None, int]]:
    for source_index in unit.sources:
        source = settings.sources[source_index]
        try:
            if source.kind == "txt":
                yield from _read_txt(source, settings.separator)
            elif source.kind == "parquet":
                yield from _read_parquet(source, unit, settings.text_field)
            else:
                yield from _read_jsonl(source, unit, settings.text_field)
        except (OSError, EOFError, zlib.error) as error:
            raise InputError(f"{source.url}: cannot read ({one_line(error, 300)}); check the file is complete and readable") from None
        except InputError:
            raise
        except Exception as error:  # pyarrow and zstandard raise their own types for corrupt files
            raise InputError(f"{source.url}: cannot read ({one_line(error, 300)}); check the file is complete and readable") from None


# Files. Every file in the work folder and every output appears whole or not at all: written under a temporary
# name, then renamed. No fsync: this guards against a killed process, which is what preemption does; a power cut
# may need the work folder deleted.

def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        np.lib.format.write_array(handle, np.ascontiguousarray(array), allow_pickle=False)


# Tokenizing a unit, in a worker. The unit's documents are encoded in batches and collected into parts; each part
# is stored sorted by document key (tokens, document offsets, keys as .npy files), and a unit manifest written
# last marks the unit done.

_worker_tokenizer = None
_worker_progress: Callable[[int, int, int], None] | None = None


def _init_worker(tokenizer_path: str, progress_queue: multiprocessing.Queue | None, threads: int) -> None:
    global _worker_tokenizer, _worker_progress
    # The workers share the cores: each gets its part of them for the library's thread pool (read at its first use).
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_file(tokenizer_path)
    if progress_queue is not None:
        _worker_progress = lambda *counts: progress_queue.put(counts)  # noqa: E731


def _run_unit(settings: Settings, unit: Unit) -> dict:
    return tokenize_unit(settings, unit, _worker_tokenizer, _worker_progress)


def _unit_path(work: Path, index: int) -> Path:
    return work / "units" / f"unit_{index:06d}.json"


def _part_stem(work: Path, unit: int, part: int) -> Path:
    return work / "parts" / f"unit_{unit:06d}_part_{part:04d}"


def tokenize_unit(settings: Settings, unit: Unit, tokenizer, progress: Callable[[int, int, int], None] | None) -> dict:
    work, dtype = Path(settings.work), np.dtype(settings.dtype)
    parts: list[dict] = []
    per_source: dict[int, list[int]] = {}
    texts: list[str] = []
    meta: list[tuple[int, int]] = []
    chars = 0
    held: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (tokens, lengths, keys) per encoded batch
    held_tokens = 0
    pending_bytes = 0

    def encode() -> None:
        nonlocal texts, meta, chars, held_tokens, pending_bytes
        if not texts:
            return
        id_lists = [encoding.ids for encoding in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        lengths = np.fromiter((len(ids) for ids in id_lists), dtype=np.int64, count=len(id_lists))
        tokens = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=dtype, count=int(lengths.sum()))
        keep = lengths > 0
        sources = np.fromiter((m[0] for m in meta), dtype=np.int64, count=len(meta))
        positions = np.fromiter((m[1] for m in meta), dtype=np.uint64, count=len(meta))
        keys = document_keys(settings.seed, sources[keep], positions[keep])
        for source_index, length in zip(sources[keep].tolist(), lengths[keep].tolist()):
            counts = per_source.setdefault(source_index, [0, 0])
            counts[0] += 1
            counts[1] += length
        held.append((tokens, lengths[keep], keys))
        held_tokens += len(tokens)
        if progress is not None:
            progress(pending_bytes, int(keep.sum()), len(tokens))
        texts, meta, chars, pending_bytes = [], [], 0, 0

    def flush_part() -> None:
        nonlocal held, held_tokens
        if not held:
            return
        tokens = np.concatenate([t for t, _, _ in held])
        lengths = np.concatenate([n for _, n, _ in held])
        keys = np.concatenate([k for _, _, k in held])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        order = np.argsort(keys, kind="stable")
        sorted_tokens = np.concatenate([tokens[offsets[i]:offsets[i + 1]] for i in order.tolist()]) if len(order) else tokens
        sorted_offsets = np.zeros_like(offsets)
        np.cumsum(lengths[order], out=sorted_offsets[1:])
        stem = _part_stem(work, unit.index, len(parts))
        _save_npy(stem.with_suffix(".tokens.npy"), sorted_tokens)
        _save_npy(stem.with_suffix(".offsets.npy"), sorted_offsets)
        _save_npy(stem.with_suffix(".keys.npy"), keys[order])
        parts.append({"documents": len(lengths), "tokens": len(tokens)})
        held, held_tokens = [], 0

    for source_index, position, text, consumed in read_unit(settings, unit):
        pending_bytes += consumed
        if text:
            texts.append(text)
            meta.append((source_index, position))
            chars += len(text)
        if chars >= ENCODE_BATCH_CHARS:
            encode()
            if held_tokens >= PART_TOKENS:
                flush_part()
    encode()
    flush_part()
    if progress is not None and pending_bytes:
        progress(pending_bytes, 0, 0)
    manifest = {
        "unit": unit.index,
        "parts": parts,
        "sources": {str(k): v for k, v in sorted(per_source.items())},
    }
    write_json_atomically(_unit_path(work, unit.index), manifest)
    return manifest


# Resolving inputs: local paths, globs and folders; bucket URLs (with globs) listed through pretrain.storage and
# downloaded into the work folder.

def _is_remote(item: str) -> bool:
    scheme, separator, _ = item.partition("://")
    return bool(separator) and scheme.lower() != "file"


def _local_candidates(item: str) -> list[str]:
    path_text = str(local_root(item)) if item.startswith("file://") else item
    if any(c in path_text for c in GLOB_CHARS):
        matches = sorted(glob.glob(path_text, recursive=True))
        files = [m for m in matches if os.path.isfile(m) and kind_of(m)]
        if not files:
            raise InputError(f"{item}: matches no .txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet file; check the pattern")
        return files
    path = Path(path_text)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and kind_of(p.name))
        if not files:
            raise InputError(f"{item}: folder holds no .txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet file")
        return files
    if not path.exists():
        raise InputError(f"{item}: no such file or folder; pass existing input files, folders or globs")
    if not kind_of(path.name):
        raise InputError(f"{item}: unsupported file type; expected .txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet")
    return [path_text]


def _remote_candidates(item: str, options: StorageOptions) -> list[tuple[str, Storage, str, int]]:
    """(url, storage, key, size) of every input object an input URL names."""
    cut = min((item.find(c) for c in GLOB_CHARS if c in item), default=-1)
    if cut >= 0:
        base = item[: item.rfind("/", 0, cut)]
        pattern = item[len(base) + 1:]
        storage = open_storage(base, options)
        found = [(f"{base}/{o.key}", storage, o.key, o.size) for o in storage.list()
                 if fnmatch.fnmatchcase(o.key, pattern) and kind_of(o.key)]
    else:
        parent, _, name = item.rstrip("/").rpartition("/")
        storage = open_storage(parent, options)
        found = [(item, storage, o.key, o.size) for o in storage.list(name) if o.key == name]
        if found and not kind_of(name):
            raise InputError(f"{item}: unsupported file type; expected .txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet")
        if not found:
            folder = open_storage(item.rstrip("/"), options)
            found = [(f"{item.rstrip('/')}/{o.key}", folder, o.key, o.size) for o in folder.list() if kind_of(o.key)]
    if not found:
        raise InputError(f"{item}: names no .txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet object; check the URL")
    return found


@dataclass(frozen=True)
class PlannedInput:
    url: str
    size: int
    storage: Storage | None
    key: str | None


def plan_inputs(items: list[str], options: StorageOptions) -> list[PlannedInput]:
    planned: dict[str, PlannedInput] = {}
    for item in items:
        if _is_remote(item):
            for url, storage, key, size in _remote_candidates(item, options):
                planned[url] = PlannedInput(url, size, storage, key)
        else:
            for path in _local_candidates(item):
                try:
                    size = os.stat(path).st_size
                except OSError as error:
                    raise InputError(f"{path}: cannot read ({error.strerror}); check the path and permissions") from None
                planned[path] = PlannedInput(path, size, None, None)
    return [planned[url] for url in sorted(planned)]


def materialize_inputs(planned: list[PlannedInput], work: Path) -> list[Source]:
    """Sources with local paths; bucket objects are downloaded into the work folder once (skipped if there)."""
    sources = []
    for index, item in enumerate(planned):
        path = item.url
        if item.storage is not None:
            local = work / "inputs" / f"{index:05d}_{item.key.rsplit('/', 1)[-1]}"
            if not (local.is_file() and local.stat().st_size == item.size):
                item.storage.download(item.key, local)
            path = str(local)
        sources.append(Source(index, item.url, path, kind_of(item.url), item.size))
    return sources


def first_document(source: Source, settings: Settings) -> bool:
    """Reads a source up to its first document: catches unreadable files and a missing text field in seconds."""
    if not os.access(source.path, os.R_OK):
        raise InputError(f"{source.url}: cannot read (permission denied); fix its permissions or leave it out")
    for unit in plan_units([source], settings.separator, settings.text_field):
        for _, _, text, _ in read_unit(settings, unit):
            if text:
                return True
    return False


def _parquet_groups(source: Source, text_field: str) -> list[tuple[int, int]]:
    """(first row, size in bytes) of every row group; checks the text column exists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source.path)
    except Exception as error:  # pyarrow raises ArrowInvalid and friends
        raise InputError(f"{source.url}: not a readable parquet file ({one_line(error, 300)}); check the file") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise InputError(
            f"{source.url}: no {text_field!r} column (it has: {', '.join(schema.names[:8])}); pass --text-field NAME"
        )
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise InputError(f"{source.url}: column {text_field!r} has type {column_type}, not string; pass --text-field NAME")
    groups, row = [], 0
    for index in range(parquet.metadata.num_row_groups):
        group = parquet.metadata.row_group(index)
        groups.append((row, group.total_byte_size))
        row += group.num_rows
    return groups


def plan_units(sources: list[Source], separator: str | None, text_field: str = "text") -> list[Unit]:
    """The fixed split of the corpus into units; depends only on the sources and arguments, never on timing."""
    units: list[Unit] = []
    txt_group: list[Source] = []

    def close_txt_group() -> None:
        if txt_group:
            units.append(Unit(len(units), tuple(s.index for s in txt_group), size=sum(s.size for s in txt_group)))
            txt_group.clear()

    for source in sources:
        if source.kind == "txt" and separator is None:
            if txt_group and sum(s.size for s in txt_group) + source.size > UNIT_BYTES:
                close_txt_group()
            txt_group.append(source)
            continue
        close_txt_group()
        if source.kind == "jsonl":
            for start in range(0, max(source.size, 1), UNIT_BYTES):
                end = start + UNIT_BYTES if start + UNIT_BYTES < source.size else None
                units.append(Unit(len(units), (source.index,), start=start, end=end, size=min(UNIT_BYTES, source.size - start)))
        elif source.kind == "parquet":
            for group, (first_row, size) in enumerate(_parquet_groups(source, text_field)):
                units.append(Unit(len(units), (source.index,), row_group=group, first_row=first_row, size=size))
        else:
            units.append(Unit(len(units), (source.index,), size=source.size))
    close_txt_group()
    return units


# Assembling shards. The key space is cut into K equal ranges (buckets), K = stream tokens / --bucket-tokens;
# bucket b gathers its documents from every part (each part is sorted by key, so that is one contiguous slice per
# part), sorts them by key, joins them with EOS and appends them to the stream that is cut into shards. Memory:
# one bucket plus one shard. After each bucket the leftover tail and the next shard number are saved, so a
# killed run continues from the last whole bucket.

def _load_parts(work: Path, units: list[Unit]) -> list[Path]:
    stems = []
    for unit in units:
        manifest = json.loads(_unit_path(work, unit.index).read_text())
        stems.extend(_part_stem(work, unit.index, part) for part in range(len(manifest["parts"])))
    return stems


def _bucket_bounds(num_buckets: int, bucket: int) -> tuple[int, int | None]:
    low = (bucket << 64) // num_buckets
    high = ((bucket + 1) << 64) // num_buckets
    return low, (high if high < (1 << 64) else None)


def gather_bucket(stems: list[Path], num_buckets: int, bucket: int, eos: int, dtype: np.dtype) -> np.ndarray:
    low, high = _bucket_bounds(num_buckets, bucket)
    keys_parts, pieces = [], []
    for stem in stems:
        keys = np.load(stem.with_suffix(".keys.npy"), mmap_mode="r")
        first = int(np.searchsorted(keys, np.uint64(low), side="left"))
        last = len(keys) if high is None else int(np.searchsorted(keys, np.uint64(high), side="left"))
        if last <= first:
            continue
        offsets = np.load(stem.with_suffix(".offsets.npy"), mmap_mode="r")[first:last + 1]
        tokens = np.load(stem.with_suffix(".tokens.npy"), mmap_mode="r")
        chunk = np.array(tokens[offsets[0]:offsets[-1]])
        local = np.asarray(offsets, dtype=np.int64) - int(offsets[0])
        keys_parts.append(np.array(keys[first:last]))
        pieces.extend(chunk[local[i]:local[i + 1]] for i in range(last - first))
    if not pieces:
        return np.empty(0, dtype=dtype)
    order = np.argsort(np.concatenate(keys_parts), kind="stable")
    separator = np.array([eos], dtype=dtype)
    return np.concatenate(list(itertools.chain.from_iterable((pieces[i], separator) for i in order.tolist())))


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.npz"


def assemble(work: Path, stage: Path, stems: list[Path], stream_tokens: int, shard_tokens: int,
             bucket_tokens: int, eos: int, dtype: np.dtype) -> int:
    """Writes every shard into stage; returns how many. Continues from the saved state after a kill."""
    state_path = work / "assemble.json"
    num_buckets = max(1, math.ceil(stream_tokens / bucket_tokens))
    state = json.loads(state_path.read_text()) if state_path.exists() else {"next_bucket": 0, "next_shard": 0, "carry": None}
    carry = np.load(work / state["carry"]) if state["carry"] else np.empty(0, dtype=dtype)
    next_shard = state["next_shard"]
    with tqdm(total=stream_tokens, initial=min(stream_tokens, next_shard * shard_tokens + len(carry)), unit="tok",
              unit_scale=True, desc="shuffle+pack", file=sys.stderr, disable=None, mininterval=1.0) as bar:
        for bucket in range(state["next_bucket"], num_buckets):
            gathered = gather_bucket(stems, num_buckets, bucket, eos, dtype)
            stream = np.concatenate([carry, gathered]) if len(carry) else gathered
            start = 0
            while len(stream) - start >= shard_tokens:
                write_shard(stage / shard_name(next_shard), stream[start:start + shard_tokens])
                next_shard += 1
                start += shard_tokens
            carry = np.array(stream[start:])
            carry_name = f"carry_{bucket:06d}.npy" if len(carry) else None
            if carry_name:
                _save_npy(work / carry_name, carry)
            write_json_atomically(state_path, {"next_bucket": bucket + 1, "next_shard": next_shard, "carry": carry_name})
            if state["carry"] and state["carry"] != carry_name:
                (work / state["carry"]).unlink(missing_ok=True)
            state = {"carry": carry_name}
            bar.update(len(gathered))
    if len(carry):
        write_shard(stage / shard_name(next_shard), carry)
        next_shard += 1
    return next_shard


# The command.

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.prepare_data",
        description="Tokenize text files into shuffled .npz token shards with a dataset.json (see README).",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="files, folders or globs, local or gs:// s3:// az:// file:// (.txt, .jsonl[.gz|.zst], .parquet)")
    parser.add_argument("--out", required=True, help="output folder or bucket URL")
    tokenizer = parser.add_mutually_exclusive_group(required=True)
    tokenizer.add_argument("--tokenizer", type=Path, help="a Hugging Face tokenizer.json or a folder holding one")
    tokenizer.add_argument("--train-tokenizer", action="store_true", help="train a byte-level BPE on the input")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size for --train-tokenizer")
    parser.add_argument("--max-vocab-size", type=int, help="refuse a tokenizer with more ids (the model's vocab_size)")
    parser.add_argument("--eos-token", help="end-of-text token of --tokenizer (default: found in its config)")
    parser.add_argument("--tokenizer-sample-bytes", type=int, default=DEFAULT_SAMPLE_BYTES,
                        help="text read to train the tokenizer, spread over the whole input")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document shuffle")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="tokenizer processes, each using the library's threads on its share of the cores "
                             f"(default: one per {CORES_PER_WORKER} cores; 1: this process alone)")
    parser.add_argument("--text-field", default="text", help="JSON field or parquet column holding the text")
    parser.add_argument("--separator", help="split .txt files into documents at this string (default: one per file)")
    parser.add_argument("--seq-len-hint", type=int, help="training seq_len; recorded and used for packing_efficiency")
    parser.add_argument("--bucket-tokens", type=int, default=DEFAULT_BUCKET_TOKENS,
                        help="shuffle buffer: peak memory of the shuffle is about 3x this many tokens")
    parser.add_argument("--work-dir", type=Path, help="resumable work folder (default: OUT/.prepare-work, or a "
                        "folder under the temp dir for a bucket URL)")
    parser.add_argument("--s3-endpoint-url", help="for S3-compatible stores")
    parser.add_argument("--gcs-credentials", help="service account key file for gs://")
    parser.add_argument("--gcp-project")
    return parser


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) // CORES_PER_WORKER)


def check_arguments(args: argparse.Namespace) -> None:
    positive = {"--shard-tokens": args.shard_tokens, "--workers": args.workers, "--bucket-tokens": args.bucket_tokens,
                "--tokenizer-sample-bytes": args.tokenizer_sample_bytes}
    if args.seq_len_hint is not None:
        positive["--seq-len-hint"] = args.seq_len_hint
    for flag, value in positive.items():
        if value < 1:
            raise InputError(f"{flag} {value}: expected a positive number")
    if args.train_tokenizer and args.vocab_size is None:
        raise InputError("--train-tokenizer needs --vocab-size N (for example --vocab-size 32000)")
    if args.tokenizer is not None and args.vocab_size is not None:
        raise InputError("--vocab-size applies to --train-tokenizer only; the vocabulary of --tokenizer is fixed")
    if args.separator == "":
        raise InputError("--separator '': expected a non-empty string such as '\\n\\n' or '<|endoftext|>'")
    if args.max_vocab_size is not None and args.vocab_size is not None and args.vocab_size > args.max_vocab_size:
        raise InputError(f"--vocab-size {args.vocab_size} is larger than --max-vocab-size {args.max_vocab_size}; "
                         f"lower --vocab-size or raise --max-vocab-size")


def _recorded_arguments(args: argparse.Namespace, planned: list[PlannedInput], tokenizer_sha: str | None) -> dict:
    """Everything the output depends on; a work folder refuses a re-run whose record differs."""
    return {
        "inputs": [[p.url, p.size] for p in planned],
        "tokenizer": {"sha256": tokenizer_sha, "eos_token": args.eos_token} if tokenizer_sha
        else {"train_vocab_size": args.vocab_size, "sample_bytes": args.tokenizer_sample_bytes},
        "max_vocab_size": args.max_vocab_size,
        "shard_tokens": args.shard_tokens,
        "seed": args.seed,
        "text_field": args.text_field,
        "separator": args.separator,
        "seq_len_hint": args.seq_len_hint,
    }


def _describe_difference(old: dict, new: dict) -> str:
    flags = {"shard_tokens": "--shard-tokens", "seed": "--seed", "text_field": "--text-field",
             "separator": "--separator", "seq_len_hint": "--seq-len-hint", "max_vocab_size": "--max-vocab-size"}
    for key in new:
        if old.get(key) != new[key]:
            if key == "inputs":
                return "different inputs (a file was added, removed or changed size)"
            if key == "tokenizer":
                return "a different tokenizer"
            return f"{flags[key]} {old.get(key)!r}, this run has {new[key]!r}"
    return "different arguments"


def _tokenizer_sample(settings: Settings, units: list[Unit], budget: int) -> Iterator[str]:
    """Texts from the start of every unit, budget/len(units) bytes each: a bounded sample of the whole corpus."""
    per_unit = max(1, budget // max(1, len(units)))
    for unit in units:
        taken = 0
        for _, _, text, _ in read_unit(settings, unit):
            if text:
                yield text
                taken += len(text)
                if taken >= per_unit:
                    break


def _prepare_tokenizer(args: argparse.Namespace, given: LoadedTokenizer | None, work: Path, settings: Settings,
                       units: list[Unit]) -> LoadedTokenizer:
    path = work / TOKENIZER_JSON
    if not path.exists():
        if args.train_tokenizer:
            print(f"training a byte-level BPE of {args.vocab_size} ids on up to {args.tokenizer_sample_bytes:,} "
                  f"bytes of the input", file=sys.stderr)
            with atomic_path(path) as temp:
                train_byte_level_bpe(_tokenizer_sample(settings, units, args.tokenizer_sample_bytes), args.vocab_size,
                                     temp)
        else:
            write_atomically(path, given.json_path.read_bytes())
    # A folder's EOS may come from its tokenizer_config.json, which is not copied: carry the name over.
    return load_tokenizer(path, given.eos_token if given else None,
                          flag="--tokenizer" if given else "--train-tokenizer")


def _tokenize_all(settings: Settings, units: list[Unit], tokenizer_path: Path, workers: int) -> None:
    work = Path(settings.work)
    todo = [u for u in units if not _unit_path(work, u.index).exists()]
    total_bytes = sum(u.size for u in units)
    done_bytes = total_bytes - sum(u.size for u in todo)
    if done_bytes:
        print(f"resuming: {len(units) - len(todo)} of {len(units)} units already tokenized", file=sys.stderr)
    counts = {"documents": 0, "tokens": 0}
    began = time.monotonic()
    with tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, desc="tokenize", file=sys.stderr,
              disable=None, mininterval=1.0) as bar:

        def progress(consumed: int, documents: int, tokens: int) -> None:
            counts["documents"] += documents
            counts["tokens"] += tokens
            rate = counts["tokens"] / max(1e-9, time.monotonic() - began)
            bar.set_postfix_str(f"{counts['documents']:,} docs, {rate:,.0f} tok/s", refresh=False)
            bar.update(consumed)

        if workers == 1 or len(todo) <= 1:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tokenizer_path))
            for unit in todo:
                tokenize_unit(settings, unit, tokenizer, progress)
            return
        context = multiprocessing.get_context("spawn")
        progress_queue = context.Queue()
        processes = min(workers, len(todo))
        threads = max(1, len(os.sched_getaffinity(0)) // processes)
        with ProcessPoolExecutor(max_workers=processes, mp_context=context, initializer=_init_worker,
                                 initargs=(str(tokenizer_path), progress_queue, threads)) as pool:
            pending: set[Future] = {pool.submit(_run_unit, settings, unit) for unit in todo}
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    _drain(progress_queue, progress)
                    for future in done:
                        future.result()  # re-raises a worker's InputError here, in the main process
                _drain(progress_queue, progress)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise


def _drain(progress_queue: multiprocessing.Queue, progress: Callable[[int, int, int], None]) -> None:
    while True:
        try:
            progress(*progress_queue.get_nowait())
        except queue.Empty:
            return


def _check_output_is_new(out: str, storage: Storage | None, stage: Path, options: StorageOptions) -> None:
    if storage is not None:
        if storage.exists(DATASET_JSON):
            raise InputError(f"--out {out}: already holds a prepared dataset ({DATASET_JSON}); choose another --out "
                             f"or delete it")
        return
    if stage.is_dir() and any(p.name != WORK_NAME for p in stage.iterdir()):
        raise InputError(f"--out {out}: folder is not empty; choose a new or empty folder so shards from "
                         f"elsewhere cannot mix into this dataset")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    options = StorageOptions(gcs_credentials=args.gcs_credentials, gcp_project=args.gcp_project,
                             s3_endpoint_url=args.s3_endpoint_url)
    remote_out = _is_remote(args.out)
    out_storage = open_storage(args.out, options) if remote_out else None
    if remote_out:
        digest = bytes_digest(args.out.encode())[:16]
        work = args.work_dir or Path(tempfile.gettempdir()) / f"pretrain-prepare-{digest}"
        stage = work / "stage"
    else:
        stage = local_root(args.out) if args.out.startswith("file://") else Path(args.out)
        work = args.work_dir or stage / WORK_NAME

    planned = plan_inputs(args.inputs, options)
    given = load_tokenizer(args.tokenizer, args.eos_token) if args.tokenizer is not None else None
    if given is not None and args.max_vocab_size is not None and given.vocab_size > args.max_vocab_size:
        raise InputError(f"--tokenizer {given.json_path}: vocabulary has {given.vocab_size} ids, more than "
                         f"--max-vocab-size {args.max_vocab_size}; use the model's tokenizer or raise --max-vocab-size")
    recorded = _recorded_arguments(args, planned, file_digest(given.json_path) if given else None)

    args_path = work / "args.json"
    if args_path.exists():
        previous = json.loads(args_path.read_text())
        if previous != recorded:
            raise InputError(f"--work-dir {work}: was started with {_describe_difference(previous, recorded)}; "
                             f"re-run with the original arguments, or delete {work} to start over")
        if (work / "done").exists():
            _remove_bulky(work)  # a run killed while cleaning up
            print(f"{args.out}: already prepared with these arguments; nothing to do", file=sys.stderr)
            return 0
    else:
        _check_output_is_new(args.out, out_storage, stage, options)

    for folder in (work, work / "units", work / "parts", stage):
        folder.mkdir(parents=True, exist_ok=True)
    for leftover in itertools.chain(work.rglob(f".*{PARTIAL_SUFFIX}"), stage.glob(f".*{PARTIAL_SUFFIX}")):
        leftover.unlink(missing_ok=True)  # half-written files of a killed run

    sources = materialize_inputs(planned, work)
    dtype_guess = "uint32"
    settings = Settings(str(work), tuple(sources), args.seed, args.text_field, args.separator, dtype_guess)
    units = plan_units(sources, args.separator, args.text_field)
    if not args_path.exists():
        if not any(first_document(s, settings) for s in sources):
            raise InputError(f"{' '.join(args.inputs)}: no documents found in {len(sources)} file(s) (all empty); "
                             f"check the inputs and --text-field / --separator")
        write_json_atomically(args_path, recorded)

    loaded = _prepare_tokenizer(args, given, work, settings, units)
    if args.max_vocab_size is not None and loaded.vocab_size > args.max_vocab_size:
        raise InputError(f"--tokenizer {loaded.json_path}: vocabulary has {loaded.vocab_size} ids, more than "
                         f"--max-vocab-size {args.max_vocab_size}")
    dtype = np.dtype(np.uint16 if loaded.vocab_size <= UINT16_VOCAB_LIMIT else np.uint32)
    settings = Settings(str(work), tuple(sources), args.seed, args.text_field, args.separator, dtype.name)

    began = time.monotonic()
    _tokenize_all(settings, units, work / TOKENIZER_JSON, args.workers)
    manifests = [json.loads(_unit_path(work, u.index).read_text()) for u in units]
    per_source = [[0, 0] for _ in sources]
    for manifest in manifests:
        for index, (documents, tokens) in manifest["sources"].items():
            per_source[int(index)][0] += documents
            per_source[int(index)][1] += tokens
    documents = sum(d for d, _ in per_source)
    if documents == 0:
        raise InputError(f"{' '.join(args.inputs)}: no documents with text found; check the inputs and --text-field")
    stream_tokens = documents + sum(t for _, t in per_source)
    print(f"tokenized {documents:,} documents, {stream_tokens:,} tokens with EOS, in "
          f"{time.monotonic() - began:.1f} s", file=sys.stderr)

    num_shards = assemble(work, stage, _load_parts(work, units), stream_tokens, args.shard_tokens,
                          args.bucket_tokens, loaded.eos_token_id, dtype)
    shards = []
    for index in range(num_shards):
        path = stage / shard_name(index)
        shards.append(ShardInfo(path=path.name, num_tokens=read_array_header(path).num_tokens,
                                size_bytes=path.stat().st_size))
    write_atomically(stage / TOKENIZER_JSON, (work / TOKENIZER_JSON).read_bytes())
    if args.seq_len_hint:
        usable = sum(s.num_tokens // args.seq_len_hint * args.seq_len_hint for s in shards)
        efficiency = usable / stream_tokens
    else:
        efficiency = 1.0  # documents are packed back to back: no padding, nothing dropped
    DatasetManifest(
        shards=tuple(shards), vocab_size=loaded.vocab_size, eos_token_id=loaded.eos_token_id,
        tokenizer_file=TOKENIZER_JSON, tokenizer_sha256=file_digest(stage / TOKENIZER_JSON),
        details={
            "dtype": dtype.name,
            "seq_len_hint": args.seq_len_hint,
            "sources": [{"url": s.url, "size_bytes": s.size, "documents": d, "tokens": t}
                        for s, (d, t) in zip(sources, per_source)],
            "totals": {"documents": documents, "tokens": stream_tokens},
            "packing_efficiency": round(efficiency, 6),
            "seed": args.seed,
        },
    ).write(stage)
    if out_storage is not None:
        _upload(out_storage, stage, [s.path for s in shards], work / "uploaded")
    write_atomically(work / "done", b"")
    _remove_bulky(work)
    print(f"wrote {len(shards)} shards, {stream_tokens:,} tokens ({dtype.name}) and {DATASET_JSON} to {args.out}",
          file=sys.stderr)
    return 0


def _remove_bulky(work: Path) -> None:
    """Everything but the record of the arguments and the done mark; a later run with them has nothing to do."""
    for bulky in ("units", "parts", "inputs", "stage", "uploaded"):
        shutil.rmtree(work / bulky, ignore_errors=True)
    for carry in work.glob("carry_*.npy"):
        carry.unlink(missing_ok=True)


def _upload(storage: Storage, stage: Path, shard_names: list[str], marks: Path) -> None:
    """Shards, then tokenizer.json, then dataset.json last, so a dataset.json in the bucket means a complete set."""
    marks.mkdir(parents=True, exist_ok=True)
    names = [*shard_names, TOKENIZER_JSON]
    for name in tqdm(names, desc="upload", unit="file", file=sys.stderr, disable=None):
        if not (marks / name).exists():
            storage.upload(stage / name, name)
            write_atomically(marks / name, b"")
    storage.upload(stage / DATASET_JSON, DATASET_JSON)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (InputError, TokenizerError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StorageError as error:
        print(f"error: {redact(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to continue where it stopped", file=sys.stderr)
        return 130
