"""Mixtures as pure functions, no training: the weighted interleave, the --data-mixture spec, the composed order with
stages, per-source accounting from the order (1 and 2 processes, resumed on another count), growth without repeats,
and the frozen record's versions."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from pretrain.data.format import ShardInfo
from pretrain.data.mixture import FLAG, Interleave, MixtureError, parse_mixture
from pretrain.data.order import LEGACY_ORDER, OrderSpec, SampleOrder
from pretrain.data.samples import rank_batches
from pretrain.data.sources import (
    FrozenData,
    FrozenSource,
    Growth,
    MixtureOrder,
    Part,
    grown,
    within_segments,
)
from pretrain.data.training_data import FrozenShards

SEQ_LEN = 8
SEED = 11
ORDER = OrderSpec(mix_shards=4, shard_chunks=2)
F = Fraction


def shards(prefix: str, samples: list[int]) -> tuple[ShardInfo, ...]:
    return tuple(ShardInfo(f"{prefix}/s{i:03d}.npz", n * SEQ_LEN + i % 3, 1000 + i) for i, n in enumerate(samples))


def mixture(sources: dict[str, list[int]], segments) -> FrozenData:
    frozen = tuple(FrozenSource(name, f"gs://b/{name}", (Part(shards(name, sizes), ORDER, 100 + k),))
                   for k, (name, sizes) in enumerate(sources.items()))
    return FrozenData(frozen, tuple((start, tuple(F(w) for w in weights)) for start, weights in segments))


def identity(order: MixtureOrder, index: int) -> tuple[str, str, int]:
    """What a sample is: its source, its shard and its place in the shard (the same sample in every epoch)."""
    source, part, shard, sample = order.locate(index)
    return order.frozen.sources[source].name, order.frozen.sources[source].parts[part].train[shard].path, sample


# The weighted interleave.

@pytest.mark.parametrize("trial", range(30))
def test_interleave_counts_partition_every_prefix_and_locate_agrees(trial):
    rng = np.random.default_rng(trial)
    streams = int(rng.integers(1, 6))
    starts = sorted({0, *(int(s) for s in rng.integers(1, 400, size=int(rng.integers(0, 4))))})
    segments = []
    for start in starts:
        weights = [F(int(w), int(rng.integers(1, 9))) for w in rng.integers(0, 5, size=streams)]
        weights[int(rng.integers(streams))] += 1  # a positive sum
        segments.append((start, weights))
    interleave = Interleave(segments, streams)
    seen = [0] * streams
    for index in range(600):
        stream, within = interleave.locate(index)
        assert within == seen[stream]
        seen[stream] += 1
        assert interleave.counts(index + 1) == seen
    # Within one sample per stream of the exact share of every prefix of a segment, and exact at its period.
    start, weights = segments[-1]
    total = sum(weights)
    base = interleave.counts(start)
    for n in range(0, 300, 7):
        counts = interleave.counts(start + n)
        for s in range(streams):
            assert abs(counts[s] - base[s] - n * weights[s] / total) <= streams
    period = int(np.lcm.reduce([(w / total).denominator for w in weights]))
    counts = interleave.counts(start + period)
    assert [c - b for c, b in zip(counts, base)] == [period * w / total for w in weights]


def test_interleave_is_o1_far_out_and_skips_zero_weights():
    interleave = Interleave([(0, [F(7, 10), F(0), F(3, 10)]), (10**6, [F(1), F(1), F(0)])], 3)
    far = 10**15 + 3
    counts, after = interleave.counts(far), interleave.counts(far + 1)
    stream, within = interleave.locate(far)
    assert [b - a for a, b in zip(counts, after)] == [int(s == stream) for s in range(3)] and within == counts[stream]
    assert interleave.counts(10**6) == [700_000, 0, 300_000]
    assert interleave.counts(10**6 + 10) == [700_005, 5, 300_000]
    with pytest.raises(ValueError, match="positive sum"):
        Interleave([(0, [F(0), F(0)])], 2)


# The --data-mixture spec.

def test_inline_and_file_mixtures_parse_to_exact_weights_and_stages(tmp_path):
    spec = parse_mixture("web=gs://b/web:0.7, code=s3://c/code/:0.3,books=/data/books:1/10")
    assert spec.names == ["web", "code", "books"]
    assert [s.url for s in spec.sources] == ["gs://b/web", "s3://c/code/", "/data/books"]
    assert [s.weight for s in spec.sources] == [F(7, 10), F(3, 10), F(1, 10)]
    assert parse_mixture("") is None

    (tmp_path / "books").mkdir()
    (tmp_path / "mix.yaml").write_text(
        "sources:\n"
        "  - {name: web, url: gs://b/web, weight: 0.6}\n"
        "  - {name: code, url: az://c/code, weight: 0.4}\n"
        "  - {name: books, url: books, weight: 0}\n"
        "stages:\n"
        "  - {step: 90, weights: {books: 0.5, code: 0.5}}\n"
        "  - {tokens: 20000, weights: {web: 1}}\n")
    spec = parse_mixture(str(tmp_path / "mix.yaml"))
    assert spec.source("books").url == str(tmp_path / "books")  # relative to the file
    assert spec.segments(seq_len=SEQ_LEN, global_batch_samples=16) == [
        (0, {"web": F(3, 5), "code": F(2, 5), "books": F(0)}),
        (90 * 16, {"web": F(0), "code": F(1, 2), "books": F(1, 2)}),
        (2500, {"web": F(1), "code": F(0), "books": F(0)}),
    ]
    (tmp_path / "mix.json").write_text(json.dumps({"sources": [{"name": "a", "url": "file:///x", "weight": 2}]}))
    assert parse_mixture(str(tmp_path / "mix.json")).sources[0].weight == 2


@pytest.mark.parametrize("value, fragment", [
    ("web=gs://b/web:0.7,code=gs://b/code:heavy", "'heavy', which does not parse as a number"),
    ("web=gs://b/web:-1", "must not be negative"),
    ("web=gs://b/web", "is not NAME=URL:WEIGHT"),
    ("web=gs://b/web:1,web=gs://b/x:1", "listed twice"),
    ("we b=gs://b/web:1", "source name 'we b'"),
    ("web=gs://b/web:0,code=gs://b/code:0", "add up to 0"),
    ("FILE:missing.yaml", "no such mixture file"),
    ("FILE:sources:\n  - {name: a, url: x, weight: 1, wieght: 2}\n", "unknown key(s) wieght"),
    ("FILE:sources:\n  - {name: a, url: x, weight: 1}\nstages:\n  - {step: 5, weights: {b: 1}}\n",
     "names source 'b'"),
    ("FILE:sources:\n  - {name: a, url: x, weight: 1}\nstages:\n  - {step: 5, weights: {a: 1}}\n"
     "  - {step: 4, weights: {a: 1}}\n", "does not start after the one before it"),
    ("FILE:sources: [ {name: a\n", "not readable as YAML"),
    ("FILE:sources:\n  - {name: a, url: x}\n", "needs name, url and weight"),
])
def test_a_bad_mixture_is_one_line_naming_the_flag(tmp_path, value, fragment):
    if value.startswith("FILE:"):
        path = tmp_path / "mix.yaml"
        if value != "FILE:missing.yaml":
            path.write_text(value[5:])
        value = str(path)
    with pytest.raises(MixtureError) as caught:
        spec = parse_mixture(value)
        spec.segments(SEQ_LEN, 16)
    message = str(caught.value)
    assert message.startswith(FLAG) and fragment in message and "\n" not in message, message


# The composed order, its accounting and its stages.

SOURCES = {"web": [40, 33, 57, 48, 21, 30], "code": [25, 19, 30], "math": [7, 5]}  # math is small: it wraps
WEIGHTS = [F(5, 10), F(3, 10), F(2, 10)]


def test_a_single_dataset_is_a_mixture_of_one_with_the_order_it_always_had():
    train = shards("d", [5, 1, 0, 12, 7, 3, 9, 30, 2])
    frozen = FrozenData.single(train, (), ORDER)
    plain = SampleOrder(list(train), SEQ_LEN, SEED, ORDER.mix_shards, ORDER.shard_chunks)
    composed = MixtureOrder(frozen, SEQ_LEN, SEED)
    for index in itertools.chain(range(3 * plain.samples_per_epoch), [10**12 + 5]):
        assert composed.locate(index)[2:] == plain.locate(index) and composed.locate(index)[:2] == (0, 0)
    assert composed.source_epochs(3 * plain.samples_per_epoch - 1) == [2]
    # Its record is the one checkpoints held before mixtures, and old records still load with their order.
    old = FrozenShards(train, (), ORDER).to_json()
    assert frozen.to_json() == old and FrozenData.from_json(old) == frozen
    legacy = {"train": old["train"], "eval": []}
    assert FrozenData.from_json(legacy).order == LEGACY_ORDER


def shares_read_by_ranks(order: MixtureOrder, start: int, steps: int, per_device: int, world: int) -> Counter:
    """Tokens per source that `world` ranks read over `steps` optimizer steps from global sample `start`, each rank
    taking its own micro-batches as the loaders do, every sample located in the order."""
    read = Counter()
    streams = [rank_batches(start, per_device, rank, world) for rank in range(world)]
    accumulation = 16 // (per_device * world)
    for _ in range(steps * accumulation):
        for stream in streams:
            for index in next(stream):
                read[identity(order, index)[0]] += SEQ_LEN
    return read


def test_tokens_per_source_match_the_weights_with_1_and_2_processes_and_after_resuming_on_another_count():
    order = MixtureOrder(mixture(SOURCES, [(0, WEIGHTS)]), SEQ_LEN, SEED)
    steps = 300  # 16 samples per step
    one = shares_read_by_ranks(order, 0, steps, per_device=8, world=1)
    two = shares_read_by_ranks(order, 0, steps, per_device=4, world=2)
    resumed = shares_read_by_ranks(order, 0, 120, 4, 2) + shares_read_by_ranks(order, 120 * 16, steps - 120, 8, 1)
    total = steps * 16 * SEQ_LEN
    for read in (one, two, resumed):
        assert read == one  # the same samples whoever reads them
        for name, weight in zip(SOURCES, WEIGHTS):
            assert abs(read[name] / total - weight) < 0.01 * weight, (name, read[name] / total, weight)
    # The accounting the run logs comes from the order alone, and agrees with what the ranks read.
    accounting = order.accounting(steps * 16)
    assert {name: numbers["tokens"] for name, numbers in accounting.items()} == dict(one)
    # math (12 samples per epoch) ran out many times; its epoch is counted, the others' too.
    math_samples = sum(n for n in SOURCES["math"])
    assert accounting["math"]["epoch"] == accounting["math"]["samples"] // math_samples > 10
    assert accounting["web"]["epoch"] == accounting["web"]["samples"] // sum(SOURCES["web"])


def test_each_source_reads_every_sample_once_per_epoch_of_its_own():
    order = MixtureOrder(mixture(SOURCES, [(0, WEIGHTS)]), SEQ_LEN, SEED)
    per_source: dict[str, list] = {name: [] for name in SOURCES}
    for index in range(4000):
        name, path, sample = identity(order, index)
        per_source[name].append((path, sample))
    for name, sizes in SOURCES.items():
        epoch = sum(sizes)
        seen = per_source[name]
        for start in range(0, len(seen) - epoch + 1, epoch):
            assert len(set(seen[start:start + epoch])) == epoch, name
        assert set(seen[:epoch]) == {(f"{name}/s{i:03d}.npz", j) for i, n in enumerate(sizes) for j in range(n)}


def test_a_stage_changes_the_shares_at_its_sample_and_the_order_before_it_stays():
    stage_at = 50 * 16
    staged = MixtureOrder(mixture(SOURCES, [(0, WEIGHTS), (stage_at, [0, 1, 1])]), SEQ_LEN, SEED)
    unstaged = MixtureOrder(mixture(SOURCES, [(0, WEIGHTS)]), SEQ_LEN, SEED)
    assert all(staged.locate(i) == unstaged.locate(i) for i in range(stage_at))
    before, after = staged.source_counts(stage_at), staged.source_counts(stage_at + 1600)
    assert [b - a for a, b in zip(before, after)] == [0, 800, 800]
    # Each source continues its own order across the stage: its next samples are the ones it had not read.
    web_end, code_start = staged.source_counts(stage_at)[0], staged.source_counts(stage_at)[1]
    assert staged.locate_part(stage_at + 1)[2] in (code_start, code_start + 1)
    assert staged.source_counts(10**9)[0] == web_end


# Growth.

def consumed_identities(order: MixtureOrder, end: int) -> list[tuple[str, str, int]]:
    return [identity(order, index) for index in range(end)]


def first_pass_end(order: MixtureOrder, limit: int) -> int:
    """The first global sample at which some part begins its second pass: up to there nothing may repeat."""
    for index in range(limit):
        source, part, position = order.locate_part(index)
        if position >= order.sizes[source][part]:
            return index
    return limit


def test_growth_adds_a_source_and_shards_and_no_sample_is_read_twice_before_a_source_runs_out():
    sizes = {"web": [40, 33, 57, 48] * 3, "code": [25, 19, 30, 21, 18] * 4}
    before = mixture(sizes, [(0, [F(1, 2), F(1, 2)])])
    at = 37 * 16  # the step where the resumed run is given more data
    web_new = shards("web", sizes["web"] + [22, 31])  # two shards appended
    current = {"web": ("gs://b/web", list(web_new), []),
               "code": ("gs://b/code", list(shards("code", sizes["code"])), []),
               "books": ("gs://b/books", list(shards("books", [26, 28, 30] * 3)), list(shards("books-eval", [4])))}
    segments_from = [(0, {"web": F(1, 2), "code": F(1, 2), "books": F(0)}),
                     (at - 16, {"web": F(2), "code": F(1), "books": F(1)})]
    after = grown(before, at, 37, SEQ_LEN, SEED, ORDER, current, segments_from)
    old_order, new_order = MixtureOrder(before, SEQ_LEN, SEED), MixtureOrder(after, SEQ_LEN, SEED)

    # One line per source that changed, and the new weights; recorded in the record, which round-trips.
    assert len(after.growth) == 1 and after.growth[0].at == at and after.growth[0].step == 37
    lines = after.growth[0].lines
    assert lines[0].startswith("web: +2 shards") and lines[1].startswith("books: new source, 9 shards")
    assert lines[2] == "weights from sample 592 on: web 50%, code 25%, books 25%"
    assert FrozenData.from_json(json.loads(json.dumps(after.to_json()))) == after
    assert after.to_json()["train_files"] == 14 + 20 + 9

    # Samples before the growth keep their identities; the pre-growth record still gives the pre-growth order.
    assert consumed_identities(new_order, at) == consumed_identities(old_order, at)
    reloaded = MixtureOrder(FrozenData.from_json(json.loads(json.dumps(before.to_json()))), SEQ_LEN, SEED)
    assert [reloaded.locate(i) for i in range(3000)] == [old_order.locate(i) for i in range(3000)]

    # Nothing is consumed twice until some part has read all of its samples (every sample of the run, counted from
    # the order); that point comes only after the appended shards and the rest of web's epoch were all read.
    end = first_pass_end(new_order, 6000)
    consumed = consumed_identities(new_order, end)
    assert len(consumed) == len(set(consumed)) == end > at + 500
    web_total = sum(sizes["web"]) + 22 + 31
    assert sum(1 for name, _, _ in consumed if name == "web") == web_total  # every web sample, old and new, once
    assert {path for name, path, _ in consumed if name == "web"} >= {s.path for s in web_new[-2:]}
    assert {name for name, _, _ in consumed[at:]} == {"web", "code", "books"}


def test_a_joining_part_and_the_rest_of_the_epoch_finish_together_then_run_in_step():
    parts = (Part(shards("web", [12, 9]), ORDER, 1), Part(shards("new", [5, 6]), ORDER, 2, 8))
    source = FrozenSource("web", "u", parts)
    segments = within_segments(source, SEQ_LEN)
    assert segments == [(0, (F(21), F(0))), (8, (F(13), F(11))), (32, (F(21), F(11)))]
    within = Interleave(segments, 2)
    assert within.counts(32) == [21, 11]  # both at the end of an epoch: nothing of either read twice
    assert within.counts(32 + 32 * 5) == [21 * 6, 11 * 6]  # then in step, epoch after epoch
    # A second growth inside the catch-up: what is left of every part's epoch again comes first, all of it once.
    third = Part(shards("third", [4]), ORDER, 3, 20)
    grown_twice = FrozenSource("web", "u", source.parts + (third,))
    within = Interleave(within_segments(grown_twice, SEQ_LEN), 3)
    frozen = FrozenData((grown_twice,), ((0, (F(1),)),))
    order = MixtureOrder(frozen, SEQ_LEN, SEED)
    end = first_pass_end(order, 500)
    consumed = consumed_identities(order, end)
    assert len(consumed) == len(set(consumed)) == 21 + 11 + 4
    assert within.counts(end) == [21, 11, 4]


def test_growth_of_a_single_dataset_run_and_growth_with_nothing_new():
    train = shards("d", [10, 12, 9])
    frozen = FrozenData.single(train, shards("e", [3]), ORDER)
    assert grown(frozen, 20, 5, SEQ_LEN, SEED, ORDER, {"data": ("data", list(train), [])}, None) is frozen
    more = list(train) + list(shards("d2", [8]))
    after = grown(frozen, 20, 5, SEQ_LEN, SEED, ORDER, {"data": ("data", more, [])}, None)
    assert not after.mixture and len(after.sources[0].parts) == 2 and after.sources[0].parts[1].since == 20
    assert "version" in after.to_json() and FrozenData.from_json(after.to_json()) == after
    plain, composed = MixtureOrder(frozen, SEQ_LEN, SEED), MixtureOrder(after, SEQ_LEN, SEED)
    assert [plain.locate(i) for i in range(20)] == [composed.locate(i) for i in range(20)]
    end = first_pass_end(composed, 400)
    consumed = consumed_identities(composed, end)
    assert len(consumed) == len(set(consumed)) == 31 + 8


def test_records_of_an_unknown_version_are_refused_in_one_line():
    frozen = mixture({"a": [3]}, [(0, [1])])
    record = {**frozen.to_json(), "version": 7}
    with pytest.raises(ValueError, match=r"^the checkpoint's data record is version 7"):
        FrozenData.from_json(record)
    assert FrozenData.from_json(frozen.to_json()) == frozen
    assert Growth.from_json(Growth(5, 1, ("x",)).to_json()) == Growth(5, 1, ("x",))


def test_the_mixture_flags_are_config_fields_checked_with_the_others():
    from pretrain.cli import build_parser, parse_config

    config = parse_config(["--data-mixture", "web=gs://b/web:1,code=gs://b/code:3", "--data-growth", "true"])
    assert config.data_mixture == "web=gs://b/web:1,code=gs://b/code:3" and config.data_growth
    assert parse_config([]).data_mixture == "" and not parse_config([]).data_growth
    with pytest.raises(ValueError, match=r"^--data-mixture web=gs://b/web:x: the weight of source web is 'x'"):
        parse_config(["--data-mixture", "web=gs://b/web:x"])
    with pytest.raises(ValueError, match=r"^--data-mixture and --data-bucket: pass one"):
        parse_config(["--data-mixture", "web=gs://b/web:1", "--data-bucket", "gs://b/data"])
    help_text = " ".join(build_parser(config).format_help().split())
    assert "--data-mixture STR several datasets: NAME=URL:WEIGHT" in help_text and "--data-growth [BOOL]" in help_text
