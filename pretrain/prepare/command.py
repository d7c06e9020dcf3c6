"""`python -m pretrain.prepare_data INPUT... --out DIR_OR_URL`: raw text to shuffled, packed token shards and a
dataset.json. Owns the arguments, the work folder's record of them and resuming after a kill (byte-identical shards),
and the run in order: inputs, tokenizer, tokenizing, shuffling into shards, dataset.json, upload."""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pretrain.data.format import (
    DATASET_JSON,
    DatasetManifest,
    ShardInfo,
    read_array_header,
)
from pretrain.files import (
    PARTIAL_SUFFIX,
    atomic_path,
    bytes_digest,
    file_digest,
    write_atomically,
    write_json_atomically,
)
from pretrain.prepare.inputs import (
    PlannedInput,
    is_remote,
    materialize_inputs,
    plan_inputs,
)
from pretrain.prepare.readers import (
    InputError,
    Source,
    Unit,
    has_documents,
    plan_units,
    read_unit,
    suffixes,
)
from pretrain.prepare.shuffle import assemble, eval_shard_name, shard_name
from pretrain.prepare.tokenizer import (
    LoadedTokenizer,
    TokenizerError,
    load_tokenizer,
    train_byte_level_bpe,
)
from pretrain.prepare.tokenizing import (
    CORES_PER_WORKER,
    Settings,
    default_workers,
    part_stems,
    read_manifest,
    tokenize_all,
)
from pretrain.storage import Storage, StorageError, StorageOptions, open_storage, redact
from pretrain.storage.local import local_root

WORK_NAME = ".prepare-work"
TOKENIZER_JSON = "tokenizer.json"
DEFAULT_SHARD_TOKENS = 1 << 26
DEFAULT_BUCKET_TOKENS = 1 << 25
DEFAULT_SAMPLE_BYTES = 1 << 28
UINT16_VOCAB_LIMIT = 1 << 16
# --eval-split auto: 1% of the tokens, at least enough for the test config's evaluation (4 micro-batches of 8 x 128
# tokens, four times over) and at most what many evaluations need (production reads 8 x 4 x 2 x 1024 tokens per
# evaluation), and never more than a tenth of a small corpus: a 100k-token corpus holds out 10k tokens.
EVAL_AUTO_FRACTION = 0.01
EVAL_AUTO_MIN_TOKENS = 16_384
EVAL_AUTO_MAX_TOKENS = 4 * 1024 * 1024
EVAL_AUTO_MAX_FRACTION = 0.1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.prepare_data",
        description="Tokenize text files into shuffled .npz token shards with a dataset.json (see README).",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help=f"files, folders or globs, local or gs:// s3:// az:// file:// ({', '.join(suffixes())})")
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
    parser.add_argument("--eval-split", default="auto",
                        help="documents held out as eval shards (whole, chosen by the seeded shuffle): a fraction of "
                             "the tokens such as 0.01, a token count such as 100000, 0 for none, or auto: 1%% of the "
                             f"tokens, at least {EVAL_AUTO_MIN_TOKENS:,} and at most {EVAL_AUTO_MAX_TOKENS:,}, never "
                             "more than a tenth")
    parser.add_argument("--bucket-tokens", type=int, default=DEFAULT_BUCKET_TOKENS,
                        help="shuffle buffer: peak memory of the shuffle is about 3x this many tokens")
    parser.add_argument("--work-dir", type=Path, help="resumable work folder (default: OUT/.prepare-work, or a "
                        "folder under the temp dir for a bucket URL)")
    parser.add_argument("--s3-endpoint-url", help="for S3-compatible stores")
    parser.add_argument("--gcs-credentials", help="service account key file for gs://")
    parser.add_argument("--gcp-project")
    return parser


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
    parse_eval_split(args.eval_split)
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
        "eval_split": args.eval_split,
    }


def _describe_difference(old: dict, new: dict) -> str:
    flags = {"shard_tokens": "--shard-tokens", "seed": "--seed", "text_field": "--text-field",
             "separator": "--separator", "seq_len_hint": "--seq-len-hint", "max_vocab_size": "--max-vocab-size",
             "eval_split": "--eval-split"}
    for key in new:
        if old.get(key) != new[key]:
            if key == "inputs":
                return "different inputs (a file was added, removed or changed size)"
            if key == "tokenizer":
                return "a different tokenizer"
            return f"{flags[key]} {old.get(key)!r}, this run has {new[key]!r}"
    return "different arguments"


