"""Turns `--config NAME --field-name VALUE ...` into one validated, frozen TrainingConfig.

This is the one place where command-line overrides are applied; every config field is a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import sys
import typing
from typing import Any

from configs import CONFIGS, ModelConfig, TrainingConfig, get_config, with_changes
from pretrain.checkpoint.format import step_of
from pretrain.data.mixture import FLAG as MIXTURE_FLAG
from pretrain.data.mixture import parse_mixture
from pretrain.model.families import family_for
from pretrain.model.sizing import apply_sizing, parse_count

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}
MIXED_PRECISION_CHOICES = ("bf16", "fp16", "no")
LR_SCHEDULES = ("cosine", "wsd", "linear")
DECAY_SHAPES = ("1-sqrt", "linear", "cosine")
SPIKE_POLICIES = ("warn", "skip", "rollback")


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in the dataclass source: the single place fields are documented."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+): [^#]*#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2)
    return comments


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_type(hint: Any) -> type:
    """The type a flag's text becomes: `int | None` (a field the model family fills when unset) parses as int."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if args else hint


def _config_fields() -> list[tuple[str, dataclasses.Field, type, str]]:
    """(section, field, type) for every overridable field, model shape included, flattened into one namespace."""
    hints = {name: _value_type(hint) for name, hint in
             {**typing.get_type_hints(ModelConfig), **typing.get_type_hints(TrainingConfig)}.items()}
    rows = []
    for section, cls in (("model shape", ModelConfig), ("training", TrainingConfig)):
        for f in dataclasses.fields(cls):
            if f.name in ("model", "name"):
                continue
            rows.append((section, f, hints[f.name], _field_comments(cls).get(f.name, "")))
    return rows


class _ErrorRaisingParser(argparse.ArgumentParser):
    """Raises a one-line ValueError instead of printing argparse's usage block and exiting with 2."""

    def error(self, message: str) -> typing.NoReturn:
        raise ValueError(message)


def build_parser(base: TrainingConfig) -> argparse.ArgumentParser:
    parser = _ErrorRaisingParser(
        prog="train.py",
        description="Pre-train a language model. Defaults shown are those of the chosen --config.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", default="test", help=f"named config: {', '.join(CONFIGS)}")
    groups = {}
    for section, f, field_type, comment in _config_fields():
        group = groups.setdefault(section, parser.add_argument_group(section))
        current = getattr(base.model, f.name) if section == "model shape" else getattr(base, f.name)
        default_text = "%(default)s" if current is not None else "unset"
        help_text = f"{comment} (default: {default_text})" if comment else f"(default: {default_text})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": current, "help": help_text}
        if field_type is bool:
            kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs.update(type=field_type, metavar=field_type.__name__.upper())
        if f.name == "mixed_precision":
            kwargs["choices"] = MIXED_PRECISION_CHOICES
        if f.name == "lr_schedule":
            kwargs["choices"] = LR_SCHEDULES
        if f.name == "wsd_decay_shape":
            kwargs["choices"] = DECAY_SHAPES
        group.add_argument(_flag(f.name), **kwargs)
    return parser


def _config_name(argv: list[str]) -> str:
    pre = _ErrorRaisingParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default="test")
    known, _ = pre.parse_known_args(argv)
    return known.config


