#!/usr/bin/env bash
# Launches training through `accelerate launch train.py` on this machine's GPUs (or CPU).
#   ./start_training.sh --config production --gpus 2
#   ./start_training.sh --config production --gpus 2 --resume auto
# Launcher flags: --config NAME  --gpus N  --cpu-processes N  --strategy auto|ddp|fsdp
#                 --nodes N --node-rank R --main-address HOST --main-port PORT --rendezvous-timeout-seconds S
# Every other flag goes to train.py (--resume, --max-steps, --save-steps, ...; see --help).
# SIGTERM/SIGINT are forwarded to every training process, which writes an emergency checkpoint
# and exits with 75; the exit code of train.py is returned (0 done, 1 unexpected, 2 bad input,
# 3 non-finite losses, 4 newest checkpoint only on local disk, 75 preempted, 76 a rank stalled or
# another machine is gone or never joined: run it again, 130 second Ctrl-C).
set -uo pipefail
cd "$(dirname "$0")"
# Lost-time accounting counts a restart's start-up (set-up, download, data, compile) from here.
export PRETRAIN_LAUNCHED_UNIX=$(date +%s.%N)

for arg in "$@"; do
  if [ "$arg" = "--help" ] || [ "$arg" = "-h" ]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    echo
    ./setup.sh --quiet && exec .venv/bin/python train.py "$@"
  fi
done

./setup.sh --quiet || exit 1
export PATH="$PWD/.venv/bin:$PATH"
# The supervisor (pretrain/launch/supervisor.py) plans, launches, forwards signals and returns train.py's exit code.
exec .venv/bin/python -m pretrain.launch "$@"
