"""Several processes through Accelerate: the launch files mean what they say to accelerate launch, processes really
synchronise, 2 processes train exactly like 1 with twice the batch, checkpoints resume on a different number of
processes, only the main process writes, and FSDP's sharded state is saved whole.

The multi-process runs use 2 gloo processes on the CPU (`--cpu-processes 2`), through ./start_training.sh or, for the
two check scripts, through the same accelerate launch flags that start_training.sh builds.

Loss tolerance: LOSS_TOLERANCE = 2e-5 absolute on losses near 5-6, about 40 float32 ulps there. The two layouts do
the same arithmetic in a different order (one matmul over 8 samples against two over 4, then gloo's average of the
two gradients), so they agree to a few ulps per step, and AdamW's division by sqrt(v) can amplify that a little over
6 steps (observed: at most 4.8e-7, one ulp). A real mistake is far larger: training on other samples (a wrong
partition across ranks, rank 0's loss logged instead of the mean) moves the step-1 loss by about 6e-4 and later
losses by 1e-2 to 0.16 (measured with a batch of 8 instead of 16).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env
from safetensors.torch import load_file

from configs import get_config
from pretrain.checkpoint.format import (
    MANIFEST,
    MODEL_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    STATE_FILE,
    load_checkpoint,
    verify_checkpoint,
)
from pretrain.checkpoint.lost_time import PROGRESS_FILE
from pretrain.checkpoint.store import CheckpointStore
from pretrain.launch.command import (
    ACCELERATE_CONFIG_DIR,
    parse_launch_args,
    plan_launch,
)
from pretrain.model.build import build_model
from pretrain.storage import open_storage
from tests.launcher import (
    REPO,
    RUN_NAME,
    check,
    checkpoints,
    final_weights,
    launch,
    logged,
)

LOSS_TOLERANCE = 2e-5
# FSDP with bf16 parameters and bf16 gradient reductions against DDP under bf16 autocast: the same model in a different
# bf16 rounding (weights rounded once per unshard, gradients reduced in bf16). Observed at most 1.7e-3 over 6 steps on
# losses near 5-6, where one bf16 ulp is 0.031.
BF16_LOSS_TOLERANCE = 5e-3
# Weights: |w_2proc - w_1proc| over the size of the last 3 steps' update, both as norms over all parameters.
# Observed 1.3e-5; a wrong gradient gives a ratio near 1.
WEIGHT_TOLERANCE = 1e-3
STEPS = ["--max-steps", "6", "--save-steps", "3", "--logging-steps", "1", "--eval-steps", "0", "--warmup-steps", "2"]
ONE_PROCESS = ["--per-device-train-batch-size", "8"]
TWO_PROCESSES = ["--cpu-processes", "2", "--per-device-train-batch-size", "4"]
STEP3 = "checkpoint-epoch0-step3-files7"
STEP6 = "checkpoint-epoch0-step6-files7"
CHECKPOINT_FILES = {MANIFEST, MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE}


def free_port() -> int:
    """A port for the rendezvous, so runs beside other test sessions on this machine do not collide on 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch_resolution(argv: list[str], gpus: int):
    """What accelerate launch makes of start_training.sh's flags: its own parser and validation (private, but where
    the precedence of config file against command line lives), then the settings it hands to torchrun. GPUs are
    planned as 80 GB cards, where the configured layout fits as it is."""
    memory = ["--gpu-memory-gb", "79.1"] if gpus else []
    planned, _ = plan_launch(parse_launch_args([*argv, *memory]), available_gpus=gpus, cpu_count=16)
    flags = planned.accelerate_args[: planned.accelerate_args.index("train.py")]
    args = launch_command_parser().parse_args([*flags, "train.py"])
    args, _, _ = _validate_launch_command(args)
    return args


