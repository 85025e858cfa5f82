#!/usr/bin/env bash
# The test command: bash tests/run.sh [pytest args]. Uses (or creates) the same environment as the launchers.
set -euo pipefail
source "$(dirname "$0")/../launch/python_env.sh"
PY="$(ftl_python)"
cd "$FTL_ROOT"
export PYTHONPATH="$FTL_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$FTL_ROOT/.cache/torch_extensions}"
exec "$PY" -m pytest -q "$@"
