#!/usr/bin/env bash
# Launches training through `accelerate launch train.py` on this machine's GPUs (or CPU).
#   ./start_training.sh --config production --gpus 2
#   ./start_training.sh --config production --gpus 2 --resume auto
# Launcher flags: --config NAME  --gpus N  --cpu-processes N  --strategy auto|ddp|fsdp
#                 --nodes N --node-rank R --main-address HOST --main-port PORT
# Every other flag goes to train.py (--resume, --max-steps, --save-steps, ...; see --help).
# SIGTERM/SIGINT are forwarded to every training process, which writes an emergency checkpoint
# and exits with 75; the exit code of train.py is returned (0 done, 1 unexpected, 2 bad input,
# 3 non-finite losses, 4 newest checkpoint only on local disk, 75 preempted, 130 second Ctrl-C).
set -uo pipefail
# A shell that starts with SIGINT ignored (a background job of a script, some supervisors and test runners) cannot
# trap it, so a Ctrl-C or `kill -INT` would be dropped without a word: start again with the default disposition.
if [ -z "${PRETRAIN_SIGINT_RESET:-}" ] && (( 0x$(awk '/^SigIgn:/ {print $2}' /proc/$$/status 2>/dev/null || echo 0) & 2 )) \
    && env --default-signal=INT true 2>/dev/null; then
  export PRETRAIN_SIGINT_RESET=1
  exec env --default-signal=INT "$0" "$@"
fi
cd "$(dirname "$0")"
# Lost-time accounting counts a restart's start-up (set-up, download, data, compile) from here.
export PRETRAIN_LAUNCHED_UNIX=$(date +%s.%N)

for arg in "$@"; do
  if [ "$arg" = "--help" ] || [ "$arg" = "-h" ]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    echo
    ./setup.sh --quiet && exec .venv/bin/python train.py "$@"
  fi
done

./setup.sh --quiet || exit 1
export PATH="$PWD/.venv/bin:$PATH"

# The plan goes to stderr, the command NUL-separated to stdout; a dry run prints the plan and launches nothing.
command_file=$(mktemp)
python -m pretrain.launch "$@" > "$command_file"
code=$?
mapfile -d '' command < "$command_file"
rm -f "$command_file"
[ "$code" -eq 0 ] || exit "$code"
[ "${#command[@]}" -gt 0 ] || exit 0
ORPHAN_GRACE_SECONDS=90  # above the default preemption grace (25 s) plus a step and a save
launch_dir=$(mktemp -d)
launcher=''
trap clean_up EXIT
export PRETRAIN_LAUNCH_DIR=$launch_dir
# Each rank writes rankN.pid, one pid and a newline, once its signal handler is installed.
training_pids() { cat "$launch_dir"/rank*.pid 2>/dev/null; }
# A pid of this run, not one the system has since reused: it carries this run's launch folder in its environment.
ours() {
  if [ -r "/proc/$1/environ" ]; then
    grep -qzxF "PRETRAIN_LAUNCH_DIR=$launch_dir" "/proc/$1/environ" 2>/dev/null
  else
    kill -0 "$1" 2>/dev/null
  fi
}

# The signal reaches every rank, also one that starts after it arrived: deliver() runs again until the launcher ends.
pending='' signals=0
declare -A told=()  # pid -> how many signals it has been sent
on_signal() {
  pending=$1
  signals=$((signals + 1))
  if [ -n "$launcher" ] && [ -z "$(training_pids)" ]; then
    echo "start_training.sh: SIG$1 received while starting up; the training processes get it as soon as they are ready" >&2
  fi
  deliver
}
# A signal from start-up waits until every local rank is ready (local_ranks, written by pretrain.launch.accelerate_quietly),
# so that they all get it at once; after that, and mid-training, it goes at once to every rank.
all_ready() {
  local expected
  expected=$(cat "$launch_dir/local_ranks" 2>/dev/null) || return 1
  [ "$(training_pids | wc -l)" -ge "$expected" ]
}
deliver() {
  local pid fresh=()
  [ "${#told[@]}" -gt 0 ] || all_ready || return 0
  for pid in $(training_pids); do
    if [ "${told[$pid]:-0}" -lt "$signals" ] && ours "$pid"; then
      told[$pid]=$signals
      fresh+=("$pid")
    fi
  done
  [ "${#fresh[@]}" -gt 0 ] || return 0
  echo "start_training.sh: forwarding SIG$pending to training processes ${fresh[*]}" >&2
  kill -s "$pending" "${fresh[@]}" 2>/dev/null
}
leftovers() {
  local pid
  for pid in $(training_pids); do ours "$pid" && echo "$pid"; done
}
# Nothing of this run outlives it, and the folder the ranks write to goes only after they are gone.
clean_up() {
  local stray
  stray=$(leftovers)
  if [ -n "$stray" ]; then
    echo "start_training.sh: training processes $(echo $stray) still running after the launcher ended; killing them" >&2
    kill -s KILL $stray 2>/dev/null
  fi
  # accelerate's own process group, where a single training process lives
  [ -z "$launcher" ] || kill -s KILL -- "-$launcher" 2>/dev/null
  rm -rf "$launch_dir"
}

# Its own session, so a terminal's Ctrl-C reaches only this script, which passes it to the training processes
# (not to accelerate, which would stop them before their emergency checkpoint is written).
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
if [ -n "$pending" ]; then
  echo "start_training.sh: stopped by SIG$pending before the training started; nothing has changed" >&2
  exit 75
fi
setsid "${command[@]}" &
launcher=$!
printf 'running:'; printf ' %q' "${command[@]}"; echo
while kill -0 "$launcher" 2>/dev/null; do
  if [ -n "$pending" ]; then
    sleep 0.2  # a signal is waiting for ranks that have not started yet: look for their pid files
    deliver
  else
    wait "$launcher"  # returns early when a trap runs
  fi
done
wait "$launcher"
status=$?
# The launcher waits for its ranks, so they outlive it only when it was killed: they stop as if preempted, within
# the bound below, and clean_up kills what is still there.
stray=$(leftovers)
if [ -n "$stray" ]; then
  echo "start_training.sh: the launcher ended (status $status) before training processes $(echo $stray); stopping them" >&2
  kill -s TERM $stray 2>/dev/null
  deadline=$((SECONDS + ORPHAN_GRACE_SECONDS))
  while [ -n "$(leftovers)" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
fi
if [ -s "$launch_dir/exit_code" ]; then
  status=$(cat "$launch_dir/exit_code")
elif [ "$status" -gt 128 ]; then
  echo "error: the launcher (accelerate) was killed by signal $((status - 128)) before the training reported how it ended; run the same command with --resume auto" >&2
  status=1
fi
exit "$status"
