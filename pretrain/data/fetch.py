"""Getting shards local and validated while training runs: the fetcher (one per node, in need order), the gate that
readers wait on before opening a shard, and cheap inspection of remote shards by ranged header reads.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pretrain.data.download import is_intact, local_path_for
from pretrain.data.format import (
    ShardError,
    ShardInfo,
    array_header_from_head,
    check_header,
    read_array_header,
    read_array_header_from,
    validated_id_range,
)
from pretrain.errors import one_line
from pretrain.files import write_atomically
from pretrain.storage import ObjectInfo, Storage

log = logging.getLogger(__name__)

# Per-shard validation records and per-run fetcher status files live here, inside the data folder, so every
# process of the node (DataLoader workers included) sees them, and a restarted VM with the same disk skips work.
CHECKED_DIR = ".pretrain-checked"
MARKER_FORMAT = 1
HEARTBEAT_SECONDS = 2.0
# A fetcher whose heartbeat is this old has died with its process; readers stop waiting for it.
STALE_SECONDS = 60.0
# The longest a reader waits for one shard even while the fetcher lives: a stuck download must end the run.
WAIT_SECONDS = 3600.0
POLL_SECONDS = 0.2
FETCH_WORKERS = 4
# The fetcher takes a shard once reading is within this many half blocks (see SampleOrder.progress_mark) of the block
# that first needs it: the rest of the current block at once, the next block's shards from the middle of this one.
# A block lasts about block_chunks / shard_chunks shards' worth of samples (eight by default), so half of one is far
# longer than fetching the next one's shards, and the first steps do not share the CPU and the network with a whole
# second block (bench/bench_new_vm.py: resume at 10x data, first step after the data is ready 0.7 -> 4.9 s with a
# window of one whole block ahead, 64-chunk blocks).
AHEAD_MARKS = 1
HEADER_WORKERS = 16
RANGE_CHUNK_BYTES = 64 * 1024
HEAD_BYTES = 4096  # zip local header + .npy header of a numpy.savez shard, with room to spare
CLOSE_WAIT_SECONDS = 10.0
STATUS_FILES_KEPT_SECONDS = 7 * 24 * 3600.0


class FetchFailed(ShardError):
    """The background fetcher stopped on an error; the message is its one line."""


class ReadyGate:
    """Whether a shard is local and validated, as recorded by the fetcher; picklable for DataLoader workers.

    A shard is ready when its marker matches the file's current size and mtime and its recorded id range fits
    vocab_size. wait_ready() blocks until then, and ends with a one-line error when the fetcher reports a
    failure, when its heartbeat goes stale, when it finished without the shard, or after wait_seconds.
    With reports_progress, note_progress() records how far this process has read (one small file per process,
    rewritten only when the mark grows: twice per block), which moves the fetcher's window.
    """

    def __init__(self, data_dir: Path, run_token: str, vocab_size: int, wait_seconds: float = WAIT_SECONDS,
                 stale_seconds: float = STALE_SECONDS, reports_progress: bool = True):
        self.data_dir = Path(data_dir)
        self.run_token = run_token
        self.vocab_size = vocab_size
        self.wait_seconds = wait_seconds
        self.stale_seconds = stale_seconds
        self.reports_progress = reports_progress
        self._reported = (os.getpid(), -1)

    @property
    def checked_dir(self) -> Path:
        return self.data_dir / CHECKED_DIR

    def marker_path(self, rel_path: str) -> Path:
        return self.checked_dir.joinpath(*f"{rel_path}.json".split("/"))

    def status_path(self, kind: str) -> Path:
        return self.checked_dir / f"run-{self.run_token}.{kind}"

    def is_ready(self, rel_path: str) -> bool:
        try:
            marker = json.loads(self.marker_path(rel_path).read_text())
            stat = (self.data_dir / rel_path).stat()
        except (OSError, ValueError):
            return False
        return (
            marker.get("format") == MARKER_FORMAT
            and marker.get("size") == stat.st_size
            and marker.get("mtime_ns") == stat.st_mtime_ns
            and marker["min_id"] >= 0
            and marker["max_id"] < self.vocab_size
        )

    def failure(self) -> str | None:
        try:
            return self.status_path("error").read_text().strip() or "the shard fetcher failed"
        except OSError:
            return None

    def reached_mark(self) -> int:
        """The furthest progress mark any reader of this run on this node has reported, or -1 before any report."""
        reached = -1
        for path in self.checked_dir.glob(f"run-{self.run_token}.reading-*"):
            try:
                reached = max(reached, int(path.read_text()))
            except (OSError, ValueError):
                continue  # its process is rewriting it (atomically) or has just removed it
        return reached

    def note_progress(self, mark: int) -> None:
        pid, reported = self._reported
        if not self.reports_progress or (pid == os.getpid() and mark <= reported):
            return
        write_atomically(self.status_path(f"reading-{os.getpid()}"), str(mark))
        self._reported = (os.getpid(), mark)

    def wait_ready(self, rel_path: str) -> None:
        if self.is_ready(rel_path):
            return
        began = time.monotonic()
        logged = False
        while not self.is_ready(rel_path):
            message = self.failure()
            if message is not None:
                raise FetchFailed(message)
            if self.status_path("done").exists():
                raise FetchFailed(
                    f"{self.data_dir / rel_path}: shard is not ready although the fetcher finished (deleted or "
                    f"changed during the run?); restore it and resume"
                )
            waited = time.monotonic() - began
            heartbeat = self._heartbeat_age()
            if heartbeat is not None and heartbeat > self.stale_seconds:
                raise FetchFailed(
                    f"{self.data_dir / rel_path}: waiting for this shard, but the shard fetcher stopped "
                    f"{heartbeat:.0f} s ago without a word (its process died?); resume to restart it"
                )
            if waited > self.wait_seconds:
                raise FetchFailed(
                    f"{self.data_dir / rel_path}: shard still not fetched after {waited:.0f} s; check the data "
                    f"bucket and the network, then resume"
                )
            if not logged:
                log.warning("waiting for shard %s to arrive (fetched in the background)", rel_path)
                logged = True
            time.sleep(POLL_SECONDS)

    def _heartbeat_age(self) -> float | None:
        try:
            return time.time() - self.status_path("alive").stat().st_mtime
        except OSError:
            return None


class ShardFetcher:
    """Makes shards local and validated, in the order given: download when missing or damaged (with a bucket),
    check size, header and token ids, then write the marker the gate reads. One per node (its local main).

    In the background it keeps a window: a shard is taken once the readers (as the gate reports them) are within
    ahead_marks half blocks of the block where the order first needs it, so the fetch of a large bucket trickles along
    with training instead of competing with its first steps, and a disk holds what the next blocks need early.
    """

    def __init__(self, gate: ReadyGate, seq_len: int, storage: Storage | None = None,
                 remote: dict[str, ObjectInfo] | None = None, workers: int | None = None,
                 ahead_marks: int = AHEAD_MARKS):
        self.gate = gate
        self.seq_len = seq_len
        self.storage = storage
        self.remote = remote or {}
        self.workers = FETCH_WORKERS if workers is None else workers
        self.ahead_marks = ahead_marks
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.made_ready: list[str] = []  # in completion order; tests count downloads by it
        self.downloaded: list[str] = []
        self.waiting_for_readers = threading.Event()  # set while every shard within the window is taken

    def ensure(self, shards: Iterable[ShardInfo]) -> None:
        """Blocking, on the calling thread: every given shard ready or a one-line error naming the first bad one."""
        shards = list(shards)
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            for future in [pool.submit(self._make_ready, shard) for shard in shards]:
                future.result()

    def start(self, schedule: Iterable[tuple[ShardInfo, int]], start_mark: int) -> None:
        """Fetch in the background, self.workers at a time, each (shard, block where first needed) of the schedule
        (in need order) once the readers are within ahead_marks half blocks of its block; start_mark is the
        progress mark where they begin."""
        schedule = list(schedule)
        self.gate.checked_dir.mkdir(parents=True, exist_ok=True)
        _remove_old_status_files(self.gate.checked_dir)
        self._touch_heartbeat()
        self._thread = threading.Thread(target=self._run, args=(schedule, start_mark), name="shard-fetcher",
                                        daemon=True)
        self._thread.start()

    def close(self, timeout: float = CLOSE_WAIT_SECONDS) -> None:
        """Stops taking new shards; waits up to timeout for those in flight (the threads are daemons after that)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for path in self.gate.checked_dir.glob(f"run-{self.gate.run_token}.*"):
            if not path.name.endswith(".error"):
                path.unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self, schedule: list[tuple[ShardInfo, int]], start_mark: int) -> None:
        pending = list(reversed(schedule))
        lock = threading.Lock()
        errors: list[str] = []
        in_flight = 0

        def take() -> ShardInfo | None:
            """The next shard in need order once the readers are near enough; None when all are taken."""
            nonlocal in_flight
            while not self._stop.is_set() and not errors:
                with lock:
                    if not pending:
                        return None
                    reached = max(start_mark, self.gate.reached_mark())
                    if 2 * pending[-1][1] <= reached + self.ahead_marks:
                        self.waiting_for_readers.clear()
                        in_flight += 1
                        return pending.pop()[0]
                    if in_flight == 0:
                        self.waiting_for_readers.set()
                time.sleep(POLL_SECONDS)
            return None

        def work() -> None:
            nonlocal in_flight
            while not self._stop.is_set() and not errors:
                shard = take()
                if shard is None:
                    return
                try:
                    self._make_ready(shard)
                except Exception as error:  # noqa: BLE001 - reported to every reader through the error file
                    errors.append(one_line(error))
                    self._stop.set()
                finally:
                    with lock:
                        in_flight -= 1

        # Daemon threads rather than a pool: a download in flight must not hold the interpreter at exit.
        threads = [threading.Thread(target=work, name=f"shard-fetch-{i}", daemon=True) for i in range(self.workers)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            self._touch_heartbeat()
            for thread in threads:
                thread.join(HEARTBEAT_SECONDS / len(threads))
        if errors:
            write_atomically(self.gate.status_path("error"), errors[0] + "\n")
        elif not self._stop.is_set():
            write_atomically(self.gate.status_path("done"), "")

    def _touch_heartbeat(self) -> None:
        path = self.gate.status_path("alive")
        path.touch()
        os.utime(path)

    def _make_ready(self, shard: ShardInfo) -> None:
        gate, path = self.gate, self.gate.data_dir / shard.path
        if gate.is_ready(shard.path) and path.stat().st_size == shard.size_bytes:
            return
        remote = self.remote.get(shard.path)
        if self.storage is not None and remote is not None:
            if not is_intact(path, remote):
                self.storage.download(shard.path, local_path_for(gate.data_dir, shard.path))
                self.downloaded.append(shard.path)
        elif not path.is_file():
            where = f" and {self.storage.url} lacks it" if self.storage is not None else ""
            raise FileNotFoundError(
                f"{path}: shard of this run is missing{where}; restore it (or its bucket) and resume, or start a new run"
            )
        stat = path.stat()
        if stat.st_size != shard.size_bytes:
            raise ShardError(
                f"{path}: shard has {stat.st_size} bytes but the run recorded {shard.size_bytes}; the run needs the "
                f"exact shards it started with, so restore the original file or start a new run"
            )
        header = read_array_header(path)
        check_header(path, header, self.seq_len)
        if header.num_tokens != shard.num_tokens:
            raise ShardError(
                f"{path}: shard holds {header.num_tokens} tokens but the run recorded {shard.num_tokens}; "
                f"restore the original file or start a new run"
            )
        id_range = validated_id_range(path, header, gate.vocab_size)
        marker = {"format": MARKER_FORMAT, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                  "num_tokens": header.num_tokens, "min_id": id_range[0], "max_id": id_range[1]}
        write_atomically(gate.marker_path(shard.path), json.dumps(marker))
        self.made_ready.append(shard.path)


class RangeFile(io.RawIOBase):
    """A remote object as a read-only seekable file, fetched in aligned chunks by Storage.read_range (cached), so
    zipfile can find a shard's .npy header with two or three small requests instead of a download."""

    def __init__(self, storage: Storage, key: str, size: int, chunk_bytes: int = RANGE_CHUNK_BYTES):
        super().__init__()
        self.storage, self.key, self.size, self.chunk_bytes = storage, key, size, chunk_bytes
        self.position = 0
        self.chunks: dict[int, bytes] = {}
        self.requests = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        end = min(self.size, self.position + len(buffer))
        filled = 0
        while self.position < end:
            index = self.position // self.chunk_bytes
            chunk = self._chunk(index)
            within = self.position - index * self.chunk_bytes
            piece = chunk[within : within + end - self.position]
            if not piece:
                break
            buffer[filled : filled + len(piece)] = piece
            filled += len(piece)
            self.position += len(piece)
        return filled

    def _chunk(self, index: int) -> bytes:
        if index not in self.chunks:
            self.chunks[index] = self.storage.read_range(self.key, index * self.chunk_bytes, self.chunk_bytes)
            self.requests += 1
        return self.chunks[index]


def inspect_remote_shards(storage: Storage, objects: list[ObjectInfo], seq_len: int,
                          workers: int = HEADER_WORKERS) -> list[ShardInfo]:
    """ShardInfo of each object from its .npy header alone (ranged reads, in parallel); ShardError names the first
    bad one by URL. One 4 KiB request per numpy.savez shard (a few for other zip layouts), never the tokens."""

    def inspect(info: ObjectInfo) -> ShardInfo:
        name = storage.object_url(info.key)
        header = array_header_from_head(name, storage.read_range(info.key, 0, HEAD_BYTES), info.size)
        if header is None:
            header = read_array_header_from(name, io.BufferedReader(RangeFile(storage, info.key, info.size)), info.size)
        check_header(name, header, seq_len)
        return ShardInfo(path=info.key, num_tokens=header.num_tokens, size_bytes=info.size)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(inspect, objects))


def inspect_local_headers(data_dir: Path, rel_paths: list[str], seq_len: int,
                          workers: int = HEADER_WORKERS) -> list[ShardInfo]:
    """ShardInfo of each local shard from its header alone; the token-id check waits for the fetcher."""

    def inspect(rel_path: str) -> ShardInfo:
        path = data_dir / rel_path
        header = read_array_header(path)
        check_header(path, header, seq_len)
        return ShardInfo(path=rel_path, num_tokens=header.num_tokens, size_bytes=path.stat().st_size)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(inspect, rel_paths))


def _remove_old_status_files(checked_dir: Path) -> None:
    """Status files of runs that ended long ago (a killed run leaves its own behind)."""
    cutoff = time.time() - STATUS_FILES_KEPT_SECONDS
    for path in checked_dir.glob("run-*"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass  # another node's fetcher removed it first
