"""The data format in one place: token shards (finding, writing, validating, opening one for reading) and the
dataset.json that preparation writes beside them.

A shard is an .npz holding an integer array `input_ids` (1-D, or 2-D read row-major); stored members are memory-mapped.
"""

from __future__ import annotations

import glob
import io
import json
import re
import shutil
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pretrain.files import atomic_path, write_json_atomically
from pretrain.storage import ObjectInfo, Storage
from pretrain.storage.local import LocalStorage

ARRAY_NAME = "input_ids"
SHARD_SUFFIX = ".npz"
DATASET_JSON = "dataset.json"
DATASET_FORMAT_VERSION = 2  # 2 added eval_shards: the held-out split preparation makes
DATASET_FORMAT_VERSIONS = (1, 2)
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
FORMAT_HINT = "see README, Data format"
SCAN_CHUNK_BYTES = 8 * 1024 * 1024
ZIP_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
ZIP_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"


class ShardError(ValueError):
    """A shard that cannot be trained on; the message is one line naming the file, the problem and the fix."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard as frozen into checkpoints: path relative to data_dir (posix separators), tokens, file size."""

    path: str
    num_tokens: int
    size_bytes: int

    def num_samples(self, seq_len: int) -> int:
        return self.num_tokens // seq_len

    def to_dict(self) -> dict:
        return {"path": self.path, "num_tokens": self.num_tokens, "size_bytes": self.size_bytes}

    @classmethod
    def from_dict(cls, d: dict) -> ShardInfo:
        return cls(path=str(d["path"]), num_tokens=int(d["num_tokens"]), size_bytes=int(d["size_bytes"]))


@dataclass(frozen=True)
class ArrayHeader:
    """Where `input_ids` lives in a shard and what it looks like, known without reading the token data."""

    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    stored: bool
    data_offset: int | None

    @property
    def num_tokens(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def list_shards(storage: Storage) -> list[ObjectInfo]:
    """Every shard under the storage's root (a bucket prefix or a local folder, recursively), sorted by key: the one
    listing of shards, for training, downloading and preparation alike."""
    return sorted((o for o in storage.list() if o.key.endswith(SHARD_SUFFIX)), key=lambda o: o.key)


def discover_shards(data_dir: Path, max_files: int | None = None) -> list[str]:
    """Relative posix paths of every shard under data_dir (recursive), sorted, the first max_files of them."""
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"{data_dir}: data directory does not exist; create it with token shards "
            f"or run `python -m pretrain.sample_data --out {data_dir}`"
        )
    if max_files is not None and max_files < 1:
        raise ValueError(f"max_files is {max_files}; expected a positive number of shards or None for all")
    rel_paths = [info.key for info in list_shards(LocalStorage(str(data_dir)))]
    if not rel_paths:
        raise FileNotFoundError(
            f"{data_dir}: no .npz shards found (searched recursively); expected files holding an integer "
            f"array {ARRAY_NAME} ({FORMAT_HINT}); run `python -m pretrain.sample_data --out {data_dir}` for sample data"
        )
    return rel_paths[:max_files]


def write_shard(path: Path, ids: np.ndarray, compressed: bool = False) -> None:
    """The one shard writer: an .npz holding input_ids, written atomically and byte-identical for identical ids
    (np.savez stamps the current time). Uncompressed shards are memory-mapped by training; compressed ones are
    decompressed once into a copy beside them (see README, Data format)."""
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
        with zipfile.ZipFile(handle, mode="w", compression=method, allowZip64=True) as archive:
            info = zipfile.ZipInfo(f"{ARRAY_NAME}.npy", date_time=ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = method
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(ids), allow_pickle=False)


