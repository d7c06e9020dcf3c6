#!/usr/bin/env bash
# Launches training through `accelerate launch train.py` on this machine's GPUs (or CPU).
#   ./start_training.sh --config production --gpus 2
#   ./start_training.sh --config production --gpus 2 --resume latest
# Launcher flags: --config NAME  --gpus N  --cpu-processes N  --strategy ddp|fsdp
#                 --nodes N --node-rank R --main-address HOST --main-port PORT
# Every other flag goes to train.py (--resume, --max-steps, --save-steps, ...; see --help).
# SIGTERM/SIGINT are forwarded to every training process, which writes an emergency checkpoint
# and exits with 75; the exit code of train.py is returned.
set -uo pipefail
cd "$(dirname "$0")"

for arg in "$@"; do
  if [ "$arg" = "--help" ] || [ "$arg" = "-h" ]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    echo
    ./setup.sh --quiet && exec .venv/bin/python train.py "$@"
  fi
done

./setup.sh --quiet || exit 1
export PATH="$PWD/.venv/bin:$PATH"

mapfile -d '' command < <(python -m pretrain.launch "$@")
[ "${#command[@]}" -gt 0 ] || exit 2
printf 'running:'; printf ' %q' "${command[@]}"; echo

launch_dir=$(mktemp -d)
trap 'rm -rf "$launch_dir"' EXIT
export PRETRAIN_LAUNCH_DIR=$launch_dir

training_pids() { cat "$launch_dir"/rank*.pid 2>/dev/null; }
forward() {
  local pids
  pids=$(training_pids)
  if [ -n "$pids" ]; then
    echo "start_training.sh: forwarding SIG$1 to training processes $(echo $pids)" >&2
    kill -s "$1" $pids 2>/dev/null
  else
    kill -s "$1" "$launcher" 2>/dev/null  # still starting up: nothing to checkpoint yet
  fi
}

# Its own session, so a terminal's Ctrl-C reaches only this script, which forwards it to the
# training processes: the launcher itself must keep waiting while they write their checkpoint.
setsid "${command[@]}" &
launcher=$!
trap 'forward TERM' TERM
trap 'forward INT' INT
status=0
while kill -0 "$launcher" 2>/dev/null; do
  wait "$launcher"
  status=$?
done
for pid in $(training_pids); do
  while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
done
if [ -s "$launch_dir/exit_code" ]; then
  status=$(cat "$launch_dir/exit_code")
fi
exit "$status"
