"""Manage a run's checkpoints, in the local folder and in the bucket: `python -m pretrain.checkpoints list|verify|prune|
delete|export`. Reads manifests, listings and safetensors only (nothing is unpickled); deletes only when told to."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import typing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

from configs import ModelConfig, TrainingConfig
from pretrain.checkpoint.format import (
    NAME_PATTERN,
    STATE_FILE,
    CheckpointError,
    load_weights,
    read_state,
    verify_checkpoint,
)
from pretrain.checkpoint.retention import (
    RetentionPolicy,
    best_record,
    checkpoints_to_delete,
    reasons_to_keep,
)
from pretrain.checkpoint.store import (
    CheckpointStore,
    StoredCheckpoint,
    download_checkpoint,
)
from pretrain.errors import one_line
from pretrain.model.export import export_state
from pretrain.protocol import EXIT_BAD_INPUT, EXIT_OK
from pretrain.storage import StorageError, open_storage, storage_options

log = logging.getLogger("checkpoints")
VERBS = ("list", "verify", "prune", "delete", "export")
TRUE_WORDS, FALSE_WORDS = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ValueError(f"{message} (see {self.prog} --help)")


def _bool(text: str) -> bool:
    if text.lower() in TRUE_WORDS | FALSE_WORDS:
        return text.lower() in TRUE_WORDS
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pretrain.checkpoints", description=__doc__.splitlines()[0], allow_abbrev=False)
    verbs = parser.add_subparsers(dest="verb", metavar="|".join(VERBS), parser_class=_Parser)
    where = _Parser(add_help=False, allow_abbrev=False)
    where.add_argument("--output-dir", default="checkpoints", help="the local checkpoint folder (default: checkpoints)")
    where.add_argument("--checkpoint-bucket", default="", help="the run's bucket URL (gs://, s3://, az://, file://)")
    where.add_argument("--only", choices=("local", "bucket"), help="act on one of the two only")
    where.add_argument("--gcs-credentials", default="", help="a service-account JSON; else the default chain")
    where.add_argument("--gcp-project", default="")
    where.add_argument("--s3-endpoint-url", default="", help="for S3-compatible stores")
    policy = _Parser(add_help=False, allow_abbrev=False)
    policy.add_argument("--keep", type=int, help="the newest N kept (default: the run's --save-total-limit locally, "
                                                 "--remote-save-total-limit in the bucket)")
    policy.add_argument("--keep-best", type=_bool, metavar="BOOL", help="keep the best eval loss (default: the run's)")
    policy.add_argument("--keep-every-steps", type=int, metavar="K",
                        help="keep every step divisible by K (default: the run's)")

    verbs.add_parser("list", parents=[where, policy], help="step, time, size, complete, uploaded, best or milestone")
    verify = verbs.add_parser("verify", parents=[where], help="sizes and CRC32C of every file against the manifest")
    verify.add_argument("names", nargs="*", metavar="NAME", help="checkpoints to verify (default: all)")
    verify.add_argument("--quick", action="store_true",
                        help="in the bucket, sizes and the checksums the store reports only (no download)")
    prune = verbs.add_parser("prune", parents=[where, policy], help="apply the retention policy (a dry run unless "
                                                                    "--apply)")
    prune.add_argument("--apply", action="store_true", help="delete what the dry run lists")
    delete = verbs.add_parser("delete", parents=[where], help="delete the named checkpoints (needs --yes)")
    delete.add_argument("names", nargs="+", metavar="NAME")
    delete.add_argument("--yes", action="store_true", help="really delete them")
    export = verbs.add_parser("export", parents=[where], help="a Hugging Face folder from any checkpoint")
    export.add_argument("name", metavar="NAME", help="a checkpoint name, latest or best")
    export.add_argument("--out", required=True, help="the folder to write the model into")
    export.add_argument("--weights", choices=("live", "ema"), default="live", help="the weights or their EMA")
    export.add_argument("--tokenizer", default="", help="a tokenizer.json or folder; default: the run's data's")
    return parser


@dataclass
class Stores:
    """The local folder and the bucket the flags name (either may be absent)."""

    local: CheckpointStore | None
    remote: CheckpointStore | None

    def each(self) -> list[tuple[str, CheckpointStore]]:
        return [(kind, store) for kind, store in (("local", self.local), ("bucket", self.remote)) if store is not None]


def open_stores(args: argparse.Namespace) -> Stores:
    local_dir = Path(args.output_dir)
    local = CheckpointStore.local(local_dir) if args.only != "bucket" else None
    remote = None
    if args.checkpoint_bucket and args.only != "local":
        options = storage_options(SimpleNamespace(
            gcs_credentials=args.gcs_credentials, gcp_project=args.gcp_project, s3_endpoint_url=args.s3_endpoint_url,
            storage_max_retries=3, storage_retry_backoff_seconds=0.5))
        remote = CheckpointStore(open_storage(args.checkpoint_bucket, options))
        remote.storage.list("")  # an unreachable bucket or bad credentials fail here, in one line
    elif args.only == "bucket":
        raise ValueError("--only bucket: pass --checkpoint-bucket URL too")
    if local is not None and not local_dir.is_dir():
        if remote is None:
            raise ValueError(f"--output-dir {local_dir}: no such folder; pass the run's --output-dir, or "
                             "--checkpoint-bucket URL for its bucket")
        local = None
    return Stores(local, remote)


def run_config(stores: Stores) -> dict:
    """The config of the newest checkpoint's run (its retention settings and data), from its trainer_state.json."""
    for kind, store in stores.each():
        for name in store.names():
            try:
                if kind == "local":
                    return read_state(Path(store.storage.root) / name).config
                with tempfile.TemporaryDirectory(prefix="checkpoints-state-") as scratch:
                    store.storage.download(f"{name}/{STATE_FILE}", Path(scratch) / STATE_FILE)
                    return read_state(Path(scratch)).config
            except (CheckpointError, StorageError, OSError, ValueError):
                continue
    return {}