def inspect_shards(
    data_dir: Path, rel_paths: list[str], seq_len: int, vocab_size: int, check_token_range: bool = True
) -> list[ShardInfo]:
    """Validate every shard and return its ShardInfo; raises ShardError naming the first bad file.

    Dtype, shape and length come from the .npy header only. The token-range check reads every shard once in
    fixed-size chunks (memory stays flat; compressed members are decompressed as a stream): O(dataset bytes) at
    disk speed, so very large datasets may pass check_token_range=False and rely on the tokenizer being right.
    """
    infos = []
    for rel_path in rel_paths:
        path = data_dir / rel_path
        header = read_array_header(path)
        check_header(path, header, seq_len)
        if check_token_range:
            validated_id_range(path, header, vocab_size)
        infos.append(ShardInfo(path=rel_path, num_tokens=header.num_tokens, size_bytes=path.stat().st_size))
    return infos


def split_eval_shards(shards: list[ShardInfo], eval_shards: int) -> tuple[list[ShardInfo], list[ShardInfo]]:
    """Hold out the last eval_shards shards for evaluation; returns (train, eval)."""
    if eval_shards < 0:
        raise ValueError(f"eval_shards is {eval_shards}; expected 0 (no evaluation) or a positive number of shards")
    if eval_shards >= len(shards):
        raise ValueError(
            f"eval_shards is {eval_shards} but only {len(shards)} shards were found, which leaves no training shard; "
            f"lower eval_shards or add shards"
        )
    cut = len(shards) - eval_shards
    return shards[:cut], shards[cut:]


def read_array_header(path: Path) -> ArrayHeader:
    """Parse the zip directory and the .npy header of input_ids; reads a few hundred bytes, never the tokens."""
    with open(path, "rb") as handle:
        return read_array_header_from(path, handle, path.stat().st_size)


def read_array_header_from(name: Path | str, handle: BinaryIO, size: int) -> ArrayHeader:
    """read_array_header over any seekable binary file of `size` bytes (a local file, or ranged reads of a remote
    object); `name` is what errors call it."""
    try:
        with zipfile.ZipFile(handle) as archive:
            member = _find_member(name, archive)
            if member.compress_type == zipfile.ZIP_STORED:
                member_start = _member_data_start(name, handle, member)
                handle.seek(member_start)
                dtype, shape, fortran_order = _read_npy_header(name, handle)
                data_offset = handle.tell()
                header = ArrayHeader(dtype, shape, fortran_order, stored=True, data_offset=data_offset)
                _check_stored_extent(name, header, member_end=min(member_start + member.compress_size, size))
                return header
            with archive.open(member) as stream:
                dtype, shape, fortran_order = _read_npy_header(name, stream)
            return ArrayHeader(dtype, shape, fortran_order, stored=False, data_offset=None)
    except zipfile.BadZipFile as error:
        raise ShardError(
            f"{name}: not a valid .npz (zip) file ({error}); expected an archive written by numpy.savez or "
            f"numpy.savez_compressed ({FORMAT_HINT}); re-create or re-download it"
        ) from None


def array_header_from_head(name: Path | str, head: bytes, size: int) -> ArrayHeader | None:
    """The header from the first bytes of a shard alone, when input_ids is its first zip member (as numpy.savez
    writes it): the .npy header sits right after the zip local header. None when that does not hold or `head`
    is too short; read_array_header_from then finds it through the zip directory."""
    if len(head) < ZIP_LOCAL_HEADER.size or head[:4] != ZIP_LOCAL_HEADER_SIGNATURE:
        return None
    fields = ZIP_LOCAL_HEADER.unpack(head[: ZIP_LOCAL_HEADER.size])
    method, name_length, extra_length = fields[3], fields[-2], fields[-1]
    member_name = head[ZIP_LOCAL_HEADER.size : ZIP_LOCAL_HEADER.size + name_length]
    if member_name not in (f"{ARRAY_NAME}.npy".encode(), ARRAY_NAME.encode()):
        return None
    data_start = ZIP_LOCAL_HEADER.size + name_length + extra_length
    try:
        if method == zipfile.ZIP_STORED:
            stream = io.BytesIO(head[data_start:])
            dtype, shape, fortran_order = _read_npy_header(name, stream)
            header = ArrayHeader(dtype, shape, fortran_order, stored=True, data_offset=data_start + stream.tell())
            _check_stored_extent(name, header, member_end=size)
            return header
        if method == zipfile.ZIP_DEFLATED:
            stream = io.BytesIO(zlib.decompressobj(-zlib.MAX_WBITS).decompress(head[data_start:]))
            dtype, shape, fortran_order = _read_npy_header(name, stream)
            return ArrayHeader(dtype, shape, fortran_order, stored=False, data_offset=None)
    except (ShardError, zlib.error):
        return None  # cut short or unusual: the zip directory decides, with its own errors
    return None


