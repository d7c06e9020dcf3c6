"""Non-finite losses or gradients: the update is skipped without touching the weights, counted, and K in a row stop the run."""

import pytest
import torch
from accelerate.state import AcceleratorState

from configs import CONFIGS, with_changes
from pretrain.cli import validate
from pretrain.data.synthetic import generate_sample_data
from pretrain.loop import NonFiniteLoss, Trainer
from pretrain.preemption import PreemptionFlag


@pytest.fixture
def trainer(tmp_path):
    generate_sample_data(tmp_path / "data", vocab_size=512, seed=0)
    config = validate(with_changes(
        CONFIGS["test"], data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "checkpoints"),
        logging_dir=str(tmp_path / "logs"), checkpoint_bucket="", run_name="run", max_steps=10, max_consecutive_nonfinite=3, save_steps=100,
        eval_steps=0, warmup_steps=1, logging_steps=1, export_final_model=False,
    ))
    trainer = Trainer(config, PreemptionFlag())
    with trainer.cleanup:
        trainer.set_up()
        yield trainer
    AcceleratorState._reset_state(reset_partial_state=True)


def test_nonfinite_steps_leave_the_weights_alone_and_k_in_a_row_stop_the_run(trainer, tmp_path):
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        model.gpt_neox.final_layer_norm.weight[0] = float("nan")  # every loss from here on is NaN
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(NonFiniteLoss, match="3 optimizer steps in a row had a non-finite loss"):
        trainer.train()
    after = model.state_dict()
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=0, equal_nan=True) for k in before)
    assert trainer.optimizer.state_dict()["state"] == {}  # AdamW never stepped
    # Agreed one step late (so the host never waits for the device): the third skip is acted on after step 4.
    assert int(trainer.consecutive_nonfinite) == 4 and trainer.state.step == 4
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