def policy_for(args: argparse.Namespace, config: dict, remote: bool) -> RetentionPolicy:
    defaults = TrainingConfig()
    keep = args.keep if args.keep is not None else config.get(
        "remote_save_total_limit" if remote else "save_total_limit",
        defaults.remote_save_total_limit if remote else defaults.save_total_limit)
    if keep < 1:
        raise ValueError(f"--keep must be at least 1 (the newest checkpoint always stays), got {keep}")
    keep_best = args.keep_best if args.keep_best is not None else bool(config.get("keep_best", False))
    every = args.keep_every_steps if args.keep_every_steps is not None else int(config.get("keep_every_steps", 0))
    if every < 0:
        raise ValueError(f"--keep-every-steps must not be negative, got {every}")
    return RetentionPolicy(keep=keep, keep_best=keep_best, keep_every_steps=every)


def list_checkpoints(args: argparse.Namespace, stores: Stores, out: typing.TextIO) -> int:
    config = run_config(stores)
    described = {kind: {c.name: c for c in store.describe_all()} for kind, store in stores.each()}
    names = sorted({name for found in described.values() for name in found}, key=_step, reverse=True)
    kept: dict[str, dict[str, list[str]]] = {}
    for kind, found in described.items():
        complete = [c.record for c in found.values() if c.complete]
        complete.sort(key=lambda r: r.step, reverse=True)
        kept[kind] = reasons_to_keep(complete, policy_for(args, config, remote=kind == "bucket"))
    columns = f"{'checkpoint':<44}{'step':>8}  {'saved':<19}  {'size':>9}  {'local':<10}  {'bucket':<10}  " \
              f"{'eval loss':>9}  kept as"
    print(columns, file=out)
    for name in names:
        entries = [described[kind].get(name) for kind in ("local", "bucket") if kind in described]
        first = next(c for c in entries if c is not None)
        reasons = sorted({r for kind in kept for r in kept[kind].get(name, [])}, key=["newest", "best",
                                                                                       "milestone"].index)
        print(f"{name:<44}{first.step:>8}  {_when(first.created_unix):<19}  {_size(first.size_bytes):>9}  "
              f"{_status(described, 'local', name):<10}  {_status(described, 'bucket', name):<10}  "
              f"{_loss(first):>9}  {', '.join(reasons) or '-'}", file=out)
    for kind, store in stores.each():
        objects = store.storage.list("")
        in_checkpoints = sum(c.size_bytes for c in described[kind].values())
        print(f"{kind} {store.url}: {len(described[kind])} checkpoints, {_size(in_checkpoints)}; "
              f"{_size(sum(o.size for o in objects))} in all ({len(objects)} objects)", file=out)
    return EXIT_OK


