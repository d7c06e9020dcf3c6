#!/usr/bin/env bash
# Sets up what the tests need (venv, test dependencies, Azurite) when missing, then runs them.
#   ./run_tests.sh                 the fast loop: unit and in-process tests (a few minutes)
#   ./run_tests.sh --all           everything: through the launcher, the storage emulators, the journeys and the
#                                  stress tests (what CI runs)
#   ./run_tests.sh --all -k storage   any pytest arguments after
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --dev --quiet
if [ "${1:-}" = "--all" ]; then
  shift
  exec .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest -m "not slow" "$@"