def _tokenizer_sample(args: argparse.Namespace, sources: Sequence[Source], units: list[Unit]) -> Iterator[str]:
    """Texts from the start of every unit, --tokenizer-sample-bytes / len(units) bytes each: a bounded sample of the
    whole corpus."""
    per_unit = max(1, args.tokenizer_sample_bytes // max(1, len(units)))
    for unit in units:
        taken = 0
        for _, _, text, _ in read_unit(sources, unit, args.text_field, args.separator):
            if text:
                yield text
                taken += len(text)
                if taken >= per_unit:
                    break


def _prepare_tokenizer(args: argparse.Namespace, given: LoadedTokenizer | None, work: Path, sources: Sequence[Source],
                       units: list[Unit]) -> LoadedTokenizer:
    path = work / TOKENIZER_JSON
    if not path.exists():
        if args.train_tokenizer:
            print(f"training a byte-level BPE of {args.vocab_size} ids on up to {args.tokenizer_sample_bytes:,} "
                  f"bytes of the input", file=sys.stderr)
            with atomic_path(path) as temp:
                train_byte_level_bpe(_tokenizer_sample(args, sources, units), args.vocab_size, temp)
        else:
            write_atomically(path, given.json_path.read_bytes())
    # A folder's EOS may come from its tokenizer_config.json, which is not copied: carry the name over.
    return load_tokenizer(path, given.eos_token if given else None,
                          flag="--tokenizer" if given else "--train-tokenizer")


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
    remote_out = is_remote(args.out)
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
    units = plan_units(sources, args.text_field, args.separator)
    if not args_path.exists():
        if not has_documents(sources, args.text_field, args.separator):
            raise InputError(f"{' '.join(args.inputs)}: no documents found in {len(sources)} file(s) (all empty); "
                             f"check the inputs and --text-field / --separator")
        write_json_atomically(args_path, recorded)

    loaded = _prepare_tokenizer(args, given, work, sources, units)
    if args.max_vocab_size is not None and loaded.vocab_size > args.max_vocab_size:
        raise InputError(f"--tokenizer {loaded.json_path}: vocabulary has {loaded.vocab_size} ids, more than "
                         f"--max-vocab-size {args.max_vocab_size}")
    dtype = np.dtype(np.uint16 if loaded.vocab_size <= UINT16_VOCAB_LIMIT else np.uint32)
    settings = Settings(str(work), tuple(sources), args.seed, args.text_field, args.separator, dtype.name)

    began = time.monotonic()
    tokenize_all(settings, units, work / TOKENIZER_JSON, args.workers)
    manifests = [read_manifest(work, u) for u in units]
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

    eval_tokens = eval_split_tokens(args.eval_split, stream_tokens, documents)
    num_shards, num_eval, eval_documents = assemble(work, stage, part_stems(work, units), stream_tokens,
                                                    args.shard_tokens, args.bucket_tokens, loaded.eos_token_id,
                                                    dtype, eval_tokens)
    shards = [_shard_info(stage / shard_name(index)) for index in range(num_shards)]
    eval_shards = [_shard_info(stage / eval_shard_name(index)) for index in range(num_eval)]
    write_atomically(stage / TOKENIZER_JSON, (work / TOKENIZER_JSON).read_bytes())
    if args.seq_len_hint:
        usable = sum(s.num_tokens // args.seq_len_hint * args.seq_len_hint for s in shards + eval_shards)
        efficiency = usable / stream_tokens
    else:
        efficiency = 1.0  # documents are packed back to back: no padding, nothing dropped
    held_tokens = sum(s.num_tokens for s in eval_shards)
    DatasetManifest(
        shards=tuple(shards), eval_shards=tuple(eval_shards), vocab_size=loaded.vocab_size,
        eos_token_id=loaded.eos_token_id,
        tokenizer_file=TOKENIZER_JSON, tokenizer_sha256=file_digest(stage / TOKENIZER_JSON),
        details={
            "dtype": dtype.name,
            "seq_len_hint": args.seq_len_hint,
            "sources": [{"url": s.url, "size_bytes": s.size, "documents": d, "tokens": t}
                        for s, (d, t) in zip(sources, per_source)],
            "totals": {"documents": documents, "tokens": stream_tokens},
            "eval_split": {"requested": args.eval_split, "documents": eval_documents, "tokens": held_tokens},
            "packing_efficiency": round(efficiency, 6),
            "seed": args.seed,
        },
    ).write(stage)
    if out_storage is not None:
        _upload(out_storage, stage, [s.path for s in shards + eval_shards], work / "uploaded")
    write_atomically(work / "done", b"")
    _remove_bulky(work)
    held = (f", {len(eval_shards)} eval shard(s) of {eval_documents:,} held-out documents ({held_tokens:,} tokens)"
            if eval_shards else ", no eval split")
    print(f"wrote {len(shards)} shards, {stream_tokens - held_tokens:,} training tokens ({dtype.name}){held} and "
          f"{DATASET_JSON} to {args.out}", file=sys.stderr)
    return 0


def _shard_info(path: Path) -> ShardInfo:
    return ShardInfo(path=path.name, num_tokens=read_array_header(path).num_tokens, size_bytes=path.stat().st_size)


def parse_eval_split(value: str) -> float | int | None:
    """None for auto; a float in (0, 1) for a fraction of the tokens; an int for a token count (0: no split)."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    try:
        number = float(text)
    except ValueError:
        number = -1.0
    if number < 0 or number != number or (number >= 1 and number != int(number)):
        raise InputError(f"--eval-split {value}: expected auto, a fraction of the tokens such as 0.01, a token count "
                         f"such as 100000, or 0 for no eval split")
    return number if 0 < number < 1 else int(number)


def eval_split_tokens(value: str, stream_tokens: int, documents: int) -> int:
    """How many tokens (at least, in whole documents) the eval split holds for --eval-split `value`."""
    requested = parse_eval_split(value)
    if requested is None:
        if documents < 2:
            print("one document only: no eval split (training holds out --eval-shards instead)", file=sys.stderr)
            return 0
        wanted = min(max(round(EVAL_AUTO_FRACTION * stream_tokens), EVAL_AUTO_MIN_TOKENS), EVAL_AUTO_MAX_TOKENS)
        return max(1, min(wanted, int(EVAL_AUTO_MAX_FRACTION * stream_tokens)))
    tokens = round(requested * stream_tokens) if isinstance(requested, float) else requested
    if tokens and (tokens >= stream_tokens or documents < 2):
        raise InputError(f"--eval-split {value}: the corpus has {stream_tokens:,} tokens in {documents:,} documents, "
                         f"so holding out {tokens:,} tokens of whole documents leaves no training text; hold out less")
    return max(tokens, 1) if requested else 0


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
