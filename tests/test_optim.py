"""The learning rate is a pure function of the optimizer step: warmup, then cosine, linear or warmup-stable-decay to
the floor, and a cooldown branch's decay from its branch point."""

import math

import pytest
import torch

from configs import CONFIGS, with_changes
from pretrain.cli import parse_config
from pretrain.optim import build_optimizer, lr_at, lr_multiplier, stable_steps


def test_warmup_is_linear_then_cosine_reaches_the_floor():
    values = [lr_multiplier(s, warmup_steps=10, decay_steps=100, min_ratio=0.1) for s in range(120)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(values[:10], values[1:10]))
    assert all(b <= a for a, b in zip(values[10:100], values[11:101]))
    assert values[55] == pytest.approx(0.55)  # half-way through the cosine: (1 + 0.1) / 2
    assert values[100] == pytest.approx(0.1) and values[119] == pytest.approx(0.1)


def test_lr_at_is_the_rate_each_step_applies_and_norms_are_not_decayed():
    config = with_changes(CONFIGS["test"], warmup_steps=3, max_steps=20, learning_rate=1e-3)
    # Step 1 applies the first warmup rate; the floor holds from the decay's end on.
    assert lr_at(1, config) == pytest.approx(1e-3 / 3)
    assert lr_at(3, config) == pytest.approx(1e-3)
    assert [lr_at(s, config) for s in range(4, 21)] == sorted((lr_at(s, config) for s in range(4, 21)), reverse=True)
    assert lr_at(21, config) == pytest.approx(1e-3 * config.min_learning_rate_ratio)
    for step in (1, 7, 20):
        assert lr_at(step, config) == 1e-3 * lr_multiplier(step - 1, 3, 20, config.min_learning_rate_ratio)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, config)
    assert optimizer.param_groups[0]["lr"] == lr_at(1, config)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert decayed == {id(model[0].weight)}
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


