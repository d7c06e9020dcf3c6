"""The input formats, as one registry (FORMATS): each entry names its suffixes, how it splits a file into work units and
how it reads a unit's documents. Recognising, planning, reading and every message that lists the formats ask it."""

from __future__ import annotations

import gzip
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from pretrain.errors import one_line

# Input bytes per work unit: small enough to spread a few large files over every core and to lose little work
# to a kill, large enough that per-unit files stay few.
UNIT_BYTES = 32 << 20
READ_CHUNK_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 1024


class InputError(ValueError):
    """Bad user input; the message is one line naming the file or flag, what was seen and what to do."""


@dataclass(frozen=True)
class Source:
    """One input file, numbered in the sorted order of all inputs (the number is part of every document's key)."""

    index: int
    url: str  # as the user named it (a path or a bucket URL); recorded in dataset.json
    path: str  # local file read by the workers (a downloaded copy for bucket inputs)
    kind: str  # the name of its entry in FORMATS
    size: int


@dataclass(frozen=True)
class Span:
    """Where in a source a unit reads: a byte range of a .jsonl, a parquet row group, or (the defaults) all of it."""

    start: int = 0
    end: int | None = None
    row_group: int | None = None
    first_row: int = 0
    size: int = 0  # input bytes it covers, for the progress bar


@dataclass(frozen=True)
class Unit:
    """One piece of tokenization work: one span of one source, or several whole small files."""

    index: int
    sources: tuple[int, ...]
    span: Span


# (source index, position, text or None, source bytes consumed since the last one). The position (a byte offset or a
# row) is part of the document's key, so a reader must give each document the same one however the file is split.
# Bad bytes in text become U+FFFD rather than stopping a long run.
Document = tuple[int, int, str | None, int]
Reader = Callable[[Source, Span, str, str | None], Iterator[Document]]  # (source, span, text_field, separator)
# The spans of a source, or None: the whole file, packed into a unit with neighbouring whole files up to UNIT_BYTES.
Planner = Callable[[Source, str, str | None], list[Span] | None]  # (source, text_field, separator)


def _one_span(source: Source, text_field: str, separator: str | None) -> list[Span] | None:
    return [Span(size=source.size)]


@dataclass(frozen=True)
class Format:
    name: str  # recorded as Source.kind
    suffixes: tuple[str, ...]  # lower case, with the dot
    read: Reader
    plan: Planner = _one_span


def _json_text(source: Source, line: bytes, where: str, text_field: str) -> str | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line.decode("utf-8", errors="replace"))
    except ValueError as error:
        raise InputError(f"{source.url} ({where}): not valid JSON ({error}); expected one JSON object per line"
                         ) from None
    if not isinstance(record, dict) or text_field not in record:
        fields = ", ".join(sorted(record)[:8]) if isinstance(record, dict) else type(record).__name__
        raise InputError(
            f"{source.url} ({where}): no {text_field!r} field (it has: {fields}); pass --text-field NAME"
        )
    text = record[text_field]
    if text is None:
        return None
    if not isinstance(text, str):
        raise InputError(
            f"{source.url} ({where}): field {text_field!r} holds {type(text).__name__}, not text; "
            f"pass --text-field naming a string field"
        )
    return text


def _plan_byte_ranges(source: Source, text_field: str, separator: str | None) -> list[Span]:
    return [Span(start, start + UNIT_BYTES if start + UNIT_BYTES < source.size else None,
                 size=min(UNIT_BYTES, source.size - start))
            for start in range(0, max(source.size, 1), UNIT_BYTES)]


def _read_jsonl(source: Source, span: Span, text_field: str, separator: str | None) -> Iterator[Document]:
    with open(source.path, "rb") as raw:
        # A span owns the lines that start in [start, end): skip the line the previous span owns.
        if span.start > 0:
            raw.seek(span.start - 1)
            if raw.read(1) != b"\n":
                raw.readline()
        position = raw.tell()
        end = span.end if span.end is not None else math.inf
        while position < end:
            line = raw.readline()
            if not line:
                break
            yield source.index, position, _json_text(source, line, f"byte {position}", text_field), len(line)
            position += len(line)


def _compressed_jsonl(decompress: Callable[[io.BufferedReader], io.RawIOBase]) -> Reader:
    """A reader of JSON lines through a decompressor; a compressed file cannot be entered midway, so it is one unit."""

    def read(source: Source, span: Span, text_field: str, separator: str | None) -> Iterator[Document]:
        with open(source.path, "rb") as raw:
            stream = io.BufferedReader(decompress(raw), READ_CHUNK_BYTES)
            position, consumed = 0, 0
            for number, line in enumerate(stream, start=1):
                text = _json_text(source, line, f"line {number}", text_field)
                now = raw.tell()
                yield source.index, position, text, now - consumed
                consumed = now
                position += len(line)

    return read


def _gunzip(raw: io.BufferedReader) -> io.RawIOBase:
    return gzip.GzipFile(fileobj=raw, mode="rb")


def _unzstd(raw: io.BufferedReader) -> io.RawIOBase:
    import zstandard

    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)


