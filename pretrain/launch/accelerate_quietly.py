"""`accelerate launch`, run in-process so that a failed run ends with the training's own last line and exit code
(in the launcher's child, pretrain.launch.command, or by hand as `python -m pretrain.launch.accelerate_quietly launch`).

Accelerate reports a failed child as a CalledProcessError or torchrun's ChildFailedError traceback; here either becomes
the code this machine's first rank recorded in $PRETRAIN_LAUNCH_DIR/exit_code, or one line of ours when none could.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from accelerate.commands.launch import launch_command, launch_command_parser
from torch.distributed import DistError
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from pretrain.errors import one_line
from pretrain.protocol import (
    EXIT_RESTART,
    EXIT_UNEXPECTED,
    LOCAL_RANKS_FILE,
    QUIET_AGENT_ENV,
    STALL_FILE,
    launch_dir,
    record,
    recorded_exit_code,
    recorded_json,
    recorded_pids,
)

# What torchrun's agent logs on an ordinary ending (a preempted or failed rank, the others told to stop): the
# training has said what happened, so these would only push its line up. "Unable to shutdown" (a SIGKILL) stays.
ROUTINE_AGENT_MESSAGES = (
    "Sending process %s closing signal %s",
    "failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s",
    "Received %s death signal, shutting down workers",
    "Got termination signal: %s",
)


def _drop_routine_agent_messages() -> None:
    def routine(record: logging.LogRecord) -> bool:
        return record.msg not in ROUTINE_AGENT_MESSAGES

    for name in ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api"):
        logging.getLogger(name).addFilter(routine)


def _stop_workers_within_shutdown_timeout(self: LocalElasticAgent, worker_group) -> None:  # noqa: ARG001
    """torch 2.13 gives the other ranks a fixed 30 s (then SIGKILL) once one rank exits; rank 0 may still be writing
    the emergency checkpoint then, so they get TORCH_ELASTIC_SHUTDOWN_TIMEOUT, as on a signal to the agent."""
    self._shutdown(timeout=self._shutdown_timeout)


def _describe(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _remember_signal(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    """The launcher's signals go to the ranks themselves (pretrain.launch.supervisor); this process only waits for them.
    A Python handler, not SIG_IGN, so the training processes start with the default disposition."""


def _record_local_ranks(args) -> None:
    """How many rankN.pid files the supervisor waits for before it passes on a signal that came during start-up; its
    being there also tells the supervisor that the planning is over and the launch has begun."""
    if args.num_processes:
        record(LOCAL_RANKS_FILE, str(max(1, args.num_processes // (args.num_machines or 1))))


def prepare(argv: list[str]):
    """accelerate launch's parsed arguments; from here on the supervisor holds a signal for the ranks."""
    args = launch_command_parser().parse_args(argv)
    _record_local_ranks(args)
    return args


def rendezvous_failure(args, error: BaseException) -> str | None:
    """The one line for machines that did not all meet at start-up (torchrun's static rendezvous timed out, or machine
    0's store never answered); None for any other failure."""
    folder = launch_dir()
    if (args.num_machines or 1) < 2 or not isinstance(error, DistError) or (folder and recorded_pids(folder)):
        return None
    settings = dict(item.split("=", 1) for item in (args.rdzv_conf or "").split(",") if "=" in item)
    timeout = settings.get("timeout", "?")
    where = f"{args.main_process_ip}:{args.main_process_port}"
    if int(args.machine_rank) == 0:
        what = (f"not all {args.num_machines} machines joined the rendezvous at {where} within {timeout} s "
                f"(--rendezvous-timeout-seconds; {one_line(error)}); start the same command on every machine, with "
                f"--node-rank 0 to {args.num_machines - 1} and the same --nodes, --main-address and --main-port")
    else:
        what = (f"machine 0 did not answer the rendezvous at {where} within {timeout} s "
                f"(--rendezvous-timeout-seconds; {one_line(error)}); start the same command with --node-rank 0 on "
                "machine 0, and check that this machine reaches --main-address on --main-port")
    return f"{what}; exit {EXIT_RESTART}: run the same command again"


def launch(args) -> int:
    _drop_routine_agent_messages()
    # The launcher quieted torch's C++ log for this process (torchrun's agent, whose store retries would bury the
    # line about a rendezvous that failed); the training processes start with the user's setting again.
    if os.environ.pop(QUIET_AGENT_ENV, None) is not None:
        os.environ.pop("TORCH_CPP_LOG_LEVEL", None)
    LocalElasticAgent._stop_workers = _stop_workers_within_shutdown_timeout
    # One process runs through accelerate's simple launcher, which dies on SIGTERM/SIGINT and leaves its child behind;
    # torchrun's agent installs its own handlers (forward to the ranks, wait TORCH_ELASTIC_SHUTDOWN_TIMEOUT).
    signal.signal(signal.SIGTERM, _remember_signal)
    signal.signal(signal.SIGINT, _remember_signal)
    try:
        launch_command(args)
        return 0
    except subprocess.CalledProcessError as error:
        failure = f"the training process {_describe(error.returncode)}"
    except ChildFailedError as error:
        rank, root_cause = error.get_first_failure()
        failure = f"training process rank {rank} (pid {root_cause.pid}) {_describe(root_cause.exitcode)}"
    except SignalException as error:
        failure = f"the launcher got {error.sigval.name} and stopped the training processes"
    except Exception as error:  # noqa: BLE001 - e.g. the rendezvous port is taken: one line, not accelerate's traceback
        line = rendezvous_failure(args, error)
        if line is not None:
            print(f"error: {line}", file=sys.stderr)
            return EXIT_RESTART
        print(f"error: accelerate launch failed: {one_line(error)}", file=sys.stderr)
        return EXIT_UNEXPECTED
    recorded = recorded_exit_code()
    if recorded:
        return recorded  # the training's own last line says why
    stall = recorded_json(STALL_FILE)
    if stall:
        return int(stall["code"])  # rank 0 was killed after a stall (pretrain.watchdog); the other ranks said why
    print(f"error: {failure} before it could report how it ended; its messages are above", file=sys.stderr)
    return EXIT_UNEXPECTED


def main() -> None:
    if sys.argv[1:2] != ["launch"]:
        sys.exit("usage: python -m pretrain.launch.accelerate_quietly launch [accelerate launch flags] script [script flags]")
    sys.exit(launch(prepare(sys.argv[2:])))


if __name__ == "__main__":
    main()
