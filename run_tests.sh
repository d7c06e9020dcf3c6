#!/usr/bin/env bash
# Sets up what the tests need (venv, test dependencies, Azurite) when missing, then runs them.
#   ./run_tests.sh                 the fast loop: unit and in-process tests (a few minutes)
#   ./run_tests.sh --all           everything: through the launcher, the storage emulators, the journeys and the
#                                  stress tests (what CI runs)
#   ./run_tests.sh --all -k storage   any pytest arguments after
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --dev --quiet
# One pytest-xdist worker per usable core (at most 4), each pinned to its core with everything it starts
# (tests/conftest.py); a test file stays on one worker, so its module fixtures run once. `-n 0` runs in this process.
workers=$(nproc); [ "$workers" -gt 4 ] && workers=4
parallel=(-n "$workers" --dist loadfile)
for arg in "$@"; do
  case "$arg" in -n|-n*|--numprocesses*|--pdb|--trace) parallel=() ;; esac
done
if [ "${1:-}" = "--all" ]; then
  shift
  exec .venv/bin/python -m pytest "${parallel[@]}" "$@"
fi
exec .venv/bin/python -m pytest "${parallel[@]}" -m "not slow" "$@"
