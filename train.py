"""Entry point: parse the config, build the trainer, run it, map the outcome to an exit code.

Run through `./start_training.sh` (which calls `accelerate launch train.py ...`) or directly.
Exit codes: 0 done, 1 anything unexpected, 2 bad input (config, data, checkpoint, bucket, a checkpoint that could not
be written), 3 too many non-finite steps, 4 the newest checkpoint is only on local disk (its upload failed),
75 stopped by a signal (after an emergency checkpoint once training started; rerun with --resume auto).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_NOT_UPLOADED = 0, 1, 2, 3, 4


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


def _record_for_launcher(name: str, value: str) -> None:
    """start_training.sh reads pid files (to forward signals) and the exit code (accelerate launch masks it).

    One value and a newline per file, renamed into place so the launcher never reads half of it; a launcher that is
    already gone (its folder removed) reads nothing, so nothing is written.
    """
    launch_dir = os.environ.get("PRETRAIN_LAUNCH_DIR")
    if not launch_dir:
        return
    partial = Path(launch_dir, f".{name}.{os.getpid()}.partial")
    try:
        partial.write_text(f"{value}\n")
        partial.replace(Path(launch_dir, name))
    except FileNotFoundError:
        pass


def one_line(error: BaseException) -> str:
    """Our errors are one line already; one raised in a DataLoader worker comes wrapped in the worker's traceback, whose
    last line is `module.Class: the original message`."""
    text = str(error).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


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

    from pretrain.checkpoint import CheckpointError
    from pretrain.checkpointer import CheckpointNotUploaded
    from pretrain.loop import NonFiniteLoss, Trainer
    from pretrain.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionFlag
    from pretrain.storage import StorageError, redact

    rank = os.environ.get("RANK", "0")
    launch_dir = os.environ.get("PRETRAIN_LAUNCH_DIR")
    preemption = PreemptionFlag(str(Path(launch_dir, "exit_code")) if launch_dir and rank == "0" else None)
    preemption.install()
    # Only now: the launcher sends signals to the pids it finds, and before install() one would kill this process.
    _record_for_launcher(f"rank{rank}.pid", str(os.getpid()))
    log = logging.getLogger("train")
    try:
        trainer = Trainer(config, preemption)
        _KEEP_UNTIL_EXIT.append(trainer)  # freed only by os._exit below: see exit_without_teardown
        trainer.run()
        code = EXIT_OK
    except Preempted as signal_name:
        log.warning("stopped by %s; run the same command with --resume auto to continue", signal_name)
        code = PREEMPTED_EXIT_CODE
    except CheckpointNotUploaded as error:
        log.error("error: %s", redact(one_line(error)))
        code = EXIT_NOT_UPLOADED
    except NonFiniteLoss as error:
        log.error("%s", error)
        code = EXIT_NONFINITE
    except (ValueError, FileNotFoundError, CheckpointError, StorageError, PermissionError, OSError) as error:
        log.error("error: %s", redact(one_line(error)))
        code = EXIT_BAD_INPUT
    if rank == "0":
        _record_for_launcher("exit_code", str(code))
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
