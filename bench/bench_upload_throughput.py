"""Upload throughput of Storage.upload vs the plain SDK call with equal part size and concurrency, on local emulators
(moto S3, Azurite, gcp-storage-emulator); prints MB/s and ours/plain (target >= 0.9). Not a test.
Run from the repository root: python -m bench.bench_upload_throughput [--providers s3,azure,gcs]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.storage import StorageOptions, open_storage
from tests import emulators

MiB = 1024 * 1024


def plain_s3_upload(options: StorageOptions, bucket: str) -> Callable[[Path, str], None]:
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3")
    config = TransferConfig(multipart_threshold=options.multipart_chunk_bytes,
                            multipart_chunksize=options.multipart_chunk_bytes, max_concurrency=options.max_concurrency)
    return lambda path, key: client.upload_file(str(path), bucket, f"plain/{key}", Config=config)


def plain_azure_upload(options: StorageOptions, container: str) -> Callable[[Path, str], None]:
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(
        os.environ["AZURE_STORAGE_CONNECTION_STRING"], max_block_size=options.multipart_chunk_bytes,
        max_single_put_size=options.multipart_chunk_bytes)
    client = service.get_container_client(container)

    def upload(path: Path, key: str) -> None:
        with open(path, "rb") as stream:
            client.upload_blob(f"plain/{key}", stream, overwrite=True, max_concurrency=options.max_concurrency)

    return upload


def plain_gcs_upload(options: StorageOptions, bucket: str) -> Callable[[Path, str], None]:
    from google.cloud import storage
    from google.cloud.storage import transfer_manager

    blobs = storage.Client().bucket(bucket)
    return lambda path, key: transfer_manager.upload_chunks_concurrently(
        str(path), blobs.blob(f"plain/{key}"), chunk_size=options.multipart_chunk_bytes,
        max_workers=options.max_concurrency, worker_type=transfer_manager.THREAD)


PROVIDERS = {
    # name: (start emulator, SDK env for it, create bucket, URL scheme, plain SDK upload)
    "s3": (emulators.start_moto, emulators.s3_env, emulators.create_s3_bucket, "s3", plain_s3_upload),
    "azure": (None, emulators.azure_env, emulators.create_azure_container, "az", plain_azure_upload),
    "gcs": (emulators.start_gcs_emulator, emulators.gcs_env, emulators.create_gcs_bucket, "gs", plain_gcs_upload),
}


def megabytes_per_second(upload: Callable[[Path, str], None], files: list[Path]) -> float:
    started = time.perf_counter()
    for path in files:
        upload(path, path.name)
    return sum(path.stat().st_size for path in files) / MiB / (time.perf_counter() - started)


def bench_provider(name: str, files: list[Path], options: StorageOptions, repeats: int, scratch: Path) -> None:
    start, env_for, create_bucket, scheme, plain_factory = PROVIDERS[name]
    emulator = start() if start else emulators.start_azurite(scratch)
    try:
        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        os.environ.update(env_for(emulator.endpoint))
        create_bucket(emulator.endpoint, bucket)
        storage = open_storage(f"{scheme}://{bucket}/ours", options)
        ours = storage.upload
        plain = plain_factory(options, bucket)
        ours(files[0], "warm-up")  # client creation and connection set-up stay out of the timings
        plain(files[0], "warm-up")
        results: dict[str, list[float]] = {"ours": [], "plain": []}
        for repeat in range(repeats):
            order = [("ours", ours), ("plain", plain)] if repeat % 2 == 0 else [("plain", plain), ("ours", ours)]
            for label, upload in order:
                results[label].append(megabytes_per_second(upload, files))
        ours_mbps, plain_mbps = statistics.median(results["ours"]), statistics.median(results["plain"])
        # Runs of a pair are back to back, so their ratio cancels the drift of a shared 2-core machine.
        ratio = statistics.median(o / p for o, p in zip(results["ours"], results["plain"]))
        print(f"{name:6s} ours {ours_mbps:7.1f} MB/s  plain {plain_mbps:7.1f} MB/s  ours/plain {ratio:.2f}"
              f"  (runs ours {', '.join(f'{v:.0f}' for v in results['ours'])};"
              f" plain {', '.join(f'{v:.0f}' for v in results['plain'])})", flush=True)
    finally:
        emulator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default="s3,azure,gcs")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--file-mib", type=int, default=64)
    parser.add_argument("--part-mib", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    options = StorageOptions(multipart_chunk_bytes=args.part_mib * MiB, max_concurrency=args.concurrency)
    print(f"{args.files} x {args.file_mib} MiB random files, {args.part_mib} MiB parts, {args.concurrency} threads, "
          f"median of {args.repeats} alternating runs each; MB/s = MiB uploaded per second", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as scratch:
        files = []
        for index in range(args.files):
            path = Path(scratch) / f"file{index}.bin"
            path.write_bytes(os.urandom(args.file_mib * MiB))
            files.append(path)
        for name in args.providers.split(","):
            bench_provider(name, files, options, args.repeats, Path(scratch))


if __name__ == "__main__":
    main()
