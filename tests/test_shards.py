"""Shard discovery, validation, memory-mapped and compressed reading, and the frozen-shard check used on resume."""

from __future__ import annotations

import ast
import io
import json
import mmap
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pretrain.data.format import (
    ShardError,
    ShardInfo,
    TokenStream,
    discover_shards,
    inspect_shards,
    read_array_header,
    split_eval_shards,
)
from pretrain.data.training_data import check_obtainable

SEQ_LEN = 16
VOCAB = 512


def write_shard(path: Path, compressed: bool = False, **arrays: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def write_stored_member(path: Path, npy_bytes: bytes, name: str = "input_ids.npy") -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(name, npy_bytes)
    return path


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def make_not_zip(path: Path) -> Path:
    path.write_bytes(b"this is not a zip file")
    return path


def make_truncated_zip(path: Path) -> Path:
    write_shard(path, input_ids=np.arange(1000, dtype=np.int32))
    path.write_bytes(path.read_bytes()[:2000])
    return path


def make_member_shorter_than_header(path: Path) -> Path:
    return write_stored_member(path, npy_bytes(np.arange(100, dtype=np.int32))[:-40])


def ids(values, dtype=np.int32) -> np.ndarray:
    return np.asarray(values, dtype=dtype)


BAD_SHARDS = [
    ("not_zip", make_not_zip, ["not a valid .npz"]),
    ("truncated_zip", make_truncated_zip, ["not a valid .npz"]),
    ("wrong_name", lambda p: write_shard(p, tokens=ids(range(64)), mask=ids([1] * 64)), ["no input_ids", "'mask'"]),
    ("not_npy", lambda p: write_stored_member(p, b"garbage bytes, no npy magic here"), ["not a readable .npy"]),
    ("short_member", make_member_shorter_than_header, ["truncated"]),
    ("float", lambda p: write_shard(p, input_ids=np.zeros(64, np.float32)), ["dtype float32", "integer token ids"]),
    ("bool", lambda p: write_shard(p, input_ids=np.ones(64, bool)), ["dtype bool"]),
    ("object", lambda p: write_shard(p, input_ids=np.array([1, "a"] * 32, dtype=object)), ["dtype object"]),
    ("zero_d", lambda p: write_shard(p, input_ids=ids(7)), ["shape ()", "0-D"]),
    ("three_d", lambda p: write_shard(p, input_ids=np.zeros((2, 4, 8), np.int32)), ["shape (2, 4, 8)", "3-D"]),
    ("empty", lambda p: write_shard(p, input_ids=ids([])), ["0 tokens", "no sample"]),
    ("empty_rows", lambda p: write_shard(p, input_ids=np.zeros((5, 0), np.int32)), ["0 tokens", "no sample"]),
    ("too_short", lambda p: write_shard(p, input_ids=ids(range(SEQ_LEN - 1))), ["15 tokens", "seq_len 16"]),
    ("negative", lambda p: write_shard(p, input_ids=ids([*range(60), -3])), ["from -3 to 59", "vocab_size 512"]),
    ("too_large", lambda p: write_shard(p, input_ids=ids([*range(60), 600], np.uint16)), ["from 0 to 600"]),
    ("too_large_compressed", lambda p: write_shard(p, True, input_ids=np.full((4, 16), VOCAB)), ["from 512 to 512"]),
]


@pytest.mark.parametrize("name, make, expected", BAD_SHARDS, ids=[case[0] for case in BAD_SHARDS])
def test_bad_shard_raises_one_line_error_naming_file_and_problem(tmp_path, name, make, expected):
    write_shard(tmp_path / "a" / "good.npz", input_ids=np.arange(64, dtype=np.int32))
    make(tmp_path / "a" / f"{name}.npz")

    with pytest.raises(ShardError) as raised:
        inspect_shards(tmp_path, ["a/good.npz", f"a/{name}.npz"], SEQ_LEN, VOCAB)

    message = str(raised.value)
    assert f"{name}.npz" in message and "\n" not in message
    for fragment in expected:
        assert fragment in message


def test_range_check_can_be_skipped(tmp_path):
    write_shard(tmp_path / "s.npz", input_ids=np.full(64, 9999, np.int32))
    with pytest.raises(ShardError):
        inspect_shards(tmp_path, ["s.npz"], SEQ_LEN, VOCAB)
    assert inspect_shards(tmp_path, ["s.npz"], SEQ_LEN, VOCAB, check_token_range=False)[0].num_tokens == 64


def test_range_check_spans_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr("pretrain.data.format.SCAN_CHUNK_BYTES", 64)
    for compressed in (False, True):
        ids = np.arange(1000, dtype=np.int32) % VOCAB
        ids[777] = VOCAB + 5
        write_shard(tmp_path / f"{compressed}.npz", compressed, input_ids=ids)
        with pytest.raises(ShardError, match=f"from 0 to {VOCAB + 5}"):
            inspect_shards(tmp_path, [f"{compressed}.npz"], SEQ_LEN, VOCAB)


def test_inspect_reports_tokens_and_size(tmp_path):
    write_shard(tmp_path / "one.npz", input_ids=np.arange(100, dtype=np.uint16))
    write_shard(tmp_path / "two.npz", True, input_ids=np.zeros((3, 40), np.int64))

    infos = inspect_shards(tmp_path, ["one.npz", "two.npz"], SEQ_LEN, VOCAB)

    assert [(i.path, i.num_tokens) for i in infos] == [("one.npz", 100), ("two.npz", 120)]
    assert infos[1].size_bytes == (tmp_path / "two.npz").stat().st_size
    assert infos[0].num_samples(SEQ_LEN) == 6


def test_shard_info_round_trips_through_json():
    info = ShardInfo(path="a/b/shard_001.npz", num_tokens=12345, size_bytes=999)
    assert ShardInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


LAYOUTS = [
    (np.uint16, (4096,), False),
    (np.uint16, (32, 128), True),
    (np.int32, (4096,), True),
    (np.int32, (64, 64), False),
    (np.int64, (4096,), False),
    (np.int64, (16, 256), True),
    (np.dtype(">i4"), (64, 64), False),
    (np.uint8, (4096,), False),
]


@pytest.mark.parametrize("dtype, shape, compressed", LAYOUTS)
def test_token_stream_reads_row_major_stream(tmp_path, dtype, shape, compressed):
    ids = (np.arange(int(np.prod(shape))) * 7 % 251).astype(dtype).reshape(shape)
    path = write_shard(tmp_path / "s.npz", compressed, input_ids=ids)
    expected = np.load(path)["input_ids"].reshape(-1).astype(np.int64)

    stream = TokenStream(path)

    assert isinstance(stream.array, np.memmap)  # compressed ones through their decompressed copy
    assert stream.num_tokens == expected.size
    for start, length in [(0, 100), (60, 10), (127, 130), (expected.size - 50, 50)]:
        tokens = stream.read(start, length)
        assert tokens.dtype == np.int64
        np.testing.assert_array_equal(tokens, expected[start : start + length])


@pytest.mark.parametrize("dtype, shape, compressed", LAYOUTS)
def test_shards_are_read_without_ast_which_python_3_11_races_across_threads(tmp_path, monkeypatch, dtype, shape,
                                                                            compressed):
    # numpy's own header reader calls ast.literal_eval, which raised a spurious SystemError ("AST constructor
    # recursion depth mismatch") in a run whose fetcher validated shards on several threads.
    ids = (np.arange(int(np.prod(shape))) * 7 % 251).astype(dtype).reshape(shape)
    path = write_shard(tmp_path / "s.npz", compressed, input_ids=ids)
    def forbidden(*args, **kwargs):
        raise AssertionError("ast.literal_eval called while reading a shard")

    monkeypatch.setattr(ast, "literal_eval", forbidden)
    header = read_array_header(path)
    assert (header.dtype, header.shape) == (np.dtype(dtype), shape)
    np.testing.assert_array_equal(TokenStream(path).read(0, 5), ids.reshape(-1)[:5].astype(np.int64))


def test_a_header_with_its_keys_in_another_order_is_read_and_a_structured_one_is_refused(tmp_path):
    def npy(header: str) -> bytes:  # the .npy layout by hand: magic, version 1.0, length, header padded to 64
        text = header.encode("latin1")
        text += b" " * ((64 - (10 + len(text) + 1) % 64) % 64) + b"\n"
        return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + np.arange(6, dtype="<u2").tobytes()

    other_order = write_stored_member(tmp_path / "a.npz", npy("{'shape': (6,), 'fortran_order': False, 'descr': '<u2'}"))
    np.testing.assert_array_equal(TokenStream(other_order).read(0, 6), np.arange(6))
    structured = write_stored_member(
        tmp_path / "b.npz", npy("{'descr': [('a', '<u2')], 'fortran_order': False, 'shape': (6,), }"))
    with pytest.raises(ShardError, match=r"b\.npz: input_ids is not a readable \.npy array"):
        read_array_header(structured)


def test_a_compressed_shard_is_decompressed_once_to_disk_and_again_only_when_it_changes(tmp_path):
    path = write_shard(tmp_path / "s.npz", True, input_ids=np.arange(4096, dtype=np.uint16))
    TokenStream(path)
    (copy,) = tmp_path.glob(".s.npz.*.npy")
    written = copy.stat().st_mtime_ns
    second = TokenStream(path)  # another reader (a DataLoader worker, a restart) maps the same copy
    assert copy.stat().st_mtime_ns == written and isinstance(second.array, np.memmap)
    assert sorted(p.name for p in tmp_path.iterdir()) == [copy.name, "s.npz"]  # no partial file left

    write_shard(path, True, input_ids=np.arange(4096, dtype=np.uint16)[::-1].copy())
    os.utime(path, ns=(written + 10**9, written + 10**9))  # a replaced shard, even within the same second
    np.testing.assert_array_equal(TokenStream(path).read(0, 3), [4095, 4094, 4093])
    assert [p.name for p in tmp_path.glob(".s.npz.*.npy")] != [copy.name]  # the earlier version's copy is gone
    assert len(list(tmp_path.glob(".s.npz.*.npy"))) == 1


def test_a_compressed_shard_whose_copy_cannot_be_written_is_read_into_ram(tmp_path):
    path = write_shard(tmp_path / "s.npz", True, input_ids=np.arange(4096, dtype=np.int32))
    stat = path.stat()
    # A directory where the copy would go: the rename fails like a read-only or full disk would.
    (tmp_path / f".s.npz.{stat.st_size}-{stat.st_mtime_ns}.npy").mkdir()
    stream = TokenStream(path)
    assert not isinstance(stream.array, np.memmap)
    np.testing.assert_array_equal(stream.read(100, 5), np.arange(100, 105))
    assert not list(tmp_path.glob("*.partial")), "the failed copy was left behind"


def test_fortran_order_stored_shard_is_mapped_and_read_row_major(tmp_path):
    ids = np.asfortranarray(np.arange(20 * 30, dtype=np.int32).reshape(20, 30))
    path = write_shard(tmp_path / "f.npz", input_ids=ids)
    assert read_array_header(path).fortran_order

    stream = TokenStream(path)

    assert isinstance(stream.array, np.memmap)
    np.testing.assert_array_equal(stream.read(25, 70), np.arange(25, 95))


def test_stored_member_is_mapped_at_its_offset_not_loaded(tmp_path):
    path = write_shard(tmp_path / "s.npz", input_ids=np.arange(5000, dtype=np.int32), other=np.ones(999, np.int8))

    header = read_array_header(path)
    stream = TokenStream(path)

    assert header.stored and header.data_offset > 0
    assert isinstance(stream.array, np.memmap) and stream.array.offset == header.data_offset
    assert isinstance(stream.array.base, mmap.mmap)
    np.testing.assert_array_equal(stream.array[4990:], np.arange(4990, 5000))


def test_compressed_header_is_read_without_decompressing_everything(tmp_path):
    path = write_shard(tmp_path / "c.npz", True, input_ids=np.zeros((64, 64), np.uint16))
    header = read_array_header(path)
    assert (header.stored, header.shape, header.dtype) == (False, (64, 64), np.dtype(np.uint16))


def test_discover_is_recursive_sorted_posix_and_limited(tmp_path):
    for rel in ["b/shard_1.npz", "a/x/shard_9.npz", "shard_0.npz", "a/shard_5.npz", "notes.txt", "c/part.npz.partial"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")

    assert discover_shards(tmp_path) == ["a/shard_5.npz", "a/x/shard_9.npz", "b/shard_1.npz", "shard_0.npz"]
    assert discover_shards(tmp_path, max_files=2) == ["a/shard_5.npz", "a/x/shard_9.npz"]


def test_discover_without_shards_says_what_to_do(tmp_path):
    (tmp_path / "README.md").write_text("no shards yet")
    with pytest.raises(FileNotFoundError, match="no .npz shards found.*pretrain.sample_data"):
        discover_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_shards(tmp_path / "missing")


def test_split_holds_out_last_shards():
    shards = [ShardInfo(f"s{i}.npz", 100, 10) for i in range(4)]
    assert split_eval_shards(shards, 0) == (shards, [])
    assert split_eval_shards(shards, 1) == (shards[:3], shards[3:])
    with pytest.raises(ValueError, match="leaves no training shard"):
        split_eval_shards(shards, 4)
    with pytest.raises(ValueError, match="eval_shards is -1"):
        split_eval_shards(shards, -1)


def test_a_resume_refuses_frozen_shards_that_went_missing_or_changed(tmp_path):
    write_shard(tmp_path / "a.npz", input_ids=np.arange(64, dtype=np.int32))
    write_shard(tmp_path / "b.npz", input_ids=np.arange(64, dtype=np.int32))
    frozen = inspect_shards(tmp_path, ["a.npz", "b.npz"], SEQ_LEN, VOCAB)
    write_shard(tmp_path / "added_later.npz", input_ids=np.arange(64, dtype=np.int32))
    check_obtainable(tmp_path, tuple(frozen), None, {})

    write_shard(tmp_path / "b.npz", input_ids=np.arange(80, dtype=np.int32))
    with pytest.raises(ShardError, match="b.npz: shard has .* bytes but the checkpoint recorded"):
        check_obtainable(tmp_path, tuple(frozen), None, {})

    (tmp_path / "a.npz").unlink()
    with pytest.raises(FileNotFoundError, match="a.npz: shard recorded in the checkpoint is missing"):
        check_obtainable(tmp_path, tuple(frozen), None, {})
