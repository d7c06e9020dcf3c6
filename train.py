"""Entry point: parse the config, build the trainer, run it, map the outcome to an exit code.

Run through `./start_training.sh` (which calls `accelerate launch train.py ...`) or directly.
Exit codes: 0 done, 1 anything unexpected, 2 bad input (config, data, checkpoint, bucket, a checkpoint that could not
be written), 3 too many non-finite steps or loss-spike rollbacks, 4 the newest checkpoint is only on local disk
(its upload failed), 75 stopped by a signal (after an emergency checkpoint once training started; rerun with
--resume auto), 76 a process stalled (the stall watchdog, pretrain/watchdog.py) or another machine's processes are
gone: run the same command again (on every machine).
"""

from __future__ import annotations

import logging
import os
import sys

from pretrain.errors import one_line
from pretrain.protocol import (
    EXIT_BAD_INPUT,
    EXIT_CODE_FILE,
    EXIT_NONFINITE,
    EXIT_NOT_UPLOADED,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_RESTART,
    launch_dir,
    pid_file,
    record,
)


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s" if rank == 0 else f"%(asctime)s rank{rank} %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("urllib3", "azure", "botocore", "google", "filelock", "torch._dynamo", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    from pretrain.cli import parse_config

    try:
        config = parse_config(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if config.dry_run:
        from pretrain.plan import print_dry_run

        print_dry_run(config)
        return EXIT_OK

    from pretrain.checkpoint.checkpointer import CheckpointNotUploaded
    from pretrain.checkpoint.format import CheckpointError
    from pretrain.loop import NonFiniteLoss, Trainer
    from pretrain.machines import Machines, lost_machine_line, preempted_words
    from pretrain.preemption import Preempted, PreemptionFlag
    from pretrain.spikes import TooManySpikes
    from pretrain.storage.base import StorageError
    from pretrain.storage.redaction import redact

    rank = os.environ.get("RANK", "0")
    # Each machine's launcher reads the exit code of its own first process (rank 0's on machine 0).
    local_main = os.environ.get("LOCAL_RANK", "0") == "0"
    folder = launch_dir()
    preemption = PreemptionFlag(str(folder / EXIT_CODE_FILE) if folder and local_main else None)
    preemption.install()
    # Only now: the launcher sends signals to the pids it finds, and before install() one would kill this process.
    record(pid_file(rank), str(os.getpid()))
    log = logging.getLogger("train")
    machines = Machines.from_env()
    trainer = None
    try:
        trainer = Trainer(config, preemption)
        _KEEP_UNTIL_EXIT.append(trainer)  # freed only by os._exit below: see exit_without_teardown
        trainer.run()
        code = EXIT_OK
    except Preempted as stopped:
        why = f"by {stopped.signal_name}" if stopped.signal_name else \
            f"because {preempted_words(stopped.signalled, machines)}"
        log.warning("stopped %s; run the same command with --resume auto to continue", why)
        code = EXIT_PREEMPTED
    except CheckpointNotUploaded as error:
        log.error("error: %s", redact(one_line(error)))
        code = EXIT_NOT_UPLOADED
    except (NonFiniteLoss, TooManySpikes) as error:
        log.error("%s", error)
        code = EXIT_NONFINITE
    except (ValueError, FileNotFoundError, CheckpointError, StorageError, PermissionError, OSError) as error:
        log.error("error: %s", redact(one_line(error)))
        code = EXIT_BAD_INPUT
    except Exception as error:
        # Another machine's processes are gone (a collective's connection to them closed): this machine ends too,
        # with one line, rather than a traceback or a wait. Anything else is a bug: its traceback follows.
        step = getattr(getattr(trainer, "state", None), "step", None)
        line = lost_machine_line(error, machines, step)
        if line is None:
            raise
        log.error("error: %s", line)
        code = EXIT_RESTART
    if local_main:
        record(EXIT_CODE_FILE, str(code))
    return code


def exit_without_teardown(code: int) -> None:
    """Ends the process without interpreter teardown. Freeing the DDP model there frees its reducer and with it the
    gloo process group, whose destructor joins its worker thread while holding the GIL; a worker that still has to
    free a finished broadcast's tensors needs the GIL, so the rank hangs forever (seen with torch 2.13 on 2 CPU
    processes: one rank stuck in ~ProcessGroupGloo after the other exited). Everything that must reach the disk was
    closed by the run already (checkpoint workers joined, logs closed); the streams are flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_KEEP_UNTIL_EXIT: list = []

if __name__ == "__main__":
    exit_without_teardown(main())
