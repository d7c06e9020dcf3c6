"""The accelerate launch command start_training.sh runs, for each kind of machine, and how its ending reads."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.launch.command import parse_launch_args, plan_launch
from tests.launcher import REPO, free_port, last_line


def command_for(argv, gpus=0, cores=2):
    planned, plan = plan_launch(parse_launch_args(argv), available_gpus=gpus, cpu_count=cores)
    command = planned.command
    launch = command.index("launch")
    script = command.index("train.py")
    assert command[launch - 3:launch] == ["python", "-m", "pretrain.launch.accelerate_quietly"]
    return command[:launch - 3], command[launch + 1:script], command[script + 1:], plan


def test_cpu_single_process_uses_cpu_flag_and_all_cores():
    env, flags, train_args, plan = command_for(["--config", "test", "--max-steps", "5"])
    assert env == ["env", "OMP_NUM_THREADS=2"]
    assert "--cpu" in flags and flags[flags.index("--mixed_precision") + 1] == "no"
    assert train_args == ["--config", "test", "--max-steps", "5"]
    assert "batch: 8 per device x 2 accumulation x 1 process x 128 tokens = 2,048 tokens per optimizer step" in plan


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2, reason="needs 2 CPUs")
def test_the_thread_share_counts_only_the_cpus_this_process_may_use():
    # As in a container or under taskset: pinned to one of the machine's CPUs, a process counts one; on all, all.
    def usable_when_pinned_to(cpus: set[int]) -> list[str]:
        probe = subprocess.run([sys.executable, "-c", "from pretrain.launch.command import usable_cpus; print(usable_cpus())"],
                               cwd=REPO, capture_output=True, text=True, timeout=60,
                               preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        return probe.stdout.split() or [probe.stderr]

    every_cpu = set(range(os.cpu_count()))
    assert usable_when_pinned_to({0}) == ["1"]
    assert usable_when_pinned_to(every_cpu) == [str(len(every_cpu))]


def test_cpu_processes_use_multi_gpu_flag_so_gloo_really_runs_n_processes():
    env, flags, _, _ = command_for(["--config", "test", "--cpu-processes", "2"])
    assert "--multi_gpu" in flags and "--cpu" not in flags
    assert flags[flags.index("--num_processes") + 1] == "2"
    assert env[1] == "OMP_NUM_THREADS=1"
    assert env[2] == "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=85"  # the test config's 25 s grace period + 60 s


def test_torchrun_waits_longer_than_the_emergency_checkpoints_grace_period_before_sigkill():
    env, _, _, _ = command_for(["--config", "test", "--cpu-processes", "2", "--preemption-grace-seconds", "100.5"])
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=161" in env
    env, _, _, _ = command_for(["--config", "test"])
    assert not any(word.startswith("TORCH_ELASTIC") for word in env)  # one process: no torchrun agent


def test_production_on_two_80gb_gpus_runs_ddp_as_configured_and_prints_the_plan():
    _, flags, train_args, plan = command_for(["--config", "production", "--gpus", "2", "--gpu-memory-gb", "79.1"], gpus=2)
    assert flags[flags.index("--config_file") + 1].endswith("configs/accelerate/ddp_2gpu.yaml")
    assert Path(flags[flags.index("--config_file") + 1]).is_file()
    assert flags[flags.index("--num_processes") + 1] == "2"
    assert flags[flags.index("--mixed_precision") + 1] == "bf16"
    assert "batch: 4 per device x 4 accumulation x 2 processes x 1024 tokens = 32,768 tokens per optimizer step" in plan
    assert train_args[:2] == ["--config", "production"]
    assert train_args[-6:] == ["--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "4",
                               "--gradient-checkpointing", "false"]
    assert any(line.startswith("memory plan per GPU: DDP on 2 GPUs") for line in plan)
    assert any(line.startswith("layout: DDP on 2 GPUs, micro-batch 4 x accumulation 4: fits") for line in plan)


def test_auto_picks_what_the_memory_plan_says_and_keeps_the_global_batch():
    """Two 24 GB cards: DDP does not fit, so FSDP at micro-batch 2 with twice the accumulation (README table)."""
    _, flags, train_args, plan = command_for(["--config", "production", "--gpus", "2", "--gpu-memory-gb", "22.5"], gpus=2)
    assert flags[flags.index("--config_file") + 1].endswith("configs/accelerate/fsdp.yaml")
    assert train_args[-6:] == ["--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "8",
                               "--gradient-checkpointing", "false"]
    assert "batch: 2 per device x 8 accumulation x 2 processes x 1024 tokens = 32,768 tokens per optimizer step" in plan
    # A forced strategy is kept, and the plan says it does not fit.
    _, flags, _, plan = command_for(["--config", "production", "--gpus", "2", "--gpu-memory-gb", "22.5", "--strategy",
                                     "ddp", "--gradient-checkpointing", "false"], gpus=2)
    assert flags[flags.index("--config_file") + 1].endswith("ddp_2gpu.yaml")
    assert any(line.startswith("warning:") for line in plan)


def test_dry_run_plans_gpus_this_machine_does_not_have(tmp_path):
    result = subprocess.run([str(REPO / "start_training.sh"), "--config", "production", "--gpus", "2",
                             "--gpu-memory-gb", "24", "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "running:" not in result.stdout
    assert "1,414,455,296 parameters" in result.stderr and "1,208,602,624 non-embedding" in result.stderr
    # 24.0 GiB (an RTX 4090) holds FSDP at the configured micro-batch; 22.5 GiB (A10G, L4) needs 2 x 8 (test above)
    assert "memory plan per GPU: FSDP on 2 GPUs, micro-batch 4 x accumulation 4" in result.stderr
    assert "batch: 4 per device x 4 accumulation x 2 processes x 1024 tokens = 32,768 tokens" in result.stderr


def test_fsdp_and_multi_node_pick_their_files_and_pass_rendezvous_flags():
    _, flags, _, plan = command_for(
        ["--config", "production_8gpu", "--gpus", "8", "--strategy", "fsdp", "--nodes", "2", "--node-rank", "1",
         "--main-address", "10.0.0.2", "--main-port", "29501", "--gpu-memory-gb", "79.1"], gpus=8)
    assert flags[flags.index("--config_file") + 1].endswith("multi_node_fsdp.yaml")
    assert flags[flags.index("--num_processes") + 1] == "16"
    assert flags[flags.index("--machine_rank") + 1] == "1"
    assert flags[flags.index("--main_process_ip") + 1] == "10.0.0.2"
    assert "batch: 8 per device x 4 accumulation x 16 processes x 1024 tokens = 524,288 tokens per optimizer step" in plan
    # HYBRID_SHARD: the memory plan divides the state by the 8 GPUs of a node, not by all 16
    assert any(line.startswith("memory plan per GPU: FSDP on 16 GPUs (sharded over the 8 of a node)") for line in plan)


RENDEZVOUS = ["--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.2", "--main_process_port",
              "29733", "--rdzv_conf", "timeout=600", "--max_restarts", "0"]


@pytest.mark.parametrize("processes", [1, 2])
def test_cpu_processes_on_several_machines_rendezvous_as_gpus_do(processes):
    """The same rendezvous flags as on GPUs: static at machine 0's address, bounded, never restarted."""
    cpu = ["--cpu-processes", str(processes)] if processes > 1 else []
    machine = ["--nodes", "2", "--node-rank", "1", "--main-address", "10.0.0.2", "--main-port", "29733"]
    argv = ["--config", "test", *cpu, *machine]
    env, flags, _, plan = command_for(argv)
    assert flags[:3] == ["--multi_gpu", "--num_processes", str(2 * processes)]  # all processes of all machines
    assert "--cpu" not in flags and flags[-len(RENDEZVOUS):] == RENDEZVOUS
    assert env[1] == f"OMP_NUM_THREADS={2 // processes}"  # this machine's cores among its own processes
    assert f"x {2 * processes} processes x 128 tokens" in " ".join(plan)
    _, gpu_flags, _, _ = command_for(["--config", "production_8gpu", "--gpus", "8", "--gpu-memory-gb", "79.1",
                                      *machine], gpus=8)
    assert gpu_flags[-len(RENDEZVOUS):] == RENDEZVOUS
    _, flags, _, _ = command_for([*argv, "--rendezvous-timeout-seconds", "45"])
    assert "timeout=45" in flags


