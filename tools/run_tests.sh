#!/usr/bin/env bash
# The project's test command (README): set up .venv, then run the CPU test suite.
# pytest exits non-zero when a test fails and 5 when nothing was collected: both fail here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
exec .venv/bin/python -m pytest -q --timeout=900 -p no:cacheprovider "$@"
