"""Throughput figures: tokens/s and MFU count training time only (saves and evaluations left out), MFU counts causal
attention, and the peak memory of the process is logged."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from configs import get_config
from pretrain import metrics
from pretrain.metrics import Metrics, ThroughputModel, peak_memory
from pretrain.model.families import family_for


def test_saves_and_evaluations_are_left_out_of_tokens_per_second(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    throughput = ThroughputModel(tokens_per_step=1000, flops_per_token=6.0, peak_flops_total=12_000.0)
    logger = Metrics(tmp_path, False, logging_steps=2, max_steps=10, start_step=0, throughput=throughput)
    accelerator = SimpleNamespace(reduce=lambda tensor, reduction: tensor, device=torch.device("cpu"))
    clock[0] = 101.0
    assert logger.end_step(1, torch.tensor(3.0), 1, accelerator) is None
    logger.exclude(5.0)  # a checkpoint save after step 1
    clock[0] = 107.0
    values = logger.end_step(2, torch.tensor(3.0), 1, accelerator)
    assert values["perf/tokens_per_second"] == 1000.0  # 2 steps in 7 s, of which 5 were the save
    assert values["perf/mfu"] == 0.5 and values["time/eta_seconds"] == 8.0
    clock[0] = 110.0  # the window starts again at the logging step, with nothing left out
    assert logger.end_step(4, torch.tensor(3.0), 1, accelerator)["perf/tokens_per_second"] == 2000.0 / 3.0


def test_mfu_counts_causal_attention():
    model = get_config("production").model
    family = family_for(model)
    non_embedding = family.parameter_count(model) - family.embedding_parameters(model)
    causal = 6 * non_embedding + 6 * model.vocab_size * model.hidden_size + 6 * model.num_hidden_layers * 2048 * 1024
    assert family.flops_per_token(model, 1024) == causal
    full_square = causal + 6 * model.num_hidden_layers * 2048 * 1024
    assert 1.03 < full_square / causal < 1.04  # what MFU was overstated by


def test_the_peak_memory_of_the_process_is_reported():
    name, gib = peak_memory(torch.device("cpu"))
    assert name == "memory/peak_rss_gib" and 0.05 < gib < 64