def _plan_row_groups(source: Source, text_field: str, separator: str | None) -> list[Span]:
    """A span per row group; checks the text column exists and holds strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source.path)
    except Exception as error:  # pyarrow raises ArrowInvalid and friends
        raise InputError(f"{source.url}: not a readable parquet file ({one_line(error, 300)}); check the file"
                         ) from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise InputError(
            f"{source.url}: no {text_field!r} column (it has: {', '.join(schema.names[:8])}); pass --text-field NAME"
        )
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise InputError(f"{source.url}: column {text_field!r} has type {column_type}, not string; "
                         f"pass --text-field NAME")
    spans, row = [], 0
    for index in range(parquet.metadata.num_row_groups):
        group = parquet.metadata.row_group(index)
        spans.append(Span(row_group=index, first_row=row, size=group.total_byte_size))
        row += group.num_rows
    return spans


def _read_parquet(source: Source, span: Span, text_field: str, separator: str | None) -> Iterator[Document]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(source.path)
    group = parquet.metadata.row_group(span.row_group)
    bytes_per_row = group.total_byte_size / max(1, group.num_rows)
    row = span.first_row
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[span.row_group], columns=[text_field])
    for batch in batches:
        for text in batch.column(0).to_pylist():
            yield source.index, row, text, int(bytes_per_row)
            row += 1


def _plan_txt(source: Source, text_field: str, separator: str | None) -> list[Span] | None:
    return None if separator is None else [Span(size=source.size)]


def _read_txt(source: Source, span: Span, text_field: str, separator: str | None) -> Iterator[Document]:
    with open(source.path, "rb") as handle:
        if separator is None:
            data = handle.read()
            yield source.index, 0, data.decode("utf-8", errors="replace"), len(data)
            return
        marker = separator.encode("utf-8")
        buffer, buffer_start = b"", 0
        while True:
            chunk = handle.read(READ_CHUNK_BYTES)
            buffer += chunk
            pieces = buffer.split(marker)
            complete = pieces if not chunk else pieces[:-1]
            for piece in complete:
                yield source.index, buffer_start, piece.decode("utf-8", errors="replace"), len(piece) + len(marker)
                buffer_start += len(piece) + len(marker)
            if not chunk:
                return
            buffer = pieces[-1]


# In the order the messages list them. Worker processes import this module afresh: an entry added at run time
# (as the tests do) reaches only a run in this process (--workers 1).
FORMATS: dict[str, Format] = {entry.name: entry for entry in (
    Format("txt", (".txt",), _read_txt, _plan_txt),
    Format("jsonl", (".jsonl",), _read_jsonl, _plan_byte_ranges),
    Format("jsonl.gz", (".jsonl.gz",), _compressed_jsonl(_gunzip)),
    Format("jsonl.zst", (".jsonl.zst",), _compressed_jsonl(_unzstd)),
    Format("parquet", (".parquet",), _read_parquet, _plan_row_groups),
)}


def suffixes() -> list[str]:
    return [suffix for entry in FORMATS.values() for suffix in entry.suffixes]


def suffix_list() -> str:
    """The supported suffixes for a message: ".txt, .jsonl or .parquet"."""
    names = suffixes()
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def kind_of(name: str) -> str | None:
    """The format of a file name by its longest matching suffix (.jsonl.gz before any .gz), or None."""
    lowered = name.lower()
    matches = [(len(suffix), entry.name) for entry in FORMATS.values() for suffix in entry.suffixes
               if lowered.endswith(suffix)]
    return max(matches)[1] if matches else None


def plan_units(sources: Sequence[Source], text_field: str, separator: str | None) -> list[Unit]:
    """The fixed split of the corpus into units; depends only on the sources and arguments, never on timing."""
    units: list[Unit] = []
    whole_files: list[Source] = []

    def close_whole_files() -> None:
        if whole_files:
            units.append(Unit(len(units), tuple(s.index for s in whole_files),
                              Span(size=sum(s.size for s in whole_files))))
            whole_files.clear()

    for source in sources:
        spans = FORMATS[source.kind].plan(source, text_field, separator)
        if spans is None:
            if whole_files and sum(s.size for s in whole_files) + source.size > UNIT_BYTES:
                close_whole_files()
            whole_files.append(source)
            continue
        close_whole_files()
        units.extend(Unit(index, (source.index,), span) for index, span in enumerate(spans, start=len(units)))
    close_whole_files()
    return units


def read_unit(sources: Sequence[Source], unit: Unit, text_field: str, separator: str | None) -> Iterator[Document]:
    """The unit's documents; `sources` is indexed by Source.index. A file that cannot be read is an InputError."""
    for source_index in unit.sources:
        source = sources[source_index]
        read = FORMATS[source.kind].read
        try:
            yield from read(source, unit.span, text_field, separator)
        except InputError:
            raise
        except Exception as error:  # OSError, EOFError, zlib.error; pyarrow and zstandard raise their own types
            raise InputError(f"{source.url}: cannot read ({one_line(error, 300)}); "
                             f"check the file is complete and readable") from None


def has_documents(sources: Sequence[Source], text_field: str, separator: str | None) -> bool:
    """Reads the sources up to the first document: catches unreadable files and a missing text field in seconds."""
    for source in sources:
        if not os.access(source.path, os.R_OK):
            raise InputError(f"{source.url}: cannot read (permission denied); fix its permissions or leave it out")
        for unit in plan_units([source], text_field, separator):
            for _, _, text, _ in read_unit(sources, unit, text_field, separator):
                if text:
                    return True
    return False