def check_header(path: Path, header: ArrayHeader, seq_len: int) -> None:
    """Reject dtypes, ranks and lengths that cannot be cut into samples of seq_len token ids."""
    if header.dtype.kind not in "iu":
        raise ShardError(
            f"{path}: {ARRAY_NAME} has dtype {header.dtype}; shards must hold integer token ids "
            f"such as uint16 or int32 ({FORMAT_HINT})"
        )
    if len(header.shape) not in (1, 2):
        raise ShardError(
            f"{path}: {ARRAY_NAME} has shape {header.shape} ({len(header.shape)}-D); expected a 1-D token stream "
            f"or a 2-D [num_sequences, seq_len] array; reshape it before saving ({FORMAT_HINT})"
        )
    if header.num_tokens < seq_len:
        raise ShardError(
            f"{path}: {ARRAY_NAME} has {header.num_tokens} tokens (shape {header.shape}), fewer than seq_len "
            f"{seq_len}, so it yields no sample; remove the shard, merge it into another, or lower seq_len"
        )


def validated_id_range(path: Path, header: ArrayHeader, vocab_size: int) -> tuple[int, int]:
    """(lowest, highest) id, checked against 0 <= id < vocab_size; ShardError naming the file otherwise. A dtype that
    cannot hold an out-of-range id answers from the dtype alone; others cost one chunked pass (memory stays flat)."""
    info = np.iinfo(header.dtype)
    if info.min >= 0 and info.max < vocab_size:
        return 0, int(info.max)
    id_range = token_id_range(path, header)
    check_token_range(path, id_range, vocab_size)
    return id_range


def token_id_range(path: Path, header: ArrayHeader) -> tuple[int, int]:
    """(lowest, highest) id in the shard, from one chunked pass over its tokens; (0, -1) for no tokens."""
    low, high = None, None
    for chunk in _iter_token_chunks(path, header):
        if chunk.size:
            chunk_low, chunk_high = int(chunk.min()), int(chunk.max())
            low = chunk_low if low is None else min(low, chunk_low)
            high = chunk_high if high is None else max(high, chunk_high)
    return (0, -1) if low is None else (low, high)


def check_token_range(path: Path, id_range: tuple[int, int], vocab_size: int) -> None:
    low, high = id_range
    if low < 0 or high >= vocab_size:
        raise ShardError(
            f"{path}: token ids in {ARRAY_NAME} range from {low} to {high}; expected 0 <= id < vocab_size "
            f"{vocab_size}; check that the tokenizer matches the model's vocab_size"
        )


