"""Download throughput of checkpoint-shaped files on local emulators (moto S3, gcp-storage-emulator, Azurite):
Storage.download_many vs the plain SDK call with its defaults, in one run; prints MB/s and ours/plain (target >= 0.9).
Not a test. From the repository root: python -m bench.bench_download_throughput [--providers s3 --big-mib 300 --serial]
"""

from __future__ import annotations

import argparse
import os
import shutil
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
PREFIX = "ckpt"
# (key, local path) -> None: fetches one object of the bench bucket into a local file.
Fetch = Callable[[str, Path], None]


def plain_s3(bucket: str, tuned: StorageOptions | None) -> Fetch:
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3")
    config = TransferConfig() if tuned is None else TransferConfig(
        multipart_threshold=tuned.multipart_chunk_bytes, multipart_chunksize=tuned.multipart_chunk_bytes,
        max_concurrency=tuned.max_concurrency)
    return lambda key, path: client.download_file(bucket, f"{PREFIX}/{key}", str(path), Config=config)


def plain_gcs(bucket: str, tuned: StorageOptions | None) -> Fetch:
    from google.cloud import storage
    from google.cloud.storage import transfer_manager

    blobs = storage.Client().bucket(bucket)
    if tuned is None:
        return lambda key, path: blobs.blob(f"{PREFIX}/{key}").download_to_filename(str(path))
    return lambda key, path: transfer_manager.download_chunks_concurrently(
        blobs.get_blob(f"{PREFIX}/{key}"), str(path), chunk_size=tuned.multipart_chunk_bytes,
        max_workers=tuned.max_concurrency, worker_type=transfer_manager.THREAD)


def plain_azure(container: str, tuned: StorageOptions | None) -> Fetch:
    from azure.storage.blob import BlobServiceClient

    sizes = {} if tuned is None else {"max_single_get_size": tuned.multipart_chunk_bytes,
                                      "max_chunk_get_size": tuned.multipart_chunk_bytes}
    client = BlobServiceClient.from_connection_string(
        os.environ["AZURE_STORAGE_CONNECTION_STRING"], **sizes).get_container_client(container)

    def fetch(key: str, path: Path) -> None:
        if tuned is None:
            path.write_bytes(client.download_blob(f"{PREFIX}/{key}").readall())
        else:
            with open(path, "wb") as out:
                client.download_blob(f"{PREFIX}/{key}", max_concurrency=tuned.max_concurrency).readinto(out)

    return fetch


PROVIDERS = {
    # name: (start emulator, SDK env for it, create bucket, URL scheme, plain SDK download)
    "s3": (emulators.start_moto, emulators.s3_env, emulators.create_s3_bucket, "s3", plain_s3),
    "gcs": (emulators.start_gcs_emulator_process, emulators.gcs_env, emulators.create_gcs_bucket, "gs", plain_gcs),
    "azure": (None, emulators.azure_env, emulators.create_azure_container, "az", plain_azure),
}


def timed_mbps(run: Callable[[Path], None], files: list[Path], scratch: Path) -> float:
    """MiB/s of one run that writes every file into a fresh folder (removed afterwards: the disk is shared)."""
    target = scratch / f"down-{uuid.uuid4().hex[:8]}"
    target.mkdir()
    try:
        started = time.perf_counter()
        run(target)
        elapsed = time.perf_counter() - started
        for path in files:
            if (target / path.name).stat().st_size != path.stat().st_size:
                raise RuntimeError(f"{target / path.name} came down with the wrong size")
    finally:
        shutil.rmtree(target)
    return sum(path.stat().st_size for path in files) / MiB / elapsed


