"""The document order and the shards: every document's key (a splitmix64 hash of seed, source index and position),
the parts that hold documents sorted by key, and the bucket-by-bucket merge of all parts into shards, resumable; the
documents at the end of the key order (a seeded random sample of whole documents) become the eval shards."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pretrain.data.format import write_shard
from pretrain.files import atomic_path, write_json_atomically

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
    """The sort key of each document: a hash of (seed, its source's index, its position in the source).

    The output is all documents sorted by key: a seeded uniform shuffle of the whole corpus that depends neither on
    how the work was split nor on how many workers ran."""
    base = _splitmix64(np.array([seed % (1 << 64)], dtype=np.uint64))
    per_source = _splitmix64(base ^ np.asarray(source_indices, dtype=np.uint64))
    return _splitmix64(per_source ^ np.asarray(positions, dtype=np.uint64))


def save_npy(path: Path, array: np.ndarray) -> None:
    # Whole or not at all, without fsync: this guards against a killed process, which is what preemption does; a
    # power cut may need the work folder deleted.
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        np.lib.format.write_array(handle, np.ascontiguousarray(array), allow_pickle=False)


def write_part(stem: Path, tokens: np.ndarray, lengths: np.ndarray, keys: np.ndarray) -> None:
    """Stores documents (their tokens back to back, lengths and keys) sorted by key, as gather_bucket reads them:
    STEM.tokens.npy, STEM.offsets.npy (len + 1 offsets into the tokens) and STEM.keys.npy."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    order = np.argsort(keys, kind="stable")
    sorted_tokens = (np.concatenate([tokens[offsets[i]:offsets[i + 1]] for i in order.tolist()]) if len(order)
                     else tokens)
    sorted_offsets = np.zeros_like(offsets)
    np.cumsum(lengths[order], out=sorted_offsets[1:])
    save_npy(stem.with_suffix(".tokens.npy"), sorted_tokens)
    save_npy(stem.with_suffix(".offsets.npy"), sorted_offsets)
    save_npy(stem.with_suffix(".keys.npy"), keys[order])


def _bucket_bounds(num_buckets: int, bucket: int) -> tuple[int, int | None]:
    low = (bucket << 64) // num_buckets
    high = ((bucket + 1) << 64) // num_buckets
    return low, (high if high < (1 << 64) else None)


def gather_bucket(stems: list[Path], num_buckets: int, bucket: int, eos: int, dtype: np.dtype,
                  lengths: list[int] | None = None) -> np.ndarray:
    """The documents whose keys fall in the bucket's equal share of the key space, in key order, each followed by EOS.
    Each part is sorted by key, so that is one contiguous slice per part. `lengths`, when given, receives each
    document's length with its EOS, in the same order."""
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
    if lengths is not None:
        lengths.extend(len(pieces[i]) + 1 for i in order.tolist())
    separator = np.array([eos], dtype=dtype)
    return np.concatenate(list(itertools.chain.from_iterable((pieces[i], separator) for i in order.tolist())))


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.npz"


def eval_shard_name(index: int) -> str:
    return f"eval_{index:05d}.npz"


def assemble(work: Path, stage: Path, stems: list[Path], stream_tokens: int, shard_tokens: int,
             bucket_tokens: int, eos: int, dtype: np.dtype, eval_tokens: int = 0) -> tuple[int, int, int]:
    """Writes every shard into stage; returns (training shards, eval shards, eval documents). The key space is cut
    into stream_tokens / bucket_tokens buckets, each gathered in turn and appended to the stream that is cut into
    shards. Memory: one bucket plus one shard. The leftover tail, the shard numbers and the stream position are saved
    after each bucket, so a killed run continues from the last whole bucket.

    With eval_tokens, every document that ends in the last eval_tokens tokens of the stream (so at least that many)
    goes to eval shards instead, whole: the highest keys, a seeded random sample of documents. The first document
    always trains, so a one-document corpus has no eval split. Without, the shards are those of before the split."""
    state_path = work / "assemble.json"
    num_buckets = max(1, math.ceil(stream_tokens / bucket_tokens))
    state = (json.loads(state_path.read_text()) if state_path.exists()
             else {"next_bucket": 0, "next_shard": 0, "carry": None})
    carry = np.load(work / state["carry"]) if state["carry"] else np.empty(0, dtype=dtype)
    next_shard, position = state["next_shard"], state.get("position", 0)
    evaluating, next_eval, eval_documents = state.get("eval", False), state.get("next_eval", 0), \
        state.get("eval_documents", 0)
    cut = stream_tokens - eval_tokens  # a document that ends after this stream position is held out
    done = next_shard * shard_tokens + next_eval * shard_tokens + len(carry)
    with tqdm(total=stream_tokens, initial=min(stream_tokens, done), unit="tok",
              unit_scale=True, desc="shuffle+pack", file=sys.stderr, disable=None, mininterval=1.0) as bar:
        for bucket in range(state["next_bucket"], num_buckets):
            lengths: list[int] = []
            gathered = gather_bucket(stems, num_buckets, bucket, eos, dtype, lengths)
            held_from = len(gathered)
            if eval_tokens and not evaluating:
                ends = position + np.cumsum(np.asarray(lengths, dtype=np.int64))
                held = np.flatnonzero((ends > cut) & (ends - np.asarray(lengths) > 0))
                if len(held):
                    held_from = int(ends[held[0]] - lengths[held[0]] - position)
                    eval_documents += len(lengths) - int(held[0])
            elif evaluating:
                eval_documents += len(lengths)
            pieces = [(gathered[:held_from], evaluating), (gathered[held_from:], True)]
            for piece, to_eval in pieces:
                if to_eval and not evaluating:
                    if not len(piece):
                        continue
                    if len(carry):  # the training stream ends here: its short tail is the last training shard
                        write_shard(stage / shard_name(next_shard), carry)
                        next_shard += 1
                    carry, evaluating = np.empty(0, dtype=dtype), True
                stream = np.concatenate([carry, piece]) if len(carry) else piece
                start = 0
                while len(stream) - start >= shard_tokens:
                    name = eval_shard_name(next_eval) if evaluating else shard_name(next_shard)
                    write_shard(stage / name, stream[start:start + shard_tokens])
                    next_eval, next_shard = (next_eval + 1, next_shard) if evaluating else (next_eval, next_shard + 1)
                    start += shard_tokens
                carry = np.array(stream[start:])
            position += len(gathered)
            carry_name = f"carry_{bucket:06d}.npy" if len(carry) else None
            if carry_name:
                save_npy(work / carry_name, carry)
            write_json_atomically(state_path, {"next_bucket": bucket + 1, "next_shard": next_shard, "carry": carry_name,
                                               "position": position, "eval": evaluating, "next_eval": next_eval,
                                               "eval_documents": eval_documents})
            if state["carry"] and state["carry"] != carry_name:
                (work / state["carry"]).unlink(missing_ok=True)
            state = {"carry": carry_name}
            bar.update(len(gathered))
    if len(carry):
        write_shard(stage / (eval_shard_name(next_eval) if evaluating else shard_name(next_shard)), carry)
        next_eval, next_shard = (next_eval + 1, next_shard) if evaluating else (next_eval, next_shard + 1)
    return next_shard, next_eval, eval_documents
