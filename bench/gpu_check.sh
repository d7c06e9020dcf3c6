#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a GPU machine as it is: this machine's own python3 (or $PYTHON) with torch,
# transformers and accelerate, no set-up step and no network, within 7 minutes including compile. The planned time of
# each part is in bench/gpu_check.py (PARTS); a part whose plan no longer fits the time left is skipped, not cut.
# Extra flags go to gpu_check.py (e.g. --cpu-smoke, --json FILE).
set -uo pipefail
cd "$(dirname "$0")/.."

python_bin=${PYTHON:-python3}
total_s=${GPU_CHECK_SECONDS:-420}
# The python budget ends 20 s before the hard timeout, so the table is printed before anything is killed; the hard
# timeout bounds a kernel that hangs.
exec timeout --kill-after=10 "$total_s" "$python_bin" bench/gpu_check.py --budget-seconds $(( total_s - 20 )) "$@"
