#!/usr/bin/env bash
# Run the test suite. Uses the active Python when it already has the project, its dependencies and
# the test extra; otherwise creates .venv and installs the project (pip install -e .[test]) into it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_env.sh
exec "$PYTHON" -m pytest -q -rs -p no:cacheprovider "$@" tests
