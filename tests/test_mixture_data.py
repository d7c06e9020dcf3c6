"""The data room's facade with mixtures, in process: each source frozen and fetched into its own folder, only the
first step's shards across sources ready before step 1, growth on resume, bad mixtures in one line, and the eval
split that dataset.json lists."""

from __future__ import annotations

import hashlib
import json
import logging
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pretrain.data.fetch as shard_fetch
import pretrain.data.training_data as dataset_module
from pretrain.data.format import DATASET_JSON
from pretrain.data.samples import make_train_loader
from pretrain.data.sources import FrozenData, MixtureOrder
from pretrain.data.training_data import MixtureSamples, prepare_training_data
from tests.test_dataset import (
    ONE_PROCESS,
    SEQ_LEN,
    STEP_SAMPLES,
    VOCAB,
    HeldStorage,
    config,
    local_npz,
    wait_until,
    write_shards,
)


@pytest.fixture
def buckets(tmp_path, monkeypatch) -> dict[str, HeldStorage]:
    """file:// buckets by URL, each a HeldStorage that records downloads."""
    opened: dict[str, HeldStorage] = {}

    def open_storage(url, options):
        if url not in opened:
            opened[url] = HeldStorage(url, options)
        return opened[url]

    monkeypatch.setattr(dataset_module, "open_storage", open_storage)
    return opened


def make_sources(root: Path) -> dict[str, str]:
    """web and code in buckets, math in a local folder; distinct ids per source so every sample names its source."""
    write_shards(root / "web-bucket", 10, first_id=0)
    write_shards(root / "code-bucket", 6, first_id=400)
    write_shards(root / "math", 3, samples=4, first_id=800)  # its eval shard: one global micro-batch (4 samples)
    return {"web": (root / "web-bucket").as_uri(), "code": (root / "code-bucket").as_uri(), "math": str(root / "math")}


def mixture_config(root: Path, urls: dict[str, str], weights: dict[str, str], **changes) -> SimpleNamespace:
    inline = ",".join(f"{name}={urls[name]}:{weight}" for name, weight in weights.items())
    return config(root / "data", data_mixture=inline, eval_shards=1, block_chunks=3, **changes)


def expected_sample(root: Path, place: Path, path: str, sample: int) -> np.ndarray:
    ids = np.load(place / path)["input_ids"].reshape(-1)
    return ids[sample * SEQ_LEN:(sample + 1) * SEQ_LEN]


def test_a_fresh_mixture_fetches_each_source_into_its_folder_and_only_the_first_steps_shards_before_step_1(
        tmp_path, buckets, monkeypatch):
    monkeypatch.setattr(shard_fetch, "FETCH_WORKERS", 1)
    urls = make_sources(tmp_path)
    cfg = mixture_config(tmp_path, urls, {"web": "0.5", "code": "0.3", "math": "0.2"})
    for url in (urls["web"], urls["code"]):
        buckets.setdefault(url, HeldStorage(url, None)).hold.set()
    training = prepare_training_data(cfg, ONE_PROCESS, None)
    try:
        frozen, order = training.frozen, training.order
        assert frozen.names == ["web", "code", "math"] and frozen.mixture
        assert [len(s.train) for s in frozen.sources] == [9, 5, 2] and all(len(s.eval) == 1 for s in frozen.sources)
        assert isinstance(training.train, MixtureSamples) and set(training.eval) == {"web", "code", "math"}
        # Only the shards the first step reads, across sources, and the eval shards are local at return.
        first = {}
        for index in range(STEP_SAMPLES):
            source, part, shard, _ = order.locate(index)
            named = frozen.sources[source]
            first.setdefault(named.name, set()).add(named.parts[part].train[shard].path)
        for name in ("web", "code"):
            local = local_npz(tmp_path / "data" / name)
            assert local == first.get(name, set()) | {s.path for s in frozen.sources[frozen.names.index(name)].eval}
        assert not (tmp_path / "data" / "math").exists()  # a local folder is read where it is
        described = training.describe()
        assert "mixture of 3 sources" in described and "web 50% (9 shards, 45 samples, 1 eval)" in described
        for url in (urls["web"], urls["code"]):
            buckets[url].release.set()
        # Every sample is the right tokens from the right source, wherever it lives.
        places = {"web": tmp_path / "web-bucket", "code": tmp_path / "code-bucket", "math": tmp_path / "math"}
        for index in range(0, 240, 7):
            source, part, shard, sample = order.locate(index)
            name = frozen.sources[source].name
            path = frozen.sources[source].parts[part].train[shard].path
            np.testing.assert_array_equal(training.train[index].numpy(),
                                          expected_sample(tmp_path, places[name], path, sample))
        # DataLoader workers (other processes) read the same samples through a pickled copy.
        loader = iter(make_train_loader(training.train, 20, 4, 0, 1, num_workers=1))
        assert torch.equal(torch.cat([next(loader) for _ in range(3)]),
                           torch.stack([training.train[i] for i in range(20, 32)]))
        wait_until(lambda: local_npz(tmp_path / "data" / "web") == {s.path for s in frozen.sources[0].all})
        accounting = training.accounting(200)
        assert {name: n["samples"] for name, n in accounting.items()} == {"web": 100, "code": 60, "math": 40}
        assert accounting["math"]["epoch"] == 40 // 8 and training.epoch_at(200) == 40 // 8
        assert training.metric_values(200)["data/tokens/code"] == 60 * SEQ_LEN
        record = json.loads(json.dumps(frozen.to_json()))
        assert FrozenData.from_json(record) == frozen and record["train_files"] == 16
    finally:
        for storage in buckets.values():
            storage.release.set()
        training.close()