@pytest.mark.parametrize(
    "argv, gpus, fragment",
    [
        (["--config", "production", "--gpus", "2"], 0, "--gpus 2: no GPU is visible"),
        (["--gpus", "4"], 2, "only 2 GPUs are visible"),
        (["--gpus", "1", "--cpu-processes", "2"], 1, "--cpu-processes is for machines without a GPU"),
        (["--nodes", "2", "--node-rank", "2"], 1, "--node-rank 2 must be in"),
        (["--nodes", "0"], 0, "--nodes must be at least 1, got 0"),
        (["--nodes", "2", "--main-port", "0"], 0, "--main-port must be a TCP port"),
        (["--nodes", "2", "--rendezvous-timeout-seconds", "0"], 0, "--rendezvous-timeout-seconds must be positive"),
        (["--config", "nope"], 0, "is not a known config"),
        (["--config", "production", "--gpus", "2"], 2, "pass --gpu-memory-gb N"),
        (["--save-stpes", "3"], 0, "did you mean --save-steps"),
    ],
)
def test_bad_launch_requests_fail_before_anything_starts(argv, gpus, fragment):
    with pytest.raises(ValueError) as error:
        plan_launch(parse_launch_args(argv), available_gpus=gpus, cpu_count=2)
    assert fragment in str(error.value)


