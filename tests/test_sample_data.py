"""The synthetic corpus: mixed shard formats the reader accepts, determinism, and a loss floor far below log(vocab)."""

from __future__ import annotations

import math
import zipfile
from collections import Counter

import numpy as np
import pytest

from pretrain.data.format import discover_shards, inspect_shards, read_array_header
from pretrain.data.synthetic import (
    MarkovLanguage,
    generate_sample_data,
    loss_floor_nats,
    main,
)

VOCAB = 512


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    generate_sample_data(out, num_shards=8, tokens_per_shard=4096, vocab_size=VOCAB, seed=3)
    return out


def test_shards_mix_every_format_and_pass_validation(sample_dir):
    rel_paths = discover_shards(sample_dir)
    headers = [read_array_header(sample_dir / rel) for rel in rel_paths]
    compression = set()
    for rel in rel_paths:
        with zipfile.ZipFile(sample_dir / rel) as archive:
            compression.add(archive.getinfo("input_ids.npy").compress_type)

    assert len(rel_paths) == 8
    assert {rel.split("/")[0] for rel in rel_paths} == {"part-0", "part-1"}
    assert compression == {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
    assert {len(h.shape) for h in headers} == {1, 2}
    assert {h.dtype for h in headers} == {np.dtype(np.uint16), np.dtype(np.int32)}
    infos = inspect_shards(sample_dir, rel_paths, seq_len=64, vocab_size=VOCAB)
    assert all(info.num_tokens == 4096 for info in infos)


def test_generation_is_deterministic_in_the_seed(sample_dir, tmp_path):
    generate_sample_data(tmp_path / "same", num_shards=8, tokens_per_shard=4096, vocab_size=VOCAB, seed=3)
    generate_sample_data(tmp_path / "other", num_shards=8, tokens_per_shard=4096, vocab_size=VOCAB, seed=4)
    rel = "part-1/shard_005.npz"

    original = np.load(sample_dir / rel)["input_ids"]
    assert np.array_equal(np.load(tmp_path / "same" / rel)["input_ids"], original)
    assert not np.array_equal(np.load(tmp_path / "other" / rel)["input_ids"], original)


def test_refuses_a_directory_that_already_has_shards(sample_dir):
    with pytest.raises(FileExistsError, match="already holds 8 .npz shards"):
        generate_sample_data(sample_dir, num_shards=1, tokens_per_shard=64, vocab_size=VOCAB, seed=0)


def test_loss_floor_is_far_below_uniform_and_matches_the_data():
    language = MarkovLanguage.random(VOCAB, seed=0)
    floor = loss_floor_nats(VOCAB, seed=0)
    tokens = language.sample_tokens(300_000, seed_words=[0, 1, 0])

    # Heads (ids below vocab/2) start words, so the stream parses back into words; estimate H(next word | word).
    heads = np.flatnonzero(tokens < VOCAB // 2)
    words = tokens[heads]
    pairs = Counter(zip(words[:-1].tolist(), words[1:].tolist()))
    firsts = Counter(words[:-1].tolist())
    word_entropy = -sum(n * math.log(n / firsts[a]) for (a, _), n in pairs.items()) / (len(words) - 1)
    empirical = word_entropy * (len(words) - 1) / (heads[-1] - heads[0])

    assert floor < 0.15 * math.log(VOCAB)
    assert empirical == pytest.approx(floor, rel=0.05)


def test_a_bigram_model_fit_on_some_shards_predicts_a_held_out_one(sample_dir):
    paths = [sample_dir / rel for rel in discover_shards(sample_dir)]
    train = np.concatenate([np.load(p)["input_ids"].reshape(-1).astype(np.int64) for p in paths[:-1]])
    held_out = np.load(paths[-1])["input_ids"].reshape(-1).astype(np.int64)
    counts = np.full((VOCAB, VOCAB), 0.01)
    np.add.at(counts, (train[:-1], train[1:]), 1.0)
    log_probs = np.log(counts / counts.sum(axis=1, keepdims=True))

    cross_entropy = -log_probs[held_out[:-1], held_out[1:]].mean()

    assert cross_entropy < 0.25 * math.log(VOCAB)


def test_cli_writes_shards_and_prints_the_loss_floor(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--num-shards", "3", "--tokens-per-shard", "1000", "--seed", "1"])

    printed = capsys.readouterr().out
    assert len(discover_shards(tmp_path / "cli")) == 3
    assert f"{loss_floor_nats(512, 1):.3f} nats/token" in printed
