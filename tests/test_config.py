"""Named configs, command-line overrides and the model they build."""

import dataclasses
import subprocess
import sys

import pytest

from configs import CONFIGS, ModelConfig, TrainingConfig
from pretrain.cli import build_parser, parse_config
from pretrain.model.build import build_model, count_parameters


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_named_config_parses_and_builds_on_meta(name):
    config = parse_config(["--config", name])
    model = build_model(config.model, device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert count_parameters(model).total_params > 0


def _expected_gpt_neox_parameters(m: ModelConfig) -> tuple[int, int]:
    """Independent arithmetic from the GPT-NeoX layer shapes (weights and biases), untied embeddings."""
    h, i, v = m.hidden_size, m.intermediate_size, m.vocab_size
    per_layer = 2 * (2 * h)  # two layer norms
    per_layer += h * 3 * h + 3 * h + h * h + h  # fused qkv and dense
    per_layer += h * i + i + i * h + h  # mlp
    non_embedding = m.num_hidden_layers * per_layer + 2 * h  # final layer norm
    embedding = 2 * v * h
    return non_embedding + embedding, non_embedding


def test_production_model_is_the_specified_gpt_neox():
    config = parse_config(["--config", "production"])
    m = config.model
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.intermediate_size) == (2048, 24, 16, 8192)
    assert (m.vocab_size, m.max_position_embeddings, m.rotary_pct) == (50257, 2048, 0.25)
    assert m.use_parallel_residual and not m.tie_word_embeddings and m.hidden_act == "gelu"
    model = build_model(m, device="meta")
    assert model.config.use_cache is False
    size = count_parameters(model)
    total, non_embedding = _expected_gpt_neox_parameters(m)
    assert size.total_params == total
    assert size.non_embedding_params == non_embedding
    assert 1.15e9 < size.non_embedding_params < 1.25e9  # "1.2B" is the non-embedding count


def test_production_values_match_the_spec():
    p = CONFIGS["production"]
    assert (p.per_device_train_batch_size, p.gradient_accumulation_steps, p.num_processes, p.seq_len) == (4, 4, 2, 1024)
    assert (p.max_steps, p.save_steps, p.logging_steps, p.warmup_steps) == (25000, 1250, 250, 500)
    assert (p.learning_rate, p.weight_decay, p.dataloader_num_workers) == (2e-4, 0.1, 4)
    assert p.mixed_precision == "bf16" and p.compile_model
    e = CONFIGS["production_8gpu"]
    assert (e.per_device_train_batch_size, e.gradient_accumulation_steps, e.max_steps) == (8, 4, 590625)
    assert (e.save_steps, e.logging_steps, e.warmup_steps, e.learning_rate, e.dataloader_num_workers) == (
        20000, 3000, 11812, 3e-4, 6)


def test_overrides_apply_to_training_and_model_fields():
    config = parse_config([
        "--config", "production", "--save-steps", "10", "--hidden-size", "1024", "--compile-model", "false",
        "--learning-rate", "1e-3", "--checkpoint-bucket", "s3://b/p",
    ])
    assert config.save_steps == 10 and config.model.hidden_size == 1024
    assert config.compile_model is False and config.learning_rate == 1e-3 and config.checkpoint_bucket == "s3://b/p"
    assert dataclasses.is_dataclass(config) and isinstance(config, TrainingConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.save_steps = 3


def test_bare_boolean_flag_means_true():
    assert parse_config(["--config", "production", "--dry-run"]).dry_run is True


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--config", "nope"], "test, production, production_8gpu"),
        (["--sav-steps", "3"], "did you mean --save-steps"),
        (["--save-steps", "x"], "--save-steps"),
        (["--max-steps", "0"], "--max-steps must be a positive"),
        (["--compile-model", "maybe"], "--compile-model"),
        (["--mixed-precision", "fp8"], "--mixed-precision"),
        (["--hidden-size", "100", "--num-attention-heads", "3"], "--hidden-size (100) must be divisible"),
        (["--max-steps", "20", "--lr-decay-steps", "10"], "--lr-decay-steps (10) is below --max-steps (20)"),
    ],
)
def test_bad_flags_are_one_line_errors_naming_the_flag(argv, fragment):
    with pytest.raises(ValueError) as error:
        parse_config(argv)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_help_lists_every_field_with_its_default():
    text = build_parser(CONFIGS["production"]).format_help()
    fields = [f.name for f in dataclasses.fields(ModelConfig)] + [
        f.name for f in dataclasses.fields(TrainingConfig) if f.name not in ("model", "name")
    ]
    for name in fields:
        assert "--" + name.replace("_", "-") in text, name
    assert "default: 1250" in text  # save_steps of production


def test_train_py_reports_bad_config_and_exits_2():
    result = subprocess.run([sys.executable, "train.py", "--config", "nope"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "--config 'nope' is not a known config" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_parsed_config_keeps_its_name_for_run_names_and_plans():
    assert parse_config(["--config", "production", "--max-steps", "5"]).name == "production"
    assert parse_config([]).name == "test"