class TokenStream:
    """One shard's input_ids as a flat row-major stream; stored members are memory-mapped, others decompressed."""

    def __init__(self, path: Path):
        header = read_array_header(path)
        self.path = path
        self.num_tokens = header.num_tokens
        self.array = _open_array(path, header)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as a new int64 array, independent of the mapping."""
        if self.array.ndim == 1:
            return self.array[start : start + length].astype(np.int64)
        width = self.array.shape[1]
        first_row, end_row = start // width, (start + length - 1) // width + 1
        rows = self.array[first_row:end_row].astype(np.int64).reshape(-1)
        skip = start - first_row * width
        return rows[skip : skip + length]


def _open_array(path: Path, header: ArrayHeader) -> np.ndarray:
    # C-order data is mapped as 1-D (the row-major stream itself); Fortran-order 2-D data keeps its shape and
    # TokenStream.read copies only the rows a sample spans.
    keep_shape = header.fortran_order and len(header.shape) == 2
    if header.stored:
        if keep_shape:
            return np.memmap(path, header.dtype, mode="r", offset=header.data_offset, shape=header.shape, order="F")
        return np.memmap(path, header.dtype, mode="r", offset=header.data_offset, shape=(header.num_tokens,))
    copy = _decompressed_copy(path)
    if copy is None:  # the shard's folder is read-only or full: this process holds the array in RAM instead
        with zipfile.ZipFile(path) as archive, archive.open(_find_member(path, archive)) as stream:
            array = _read_npy(path, stream)
        return np.ascontiguousarray(array).reshape(-1)
    mapped = _map_npy(copy)
    return mapped if keep_shape else mapped.reshape(-1)


def _decompressed_copy(path: Path) -> Path | None:
    """A compressed member's .npy, decompressed once beside the shard (a hidden file named after the shard's size
    and mtime, written atomically) so that readers map it like a stored shard: a reader keeps up to a block's
    worth of shards open, and holding each decompressed in every DataLoader worker's RAM would grow with the block.
    Costs the decompressed size on disk, once per machine. None when it cannot be written."""
    stat = path.stat()
    copy = path.with_name(f".{path.name}.{stat.st_size}-{stat.st_mtime_ns}.npy")
    if copy.is_file():
        return copy
    try:
        with atomic_path(copy) as partial, zipfile.ZipFile(path) as archive, \
                archive.open(_find_member(path, archive)) as stream, open(partial, "wb") as out:
            shutil.copyfileobj(stream, out, SCAN_CHUNK_BYTES)  # the member is itself a whole .npy file
    except OSError:
        return None
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.npy"):
        if stale != copy:
            stale.unlink(missing_ok=True)  # the copy of an earlier version of this shard
    return copy


def _find_member(path: Path | str, archive: zipfile.ZipFile) -> zipfile.ZipInfo:
    names = archive.namelist()
    for name in (f"{ARRAY_NAME}.npy", ARRAY_NAME):
        if name in names:
            return archive.getinfo(name)
    arrays = sorted(n.removesuffix(".npy") for n in names)
    raise ShardError(
        f"{path}: no {ARRAY_NAME} array (it has {arrays}); expected the token ids saved as "
        f"np.savez(path, {ARRAY_NAME}=ids) ({FORMAT_HINT})"
    )


def _member_data_start(path: Path | str, handle: BinaryIO, member: zipfile.ZipInfo) -> int:
    """Offset of a member's bytes: after its 30-byte local header, file name and extra field."""
    handle.seek(member.header_offset)
    raw = handle.read(ZIP_LOCAL_HEADER.size)
    if len(raw) != ZIP_LOCAL_HEADER.size or raw[:4] != ZIP_LOCAL_HEADER_SIGNATURE:
        raise ShardError(
            f"{path}: zip local header of {member.filename} is damaged; expected an archive written by numpy.savez; "
            f"re-create or re-download it"
        )
    fields = ZIP_LOCAL_HEADER.unpack(raw)
    name_length, extra_length = fields[-2], fields[-1]
    return member.header_offset + ZIP_LOCAL_HEADER.size + name_length + extra_length


# The .npy header is a dict literal; numpy parses it with ast.literal_eval, which on Python 3.11 raises a spurious
# "AST constructor recursion depth mismatch" SystemError when threads parse at once (CPython gh-106905), and the
# fetcher validates shards on several threads. This reads the three fields numpy writes, without ast.
_NPY_ENTRY = r"'(descr|fortran_order|shape)':\s*('[^']+'|True|False|\([\d,\s]*\))"  # the key and its value, in any order
NPY_HEADER_ENTRY = re.compile(_NPY_ENTRY)
NPY_HEADER = re.compile(rf"^\{{\s*(?:{_NPY_ENTRY}\s*,\s*){{2}}{_NPY_ENTRY}\s*,?\s*\}}\s*$")
NPY_HEADER_LENGTH = {(1, 0): struct.Struct("<H"), (2, 0): struct.Struct("<I"), (3, 0): struct.Struct("<I")}


