#!/usr/bin/env bash
# Stop the Slurm that start_slurm.sh DIR started (cancels its jobs, then ends the daemons by the PIDs in DIR/run).
set -euo pipefail
exec "${FTL_PYTHON:-python3}" "$(dirname "$0")/local_slurm.py" stop "${1:?usage: stop_slurm.sh DIR}"
