"""Resolving the INPUT arguments (local paths, folders, globs; bucket URLs, with globs, listed through pretrain.storage)
into one sorted list of input files, and downloading bucket inputs into the work folder as numbered Sources."""

from __future__ import annotations

import fnmatch
import glob
import os
from dataclasses import dataclass
from pathlib import Path

from pretrain.prepare.readers import InputError, Source, kind_of, suffix_list
from pretrain.storage import Storage, StorageOptions, open_storage
from pretrain.storage.local import local_root

GLOB_CHARS = "*?["


def is_remote(item: str) -> bool:
    scheme, separator, _ = item.partition("://")
    return bool(separator) and scheme.lower() != "file"


def _local_candidates(item: str) -> list[str]:
    path_text = str(local_root(item)) if item.startswith("file://") else item
    if any(c in path_text for c in GLOB_CHARS):
        matches = sorted(glob.glob(path_text, recursive=True))
        files = [m for m in matches if os.path.isfile(m) and kind_of(m)]
        if not files:
            raise InputError(f"{item}: matches no {suffix_list()} file; check the pattern")
        return files
    path = Path(path_text)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and kind_of(p.name))
        if not files:
            raise InputError(f"{item}: folder holds no {suffix_list()} file")
        return files
    if not path.exists():
        raise InputError(f"{item}: no such file or folder; pass existing input files, folders or globs")
    if not kind_of(path.name):
        raise InputError(f"{item}: unsupported file type; expected {suffix_list()}")
    return [path_text]


def _remote_candidates(item: str, options: StorageOptions) -> list[tuple[str, Storage, str, int]]:
    """(url, storage, key, size) of every input object an input URL names."""
    cut = min((item.find(c) for c in GLOB_CHARS if c in item), default=-1)
    if cut >= 0:
        base = item[: item.rfind("/", 0, cut)]
        pattern = item[len(base) + 1:]
        storage = open_storage(base, options)
        found = [(f"{base}/{o.key}", storage, o.key, o.size) for o in storage.list()
                 if fnmatch.fnmatchcase(o.key, pattern) and kind_of(o.key)]
    else:
        parent, _, name = item.rstrip("/").rpartition("/")
        storage = open_storage(parent, options)
        found = [(item, storage, o.key, o.size) for o in storage.list(name) if o.key == name]
        if found and not kind_of(name):
            raise InputError(f"{item}: unsupported file type; expected {suffix_list()}")
        if not found:
            folder = open_storage(item.rstrip("/"), options)
            found = [(f"{item.rstrip('/')}/{o.key}", folder, o.key, o.size) for o in folder.list() if kind_of(o.key)]
    if not found:
        raise InputError(f"{item}: names no {suffix_list()} object; check the URL")
    return found


@dataclass(frozen=True)
class PlannedInput:
    url: str
    size: int
    storage: Storage | None
    key: str | None


def plan_inputs(items: list[str], options: StorageOptions) -> list[PlannedInput]:
    """Every input file the arguments name, once each, sorted by URL: the order gives each its source index."""
    planned: dict[str, PlannedInput] = {}
    for item in items:
        if is_remote(item):
            for url, storage, key, size in _remote_candidates(item, options):
                planned[url] = PlannedInput(url, size, storage, key)
        else:
            for path in _local_candidates(item):
                try:
                    size = os.stat(path).st_size
                except OSError as error:
                    raise InputError(f"{path}: cannot read ({error.strerror}); check the path and permissions"
                                     ) from None
                planned[path] = PlannedInput(path, size, None, None)
    return [planned[url] for url in sorted(planned)]


def materialize_inputs(planned: list[PlannedInput], work: Path) -> list[Source]:
    """Sources with local paths; bucket objects are downloaded into the work folder once (skipped if there)."""
    sources = []
    for index, item in enumerate(planned):
        path = item.url
        if item.storage is not None:
            local = work / "inputs" / f"{index:05d}_{item.key.rsplit('/', 1)[-1]}"
            if not (local.is_file() and local.stat().st_size == item.size):
                item.storage.download(item.key, local)
            path = str(local)
        sources.append(Source(index, item.url, path, kind_of(item.url), item.size))
    return sources
