"""File checksums used by checkpoint manifests and data downloads (CRC32C: ~10 GB/s, and what GCS reports natively)."""

from __future__ import annotations

from pathlib import Path

import google_crc32c

CHUNK_BYTES = 8 * 1024 * 1024


def crc32c_of_file(path: Path) -> str:
    """Hex CRC32C of a file's bytes, read in chunks so memory stays flat for multi-GB files."""
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            checksum.update(chunk)
    return checksum.digest().hex()


def crc32c_of_bytes(data: bytes) -> str:
    return google_crc32c.Checksum(data).digest().hex()
