"""Tokenizers for data preparation: loading a Hugging Face tokenizer.json (file or folder) and finding its EOS,
or training a byte-level BPE with an `<|endoftext|>` token; nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TRAINED_EOS = "<|endoftext|>"
# Names EOS goes by in common tokenizers, tried in this order when the tokenizer's config does not say.
KNOWN_EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")
BYTE_ALPHABET_SIZE = 256


class TokenizerError(ValueError):
    """A tokenizer that cannot be used; the message is one line naming the flag or file and what to do."""


@dataclass(frozen=True)
class LoadedTokenizer:
    tokenizer: Tokenizer
    json_path: Path
    eos_token: str
    eos_token_id: int
    vocab_size: int


def tokenizer_json_path(path: Path) -> Path:
    """A tokenizer.json file, or the tokenizer.json inside a tokenizer folder."""
    candidate = path / "tokenizer.json" if path.is_dir() else path
    if not candidate.is_file():
        raise TokenizerError(
            f"--tokenizer {path}: no tokenizer.json there; pass a Hugging Face tokenizer.json file or a folder "
            f"holding one, or use --train-tokenizer --vocab-size N"
        )
    return candidate


def vocab_size_of(tokenizer: Tokenizer) -> int:
    """Ids run from 0 to the largest id; added tokens may sit above the base vocabulary."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return max(vocab.values()) + 1 if vocab else 0


def load_tokenizer(path: Path, eos_token: str | None = None, flag: str = "--tokenizer") -> LoadedTokenizer:
    json_path = tokenizer_json_path(path)
    try:
        tokenizer = Tokenizer.from_file(str(json_path))
    except Exception as error:  # the Rust side raises a bare Exception for any parse failure
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TokenizerError(
            f"{flag} {json_path}: not a readable Hugging Face tokenizer.json ({message}); pass the tokenizer.json "
            f"saved by tokenizers or transformers"
        ) from None
    name = eos_token or _configured_eos(json_path.parent) or _known_eos(tokenizer)
    if name is None:
        raise TokenizerError(
            f"{flag} {json_path}: no end-of-text token found (looked for {', '.join(KNOWN_EOS_TOKENS)} and the "
            f"eos_token of tokenizer_config.json); pass --eos-token TOKEN"
        )
    eos_id = tokenizer.token_to_id(name)
    if eos_id is None:
        raise TokenizerError(
            f"--eos-token {name!r}: not in the vocabulary of {json_path}; pass a token the tokenizer knows"
        )
    return LoadedTokenizer(tokenizer, json_path, name, eos_id, vocab_size_of(tokenizer))


def _configured_eos(folder: Path) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
        except (ValueError, OSError, AttributeError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return None


def _known_eos(tokenizer: Tokenizer) -> str | None:
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return next((name for name in KNOWN_EOS_TOKENS if name in vocab), None)


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, out_path: Path) -> None:
    """Trains a byte-level BPE (GPT-2 style, lossless on any text) with TRAINED_EOS as id 0; saves tokenizer.json.

    The tokenizers trainer gives the same file for the same texts in the same order, which a resumed preparation
    relies on when it was killed while training.
    """
    minimum = BYTE_ALPHABET_SIZE + 1
    if vocab_size < minimum:
        raise TokenizerError(
            f"--vocab-size {vocab_size}: a byte-level BPE needs at least {minimum} ids (256 bytes plus "
            f"{TRAINED_EOS}); pass a larger --vocab-size"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TRAINED_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_path))
