"""Synthetic, learnable token shards for trying the pipeline without a real corpus.

The corpus is a Markov chain over "words" (short fixed token n-grams), written in every shard format the reader accepts.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.data.format import list_shards, write_shard
from pretrain.storage.local import LocalStorage

SUCCESSORS_PER_WORD = 4
MAX_WORD_TOKENS = 4
ROW_WIDTH_2D = 256
MIN_VOCAB_SIZE = 16
STATIONARY_MAX_ITERATIONS = 100_000
STATIONARY_TOLERANCE = 1e-13
DEFAULT_NUM_SHARDS = 8
DEFAULT_TOKENS_PER_SHARD = 65536
DEFAULT_VOCAB_SIZE = 512


@dataclass(frozen=True)
class MarkovLanguage:
    """Word w is the token n-gram words[w]; after word w comes successors[w, k] with probability probabilities[w, k].

    Each word starts with its own head token and continues with tokens never used as heads, so a token stream
    parses back into words uniquely and the per-token entropy below is the exact loss floor of the process.
    """

    words: tuple[tuple[int, ...], ...]
    successors: np.ndarray
    probabilities: np.ndarray

    @classmethod
    def random(cls, vocab_size: int, seed: int) -> MarkovLanguage:
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size is {vocab_size}; sample data needs at least {MIN_VOCAB_SIZE} token ids")
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
        num_words = vocab_size // 2
        body_tokens = np.arange(num_words, vocab_size)
        lengths = rng.integers(1, MAX_WORD_TOKENS + 1, size=num_words)
        words = tuple(
            (head, *(int(t) for t in rng.choice(body_tokens, size=length - 1))) for head, length in enumerate(lengths)
        )
        # successors[w, 0] = w + 1 chains every word into one cycle, so the chain is irreducible.
        others = np.stack(
            [rng.choice(num_words, size=SUCCESSORS_PER_WORD - 1, replace=False) for _ in range(num_words)]
        )
        successors = np.concatenate([((np.arange(num_words) + 1) % num_words)[:, None], others], axis=1)
        probabilities = rng.dirichlet(np.full(SUCCESSORS_PER_WORD, 0.7), size=num_words)
        return cls(words=words, successors=successors, probabilities=probabilities)

    def stationary_distribution(self) -> np.ndarray:
        """Long-run word frequencies, by power iteration on the lazy chain (same fixed point, always aperiodic)."""
        num_words = len(self.words)
        pi = np.full(num_words, 1.0 / num_words)
        for _ in range(STATIONARY_MAX_ITERATIONS):
            moved = np.zeros(num_words)
            np.add.at(moved, self.successors, pi[:, None] * self.probabilities)
            updated = 0.5 * (pi + moved)
            converged = np.abs(updated - pi).sum() < STATIONARY_TOLERANCE
            pi = updated
            if converged:
                break
        return pi / pi.sum()

    def entropy_nats_per_token(self) -> float:
        """Entropy rate of the token stream: word-transition entropy over mean word length, both under pi."""
        # A word may list the same successor twice; merge those before taking p log p.
        same = self.successors[:, :, None] == self.successors[:, None, :]
        merged = (same * self.probabilities[:, None, :]).sum(axis=2)
        first_occurrence = ~np.tril(same, k=-1).any(axis=2)
        row_entropy = -(first_occurrence * merged * np.log(merged)).sum(axis=1)
        pi = self.stationary_distribution()
        mean_length = float(np.dot(pi, [len(w) for w in self.words]))
        return float(np.dot(pi, row_entropy)) / mean_length

    def sample_tokens(self, num_tokens: int, seed_words: list[int]) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence(seed_words))
        cumulative = np.cumsum(self.probabilities, axis=1)
        cumulative[:, -1] = 1.0
        next_word = [list(map(int, row)) for row in self.successors]
        thresholds = [list(map(float, row)) for row in cumulative]
        word = int(rng.choice(len(self.words), p=self.stationary_distribution()))
        tokens: list[int] = []
        # Each word has at least one token, so num_tokens draws are always enough.
        for draw in rng.random(num_tokens).tolist():
            tokens.extend(self.words[word])
            if len(tokens) >= num_tokens:
                break
            row = thresholds[word]
            k = 0
            while draw > row[k]:
                k += 1
            word = next_word[word][k]
        return np.array(tokens[:num_tokens], dtype=np.int64)


def loss_floor_nats(vocab_size: int, seed: int) -> float:
    """Entropy per token of the sample corpus generated with this vocab_size and seed: no model can go below it."""
    return MarkovLanguage.random(vocab_size, seed).entropy_nats_per_token()


def shard_layout(
    index: int, num_shards: int, tokens_per_shard: int, vocab_size: int
) -> tuple[str, int, bool, np.dtype]:
    """(relative path, ndim, compressed, dtype) of shard `index`: formats rotate so every reader path is used."""
    folder = "part-0" if index < (num_shards + 1) // 2 else "part-1"
    ndim = 2 if index % 2 == 1 and tokens_per_shard % ROW_WIDTH_2D == 0 else 1
    compressed = index % 4 in (2, 3)
    dtype = np.dtype(np.uint16) if vocab_size <= 2**16 and index % 3 != 2 else np.dtype(np.int32)
    return f"{folder}/shard_{index:03d}.npz", ndim, compressed, dtype


def generate_sample_data(
    out_dir: Path,
    *,
    num_shards: int = DEFAULT_NUM_SHARDS,
    tokens_per_shard: int = DEFAULT_TOKENS_PER_SHARD,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
) -> list[Path]:
    """Write num_shards shards of tokens_per_shard tokens under out_dir (refuses a directory that has shards)."""
    if num_shards < 1 or tokens_per_shard < 1:
        raise ValueError(
            f"num_shards {num_shards} and tokens_per_shard {tokens_per_shard}; expected both to be positive"
        )
    existing = list_shards(LocalStorage(str(out_dir))) if out_dir.is_dir() else []
    if existing:
        example = existing[0].key
        raise FileExistsError(
            f"{out_dir}: already holds {len(existing)} .npz shards (e.g. {example}); "
            f"training reads every shard there, so remove them or choose another --out"
        )
    language = MarkovLanguage.random(vocab_size, seed)
    written = []
    for index in range(num_shards):
        rel_path, ndim, compressed, dtype = shard_layout(index, num_shards, tokens_per_shard, vocab_size)
        tokens = language.sample_tokens(tokens_per_shard, seed_words=[seed, 1, index]).astype(dtype)
        if ndim == 2:
            tokens = tokens.reshape(-1, ROW_WIDTH_2D)
        path = out_dir / rel_path
        write_shard(path, tokens, compressed)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data"), help="directory to write shards into")
    parser.add_argument("--num-shards", type=int, default=DEFAULT_NUM_SHARDS)
    parser.add_argument("--tokens-per-shard", type=int, default=DEFAULT_TOKENS_PER_SHARD)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = generate_sample_data(
        args.out,
        num_shards=args.num_shards,
        tokens_per_shard=args.tokens_per_shard,
        vocab_size=args.vocab_size,
        seed=args.seed,
    )
    for index, path in enumerate(paths):
        _, ndim, compressed, dtype = shard_layout(index, args.num_shards, args.tokens_per_shard, args.vocab_size)
        kind = "compressed" if compressed else "stored"
        print(f"wrote {path} ({args.tokens_per_shard} tokens, {dtype}, {ndim}-D, {kind})")
    entropy = loss_floor_nats(args.vocab_size, args.seed)
    print(
        f"entropy of the generating process: {entropy:.3f} nats/token (the loss floor); "
        f"uniform tokens would give log({args.vocab_size}) = {math.log(args.vocab_size):.3f}"
    )
