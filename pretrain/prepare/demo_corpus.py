"""The embedded default data: real text from the Python standard library's own documentation, prepared the way a user
prepares theirs (a byte-level BPE trained on it, documents shuffled and packed into shards with a dataset.json)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from pretrain.data.format import list_shards
from pretrain.data.synthetic import generate_sample_data
from pretrain.prepare import command as prepare_data
from pretrain.prepare.sample_text import write_sample_text
from pretrain.storage.local import LocalStorage

log = logging.getLogger(__name__)

TEXT_BYTES = 2 * 1024 * 1024
SHARDS = 8  # about 8 training shards (the eval split is held out of them) and a short last one


def ensure_demo_corpus(kind: str, data_dir: Path, vocab_size: int, seed: int) -> None:
    """Writes the demo corpus of `kind` into data_dir when it holds no shard (the embedded default job)."""
    if not (data_dir.is_dir() and list_shards(LocalStorage(str(data_dir)))):
        write_sample_corpus(kind, data_dir, vocab_size, seed)


def write_sample_corpus(kind: str, data_dir: Path, vocab_size: int, seed: int) -> None:
    """`text`: shards, tokenizer.json and dataset.json of real text; `synthetic`: the Markov-chain corpus the tests use.
    Raises ValueError (one line) if preparation fails."""
    if kind == "synthetic":
        log.info("%s has no shards: writing the synthetic sample corpus there", data_dir)
        generate_sample_data(data_dir, vocab_size=vocab_size, seed=seed)
        return
    log.info("%s has no shards: preparing the sample corpus there (standard-library docs, %d-token BPE trained on "
             "them)", data_dir, vocab_size)
    data_dir.mkdir(parents=True, exist_ok=True)
    # Prepared beside data_dir and moved in: preparation refuses a non-empty --out, and data/ holds its README.
    with tempfile.TemporaryDirectory(prefix=".sample-corpus-", dir=data_dir.parent) as scratch:
        sources = write_sample_text(Path(scratch) / "text", TEXT_BYTES)
        prepared = Path(scratch) / "prepared"
        # About 2 bytes per token at this vocabulary size: SHARDS full shards and a short last one.
        shard_tokens = TEXT_BYTES // 2 // SHARDS
        argv = [*map(str, sources), "--out", str(prepared), "--train-tokenizer", "--vocab-size", str(vocab_size),
                "--seed", str(seed), "--shard-tokens", str(shard_tokens), "--workers", "1",
                "--work-dir", str(Path(scratch) / "work")]
        code = prepare_data.main(argv)
        if code == 0:
            # dataset.json last: its presence means the set is complete, as in a bucket.
            for path in sorted(prepared.iterdir(), key=lambda p: (p.name == "dataset.json", p.name)):
                if path.is_file():
                    path.replace(data_dir / path.name)
    if code != 0:
        raise ValueError(f"{data_dir}: preparing the sample corpus failed (see the line above); pass --data-dir with "
                         "your own shards, or --generate-sample-data false")
