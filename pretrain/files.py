"""Files that appear whole or not at all, and file digests: the one home for atomic writes and hashing.

Every writer of a file that another process may read (checkpoints, shards, status and pid files, the prepare work
folder, downloads) goes through `atomic_path`: a temporary name beside the target, then one rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# In-flight files are named `.<target name>.<random>.partial`: hidden, recognisable as leftovers of a killed
# writer, and skipped by listings (pretrain.storage.local) and cleaners.
PARTIAL_SUFFIX = ".partial"
DIGEST_CHUNK_BYTES = 8 * 1024 * 1024
DIGESTS = ("sha256", "md5", "crc32c")


@contextmanager
def atomic_path(path: Path, *, durable: bool = False, make_parents: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside `path`; when the block succeeds it replaces `path` in one rename, when it fails
    it is removed. Readers see the old file or the new one, never half of one.

    durable: fsync the file and its folder too, so the write survives a power cut and not only a killed process
    (costs a disk flush). make_parents=False for a folder that must already exist (FileNotFoundError otherwise).
    """
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        if durable:
            fsync_file(temp)
        os.replace(temp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        temp.unlink(missing_ok=True)


def write_atomically(path: Path, data: bytes | str, *, durable: bool = False, make_parents: bool = True) -> None:
    with atomic_path(path, durable=durable, make_parents=make_parents) as temp:
        temp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json_atomically(path: Path, value: Any, *, indent: int | None = 2, durable: bool = False) -> None:
    write_atomically(path, json.dumps(value, indent=indent) + "\n", durable=durable)


def is_partial(name: str) -> bool:
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks so memory stays flat for multi-GB files.

    sha256: tokenizer files and content identity; crc32c: checkpoint manifests (~10 GB/s, and what GCS reports);
    md5: what S3 and Azure report for single-part objects.
    """
    digest = _new_digest(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(DIGEST_CHUNK_BYTES):
            digest.update(chunk)
    return _hex(digest)


def bytes_digest(data: bytes, algorithm: str = "sha256") -> str:
    digest = _new_digest(algorithm)
    digest.update(data)
    return _hex(digest)


def _new_digest(algorithm: str):
    if algorithm == "crc32c":
        import google_crc32c  # only here: a run that never checksums a checkpoint needs no cloud package

        return google_crc32c.Checksum()
    if algorithm == "md5":
        return hashlib.md5(usedforsecurity=False)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"digest {algorithm!r}: expected one of {', '.join(DIGESTS)}")


def _hex(digest) -> str:
    return digest.digest().hex()  # google_crc32c's hexdigest() returns bytes; digest().hex() is a str for all three