def test_growth_on_resume_adds_a_source_and_shards_and_the_old_record_keeps_the_old_order(tmp_path, buckets, caplog):
    urls = make_sources(tmp_path)
    weights = {"web": "0.6", "code": "0.4"}
    first = prepare_training_data(mixture_config(tmp_path, urls, weights), ONE_PROCESS, None)
    before = FrozenData.from_json(json.loads(json.dumps(first.frozen.to_json())))
    first.close()
    at, step = 24 * STEP_SAMPLES, 24
    write_shards(tmp_path / "web-bucket" / "more", 2, first_id=600)  # appended to web's bucket
    grown_weights = {**weights, "math": "0.5"}

    without = mixture_config(tmp_path, urls, grown_weights)
    with pytest.raises(ValueError, match=r"source\(s\) math are not in this run's frozen mixture.*--data-growth true"):
        prepare_training_data(without, ONE_PROCESS, before, at, step)
    kept = prepare_training_data(mixture_config(tmp_path, urls, weights), ONE_PROCESS, before, at, step)
    kept.close()
    assert kept.frozen == before and not kept.grew  # more shards in the bucket, but no --data-growth: ignored

    caplog.set_level(logging.INFO)
    grown_run = prepare_training_data(mixture_config(tmp_path, urls, grown_weights, data_growth=True), ONE_PROCESS,
                                      before, at, step)
    try:
        after = grown_run.frozen
        assert grown_run.grew and after.names == ["web", "code", "math"] and len(after.growth) == 1
        assert len(after.sources[0].parts) == 2 and after.sources[0].parts[1].train[0].path.startswith("more/")
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data growth at step 24: ")]
        assert len(said) == 3 and said[0].startswith("data growth at step 24: web: +2 shards")
        assert said[1].startswith("data growth at step 24: math: new source")
        assert said[2].endswith("weights from sample 96 on: web 40%, code 26.7%, math 33.3%")
        old, new = MixtureOrder(before, SEQ_LEN, 7), grown_run.order
        assert [old.locate(i) for i in range(at)] == [new.locate(i) for i in range(at)]
        assert [new.locate(i)[0] for i in range(at, at + 30)].count(2) == 10  # math takes a third from `at` on
        np.testing.assert_array_equal(grown_run.train[at + 2].numpy(), grown_run.train[at + 2].numpy())
        assert new.accounting(at + 30)["math"]["samples"] == 10
    finally:
        grown_run.close()
    # Going back to the pre-growth checkpoint: the same order as before the growth, at every sample.
    again = prepare_training_data(mixture_config(tmp_path, urls, weights), ONE_PROCESS, before, at, step)
    again.close()
    assert [again.order.locate(i) for i in range(3 * at)] == [old.locate(i) for i in range(3 * at)]


def test_a_single_dataset_grows_only_with_data_growth(tmp_path):
    data_dir = tmp_path / "data"
    write_shards(data_dir, 6)
    first = prepare_training_data(config(data_dir, eval_shards=1), ONE_PROCESS, None)
    first.close()
    write_shards(data_dir / "zz", 2, first_id=300)  # sorts last: the --eval-shards rule would hold out zz/...001
    ignored = prepare_training_data(config(data_dir, eval_shards=1), ONE_PROCESS, first.frozen, 12, 3)
    ignored.close()
    assert ignored.frozen == first.frozen and "version" not in ignored.frozen.to_json()
    grown_run = prepare_training_data(config(data_dir, eval_shards=1, data_growth=True), ONE_PROCESS, first.frozen,
                                      12, 3)
    grown_run.close()
    assert grown_run.grew and [len(p.train) for p in grown_run.frozen.sources[0].parts] == [5, 2]
    # The shard the rule held out stays the eval shard; the one it would hold out now is new training data.
    assert grown_run.frozen.sources[0].eval == first.frozen.eval
    assert [s.path for s in grown_run.frozen.sources[0].parts[1].train] == ["zz/part/shard_000.npz", "zz/shard_001.npz"]
    assert [grown_run.order.locate(i)[2:] for i in range(12)] == [first.train.order.locate(i) for i in range(12)]


