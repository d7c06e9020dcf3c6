"""Tokenizing the corpus: one work unit in a worker (documents encoded in batches, stored as parts sorted by key, a
unit manifest written last marks it done), and the driver that runs the units not yet done over worker processes."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import queue
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pretrain.files import write_json_atomically
from pretrain.prepare.readers import Source, Unit, read_unit
from pretrain.prepare.shuffle import document_keys, write_part

# A worker process per this many cores, each running the tokenizers library's threads on its share: the library's
# batch encoding scales over threads by itself, and a process costs its start-up and imports (on 2 cores one process
# was 0.90x of bare encode_batch against 0.88x for two single-threaded ones; bench/bench_prepare.py), while the
# per-token Python work (ids to arrays, sorting, writing parts) needs more than one process on a large machine.
CORES_PER_WORKER = 4
# A unit's tokens are written out in parts of about this many tokens, so a worker's memory is bounded even for
# a single multi-gigabyte .jsonl.gz.
PART_TOKENS = 1 << 22
ENCODE_BATCH_CHARS = 1 << 20

Progress = Callable[[int, int, int], None]  # (source bytes consumed, documents, tokens) since the last call


@dataclass(frozen=True)
class Settings:
    """What the workers need; all of it is fixed for the life of a work folder."""

    work: str
    sources: tuple[Source, ...]
    seed: int
    text_field: str
    separator: str | None
    dtype: str


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) // CORES_PER_WORKER)


def unit_path(work: Path, index: int) -> Path:
    return work / "units" / f"unit_{index:06d}.json"


def _part_stem(work: Path, unit: int, part: int) -> Path:
    return work / "parts" / f"unit_{unit:06d}_part_{part:04d}"


def read_manifest(work: Path, unit: Unit) -> dict:
    """{"unit": index, "parts": [{"documents", "tokens"}...], "sources": {source index: [documents, tokens]}}."""
    return json.loads(unit_path(work, unit.index).read_text())


def part_stems(work: Path, units: list[Unit]) -> list[Path]:
    """The parts of every unit (all tokenized), for shuffle.assemble."""
    stems = []
    for unit in units:
        manifest = read_manifest(work, unit)
        stems.extend(_part_stem(work, unit.index, part) for part in range(len(manifest["parts"])))
    return stems


def tokenize_unit(settings: Settings, unit: Unit, tokenizer, progress: Progress | None) -> dict:
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
        write_part(_part_stem(work, unit.index, len(parts)), tokens, lengths, np.concatenate([k for _, _, k in held]))
        parts.append({"documents": len(lengths), "tokens": len(tokens)})
        held, held_tokens = [], 0

    for source_index, position, text, consumed in read_unit(settings.sources, unit, settings.text_field,
                                                            settings.separator):
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
    write_json_atomically(unit_path(work, unit.index), manifest)
    return manifest


_worker_tokenizer = None
_worker_progress: Progress | None = None


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


def tokenize_all(settings: Settings, units: list[Unit], tokenizer_path: Path, workers: int) -> None:
    """Tokenizes every unit without a manifest: in this process for --workers 1 (or one unit left), otherwise in that
    many spawned processes sharing the cores."""
    work = Path(settings.work)
    todo = [u for u in units if not unit_path(work, u.index).exists()]
    total_bytes = sum(u.span.size for u in units)
    done_bytes = total_bytes - sum(u.span.size for u in todo)
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


def _drain(progress_queue: multiprocessing.Queue, progress: Progress) -> None:
    while True:
        try:
            progress(*progress_queue.get_nowait())
        except queue.Empty:
            return
