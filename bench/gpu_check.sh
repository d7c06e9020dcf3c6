#!/usr/bin/env bash
# The GPU check of bench/gpu_check.py on a fresh GPU VM, within 8 minutes in all: set-up (pinned requirements
# only), then the checks with whatever time is left. Extra flags go to gpu_check.py (e.g. --cpu-smoke, --json F).
set -uo pipefail
cd "$(dirname "$0")/.."

total_s=${GPU_CHECK_SECONDS:-480}
start=$(date +%s)
if ! timeout 300 ./setup.sh --quiet; then
  echo "gpu_check.sh: ./setup.sh failed or took over 300 s; see its output above" >&2
  exit 1
fi
left=$(( total_s - ($(date +%s) - start) ))
if [ "$left" -lt 60 ]; then
  echo "gpu_check.sh: set-up left only ${left} s of the ${total_s} s budget; run again (set-up is cached now)" >&2
  exit 1
fi
# The python budget ends 20 s before the hard timeout, so the summary is printed before anything is killed;
# the hard timeout bounds a kernel that hangs.
exec timeout --kill-after=10 "$left" .venv/bin/python bench/gpu_check.py --budget-seconds $(( left - 20 )) "$@"