def verify(args: argparse.Namespace, stores: Stores, out: typing.TextIO) -> int:
    """Every file's size and CRC32C against the manifest: local folders read in full; bucket copies downloaded into
    a temporary folder and checked the same way (--quick: sizes and the store's own CRC32C, where it keeps one)."""
    _check_names(args.names)
    listed = {kind: store.names() for kind, store in stores.each()}
    missing = [name for name in args.names if not any(name in names for names in listed.values())]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such checkpoint in {_where(stores)}; `list` shows them")
    bad = 0
    for kind, store in stores.each():
        for name in [n for n in args.names if n in listed[kind]] if args.names else listed[kind]:
            problem = _verify_one(kind, store, name, args.quick)
            bad += problem is not None
            print(f"{kind} {name}: {problem or 'ok'}", file=out)
    if bad:
        raise CheckpointError(f"{bad} checkpoint(s) failed verification (see above)")
    return EXIT_OK


def _verify_one(kind: str, store: CheckpointStore, name: str, quick: bool) -> str | None:
    if kind == "local":
        return verify_checkpoint(Path(store.storage.root) / name)
    if quick:
        return store.problem(name)
    with tempfile.TemporaryDirectory(prefix="checkpoints-verify-") as scratch:
        try:
            download_checkpoint(store, name, Path(scratch))
        except (CheckpointError, StorageError) as error:
            return one_line(error)
    return None


def prune(args: argparse.Namespace, stores: Stores, out: typing.TextIO) -> int:
    config = run_config(stores)
    for kind, store in stores.each():
        policy = policy_for(args, config, remote=kind == "bucket")
        complete = [c.record for c in store.describe_all() if c.complete]
        doomed = checkpoints_to_delete(complete, policy)
        rule = (f"keep the newest {policy.keep}" + (", the best eval loss" if policy.keep_best else "")
                + (f", every {policy.keep_every_steps} steps" if policy.keep_every_steps else ""))
        if not doomed:
            print(f"{kind} {store.url}: nothing to prune ({rule})", file=out)
        for name in doomed:
            if args.apply:
                store.delete(name)
            print(f"{kind} {store.url}: {'deleted' if args.apply else 'would delete'} {name} ({rule})", file=out)
    if not args.apply:
        print("dry run: nothing was deleted; pass --apply to delete", file=out)
    return EXIT_OK


def delete(args: argparse.Namespace, stores: Stores, out: typing.TextIO) -> int:
    _check_names(args.names)
    found = [(kind, store, name) for name in args.names for kind, store in stores.each() if name in store.names()]
    missing = [name for name in args.names if not any(n == name for _, _, n in found)]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such checkpoint in {_where(stores)}; `list` shows them")
    if not args.yes:
        raise ValueError(f"delete removes {len(found)} checkpoint cop{'y' if len(found) == 1 else 'ies'} for good: "
                         "pass --yes to delete them")
    for kind, store, name in found:
        store.delete(name)
        print(f"{kind} {store.url}: deleted {name}", file=out)
    return EXIT_OK


