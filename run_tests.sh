#!/usr/bin/env bash
# Sets up what the tests need (venv, test dependencies, Azurite) when missing, then runs the whole suite.
#   ./run_tests.sh                 everything
#   ./run_tests.sh -k storage      any pytest arguments
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --dev --quiet
exec .venv/bin/python -m pytest "$@"