def run_with_launcher_flags(script: str, *script_args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` with exactly the flags start_training.sh uses for 2 CPU processes, on a check script
    (about 20 to 40 s). In its own process group, so a run that hangs is ended whole, workers included."""
    argv = ["--config", "test", *TWO_PROCESSES[:2], "--main-port", str(free_port())]
    planned, _ = plan_launch(parse_launch_args(argv), available_gpus=0, cpu_count=os.cpu_count() or 1)
    command = [*planned.command[: planned.command.index("train.py")], str(REPO / "tests" / script), *script_args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{script} still running after {timeout:.0f} s\n{stdout[-3000:]}\n{stderr[-5000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def max_loss_difference(a: dict[int, float] | list[float], b: dict[int, float] | list[float]) -> float:
    pairs = zip(a.values(), b.values()) if isinstance(a, dict) else zip(a, b)
    return max(abs(x - y) for x, y in pairs)


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[key].reshape(-1).float() for key in sorted(state)])


def checkpoint_weights(workdir: Path, name: str) -> torch.Tensor:
    return flat(load_file(str(workdir / "checkpoints" / name / MODEL_FILE)))


# Launch files --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, distributed_type, processes",
    [
        ("single_gpu.yaml", DistributedType.NO, 1),
        ("ddp_2gpu.yaml", DistributedType.MULTI_GPU, 2),
        ("ddp_8gpu.yaml", DistributedType.MULTI_GPU, 8),
        ("fsdp.yaml", DistributedType.FSDP, 2),
        ("multi_node.yaml", DistributedType.MULTI_GPU, 16),
        ("multi_node_fsdp.yaml", DistributedType.FSDP, 16),
    ],
)
def test_every_launch_file_parses_as_accelerate_reads_it(name, distributed_type, processes):
    config = load_config_from_file(str(ACCELERATE_CONFIG_DIR / name))  # raises on any key accelerate does not know
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == distributed_type
    assert config.num_processes == processes
    assert config.mixed_precision == "bf16" and config.use_cpu is False
    assert config.dynamo_config == {}  # the loop compiles the model itself; Accelerate compiling too would be twice


@pytest.mark.parametrize(
    "argv, gpus, processes, precision, kind",
    [
        (["--config", "production", "--gpus", "1"], 1, 1, "bf16", "single"),
        (["--config", "production", "--gpus", "2"], 2, 2, "bf16", "multi_gpu"),
        (["--config", "production", "--gpus", "4", "--mixed-precision", "fp16"], 4, 4, "fp16", "multi_gpu"),
        (["--config", "production_8gpu", "--gpus", "8"], 8, 8, "bf16", "multi_gpu"),
        (["--config", "production", "--gpus", "4", "--strategy", "fsdp", "--mixed-precision", "no"], 4, 4, "no", "fsdp"),
    ],
)
def test_launcher_flags_win_over_the_launch_files(argv, gpus, processes, precision, kind):
    args = accelerate_launch_resolution(argv, gpus)
    assert args.num_processes == processes  # ddp_2gpu.yaml says 2 and fsdp.yaml 2, the launcher says 4
    assert args.mixed_precision == precision  # every file says bf16
    assert (args.multi_gpu, args.use_fsdp) == (kind == "multi_gpu", kind == "fsdp")
    assert args.dynamo_backend.lower() == "no"


def test_fsdp_file_asks_for_full_shard_per_layer_whole_state_dicts_and_original_parameters(monkeypatch):
    args = accelerate_launch_resolution(["--config", "production", "--gpus", "2", "--strategy", "fsdp"], 2)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "1"
    assert env["FSDP_SYNC_MODULE_STATES"] == "true"
    for key, value in env.items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    # What each training process builds from that environment. sync_module_states is the one setting that needs a GPU
    # to construct the plugin at all (asserted above from the environment), so it is the one given here.
    plugin = FullyShardedDataParallelPlugin(sync_module_states=False)
    from torch.distributed.fsdp import ShardingStrategy, StateDictType
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer

    assert plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.use_orig_params is True and plugin.cpu_ram_efficient_loading is False
    plugin.set_auto_wrap_policy(build_model(get_config("test").model))  # raises if the class is not in the model
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {GPTNeoXLayer}


@pytest.mark.parametrize("strategy, sharding", [("ddp", None), ("fsdp", "HYBRID_SHARD")])
def test_multi_node_flags_reach_torchrun(strategy, sharding):
    argv = ["--config", "production_8gpu", "--gpus", "8", "--nodes", "2", "--node-rank", "1", "--strategy", strategy,
            "--main-address", "10.0.0.1", "--main-port", "29511"]
    args = accelerate_launch_resolution(argv, 8)
    env = prepare_multi_gpu_env(args)  # sets torchrun's arguments on args
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("8", "2", 1)
    assert args.rdzv_backend == "static" and args.rdzv_endpoint == "10.0.0.1:29511"
    assert env.get("FSDP_SHARDING_STRATEGY") == sharding


def test_cpu_processes_on_several_machines_reach_torchrun_as_a_bounded_static_rendezvous(tmp_path, monkeypatch):
    """What torchrun's agent gets for machine 1 of 2 with 2 CPU processes each: 2 local processes of 4, machine 0's
    address, the rendezvous timeout, no restarts; and the launcher expects 2 local ranks."""
    import torch.distributed.run as torchrun
    from accelerate.utils.launch import _filter_args

    from pretrain.launch import accelerate_quietly

    argv = ["--config", "test", "--cpu-processes", "2", "--nodes", "2", "--node-rank", "1", "--main-address",
            "127.0.0.1", "--main-port", "29733", "--rendezvous-timeout-seconds", "30"]
    args = accelerate_launch_resolution(argv, 0)
    assert args.multi_gpu and not args.cpu and args.num_processes == 4 and args.mixed_precision == "no"
    prepare_multi_gpu_env(args)  # sets torchrun's arguments on args
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun would set it in this process's environment
    torchrun_args = _filter_args(args, torchrun.get_args_parser(), ["--training_script", "train.py"])
    config, _, _ = torchrun.config_from_args(torchrun_args)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 2)
    assert config.rdzv_backend == "static" and config.rdzv_endpoint == "127.0.0.1:29733"
    assert int(config.rdzv_configs["timeout"]) == 30 and config.rdzv_configs["rank"] == 1
    assert config.max_restarts == 0

    monkeypatch.setenv("PRETRAIN_LAUNCH_DIR", str(tmp_path))
    planned, _ = plan_launch(parse_launch_args(argv), available_gpus=0, cpu_count=2)
    accelerate_quietly.prepare(planned.accelerate_args)
    assert (tmp_path / "local_ranks").read_text() == "2\n"  # the ranks of this machine, not of the run


def test_cpu_processes_resolve_to_gloo_processes_without_any_launch_file():
    args = accelerate_launch_resolution(["--config", "test", "--cpu-processes", "2"], 0)
    assert args.multi_gpu and args.num_processes == 2 and args.config_file is None
    assert args.mixed_precision == "no"
    with pytest.raises(ValueError, match="--strategy fsdp needs GPUs"):
        plan_launch(parse_launch_args(["--config", "test", "--cpu-processes", "2", "--strategy", "fsdp"]), 0, 2)


# Runs on 2 CPU processes -------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, sample_data):
    """6 steps with 1 process and 8 samples per micro-batch, checkpoints at steps 3 and 6."""
    workdir = tmp_path_factory.mktemp("one_process")
    check(launch(workdir, sample_data, *ONE_PROCESS, *STEPS))
    return workdir


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, sample_data):
    """The same 6 steps with 2 processes and 4 samples each per micro-batch, uploading to a local bucket."""
    workdir = tmp_path_factory.mktemp("two_processes")
    bucket = f"file://{workdir / 'bucket'}"
    result = check(launch(workdir, sample_data, *TWO_PROCESSES, "--main-port", str(free_port()), *STEPS,
                          "--checkpoint-bucket", bucket))
    assert "launch --multi_gpu --num_processes 2" in result.stdout
    return workdir


@pytest.mark.slow
def test_processes_hold_identical_weights_after_steps_on_different_data(tmp_path):
    result_file = tmp_path / "sync.json"
    check(run_with_launcher_flags("ddp_sync_check.py", str(result_file)))
    result = json.loads(result_file.read_text())
    assert result["num_processes"] == 2 and result["backend"] == "gloo"
    assert result["distributed_type"] == "DistributedType.MULTI_CPU"
    rank0_losses, rank1_losses = result["losses_by_rank"]
    assert max_loss_difference(rank0_losses, rank1_losses) > 1e-3  # each rank really saw different tokens
    assert result["largest_weight_change"] > 1e-3  # and the steps really changed the weights
    assert result["spread_after_synced_steps"] == 0.0  # bit-identical on both ranks
    assert result["spread_after_unsynced_step"] > 1e-4  # control: without the all-reduce they drift apart at once


@pytest.mark.slow
def test_two_processes_log_the_losses_of_one_process_with_twice_the_batch(one_process_run, two_process_run):
    one, two = logged(one_process_run), logged(two_process_run)
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5, 6]
    assert max_loss_difference(one, two) <= LOSS_TOLERANCE, (one, two)
    assert two[6] < two[1] - 0.5  # it learns: the comparison is between moving numbers, not two constants

    update = checkpoint_weights(one_process_run, STEP6) - checkpoint_weights(one_process_run, STEP3)
    difference = flat(final_weights(one_process_run)) - flat(final_weights(two_process_run))
    assert difference.norm() <= WEIGHT_TOLERANCE * update.norm()
    state = load_checkpoint(two_process_run / "checkpoints" / STEP6).state
    assert state.num_processes == 2 and state.global_batch_samples == 16 and state.samples_consumed == 96


@pytest.mark.slow
def test_only_the_main_process_writes_checkpoints_logs_exports_and_uploads(one_process_run, two_process_run):
    output = two_process_run / "checkpoints"
    # No second writer's temp folders; beside the checkpoints only the export and the run's progress record.
    assert sorted(p.name for p in output.iterdir()) == [STEP3, STEP6, "final-model", PROGRESS_FILE]
    for name in (STEP3, STEP6):
        folder = output / name
        assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES
        assert verify_checkpoint(folder) is None
        assert set(load_checkpoint(folder).rng_states) == {"rank0", "rank1"}  # one per rank, gathered to rank 0
    assert set(load_checkpoint(one_process_run / "checkpoints" / STEP6).rng_states) == {"rank0"}

    run_dir = two_process_run / "logs" / RUN_NAME
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5, 6]  # each step once, not per rank
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1

    storage = open_storage(f"file://{two_process_run / 'bucket'}")
    assert sorted(CheckpointStore(storage).complete()) == [STEP3, STEP6]
    uploaded = {info.key for info in storage.list(f"{STEP6}/")}
    assert uploaded == {f"{STEP6}/{name}" for name in CHECKPOINT_FILES}


@pytest.mark.slow
def test_two_process_checkpoint_from_the_bucket_resumes_on_one_process(tmp_path, sample_data, one_process_run,
                                                                      two_process_run):
    """A fresh machine with 1 process, an empty disk and the 2-process run's bucket picks up at step 4."""
    bucket = tmp_path / "bucket"
    shutil.copytree(two_process_run / "bucket", bucket)
    result = check(launch(tmp_path, sample_data, *ONE_PROCESS, *STEPS, "--resume", STEP3,
                          "--checkpoint-bucket", f"file://{bucket}"))
    assert f"resuming from {tmp_path / 'checkpoints' / STEP3}" in result.stderr
    resumed, straight = logged(tmp_path), logged(one_process_run)
    assert sorted(resumed) == [4, 5, 6]
    assert max_loss_difference(resumed, {step: straight[step] for step in resumed}) <= LOSS_TOLERANCE
    state = load_checkpoint(tmp_path / "checkpoints" / STEP6).state
    assert state.num_processes == 1 and state.samples_consumed == 96


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_processes(tmp_path, sample_data, one_process_run, two_process_run):
    shutil.copytree(one_process_run / "checkpoints" / STEP3, tmp_path / "checkpoints" / STEP3)
    result = check(launch(tmp_path, sample_data, *TWO_PROCESSES, "--main-port", str(free_port()), *STEPS,
                          "--resume", "latest"))
    assert "resuming from" in result.stderr and STEP3 in result.stderr
    resumed, straight = logged(tmp_path), logged(two_process_run)
    assert sorted(resumed) == [4, 5, 6]
    assert max_loss_difference(resumed, {step: straight[step] for step in resumed}) <= LOSS_TOLERANCE
    assert checkpoints(tmp_path) == [STEP3, STEP6]
    state = load_checkpoint(tmp_path / "checkpoints" / STEP6).state
    assert state.num_processes == 2 and state.samples_consumed == 96


@pytest.mark.slow
def test_fsdp_on_cpu_trains_like_ddp_and_its_whole_checkpoint_resumes_on_one_process(tmp_path, sample_data):
    result_file = tmp_path / "fsdp.json"
    check(run_with_launcher_flags("fsdp_cpu_check.py", str(sample_data), str(result_file)))
    result = json.loads(result_file.read_text())
    assert result["world_size"] == 2 and result["distributed_type"] == "DistributedType.MULTI_CPU"
    ddp = result["ddp"]
    assert ddp["local_numel"] == ddp["total_numel"]
    for strategy in ("ddp", "fsdp1", "fsdp2"):
        run = result[strategy]
        assert run["model_keys"] == run["parameter_names"]  # the whole model, under the unwrapped model's names
        assert run["optimizer_keys"] == run["parameter_names"]  # and the whole optimizer state, by the same names
        assert max_loss_difference(run["losses"], ddp["losses"]) <= LOSS_TOLERANCE
        assert max_loss_difference(run["resumed_losses"], run["losses"][3:]) <= LOSS_TOLERANCE
        if strategy != "ddp":
            assert run["local_numel"] <= 0.51 * run["total_numel"]  # each rank really holds only half
    assert ddp["losses"][-1] < ddp["losses"][0] - 0.5

    # bf16: FSDP1 under the loop's policy keeps the rotary frequencies (buffers) in fp32, where Accelerate's own
    # policy makes them bf16, and trains like DDP under autocast within bf16's precision
    bf16 = result["bf16"]
    assert bf16["fsdp1"]["rotary_dtypes"] == bf16["ddp"]["rotary_dtypes"] == ["torch.float32"]
    assert bf16["fsdp1_accelerate_default"]["rotary_dtypes"] == ["torch.bfloat16"]
    assert max_loss_difference(bf16["fsdp1"]["losses"], bf16["ddp"]["losses"]) <= BF16_LOSS_TOLERANCE
    assert bf16["ddp"]["losses"][-1] < bf16["ddp"]["losses"][0] - 0.5


def test_the_fsdp_policy_keeps_buffers_in_fp32_and_reaches_accelerates_plugin(monkeypatch):
    """What make_accelerator hands Accelerate under an FSDP launch: its own plugin (read from the launch's
    environment) with the loop's policy, bf16/fp16 compute and reductions, fp32 buffers; no policy for fp32 runs."""
    from pretrain.loop import fsdp_mixed_precision, fsdp_plugin_from_launch

    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        policy = fsdp_mixed_precision(precision)
        assert (policy.param_dtype, policy.reduce_dtype, policy.buffer_dtype) == (dtype, dtype, torch.float32)
    assert fsdp_mixed_precision("no") is None
    assert fsdp_plugin_from_launch("bf16") is None  # not an FSDP launch
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")  # on a GPU it is true; building it needs a device here
    plugin = fsdp_plugin_from_launch("bf16")
    assert plugin.mixed_precision_policy == fsdp_mixed_precision("bf16")
    plugin.set_mixed_precision("bf16")  # what AcceleratorState does with it: a policy already set is kept
    assert plugin.mixed_precision_policy.buffer_dtype == torch.float32