def export(args: argparse.Namespace, stores: Stores, out: typing.TextIO) -> int:
    """Weights from safetensors only; the model shape and the data (for its tokenizer) from trainer_state.json."""
    with tempfile.TemporaryDirectory(prefix="checkpoints-export-") as scratch:
        folder = _local_copy(args.name, stores, Path(scratch))
        config = read_state(folder).config
        weights = load_weights(folder, args.weights)
        tokenizer = Path(args.tokenizer) if args.tokenizer else _run_tokenizer(config)
        final = export_state(ModelConfig(**config["model"]), weights, Path(args.out), tokenizer)
    print(f"exported {folder.name} ({args.weights} weights{', with the tokenizer' if tokenizer else ''}) to {final}",
          file=out)
    return EXIT_OK


def _local_copy(wanted: str, stores: Stores, scratch: Path) -> Path:
    """A verified local folder of the checkpoint `wanted` (a name, latest or best): the local one, else downloaded."""
    if wanted not in ("latest", "best"):
        _check_names([wanted])
    for kind, store in stores.each():
        complete = [c for c in store.describe_all() if c.complete]
        if wanted == "latest":
            chosen = complete[0].name if complete else None
        elif wanted == "best":
            best = best_record([c.record for c in complete])
            chosen = best.name if best else None
        else:
            chosen = wanted if any(c.name == wanted for c in complete) else None
        if chosen is None:
            continue
        if kind == "local":
            folder = Path(store.storage.root) / chosen
            problem = verify_checkpoint(folder)
            if problem:
                raise CheckpointError(problem)
            return folder
        return download_checkpoint(store, chosen, scratch)
    what = "no checkpoint with an eval loss" if wanted == "best" else f"{wanted}: no complete checkpoint"
    raise FileNotFoundError(f"{what} in {_where(stores)}; `list` shows them")


def _run_tokenizer(config: dict) -> Path | None:
    """The tokenizer of the run's data (dataset.json beside the shards), as the run's own export carries it."""
    from pretrain.data.training_data import find_tokenizer

    try:
        return find_tokenizer(SimpleNamespace(**{**_storage_defaults(), **config}))
    except (FileNotFoundError, ValueError, StorageError) as error:
        log.warning("exporting without a tokenizer: %s", one_line(error))
        return None


def _storage_defaults() -> dict:
    d = TrainingConfig()
    return {"data_bucket": d.data_bucket, "gcs_credentials": d.gcs_credentials, "gcp_project": d.gcp_project,
            "s3_endpoint_url": d.s3_endpoint_url, "storage_max_retries": d.storage_max_retries,
            "storage_retry_backoff_seconds": d.storage_retry_backoff_seconds}


def _check_names(names: list[str]) -> None:
    for name in names:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"{name!r} is not a checkpoint name: expected checkpoint-epochE-stepS-filesF (no '/' or "
                             "'..'), as `list` shows them")


def _status(described: dict[str, dict[str, StoredCheckpoint]], kind: str, name: str) -> str:
    if kind not in described:
        return "-"
    found = described[kind].get(name)
    if found is None:
        return "absent"
    if not found.complete:
        return "incomplete"
    return "complete" if kind == "local" else "uploaded"


def _step(name: str) -> int:
    return int(NAME_PATTERN.match(name).group(2))


def _when(unix: float | None) -> str:
    return datetime.fromtimestamp(unix).strftime("%Y-%m-%d %H:%M:%S") if unix else "-"


def _size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _loss(stored: StoredCheckpoint) -> str:
    return f"{stored.eval_loss:.4f}" if stored.eval_loss is not None else "-"


def _where(stores: Stores) -> str:
    return " or ".join(store.url for _, store in stores.each()) or "nowhere"


COMMANDS = {"list": list_checkpoints, "verify": verify, "prune": prune, "delete": delete, "export": export}


def main(argv: list[str] | None = None, out: typing.TextIO | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    out = out or sys.stdout
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        if args.verb is None:
            raise ValueError(f"name what to do: python -m pretrain.checkpoints {{{','.join(VERBS)}}} ... (--help)")
        return COMMANDS[args.verb](args, open_stores(args), out)
    except (ValueError, FileNotFoundError, CheckpointError, StorageError, OSError, KeyError,
            json.JSONDecodeError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