def validate(config: TrainingConfig) -> TrainingConfig:
    """Raises ValueError naming the flag for values no run could use."""
    positive = [
        "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "seq_len", "save_steps",
        "logging_steps", "save_total_limit", "remote_save_total_limit", "max_consecutive_nonfinite",
        "block_chunks", "shard_chunks", "loss_spike_window", "loss_spike_skip_steps", "max_rollbacks",
        "rollback_window_steps",
    ]
    for name in positive:
        if getattr(config, name) <= 0:
            raise ValueError(f"{_flag(name)} must be a positive integer, got {getattr(config, name)}")
    non_negative = [
        "max_files", "eval_steps", "eval_batches", "eval_shards", "warmup_steps", "lr_decay_steps",
        "dataloader_num_workers", "sync_logs_every_minutes", "storage_max_retries",
        "weight_decay", "max_grad_norm", "upload_timeout_seconds", "preemption_grace_seconds", "final_samples",
        "z_loss_coefficient", "cooldown_steps", "stall_timeout_minutes",
        "loss_spike_sigmas", "grad_spike_sigmas", "loss_spike_lr_steps", "early_stop_patience", "keep_every_steps",
    ]
    for name in non_negative:
        if getattr(config, name) < 0:
            raise ValueError(f"{_flag(name)} must not be negative, got {getattr(config, name)}")
    if config.startup_timeout_minutes <= 0:
        raise ValueError(f"--startup-timeout-minutes must be positive, got {config.startup_timeout_minutes}")
    if config.learning_rate <= 0:
        raise ValueError(f"--learning-rate must be positive, got {config.learning_rate}")
    if config.lr_decay_steps and config.lr_decay_steps < config.max_steps:
        raise ValueError(
            f"--lr-decay-steps ({config.lr_decay_steps}) is below --max-steps ({config.max_steps}); "
            "the schedule would end before training does"
        )
    _validate_schedule(config)
    if config.init_from and "://" in config.init_from:
        raise ValueError(f"--init-from {config.init_from}: expected a local Hugging Face model folder; copy it from "
                         "the bucket first")
    if config.init_from and config.cooldown_from:
        raise ValueError("--init-from and --cooldown-from both choose the starting weights; pass one of them")
    model = config.model
    family_for(model).validate(model)
    if config.seq_len > model.max_position_embeddings:
        raise ValueError(
            f"--seq-len ({config.seq_len}) exceeds --max-position-embeddings ({model.max_position_embeddings})"
        )
    if config.gradient_checkpointing not in ("auto", "true", "false"):
        raise ValueError(f"--gradient-checkpointing must be auto, true or false, got {config.gradient_checkpointing!r}")
    if config.gpu_memory_gb < 0:
        raise ValueError(f"--gpu-memory-gb must not be negative, got {config.gpu_memory_gb}")
    if config.sample_corpus not in ("text", "synthetic"):
        raise ValueError(f"--sample-corpus must be text or synthetic, got {config.sample_corpus!r}")
    if config.wandb_mode not in ("online", "offline"):
        raise ValueError(f"--wandb-mode must be online or offline, got {config.wandb_mode!r}")
    _validate_unattended(config)
    if parse_mixture(config.data_mixture) is not None and config.data_bucket:  # MixtureError names the flag
        raise ValueError(f"{MIXTURE_FLAG} and --data-bucket: pass one; each source of a mixture names its own "
                         "bucket or folder")
    return config


def _validate_schedule(config: TrainingConfig) -> None:
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {config.lr_schedule!r}")
    if config.wsd_decay_shape not in DECAY_SHAPES:
        raise ValueError(f"--wsd-decay-shape must be one of {', '.join(DECAY_SHAPES)}, got {config.wsd_decay_shape!r}")
    if not 0 < config.wsd_decay_fraction <= 1:
        raise ValueError(f"--wsd-decay-fraction must be in (0, 1], got {config.wsd_decay_fraction}")
    if config.lr_schedule == "wsd" and not config.cooldown_steps and config.warmup_steps > config.lr_decay_start():
        raise ValueError(
            f"--warmup-steps ({config.warmup_steps}) runs past the start of the wsd decay (step "
            f"{config.lr_decay_start()}, the last --wsd-decay-fraction {config.wsd_decay_fraction:g} of "
            f"{config.effective_lr_decay_steps()} steps); shorten the warmup or the decay"
        )


def _given(argv: list[str]) -> set[str]:
    """The config fields named on the command line (`--hidden-size 64` or `--hidden-size=64`)."""
    return {token[2:].split("=")[0].replace("-", "_") for token in argv if token.startswith("--")}