def _cosine_before_schedules(step, warmup_steps, decay_steps, min_ratio):
    """lr_multiplier as it was before --lr-schedule existed: the default must stay bit for bit."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def test_cosine_stays_the_default_and_unchanged_bit_for_bit():
    config = CONFIGS["production"]
    assert config.lr_schedule == "cosine"
    for step in [1, 2, 250, 499, 500, 501, 12_345, 24_999, 25_000, 25_001, 30_000]:
        old = config.learning_rate * _cosine_before_schedules(step - 1, 500, 25_000, 0.1)
        assert lr_at(step, config) == old  # ==, not approx


def test_wsd_warms_up_holds_the_peak_then_decays_in_its_shape():
    # 100 steps, warmup 10, the last 20% decay: flat over completed steps 10..80, then 1-sqrt to the floor at 100
    values = [lr_multiplier(s, 10, 100, 0.1, schedule="wsd", decay_start=80, shape="1-sqrt") for s in range(120)]
    assert values[:10] == [(s + 1) / 10 for s in range(10)]
    assert values[10:81] == [1.0] * 71
    assert values[85] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(5 / 20)))
    assert values[90] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert all(b < a for a, b in zip(values[80:100], values[81:101]))
    assert values[100] == pytest.approx(0.1) and values[119] == pytest.approx(0.1)
    linear = [lr_multiplier(s, 10, 100, 0.0, schedule="wsd", decay_start=80, shape="linear") for s in (80, 90, 100)]
    assert linear == pytest.approx([1.0, 0.5, 0.0])
    cosine = lr_multiplier(90, 10, 100, 0.0, schedule="wsd", decay_start=80, shape="cosine")
    assert cosine == pytest.approx(0.5)


def test_lr_at_follows_the_configured_wsd_and_linear_schedules():
    wsd = with_changes(CONFIGS["test"], lr_schedule="wsd", warmup_steps=5, max_steps=50, wsd_decay_fraction=0.2,
                       learning_rate=1e-3)
    assert wsd.lr_decay_start() == 40
    rates = [lr_at(s, wsd) for s in range(1, 51)]
    assert rates[4:41] == [1e-3] * 37  # steps 5..41 apply the peak: step 41 is the first of the decay (progress 0)
    assert rates[41] < 1e-3 and rates[-1] > 1e-4 and lr_at(51, wsd) == pytest.approx(1e-4)
    assert rates == [1e-3 * lr_multiplier(s - 1, 5, 50, 0.1, "wsd", 40, "1-sqrt") for s in range(1, 51)]
    linear = with_changes(CONFIGS["test"], lr_schedule="linear", warmup_steps=10, max_steps=110, learning_rate=1.0,
                          min_learning_rate_ratio=0.0)
    assert lr_at(11, linear) == 1.0 and lr_at(61, linear) == pytest.approx(0.5) and lr_at(111, linear) == 0.0


def test_a_cooldown_branch_decays_from_its_branch_point_to_the_floor():
    main = with_changes(CONFIGS["test"], lr_schedule="wsd", warmup_steps=5, max_steps=1000, learning_rate=1e-3)
    assert stable_steps(main) == (5, 800)
    branch = parse_config(["--lr-schedule", "wsd", "--warmup-steps", "5", "--max-steps", "1000", "--learning-rate",
                           "1e-3", "--cooldown-from", "gs://b/run/checkpoint-epoch0-step300-files7",
                           "--cooldown-steps", "100"])
    assert (branch.max_steps, branch.lr_decay_start(), branch.effective_lr_decay_steps()) == (400, 300, 400)
    assert [lr_at(s, branch) for s in range(1, 302)] == [lr_at(s, main) for s in range(1, 302)]  # the same up to S+1
    assert lr_at(301, branch) == 1e-3
    decay = [lr_at(s, branch) for s in range(301, 402)]
    assert all(b < a for a, b in zip(decay[:100], decay[1:100]))
    assert lr_at(351, branch) == pytest.approx(1e-3 * (0.1 + 0.9 * (1 - math.sqrt(0.5))))
    assert lr_at(401, branch) == pytest.approx(1e-4)
    assert stable_steps(branch) is None  # no branch from a branch
    assert stable_steps(with_changes(main, lr_schedule="cosine")) is None


@pytest.mark.parametrize("argv, fragment", [
    (["--lr-schedule", "step"], "argument --lr-schedule: invalid choice: 'step'"),
    (["--wsd-decay-shape", "exp"], "argument --wsd-decay-shape: invalid choice"),
    (["--lr-schedule", "wsd", "--wsd-decay-fraction", "0"], "--wsd-decay-fraction must be in (0, 1], got 0.0"),
    (["--lr-schedule", "wsd", "--max-steps", "100", "--warmup-steps", "90"],
     "--warmup-steps (90) runs past the start of the wsd decay (step 80"),
    (["--cooldown-steps", "10"], "--cooldown-steps is the length of a cooldown branch: pass --cooldown-from"),
    (["--cooldown-from", "run/checkpoint-epoch0-step40-files7"], "--cooldown-from needs --cooldown-steps N"),
    (["--cooldown-from", "run/final-model", "--cooldown-steps", "5"], "--cooldown-from run/final-model: expected a "
                                                                      "checkpoint folder"),
    (["--cooldown-from", "a/checkpoint-epoch0-step4-files7", "--cooldown-steps", "5", "--init-from", "m"],
     "--init-from and --cooldown-from both choose the starting weights"),
    (["--z-loss-coefficient", "-1"], "--z-loss-coefficient must not be negative"),
    (["--init-from", "gs://b/model"], "--init-from gs://b/model: expected a local Hugging Face model folder"),
])
def test_schedule_flags_are_validated_in_one_line_naming_the_flag(argv, fragment):
    with pytest.raises(ValueError) as error:
        parse_config(argv)
    assert fragment in str(error.value) and "\n" not in str(error.value)
