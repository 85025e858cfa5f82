#!/usr/bin/env bash
# The test command: bash tests/run.sh [pytest args]. Uses (or creates) the same environment as the launchers.
set -euo pipefail
source "$(dirname "$0")/../launch/python_env.sh"
PY="$(ftl_python)"
cd "$FTL_ROOT"
export PYTHONPATH="$FTL_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$FTL_ROOT/.cache/torch_extensions}"
# Two workers (pytest-xdist), whole files to each so module fixtures run once; runs that several files share are
# trained once per session across workers (tests/conftest.py: train_once). FTL_TEST_WORKERS=0 runs in one process.
exec "$PY" -m pytest -q -n "${FTL_TEST_WORKERS:-2}" --dist loadfile "$@"
