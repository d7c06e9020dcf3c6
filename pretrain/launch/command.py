"""The launcher's child: plans the `accelerate launch ... train.py ...` run, prints the plan (stderr) and the command
(`running: ...`, stdout), then runs accelerate launch in this same process, so torch is imported here once.
Config flags are validated here, before anything is spawned. pretrain.launch.supervisor starts it.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from configs import TrainingConfig
from pretrain.cli import parse_config
from pretrain.memory import (
    Layout,
    measured_gpu_memory_gib,
    plan_for_config,
    with_layout,
)
from pretrain.model.families import family_for
from pretrain.plan import RunPlan
from pretrain.protocol import EXIT_BAD_INPUT, LIMITS_FILE, record

ACCELERATE_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "accelerate"  # the repository root
STRATEGIES = ("auto", "ddp", "fsdp")
# torchrun's agent SIGKILLs the ranks this long after passing on a SIGTERM; they need the grace period plus the
# time to finish the step they are in and leave the process group.
SHUTDOWN_MARGIN_SECONDS = 60
# How long torchrun's static rendezvous waits for every machine at start-up (its own default is 900 s).
RENDEZVOUS_TIMEOUT_SECONDS = 600


@dataclass(frozen=True)
class Launch:
    env: dict[str, str]  # set for accelerate and the training processes
    accelerate_args: list[str]  # accelerate launch's flags, then train.py and its flags
    stall_limits: str = ""  # "START_UP_SECONDS GRACE_SECONDS": what the launcher's own stall watch goes by

    @property
    def command(self) -> list[str]:
        """The same launch as one shell command, as the `running:` line shows it (it runs the same way by hand)."""
        env_words = [f"{key}={value}" for key, value in self.env.items()]
        quietly = ["python", "-m", "pretrain.launch.accelerate_quietly", "launch"]
        return ["env", *env_words, *quietly, *self.accelerate_args]


@dataclass(frozen=True)
class LaunchRequest:
    config_name: str
    gpus: int | None  # None: every visible GPU
    cpu_processes: int
    strategy: str
    nodes: int
    node_rank: int
    main_address: str
    main_port: int
    train_args: list[str]
    rendezvous_timeout_seconds: int = RENDEZVOUS_TIMEOUT_SECONDS


def parse_launch_args(argv: list[str]) -> LaunchRequest:
    parser = argparse.ArgumentParser(prog="start_training.sh", add_help=False, allow_abbrev=False)
    parser.add_argument("--config", default="test")
    parser.add_argument("--gpus", type=int, default=None)
    parser.add_argument("--cpu-processes", type=int, default=0)
    parser.add_argument("--strategy", choices=STRATEGIES, default="auto")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--main-address", default="127.0.0.1")
    parser.add_argument("--main-port", type=int, default=29500)
    parser.add_argument("--rendezvous-timeout-seconds", type=int, default=RENDEZVOUS_TIMEOUT_SECONDS)
    known, rest = parser.parse_known_args(argv)
    for name in ("gpus", "cpu_processes", "nodes"):
        value = getattr(known, name)
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {value}")
    if known.nodes < 1:
        raise ValueError(f"--nodes must be at least 1, got {known.nodes}")
    if not 0 <= known.node_rank < known.nodes:
        raise ValueError(f"--node-rank {known.node_rank} must be in [0, --nodes {known.nodes})")
    if not 0 < known.main_port < 65536:
        raise ValueError(f"--main-port must be a TCP port (1 to 65535), got {known.main_port}")
    if known.rendezvous_timeout_seconds <= 0:
        raise ValueError(f"--rendezvous-timeout-seconds must be positive, got {known.rendezvous_timeout_seconds}")
    return LaunchRequest(
        config_name=known.config, gpus=known.gpus, cpu_processes=known.cpu_processes, strategy=known.strategy,
        nodes=known.nodes, node_rank=known.node_rank, main_address=known.main_address, main_port=known.main_port,
        train_args=["--config", known.config, *rest], rendezvous_timeout_seconds=known.rendezvous_timeout_seconds,
    )


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def accelerate_config_file(gpus: int, strategy: str, nodes: int) -> Path:
    if nodes > 1:
        name = "multi_node_fsdp.yaml" if strategy == "fsdp" else "multi_node.yaml"
    elif strategy == "fsdp":
        name = "fsdp.yaml"
    elif gpus == 1:
        name = "single_gpu.yaml"
    elif gpus == 8:
        name = "ddp_8gpu.yaml"
    else:
        name = "ddp_2gpu.yaml"  # any other count: the same DDP file, --num_processes overrides its count
    return ACCELERATE_CONFIG_DIR / name


def choose_layout_for(request: LaunchRequest, config: TrainingConfig, gpus: int) -> tuple[Layout, list[str]]:
    """The layout `--strategy auto` / `--gradient-checkpointing auto` pick from the memory plan, with the plan's lines.

    GPU memory: --gpu-memory-gb, else what the first visible GPU reports.
    """
    gib = config.gpu_memory_gb or measured_gpu_memory_gib(0)
    if not gib:
        raise ValueError("no GPU is visible to plan the memory for: pass --gpu-memory-gb N (the memory of one GPU)")
    layout = plan_for_config(config, num_gpus=gpus * request.nodes, gpu_memory_gib=gib, strategy=request.strategy,
                             activation_checkpointing=config.gradient_checkpointing, nodes=request.nodes)
    lines = [*layout.plan.lines(), f"layout: {layout.reason}"]
    if not layout.fits:
        lines.append(f"warning: {layout.plan.verdict} with headroom; the run may stop out of memory (see README, "
                     "Will it fit?)")
    return layout, lines


def plan_launch(request: LaunchRequest, available_gpus: int, cpu_count: int) -> tuple[Launch | None, list[str]]:
    """(the launch, plan lines); no launch for a dry run, whose whole plan is in the lines."""
    config = parse_config(request.train_args)
    gpus = available_gpus if request.gpus is None else request.gpus
    if request.cpu_processes and gpus:
        raise ValueError("--cpu-processes is for machines without a GPU; drop it or pass --gpus 0")
    if config.dry_run:
        return None, dry_run_lines(request, config, gpus)
    if gpus > available_gpus:
        raise ValueError(
            f"--gpus {gpus}: {'no GPU is' if not available_gpus else f'only {available_gpus} GPUs are'} visible on "
            "this machine; use --gpus 0 to train on the CPU, or --cpu-processes N for N CPU processes"
        )
    env = {}
    flags: list[str] = []
    train_args = list(request.train_args)
    memory_lines: list[str] = []
    if gpus:
        processes_per_node = gpus
        precision = config.mixed_precision
        layout, memory_lines = choose_layout_for(request, config, gpus)
        # The choice goes to train.py as ordinary flags (the last of a repeated flag wins), so it shows in the command.
        train_args += ["--per-device-train-batch-size", str(layout.micro_batch), "--gradient-accumulation-steps",
                       str(layout.accumulation), "--gradient-checkpointing", str(layout.activation_checkpointing).lower()]
        config = with_layout(config, layout)
        flags += ["--config_file", str(accelerate_config_file(gpus, layout.strategy, request.nodes))]
        if layout.strategy == "fsdp":
            # One FSDP unit per block: the block class is the model family's (the files name no architecture).
            flags += ["--fsdp_transformer_layer_cls_to_wrap", family_for(config.model).layer_class_name]
        flags += ["--num_processes", str(gpus * request.nodes), "--mixed_precision", precision]
    else:
        if request.strategy == "fsdp":
            raise ValueError("--strategy fsdp needs GPUs: Accelerate does not set up FSDP on CPU processes (see README)")
        processes_per_node = max(1, request.cpu_processes)
        precision = config.mixed_precision if config.cpu_mixed_precision else "no"
        if processes_per_node * request.nodes > 1:
            # `--cpu --num_processes N` silently runs one process; --multi_gpu on a CPU-only machine gives N gloo
            # processes, also across machines (torchrun's rendezvous as on GPUs).
            flags += ["--multi_gpu", "--num_processes", str(processes_per_node * request.nodes)]
            if request.nodes == 1:
                flags += ["--main_process_port", str(request.main_port)]
        else:
            flags += ["--cpu", "--num_processes", "1"]
        if request.nodes == 1:
            flags += ["--num_machines", "1"]
        flags += ["--mixed_precision", precision, "--dynamo_backend", "no"]
        # A fair share of the cores per process; oversubscribed threads make every process slower.
        env["OMP_NUM_THREADS"] = str(max(1, cpu_count // processes_per_node))
    if request.nodes > 1:
        flags += rendezvous_flags(request)
    processes = processes_per_node * request.nodes
    if processes > 1:
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(math.ceil(config.preemption_grace_seconds) + SHUTDOWN_MARGIN_SECONDS)
    plan = [*RunPlan(config, processes, cuda=bool(gpus)).lines(), *memory_lines]
    limits = f"{60 * config.startup_timeout_minutes:g} {config.preemption_grace_seconds:g}"
    return Launch(env, [*flags, "train.py", *train_args], limits), plan


def rendezvous_flags(request: LaunchRequest) -> list[str]:
    """Several machines, on GPUs or CPU processes alike: torchrun's static rendezvous at machine 0's address, bounded
    by --rendezvous-timeout-seconds, and no restarts (a lost machine ends the run; the orchestrator restarts it)."""
    return [
        "--num_machines", str(request.nodes), "--machine_rank", str(request.node_rank),
        "--main_process_ip", request.main_address, "--main_process_port", str(request.main_port),
        "--rdzv_conf", f"timeout={request.rendezvous_timeout_seconds}", "--max_restarts", "0",
    ]


def dry_run_lines(request: LaunchRequest, config: TrainingConfig, gpus: int) -> list[str]:
    """The whole plan without allocating anything or needing the GPUs: the model on the meta device, the memory plan
    (with --gpu-memory-gb on a machine without them) and the layout auto would pick."""
    from pretrain.model.build import (  # transformers: only for a dry run
        build_model,
        count_parameters,
    )

    lines = ["dry run: nothing is allocated or trained"]
    memory_lines: list[str] = []
    processes = (gpus or max(1, request.cpu_processes)) * request.nodes
    if gpus:
        layout, memory_lines = choose_layout_for(request, config, gpus)
        config = with_layout(config, layout)
    model = build_model(config.model, device="meta")
    lines += RunPlan(config, processes, cuda=bool(gpus), model_size=count_parameters(model)).lines()
    return [*lines, *memory_lines]


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's pinning), not all the machine has: the threads'
    fair share counts only those."""
    return len(os.sched_getaffinity(0))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        request = parse_launch_args(argv)
        launch, plan = plan_launch(request, visible_gpus(), usable_cpus())
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for line in plan:
        print(line, file=sys.stderr)
    if launch is None:
        return 0
    # accelerate and torch.distributed: imported only to launch, not for a plan or a dry run
    from pretrain.launch import accelerate_quietly

    os.environ.update(launch.env)  # read by accelerate, torchrun and every training process it starts
    record(LIMITS_FILE, launch.stall_limits)  # before the launch begins: the launcher watches it from then on
    args = accelerate_quietly.prepare(launch.accelerate_args)
    print("running: " + shlex.join(launch.command), flush=True)
    return accelerate_quietly.launch(args)


if __name__ == "__main__":
    sys.exit(main())