def _with_cooldown(config: TrainingConfig) -> TrainingConfig:
    """A cooldown branch ends at its checkpoint's step (read from the folder's name) plus --cooldown-steps, so its
    rate is a pure function of the step like any run's; --max-steps and --lr-decay-steps are the main run's."""
    if not config.cooldown_from:
        if config.cooldown_steps:
            raise ValueError("--cooldown-steps is the length of a cooldown branch: pass --cooldown-from CHECKPOINT too")
        return config
    name = config.cooldown_from.rstrip("/").rsplit("/", 1)[-1]
    try:
        branch_step = step_of(name)
    except ValueError:
        raise ValueError(f"--cooldown-from {config.cooldown_from}: expected a checkpoint folder, named like "
                         "checkpoint-epoch0-step5000-files8") from None
    if config.cooldown_steps < 1:
        raise ValueError(f"--cooldown-from needs --cooldown-steps N (a positive number of steps), got "
                         f"{config.cooldown_steps}")
    return with_changes(config, max_steps=branch_step + config.cooldown_steps, lr_decay_steps=0)
def _validate_unattended(config: TrainingConfig) -> None:
    """Loss spikes, EMA, early stopping, retention and the save interval."""
    try:
        minutes = config.save_interval_minutes()
    except ValueError:
        minutes = -1.0
    if minutes is not None and not minutes >= 0:
        raise ValueError(f"--save-every-minutes must be auto or a number of minutes >= 0 (0: off), "
                         f"got {config.save_every_minutes!r}")
    if config.on_loss_spike not in SPIKE_POLICIES:
        raise ValueError(f"--on-loss-spike must be one of {', '.join(SPIKE_POLICIES)}, got {config.on_loss_spike!r}")
    if not 0 < config.loss_spike_lr_factor <= 1:
        raise ValueError(f"--loss-spike-lr-factor must be in (0, 1] (1: the rate is not lowered), "
                         f"got {config.loss_spike_lr_factor}")
    if not 0 <= config.ema_decay < 1:
        raise ValueError(f"--ema-decay must be in [0, 1) (0: off; e.g. 0.999), got {config.ema_decay}")
    if config.export_weights not in ("live", "ema"):
        raise ValueError(f"--export-weights must be live or ema, got {config.export_weights!r}")
    if config.export_weights == "ema" and not config.ema_decay:
        raise ValueError("--export-weights ema needs an EMA: pass --ema-decay (e.g. 0.999)")
    if config.early_stop_patience and not config.eval_steps:
        raise ValueError("--early-stop-patience needs evaluations during training: pass --eval-steps N")


def parse_config(argv: list[str] | None = None) -> TrainingConfig:
    """Parses argv into a validated config. Errors raise ValueError with a one-line message naming the flag.

    The model's shape comes from --size-preset or --target-params when given (pretrain/model/sizing.py), and every
    model field left unset takes its family's default, so the config a run records is explicit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    base = get_config(_config_name(argv))
    parser = build_parser(base)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ValueError(_unknown_flag_message(unknown[0], parser))
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    config = with_changes(base, **overrides)
    family = family_for(config.model)
    if config.model.target_params:
        parse_count(config.model.target_params)  # a malformed count is named before anything else
    config = dataclasses.replace(config, model=family.resolve(apply_sizing(config.model, _given(argv))))
    return validate(_with_cooldown(config))


def _unknown_flag_message(token: str, parser: argparse.ArgumentParser) -> str:
    valid = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    if not token.startswith("--"):
        return f"unexpected argument {token!r}: flags take the form --field-name VALUE (see --help)"
    close = difflib.get_close_matches(token.split("=")[0], valid, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return f"unknown flag {token.split('=')[0]}: {hint}valid flags: {' '.join(sorted(valid))}"