def bench_provider(name: str, files: list[Path], options: StorageOptions, workers: int, repeats: int,
                   with_serial: bool, with_tuned: bool, scratch: Path) -> None:
    start, env_for, create_bucket, scheme, plain_factory = PROVIDERS[name]
    emulator = start() if start else emulators.start_azurite(scratch)
    try:
        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        os.environ.update(env_for(emulator.endpoint))
        create_bucket(emulator.endpoint, bucket)
        storage = open_storage(f"{scheme}://{bucket}/{PREFIX}", options)
        started = time.perf_counter()
        storage.upload_many([(path, path.name) for path in files], max_workers=workers)
        upload_mbps = sum(path.stat().st_size for path in files) / MiB / (time.perf_counter() - started)
        plain = plain_factory(bucket, None)
        keys = [path.name for path in files]
        runs: dict[str, Callable[[Path], None]] = {
            "many": lambda target: storage.download_many([(key, target / key) for key in keys], max_workers=workers),
            "plain": lambda target: [plain(key, target / key) for key in keys],
        }
        if with_serial:
            runs["serial"] = lambda target: [storage.download(key, target / key) for key in keys]
        if with_tuned:
            tuned = plain_factory(bucket, options)
            runs["tuned"] = lambda target: [tuned(key, target / key) for key in keys]
        # Client creation and connection set-up stay out of the timings.
        storage.download(keys[-1], scratch / "warm-up-ours")
        plain(keys[-1], scratch / "warm-up-plain")
        results: dict[str, list[float]] = {label: [] for label in runs}
        for repeat in range(repeats):
            # Rotating the order spreads the drift of a shared 2-core machine over every kind of run.
            labels = list(runs)[repeat % len(runs):] + list(runs)[:repeat % len(runs)]
            for label in labels:
                results[label].append(timed_mbps(runs[label], files, scratch))
        median = {label: statistics.median(values) for label, values in results.items()}
        # Each ratio pairs runs of the same repeat, which ran back to back.
        ratio = {label: statistics.median(ours / plain for ours, plain in zip(results[label], results["plain"]))
                 for label in runs if label != "plain"}
        if with_tuned:
            ratio["tuned"] = statistics.median(ours / tuned for ours, tuned in zip(results["many"], results["tuned"]))
        extra = (f"  download one by one {median['serial']:6.1f} MB/s (/plain {ratio['serial']:.2f})"
                 if with_serial else "")
        if with_tuned:
            extra += (f"  plain SDK with our part size and threads {median['tuned']:6.1f} MB/s "
                      f"(download_many/it {ratio['tuned']:.2f})")
        print(f"{name:6s} download_many {median['many']:6.1f} MB/s  plain SDK {median['plain']:6.1f} MB/s  "
              f"download_many/plain {ratio['many']:.2f}{extra}  |  our upload_many {upload_mbps:6.1f} MB/s, "
              f"download_many/upload_many {median['many'] / upload_mbps:.2f}", flush=True)
        print("       runs: " + "; ".join(f"{label} {', '.join(f'{v:.0f}' for v in values)}"
                                          for label, values in results.items()), flush=True)
    finally:
        emulator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default="s3,gcs,azure")
    parser.add_argument("--big-files", type=int, default=2, help="like model.safetensors and optimizer.pt")
    parser.add_argument("--big-mib", type=int, default=128)
    parser.add_argument("--small-files", type=int, default=3, help="like the JSON state and the manifest")
    parser.add_argument("--small-kib", type=int, default=64)
    parser.add_argument("--part-mib", type=int, default=StorageOptions.multipart_chunk_bytes // MiB)
    parser.add_argument("--concurrency", type=int, default=StorageOptions.max_concurrency)
    parser.add_argument("--workers", type=int, default=4, help="objects in flight at once in download_many")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--serial", action="store_true", help="also time Storage.download one file after another")
    parser.add_argument("--tuned", action="store_true",
                        help="also time the plain SDK call given our part size and threads (one file after another)")
    args = parser.parse_args()
    options = StorageOptions(multipart_chunk_bytes=args.part_mib * MiB, max_concurrency=args.concurrency)
    print(f"{args.big_files} x {args.big_mib} MiB + {args.small_files} x {args.small_kib} KiB random files; ours: "
          f"{args.part_mib} MiB parts (GCS downloads: at most 16 MiB, each read in one call), {args.concurrency} "
          f"threads per object, {args.workers} objects at once; "
          f"plain: SDK defaults, one file after another; median of {args.repeats} rotated runs; MB/s = MiB per second", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-download-") as scratch:
        files = []
        for index in range(args.big_files):
            files.append(Path(scratch) / f"big{index}.bin")
            files[-1].write_bytes(os.urandom(args.big_mib * MiB))
        for index in range(args.small_files):
            files.append(Path(scratch) / f"small{index}.json")
            files[-1].write_bytes(os.urandom(args.small_kib * 1024))
        for name in args.providers.split(","):
            bench_provider(name, files, options, args.workers, args.repeats, args.serial, args.tuned, Path(scratch))


if __name__ == "__main__":
    main()
