"""Fetches data shards from a bucket into a local folder, skipping ones already there intact.

Run as `python -m pretrain.download --data-bucket URL --data-dir data --max-files N`.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pretrain.data.format import list_shards
from pretrain.files import file_digest
from pretrain.storage import (
    ObjectInfo,
    Storage,
    StorageError,
    StorageOptions,
    open_storage,
)


@dataclass(frozen=True)
class ShardDownloadReport:
    paths: list[Path]  # every selected shard, in key order
    downloaded: int
    skipped: int
    bytes_downloaded: int


def is_intact(local_path: Path, info: ObjectInfo) -> bool:
    """Size must match; where the store reports a checksum it must match too (a same-size corrupt file is refetched)."""
    if not local_path.is_file() or local_path.stat().st_size != info.size:
        return False
    if info.checksum is None:
        return True
    algorithm, _, expected = info.checksum.partition(":")
    if algorithm in ("crc32c", "md5"):
        return file_digest(local_path, algorithm) == expected
    return True  # a checksum kind this code does not know: fall back to the size check


def local_path_for(data_dir: Path, key: str) -> Path:
    # Keys come from the store; refusing '..' keeps a hostile listing from writing outside data_dir.
    if key.startswith("/") or ".." in key.split("/"):
        raise StorageError(f"refusing shard key {key!r}: it would land outside {data_dir}")
    return data_dir.joinpath(*key.split("/"))


def fetch_shards(storage: Storage, data_dir: Path, *, max_files: int | None = None, workers: int = 8,
                 progress: bool = True) -> ShardDownloadReport:
    selected = list_shards(storage)
    if max_files is not None:
        selected = selected[:max_files]
    targets = [(info, local_path_for(data_dir, info.key)) for info in selected]
    # Checksumming local files is the slow part of a restart with a warm cache; it runs in the pool too.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        intact = list(pool.map(lambda target: is_intact(target[1], target[0]), targets))
        missing = [target for target, ok in zip(targets, intact) if not ok]
        total_bytes = sum(info.size for info, _ in missing)
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"shards 0/{len(missing)}",
                  disable=not progress) as bar:
            futures = {pool.submit(storage.download, info.key, path): info for info, path in missing}
            try:
                for done, future in enumerate(as_completed(futures), start=1):
                    future.result()
                    bar.update(futures[future].size)
                    bar.set_description(f"shards {done}/{len(missing)}")
            except BaseException:
                for future in futures:
                    future.cancel()  # one failed shard ends the run; the queued ones need not start
                raise
    return ShardDownloadReport(paths=[path for _, path in targets], downloaded=len(missing),
                               skipped=len(targets) - len(missing), bytes_downloaded=total_bytes)


def download_shards(storage: Storage, data_dir: Path, *, max_files: int | None = None, workers: int = 8,
                    progress: bool = True) -> list[Path]:
    """Downloads the first max_files shards (by key) that are missing or damaged locally; returns all their paths."""
    return fetch_shards(storage, data_dir, max_files=max_files, workers=workers, progress=progress).paths


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain.download", description=__doc__.splitlines()[0])
    parser.add_argument("--data-bucket", required=True, help="gs://, s3://, az://, file:// URL or a local folder")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--max-files", type=int, default=None)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--gcs-credentials", default=None, help="path to a service-account JSON file")
    parser.add_argument("--gcp-project", default=None)
    parser.add_argument("--s3-endpoint-url", default=None)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.max_files is not None and args.max_files < 0:
        print(f"error: --max-files must be >= 0, got {args.max_files}", file=sys.stderr)
        return 2
    options = StorageOptions(gcs_credentials=args.gcs_credentials, gcp_project=args.gcp_project,
                             s3_endpoint_url=args.s3_endpoint_url)
    try:
        storage = open_storage(args.data_bucket, options)
        report = fetch_shards(storage, args.data_dir, max_files=args.max_files, workers=args.workers,
                              progress=not args.no_progress)
    except (StorageError, ValueError, OSError) as error:
        print(f"error: --data-bucket {args.data_bucket}: {error}", file=sys.stderr)
        return 1
    if not report.paths and args.max_files != 0:
        print(f"error: --data-bucket {args.data_bucket}: no *.npz objects found", file=sys.stderr)
        return 1
    print(f"downloaded {report.downloaded}, skipped {report.skipped}, "
          f"{report.bytes_downloaded} bytes into {args.data_dir}")
    return 0
