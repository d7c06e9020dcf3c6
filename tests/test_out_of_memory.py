"""Running out of GPU memory ends the run with one line naming the flags that change the layout (exit code 2)."""

import pytest
import torch
from accelerate.state import AcceleratorState

from configs import CONFIGS, with_changes
from pretrain import loop
from pretrain.cli import validate
from pretrain.data.synthetic import generate_sample_data
from pretrain.loop import OutOfMemory, Trainer
from pretrain.preemption import PreemptionFlag


def test_out_of_memory_becomes_one_line_naming_the_flags(tmp_path, monkeypatch):
    generate_sample_data(tmp_path / "data", vocab_size=512, seed=0)
    config = validate(with_changes(
        CONFIGS["test"], data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "checkpoints"),
        logging_dir=str(tmp_path / "logs"), checkpoint_bucket="", run_name="run", max_steps=3, save_steps=100,
        eval_steps=0, warmup_steps=1, logging_steps=1, export_final_model=False,
    ))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.6 GiB total)")

    monkeypatch.setattr(loop, "train_step", out_of_memory)
    try:
        with pytest.raises(OutOfMemory) as raised:
            Trainer(config, PreemptionFlag()).run()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    message = str(raised.value)
    assert isinstance(raised.value, ValueError) and "\n" not in message  # train.py maps ValueError to exit 2
    assert message.startswith("out of GPU memory with micro-batch 8 x 128 tokens")
    for flag in ("--per-device-train-batch-size", "--gradient-accumulation-steps", "--gradient-checkpointing true",
                 "--strategy fsdp"):
        assert flag in message