def write_manifest(folder: Path, vocab: int, tokenizer: bytes, eval_paths: tuple[str, ...] = ()) -> None:
    (folder / "tokenizer.json").write_bytes(tokenizer)
    paths = sorted(local_npz(folder))
    entries = [{"path": p, "num_tokens": int(np.load(folder / p)["input_ids"].size),
                "size_bytes": (folder / p).stat().st_size} for p in paths]
    manifest = {"format_version": 2, "tokenizer": {"file": "tokenizer.json",
                                                   "sha256": hashlib.sha256(tokenizer).hexdigest()},
                "vocab_size": vocab, "eos_token_id": 0, "shards": [e for e in entries if e["path"] not in eval_paths],
                "eval_shards": [e for e in entries if e["path"] in eval_paths]}
    (folder / DATASET_JSON).write_text(json.dumps(manifest))


def test_sources_tokenized_differently_or_missing_are_one_line(tmp_path, buckets):
    urls = make_sources(tmp_path)
    write_manifest(tmp_path / "math", VOCAB, b'{"a": 1}')
    write_manifest(tmp_path / "code-bucket", VOCAB, b'{"b": 2}')
    with pytest.raises(ValueError) as caught:
        dataset_module.freeze_data(mixture_config(tmp_path, urls, {"code": 1, "math": 1}),
                                   dataset_module.parse_mixture(f"code={urls['code']}:1,math={urls['math']}:1"), 4)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("--data-mixture: sources code and math were tokenized differently")
    assert "prepare every source with the same --tokenizer" in message

    missing = f"web={urls['web']}:1,books={tmp_path / 'no-books'}:1"
    with pytest.raises(FileNotFoundError, match=r"^--data-mixture: source books \(.*no-books\) does not exist"):
        prepare_training_data(config(tmp_path / "data", data_mixture=missing), ONE_PROCESS, None)
    empty_bucket = tmp_path / "empty-bucket"
    empty_bucket.mkdir()
    with pytest.raises(FileNotFoundError, match=r"^--data-mixture: source books: .*empty-bucket: no .npz shards"):
        prepare_training_data(config(tmp_path / "data", data_mixture=f"books={empty_bucket.as_uri()}:1"),
                              ONE_PROCESS, None)


def test_the_eval_split_of_dataset_json_is_held_out_and_max_files_counts_training_shards(tmp_path):
    data_dir = tmp_path / "data"
    write_shards(data_dir, 6)
    eval_paths = ("part/shard_000.npz", "shard_003.npz")
    write_manifest(data_dir, VOCAB, b"{}", eval_paths)
    frozen = dataset_module.freeze_shards(config(data_dir, eval_shards=1, max_files=2))
    assert [s.path for s in frozen.eval] == list(eval_paths)
    assert [s.path for s in frozen.train] == ["part/shard_004.npz", "shard_001.npz"]
    everything = dataset_module.freeze_shards(config(data_dir, eval_shards=1))
    assert len(everything.train) == 4 and not {s.path for s in everything.train} & set(eval_paths)
    (data_dir / "shard_003.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"dataset.json: lists eval shard shard_003.npz, which is not there"):
        dataset_module.freeze_shards(config(data_dir))


def test_stages_become_global_samples_with_the_batch_of_step_0(tmp_path, buckets):
    urls = make_sources(tmp_path)
    (tmp_path / "mix.yaml").write_text(
        f"sources:\n  - {{name: web, url: '{urls['web']}', weight: 1}}\n  - {{name: code, url: '{urls['code']}', "
        f"weight: 1}}\nstages:\n  - {{step: 5, weights: {{code: 1}}}}\n")
    training = prepare_training_data(config(tmp_path / "data", data_mixture=str(tmp_path / "mix.yaml"), eval_shards=1,
                                            block_chunks=3), ONE_PROCESS, None)
    training.close()
    assert training.frozen.segments == ((0, (Fraction(1), Fraction(1))), (5 * STEP_SAMPLES, (Fraction(0), Fraction(1))))
    assert "1 later change(s) of the weights" in training.describe()
    counts = training.order.source_counts(5 * STEP_SAMPLES + 10)
    assert counts == [10, 20]
