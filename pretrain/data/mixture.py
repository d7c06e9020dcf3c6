"""Data mixtures: the --data-mixture spec (inline, or a YAML/JSON file of sources and stages) and the weighted
interleave of streams over sample indices, a pure function with exact counts and lookups in O(streams) at any index.
Standard library only: the launcher and the flag checks import it before anything heavy."""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

FLAG = "--data-mixture"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FILE_SUFFIXES = (".yaml", ".yml", ".json")
SOURCE_KEYS = {"name", "url", "weight"}
STAGE_KEYS = {"step", "tokens", "weights"}
REMOTE_SCHEMES = ("gs://", "s3://", "az://", "file://")


class MixtureError(ValueError):
    """A mixture that cannot be used; the message is one line naming --data-mixture."""


@dataclass(frozen=True)
class SourceSpec:
    name: str
    url: str  # a bucket URL (gs://, s3://, az://, file://) or a local folder
    weight: Fraction

    @property
    def is_remote(self) -> bool:
        return self.url.startswith(REMOTE_SCHEMES)


@dataclass(frozen=True)
class StageSpec:
    """From `step` (optimizer steps) or `tokens` on, the weights become `weights` (sources it does not name: 0)."""

    weights: tuple[tuple[str, Fraction], ...]
    step: int | None = None
    tokens: int | None = None

    def start_sample(self, seq_len: int, global_batch_samples: int) -> int:
        if self.step is not None:
            return self.step * global_batch_samples
        return -(-self.tokens // seq_len)  # the first sample that starts at or after that token


@dataclass(frozen=True)
class MixtureSpec:
    sources: tuple[SourceSpec, ...]
    stages: tuple[StageSpec, ...] = ()
    origin: str = ""  # the flag's value, for messages

    @property
    def names(self) -> list[str]:
        return [source.name for source in self.sources]

    def source(self, name: str) -> SourceSpec | None:
        return next((s for s in self.sources if s.name == name), None)

    def segments(self, seq_len: int, global_batch_samples: int) -> list[tuple[int, dict[str, Fraction]]]:
        """(first global sample, weights by name) of the base mixture and each stage, starts strictly increasing.
        Steps become samples with the global batch of the moment this is frozen (a later change of the batch moves
        the stage in steps, not in samples)."""
        segments = [(0, {s.name: s.weight for s in self.sources})]
        for stage in self.stages:
            start = stage.start_sample(seq_len, global_batch_samples)
            where = f"step {stage.step}" if stage.step is not None else f"tokens {stage.tokens}"
            if start <= segments[-1][0] and not (start == 0 and len(segments) == 1):
                raise MixtureError(f"{FLAG} {self.origin}: the stage at {where} (sample {start:,}) does not start "
                                   f"after the one before it; list stages in increasing order")
            weights = {name: Fraction(0) for name in self.names} | dict(stage.weights)
            segments = segments[:-1] if start == 0 else segments
            segments.append((start, weights))
        return segments


def parse_mixture(value: str) -> MixtureSpec | None:
    """The mixture `value` names: inline `NAME=URL:WEIGHT,...`, or a .yaml/.yml/.json file; None for ''."""
    value = value.strip()
    if not value:
        return None
    if value.lower().endswith(FILE_SUFFIXES) or ("=" not in value and Path(value).is_file()):
        return _parse_file(Path(value))
    return _parse_inline(value)


def _parse_inline(value: str) -> MixtureSpec:
    sources = []
    for item in value.split(","):
        item = item.strip()
        name, equals, rest = item.partition("=")
        url, colon, weight = rest.rpartition(":")
        if not equals or not colon or weight.startswith("/") or not url:  # "gs://b" alone: no weight
            raise MixtureError(f"{FLAG} {value}: {item!r} is not NAME=URL:WEIGHT (for example "
                               f"web=gs://bucket/web:0.7); or pass a mixture file ending in .yaml or .json")
        sources.append(_source(value, name.strip(), url.strip(), weight.strip()))
    return _checked(MixtureSpec(tuple(sources), (), value))


def _parse_file(path: Path) -> MixtureSpec:
    origin = str(path)
    if not path.is_file():
        raise MixtureError(f"{FLAG} {origin}: no such mixture file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            document = json.loads(text)
        else:
            import yaml  # PyYAML, installed with accelerate and transformers

            document = yaml.safe_load(text)
    except Exception as error:  # noqa: BLE001 - yaml's and json's errors alike become one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MixtureError(f"{FLAG} {origin}: not readable as {path.suffix.lstrip('.').upper()} ({first})") from None
    if not isinstance(document, dict) or not isinstance(document.get("sources"), list) or not document["sources"]:
        raise MixtureError(f"{FLAG} {origin}: expected a mapping with a non-empty list `sources:` of name, url and "
                           f"weight (see README, Data mixtures)")
    _no_unknown_keys(origin, "the file", document, {"sources", "stages"})
    sources = []
    for index, entry in enumerate(document["sources"]):
        if not isinstance(entry, dict) or not SOURCE_KEYS <= set(entry):
            raise MixtureError(f"{FLAG} {origin}: source {index + 1} needs name, url and weight, it has "
                               f"{sorted(entry) if isinstance(entry, dict) else entry!r}")
        _no_unknown_keys(origin, f"source {entry['name']}", entry, SOURCE_KEYS)
        url = str(entry["url"])
        if not url.startswith(REMOTE_SCHEMES) and not Path(url).is_absolute():
            url = str((path.parent / url).resolve())  # a relative folder is relative to the mixture file
        sources.append(_source(origin, str(entry["name"]), url, entry["weight"]))
    names = [s.name for s in sources]
    stages = []
    for index, entry in enumerate(document.get("stages") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("weights"), dict) or \
                (("step" in entry) == ("tokens" in entry)):
            raise MixtureError(f"{FLAG} {origin}: stage {index + 1} needs `weights:` and one of `step:` or `tokens:`")
        _no_unknown_keys(origin, f"stage {index + 1}", entry, STAGE_KEYS)
        weights = []
        for name, weight in entry["weights"].items():
            if name not in names:
                raise MixtureError(f"{FLAG} {origin}: stage {index + 1} names source {name!r}, which is not among the "
                                   f"sources ({', '.join(names)})")
            weights.append((name, _weight(origin, f"source {name} in stage {index + 1}", weight)))
        if sum(w for _, w in weights) <= 0:
            raise MixtureError(f"{FLAG} {origin}: the weights of stage {index + 1} add up to 0")
        key = "step" if "step" in entry else "tokens"
        start = entry[key]
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise MixtureError(f"{FLAG} {origin}: stage {index + 1} has {key}: {start!r}; expected a whole number >= 0")
        stages.append(StageSpec(tuple(weights), **{key: start}))
    return _checked(MixtureSpec(tuple(sources), tuple(stages), origin))


def _source(origin: str, name: str, url: str, weight) -> SourceSpec:
    if not NAME_PATTERN.match(name):
        raise MixtureError(f"{FLAG} {origin}: source name {name!r} must be letters, digits, '_', '-' or '.' "
                           f"(it names a folder under --data-dir and a metric)")
    return SourceSpec(name, url, _weight(origin, f"source {name}", weight))


def _weight(origin: str, what: str, weight) -> Fraction:
    """Exact: 0.7 is 7/10, so the interleave's counts do not depend on float rounding."""
    try:
        if isinstance(weight, bool):
            raise ValueError
        value = Fraction(str(weight).strip())
    except (ValueError, ZeroDivisionError):
        raise MixtureError(f"{FLAG} {origin}: the weight of {what} is {weight!r}, which does not parse as a number "
                           f"(for example 0.7 or 7/10)") from None
    if value < 0:
        raise MixtureError(f"{FLAG} {origin}: the weight of {what} is {weight}; weights must not be negative")
    return value


def _no_unknown_keys(origin: str, what: str, entry: dict, known: set[str]) -> None:
    unknown = sorted(set(entry) - known)
    if unknown:
        raise MixtureError(f"{FLAG} {origin}: {what} has unknown key(s) {', '.join(map(str, unknown))}; "
                           f"expected {', '.join(sorted(known))}")


def _checked(spec: MixtureSpec) -> MixtureSpec:
    names = spec.names
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise MixtureError(f"{FLAG} {spec.origin}: source {duplicate!r} is listed twice")
    if sum(s.weight for s in spec.sources) <= 0 and not any(stage.start_sample(1, 1) == 0 for stage in spec.stages):
        raise MixtureError(f"{FLAG} {spec.origin}: the weights add up to 0; give at least one source a positive weight")
    return spec


class Interleave:
    """Streams interleaved over indices 0, 1, 2, ... by weight, piecewise: segment k covers [start_k, start_k+1) with
    weights of its own. A pure function of the segments, with exact counts (no float rounding) at any index.

    Within a segment the streams are split by nested Bresenham lines: stream 0 takes floor(n * w0 / W) of the first
    n positions (W: the sum of the weights), stream 1 takes floor(m * w1 / (W - w0)) of the m that remain, and so
    on; the last stream with weight takes the rest. So stream s holds within one sample per level of its exact
    share of every prefix, the positions of a stream are spread evenly, and a stream that had weight w over n
    positions gets exactly n * w / W of them whenever that is whole. counts(n) and locate(i) cost one binary search
    over the segment starts and O(streams) integer operations; the counts at each segment start are precomputed.
    """

    def __init__(self, segments: Sequence[tuple[int, Sequence[Fraction]]], streams: int):
        if streams < 1 or not segments or segments[0][0] != 0:
            raise ValueError(f"an interleave needs at least one stream and a first segment at 0, got {segments!r}")
        self.streams = streams
        self.starts: list[int] = []
        self._levels: list[list[tuple[int, int]]] = []
        self._at_start: list[list[int]] = []
        for start, weights in segments:
            weights = [Fraction(w) for w in weights]
            if len(weights) != streams or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"segment at {start} has weights {weights}; expected {streams} non-negative weights "
                                 f"with a positive sum")
            if self.starts and start <= self.starts[-1]:
                raise ValueError(f"segment starts must increase, got {start} after {self.starts[-1]}")
            if self.starts:
                previous = self._segment_counts(len(self.starts) - 1, start - self.starts[-1])
                self._at_start.append([a + b for a, b in zip(self._at_start[-1], previous)])
            else:
                self._at_start.append([0] * streams)
            self.starts.append(start)
            self._levels.append(_levels(weights))

    def counts(self, n: int) -> list[int]:
        """How many of the indices [0, n) each stream holds."""
        if n < 0:
            raise IndexError(f"index {n} is negative")
        segment = bisect.bisect_right(self.starts, n) - 1
        within = self._segment_counts(segment, n - self.starts[segment])
        return [a + b for a, b in zip(self._at_start[segment], within)]

    def locate(self, index: int) -> tuple[int, int]:
        """(stream, index within that stream) of an index."""
        if index < 0:
            raise IndexError(f"index {index} is negative")
        segment = bisect.bisect_right(self.starts, index) - 1
        position = index - self.starts[segment]
        for stream, (numerator, denominator) in enumerate(self._levels[segment]):
            before = position * numerator // denominator
            if (position + 1) * numerator // denominator > before:
                return stream, self._at_start[segment][stream] + before
            position -= before  # its index among the positions the later streams share
        raise AssertionError("unreachable: the last stream with weight takes every remaining position")

    def _segment_counts(self, segment: int, n: int) -> list[int]:
        counts, rest = [], n
        for numerator, denominator in self._levels[segment]:
            taken = rest * numerator // denominator
            counts.append(taken)
            rest -= taken
        return counts + [0] * (self.streams - len(counts))


def _levels(weights: list[Fraction]) -> list[tuple[int, int]]:
    """Per stream, its share of what the streams from it on hold, as an exact ratio; ends at the last one with weight
    (whose share is 1)."""
    levels, remaining = [], sum(weights)
    last = max(i for i, w in enumerate(weights) if w > 0)
    for weight in weights[: last + 1]:
        share = weight / remaining if remaining else Fraction(0)
        levels.append((share.numerator, share.denominator))
        remaining -= weight
    return levels


def derived_seed(seed: int, *words: object) -> int:
    """A non-negative 63-bit seed for a stream of the run, stable across Python versions and platforms."""
    import hashlib

    text = "/".join([str(seed), *map(str, words)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def format_share(weight: Fraction, weights: Sequence[Fraction]) -> str:
    """A weight as its share of all, in percent: 0.7 of 0.7 + 0.3 is 70%."""
    return f"{100 * float(weight / sum(weights)):.3g}%"
