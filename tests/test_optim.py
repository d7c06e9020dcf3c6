"""The learning rate is a pure function of the optimizer step: warmup, cosine, floor."""

import pytest
import torch

from configs import CONFIGS, with_changes
from pretrain.optim import build_optimizer, lr_at, lr_multiplier


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
