#!/usr/bin/env bash
# Start a real Slurm on this machine for the tests: bash tests/slurm/start_slurm.sh DIR
# (root, Debian: installs slurm-wlm and munge with apt-get when missing; munged, slurmctld and slurmd n1, n2 on
# localhost). Prints the slurm.conf path: export SLURM_CONF=DIR/etc/slurm.conf. Stop with stop_slurm.sh DIR.
set -euo pipefail
exec "${FTL_PYTHON:-python3}" "$(dirname "$0")/local_slurm.py" start "${1:?usage: start_slurm.sh DIR}"
