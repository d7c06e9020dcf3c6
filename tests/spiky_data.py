"""A corpus with a real loss spike: learnable text everywhere except the samples one known optimizer step reads, which
are random tokens. The order is a pure function of the shard list, so which samples step S reads is known up front."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from configs import CONFIGS, TrainingConfig, with_changes
from pretrain.cli import validate
from pretrain.data.format import write_shard
from pretrain.data.order import SampleOrder
from pretrain.data.synthetic import MarkovLanguage
from pretrain.data.training_data import freeze_shards

SHARDS = 8  # the last one is held out for evaluation
TOKENS_PER_SHARD = 32768
VOCAB = 512


def write_corpus(data_dir: Path, config: TrainingConfig, spike_step: int | Sequence[int] | None = None) -> list[int]:
    """Shards of a Markov chain's text (about 0.4 nats/token to learn); with spike_step (one or several), every sample
    that optimizer step reads holds uniformly random tokens instead. Returns those samples' global indices."""
    language = MarkovLanguage.random(VOCAB, seed=0)
    for index in range(SHARDS):
        tokens = language.sample_tokens(TOKENS_PER_SHARD, seed_words=[0, 1, index]).astype(np.uint16)
        write_shard(data_dir / f"shard_{index:03d}.npz", tokens)
    if spike_step is None:
        return []
    frozen = freeze_shards(config)
    order = SampleOrder(list(frozen.train), config.seq_len, config.seed, frozen.order.mix_shards,
                        frozen.order.shard_chunks)
    step_samples = config.per_device_train_batch_size * config.gradient_accumulation_steps
    steps = [spike_step] if isinstance(spike_step, int) else list(spike_step)
    indices = [i for step in steps for i in range((step - 1) * step_samples, step * step_samples)]
    noise = np.random.default_rng(7)
    arrays: dict[str, np.ndarray] = {}
    for index in indices:
        position, sample = order.locate(index)
        path = frozen.train[position].path
        if path not in arrays:
            with np.load(data_dir / path) as archive:
                arrays[path] = archive["input_ids"].copy()
        start = sample * config.seq_len
        arrays[path][start:start + config.seq_len] = noise.integers(0, VOCAB, size=config.seq_len)
    for path, tokens in arrays.items():
        write_shard(data_dir / path, tokens)  # the same size: the frozen token counts do not change
    return indices


def spike_config(root: Path, **changes) -> TrainingConfig:
    """The test config on one CPU process, logging every step, with every output under `root`."""
    settings = dict(data_dir=str(root / "data"), output_dir=str(root / "checkpoints"), logging_dir=str(root / "logs"),
                    checkpoint_bucket="", run_name="run", max_steps=32, save_steps=13, eval_steps=0, warmup_steps=2,
                    logging_steps=1, export_final_model=False, on_loss_spike="rollback", loss_spike_window=8)
    return validate(with_changes(CONFIGS["test"], **{**settings, **changes}))


@contextmanager
def one_thread() -> Iterator[None]:
    """In-process training on one torch thread: on a shared machine, a second thread spinning at every barrier costs
    far more than it brings to a model this small (measured: 6x slower with 2 threads on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
