"""Sizing a model by preset or by a parameter target: the shapes the rule picks, counts that equal transformers' own
count of the built model (on the meta device), the plan's line, one-line errors, and the README's tables."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from configs import ModelConfig, get_config
from pretrain.cli import parse_config
from pretrain.launch.command import parse_launch_args, plan_launch
from pretrain.model.build import build_model, count_parameters
from pretrain.model.families import FAMILIES, family_for
from pretrain.model.sizing import (
    describe_sizing,
    parse_count,
    preset_shape,
    shape_for_target,
)

README = Path(__file__).resolve().parent.parent / "README.md"
PRESETS = [(family, name) for family in sorted(FAMILIES) for name in FAMILIES[family].presets]
TARGETS = ["125M", "350M", "1.2B", "3B", "7B"]


def _non_embedding(model: ModelConfig) -> int:
    family = family_for(model)
    return family.parameter_count(model) - family.embedding_parameters(model)


@pytest.mark.parametrize("family, name", PRESETS)
@pytest.mark.parametrize("tied", [False, True])
def test_every_preset_counts_what_transformers_builds(family, name, tied):
    config = parse_config(["--config", "production", "--model-type", family, "--size-preset", name,
                           "--tie-word-embeddings", str(tied)])
    built = count_parameters(build_model(config.model, device="meta"))
    assert family_for(config.model).parameter_count(config.model) == built.total_params
    assert f"{built.non_embedding_params:,} non-embedding parameters" in describe_sizing(config.model)
    for field, value in FAMILIES[family].presets[name].items():
        assert getattr(config.model, field) == value


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("target", ["10M", *TARGETS, "13B", "70B"])
def test_target_params_counts_what_transformers_builds_near_the_target(family, target):
    config = parse_config(["--config", "production", "--model-type", family, "--target-params", target])
    model = config.model
    built = count_parameters(build_model(model, device="meta"))
    assert family_for(model).parameter_count(model) == built.total_params
    goal = parse_count(target)
    # within half a layer of the target (the rule's depth is the nearest whole number of blocks)
    per_layer = family_for(model).layer_parameters(model)
    assert abs(built.non_embedding_params - goal) <= per_layer / 2 + model.hidden_size
    assert model.hidden_size % 256 == 0 and model.hidden_size % model.num_attention_heads == 0
    head_dim = model.hidden_size // model.num_attention_heads
    assert head_dim == (64 if model.hidden_size < 2048 else 128)
    if family == "llama":
        assert model.num_key_value_heads * 4 == model.num_attention_heads
        assert model.intermediate_size % 256 == 0
    line = describe_sizing(model)
    assert f"{built.non_embedding_params:,} non-embedding parameters" in line
    assert f"{built.total_params:,} with the embeddings" in line


def test_the_rule_gives_the_production_shapes_at_1_2b():
    neox = shape_for_target(ModelConfig(), parse_count("1.2B"))
    production = get_config("production").model
    assert [getattr(neox, f) for f in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                       "intermediate_size")] == [2048, 24, 16, 8192]
    assert _non_embedding(family_for(production).resolve(production)) == _non_embedding(neox)
    llama = family_for(ModelConfig(model_type="llama")).resolve(
        shape_for_target(ModelConfig(model_type="llama"), parse_count("1.2B")))
    assert llama == family_for(llama).resolve(get_config("production_llama").model)


def test_the_aspect_ratio_grows_with_size():
    ratios = [m.hidden_size / m.num_hidden_layers for m in
              (shape_for_target(ModelConfig(), parse_count(t)) for t in ("50M", "1.2B", "13B"))]
    assert ratios == sorted(ratios) and 30 < ratios[0] < 50 and 100 < ratios[-1] < 128


@pytest.mark.parametrize("text, count", [("350M", 350_000_000), ("1.2B", 1_200_000_000), ("125m", 125_000_000),
                                         ("7e9", 7_000_000_000), ("350000000", 350_000_000), ("500k", 500_000)])
def test_parse_count(text, count):
    assert parse_count(text) == count


@pytest.mark.parametrize("argv, fragment", [
    (["--target-params", "lots"], "--target-params 'lots': expected a parameter count such as 350M"),
    (["--target-params", "1000"], "--target-params 1000: 1,000 parameters is below"),
    (["--target-params", "350M", "--hidden-size", "512"], "--target-params sets the layers, width, heads and FFN size; "
                                                          "drop --hidden-size"),
    (["--size-preset", "pythia-70m", "--num-hidden-layers=3"], "drop --num-hidden-layers"),
    (["--size-preset", "pythia-70m", "--target-params", "1B"], "--size-preset and --target-params both choose"),
    (["--size-preset", "llama3.2-1b"], "is not a gpt_neox preset (it is a llama preset: add --model-type llama)"),
    (["--model-type", "llama", "--size-preset", "gpt-5"], "llama presets: smollm-135m, smollm-360m"),
])
def test_sizing_errors_are_one_line_naming_the_flag(argv, fragment):
    with pytest.raises(ValueError) as error:
        parse_config(argv)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_the_dry_run_prints_the_exact_count_before_anything_is_allocated():
    request = parse_launch_args(["--config", "production", "--model-type", "llama", "--target-params", "350M",
                                 "--gpus", "2", "--gpu-memory-gb", "24", "--dry-run"])
    planned, lines = plan_launch(request, available_gpus=0, cpu_count=2)
    assert planned is None
    text = "\n".join(lines)
    model = parse_config(request.train_args).model
    built = count_parameters(build_model(model, device="meta"))
    assert (f"size: --target-params 350M (350,000,000): 20 layers x 1280 wide (20 heads of 64, 5 K/V heads), FFN "
            f"3584: {built.non_embedding_params:,} non-embedding parameters (+2.1%), "
            f"{built.total_params:,} with the embeddings") in text
    assert f"model: Llama {built.total_params:,} parameters" in text
    assert "memory plan per GPU" in text and "layout:" in text


def _readme_rows(heading: str) -> list[list[str]]:
    text = README.read_text()
    lines = text[text.index(heading):].splitlines()
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines))
    rows = [[cell.strip().strip("`") for cell in line.strip("|").split("|")] for line in table]
    return rows[2:]  # below the header and its rule


def test_the_readme_preset_table_is_what_the_code_builds():
    rows = _readme_rows("| family | preset |")
    assert [(row[0], row[1]) for row in rows] == PRESETS
    for family, name, layers, width, heads, kv_heads, ffn, non_embedding, total in rows:
        model = family_for(ModelConfig(model_type=family)).resolve(
            preset_shape(ModelConfig(model_type=family, size_preset=name)))
        expected_kv = str(model.num_key_value_heads) if family == "llama" else "-"
        assert [layers, width, heads, kv_heads, ffn] == [str(model.num_hidden_layers), str(model.hidden_size),
                                                        str(model.num_attention_heads), expected_kv,
                                                        str(model.intermediate_size)], name
        assert non_embedding == f"{_non_embedding(model):,}"
        assert total == f"{family_for(model).parameter_count(model):,}"


def test_the_readme_target_table_is_what_the_rule_picks():
    rows = _readme_rows("| --target-params | family |")
    assert [(row[0], row[1]) for row in rows] == [(t, f) for t in TARGETS for f in sorted(FAMILIES)]
    for target, family, layers, width, heads, kv_heads, ffn, non_embedding, total in rows:
        model = family_for(ModelConfig(model_type=family)).resolve(
            shape_for_target(ModelConfig(model_type=family), parse_count(target)))
        expected_kv = str(model.num_key_value_heads) if family == "llama" else "-"
        assert [layers, width, heads, kv_heads, ffn] == [str(model.num_hidden_layers), str(model.hidden_size),
                                                        str(model.num_attention_heads), expected_kv,
                                                        str(model.intermediate_size)], target
        assert non_embedding == f"{_non_embedding(model):,}"
        assert total == f"{family_for(model).parameter_count(model):,}"


def test_sizing_is_recorded_with_the_shape_it_chose():
    config = parse_config(["--model-type", "llama", "--target-params", "50M"])
    assert config.model.target_params == "50M" and config.model.num_hidden_layers == 17
    assert dataclasses.asdict(config)["model"]["num_key_value_heads"] == 2