# Stand-ins for train.py, run by the real launcher module: how each way of ending reaches the user.
SAYS_BAD_INPUT = """
import os, pathlib, sys
print("error: data/x.npz: not a valid .npz", file=sys.stderr)
if os.environ["RANK"] == "0":
    pathlib.Path(os.environ["PRETRAIN_LAUNCH_DIR"], "exit_code").write_text("2\\n")
sys.exit(2)
"""
CRASHES = "raise RuntimeError('a bug')\n"
RANK_1_KILLED = """
import os, signal, time
if os.environ["RANK"] == "1":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(60)  # rank 0 is still working when rank 1 dies: torchrun must stop it
"""


@pytest.mark.parametrize(
    "script, processes, code, last_words",
    [
        (SAYS_BAD_INPUT, 2, 2, "error: data/x.npz: not a valid .npz"),
        (CRASHES, 1, 1, "error: the training process exited with code 1 before it could report how it ended"),
        (RANK_1_KILLED, 2, 1, "error: training process rank 1 (pid "),
    ],
    ids=["bad-input-2-processes", "crash-1-process", "rank-killed-2-processes"],
)
def test_the_launcher_ends_with_one_line_of_ours_and_the_trainings_exit_code(script, processes, code, last_words, tmp_path):
    (tmp_path / "stand_in.py").write_text(script)
    launch_dir = tmp_path / "launch"
    launch_dir.mkdir()
    argv = ["--config", "test", "--main-port", str(free_port())] + (["--cpu-processes", "2"] if processes > 1 else [])
    planned, _ = plan_launch(parse_launch_args(argv), available_gpus=0, cpu_count=2)
    command = [*planned.command[: planned.command.index("train.py")], str(tmp_path / "stand_in.py")]
    env = {**os.environ, "PRETRAIN_LAUNCH_DIR": str(launch_dir), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stderr[-3000:]
    assert last_words in last_line(result.stderr), result.stderr[-3000:]
    for noise in ("CalledProcessError", "ChildFailedError", "closing signal", "failed (exitcode"):
        assert noise not in result.stderr, result.stderr[-3000:]
    if script == RANK_1_KILLED:
        assert "SIGKILL" in last_line(result.stderr)