def _read_npy_header(path: Path | str, handle: BinaryIO) -> tuple[np.dtype, tuple[int, ...], bool]:
    try:
        version = np.lib.format.read_magic(handle)
        if version not in NPY_HEADER_LENGTH:
            raise ValueError(f"unsupported .npy format version {version}")
        length_field = NPY_HEADER_LENGTH[version]
        raw_length = handle.read(length_field.size)
        if len(raw_length) != length_field.size:
            raise EOFError("the header length is cut short")
        (length,) = length_field.unpack(raw_length)
        raw = handle.read(length)
        if len(raw) != length:
            raise EOFError("the header is cut short")
        text = raw.decode("utf8" if version == (3, 0) else "latin1")
        fields = dict(NPY_HEADER_ENTRY.findall(text)) if NPY_HEADER.match(text) else {}
        if len(fields) != 3 or fields["descr"][0] != "'" or fields["fortran_order"] not in ("True", "False") \
                or fields["shape"][0] != "(":
            raise ValueError(f"header {raw[:80]!r} is not the plain array numpy.savez writes")
        dtype = np.dtype(fields["descr"].strip("'"))
        shape = tuple(int(n) for n in fields["shape"].strip("()").replace(",", " ").split())
    except (ValueError, EOFError, TypeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ShardError(
            f"{path}: {ARRAY_NAME} is not a readable .npy array ({message}); expected an array written by "
            f"numpy.savez ({FORMAT_HINT}); re-create or re-download it"
        ) from None
    return dtype, shape, fields["fortran_order"] == "True"


def _read_npy(path: Path | str, stream: BinaryIO) -> np.ndarray:
    """A whole .npy array from a stream, its header read as above."""
    dtype, shape, fortran_order = _read_npy_header(path, stream)
    array = np.frombuffer(stream.read(), dtype=dtype)
    return array.reshape(shape, order="F" if fortran_order else "C")


def _map_npy(path: Path) -> np.ndarray:
    """A .npy file memory-mapped, its header read as above."""
    with open(path, "rb") as handle:
        dtype, shape, fortran_order = _read_npy_header(path, handle)
        offset = handle.tell()
    return np.memmap(path, dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


def _check_stored_extent(path: Path | str, header: ArrayHeader, member_end: int) -> None:
    """Data running past its zip member would otherwise surface as a crash or garbage tokens mid-run."""
    if header.dtype.kind not in "iu":
        return
    needed_end = header.data_offset + header.num_tokens * header.dtype.itemsize
    available_end = member_end
    if needed_end > available_end:
        raise ShardError(
            f"{path}: {ARRAY_NAME} is truncated (its header needs {needed_end - header.data_offset} data bytes, "
            f"the file holds {max(0, available_end - header.data_offset)}); re-download or re-create the shard"
        )


def _iter_token_chunks(path: Path, header: ArrayHeader):
    """The token ids in storage order, SCAN_CHUNK_BYTES at a time (min/max do not care about row order)."""
    itemsize = header.dtype.itemsize
    chunk_items = max(1, SCAN_CHUNK_BYTES // itemsize)
    remaining = header.num_tokens
    if header.stored:
        # Plain reads rather than a memmap: mapped pages would count toward RSS until unmapped.
        with open(path, "rb") as handle:
            handle.seek(header.data_offset)
            while remaining:
                count = min(chunk_items, remaining)
                yield np.fromfile(handle, dtype=header.dtype, count=count)
                remaining -= count
        return
    with zipfile.ZipFile(path) as archive, archive.open(_find_member(path, archive)) as stream:
        _read_npy_header(path, stream)
        while remaining:
            count = min(chunk_items, remaining)
            raw = stream.read(count * itemsize)
            if len(raw) != count * itemsize:
                raise ShardError(
                    f"{path}: {ARRAY_NAME} is truncated (compressed data ended {remaining * itemsize - len(raw)} "
                    f"bytes early); re-download or re-create the shard"
                )
            yield np.frombuffer(raw, dtype=header.dtype)
            remaining -= count


@dataclass(frozen=True)
class DatasetManifest:
    """dataset.json: written by preparation beside the shards (last, so its presence means a complete set), read by
    training for token counts without touching the shards, for the vocabulary and for the tokenizer file."""

    shards: tuple[ShardInfo, ...]  # training shards
    vocab_size: int | None = None
    eos_token_id: int | None = None
    tokenizer_file: str | None = None
    tokenizer_sha256: str | None = None
    details: dict = field(default_factory=dict)  # dtype, seq_len_hint, sources, totals, packing_efficiency, seed
    eval_shards: tuple[ShardInfo, ...] = ()  # held-out documents, never in a training shard (format 2)

    def to_json(self) -> dict:
        tokenizer = {"file": self.tokenizer_file, "sha256": self.tokenizer_sha256} if self.tokenizer_file else None
        values = {"format_version": DATASET_FORMAT_VERSION, "tokenizer": tokenizer, "vocab_size": self.vocab_size,
                  "eos_token_id": self.eos_token_id}
        values.update({key: self.details[key] for key in ("dtype", "seq_len_hint") if key in self.details})
        values["shards"] = [s.to_dict() for s in self.shards]
        values["eval_shards"] = [s.to_dict() for s in self.eval_shards]
        values.update({key: value for key, value in self.details.items() if key not in values})
        return values

    def write(self, folder: Path) -> Path:
        path = folder / DATASET_JSON
        write_json_atomically(path, self.to_json())
        return path

    def counts_for(self, sizes: dict[str, int]) -> dict[str, ShardInfo]:
        """The listed shards (eval shards too) that still have the size listed (by path); a shard rewritten since
        falls back to its header."""
        return {s.path: s for s in self.shards + self.eval_shards if sizes.get(s.path) == s.size_bytes}

    def check_vocab(self, name: str, vocab_size: int) -> None:
        if self.vocab_size is not None and self.vocab_size > vocab_size:
            raise ValueError(
                f"{name}: the shards were tokenized with vocab_size {self.vocab_size}, larger than the model's "
                f"--vocab-size {vocab_size}; pass --vocab-size {self.vocab_size} (or more)"
            )


def read_dataset_json(path: Path, name: str | None = None) -> DatasetManifest | None:
    """The manifest at `path`, None when there is none; a damaged or foreign one is a one-line ValueError (`name`:
    how errors call it, e.g. its bucket URL)."""
    name = name or str(path)
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
        version = values["format_version"]
        shards = tuple(ShardInfo.from_dict(entry) for entry in values["shards"])
        eval_shards = tuple(ShardInfo.from_dict(entry) for entry in values.get("eval_shards") or ())
        tokenizer = values.get("tokenizer") or {}
        vocab = values.get("vocab_size")
        eos = values.get("eos_token_id")
        manifest = DatasetManifest(
            shards=shards, vocab_size=None if vocab is None else int(vocab), eos_token_id=None if eos is None else int(eos),
            tokenizer_file=str(tokenizer["file"]) if tokenizer.get("file") else None,
            tokenizer_sha256=tokenizer.get("sha256"),
            details={k: v for k, v in values.items() if k not in _MANIFEST_KEYS},
            eval_shards=eval_shards,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{name}: not a readable dataset manifest ({type(error).__name__}: {error}); re-create it with "
            f"`python -m pretrain.prepare_data` or delete it (token counts then come from the shard headers)"
        ) from None
    if version not in DATASET_FORMAT_VERSIONS:
        readable = " and ".join(map(str, DATASET_FORMAT_VERSIONS))
        raise ValueError(
            f"{name}: format_version {version} is unknown (this code reads {readable}); "
            f"re-create it with this version's `python -m pretrain.prepare_data`"
        )
    return manifest


_MANIFEST_KEYS = ("format_version", "tokenizer", "vocab_size", "eos_token_id", "shards", "eval_shards")
