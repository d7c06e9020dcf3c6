"""Sample text from any checkpoint, local or in the bucket: `python -m pretrain.generate --checkpoint latest --prompt "..."`.

The model shape and data settings come from the checkpoint itself; the tokenizer is the one the data was prepared with
(dataset.json beside the shards, fetched from --data-bucket when missing), or --tokenizer.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

from configs import TrainingConfig, from_dict
from pretrain.checkpoint.format import (
    CheckpointError,
    load_checkpoint,
    verify_checkpoint,
)
from pretrain.checkpoint.state_dicts import load_model_state
from pretrain.checkpoint.store import CheckpointStore, download_checkpoint
from pretrain.data.training_data import find_tokenizer
from pretrain.model.build import build_model
from pretrain.prepare.tokenizer import TokenizerError, load_tokenizer
from pretrain.storage import StorageError, open_storage

log = logging.getLogger("generate")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="latest",
                        help="'latest', a checkpoint folder name, or a path to a checkpoint folder")
    parser.add_argument("--output-dir", default="checkpoints", help="where local checkpoints are")
    parser.add_argument("--checkpoint-bucket", default="", help="also look there (gs://, s3://, az://, file://)")
    parser.add_argument("--tokenizer", default="", help="a tokenizer.json or folder; default: the data's")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def checkpoint_folder(args: argparse.Namespace, scratch: Path) -> Path:
    given = Path(args.checkpoint)
    if given.is_dir():
        problem = verify_checkpoint(given)
        if problem:
            raise CheckpointError(problem)
        return given
    stores = [CheckpointStore.local(Path(args.output_dir))]
    if args.checkpoint_bucket:
        stores.append(CheckpointStore(open_storage(args.checkpoint_bucket)))
    for store in stores:
        names = store.complete() if args.checkpoint == "latest" else [n for n in store.names() if n == args.checkpoint]
        if names:
            if store is stores[0]:
                return Path(args.output_dir) / names[0]
            return download_checkpoint(store, names[0], scratch)
    where = " or ".join(store.url for store in stores)
    raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no complete checkpoint in {where}")


def training_config(saved: dict) -> TrainingConfig:
    return from_dict(saved)


def generate(args: argparse.Namespace) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="generate-") as scratch:
        folder = checkpoint_folder(args, Path(scratch))
        payload = load_checkpoint(folder)
        config = training_config(payload.state.config)
        tokenizer_path = Path(args.tokenizer) if args.tokenizer else find_tokenizer(config)
        if tokenizer_path is None:
            raise FileNotFoundError(
                f"{folder}: its data ({config.data_dir}) has no dataset.json naming a tokenizer; pass --tokenizer PATH")
        tokenizer = load_tokenizer(tokenizer_path, flag="--tokenizer")
        model = build_model(config.model)
        load_model_state(model, payload.model_state)
        model.eval()
        log.info("generating with %s (step %d)", folder.name, payload.state.step)
        torch.manual_seed(args.seed)
        outputs = []
        for prompt in args.prompt:
            ids = torch.tensor([tokenizer.tokenizer.encode(prompt).ids], dtype=torch.long)
            with torch.no_grad():
                generated = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=True,
                                           temperature=args.temperature, top_k=args.top_k,
                                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
            outputs.append(tokenizer.tokenizer.decode(generated[0].tolist(), skip_special_tokens=True))
        return outputs


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        for text in generate(args):
            print(text.replace("\n", " "))
    except (CheckpointError, FileNotFoundError, StorageError, TokenizerError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
