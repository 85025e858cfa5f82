#!/usr/bin/env bash
# usage: bash launch/submit.sh --config CONFIG.yaml [--nodes N] [--gpus-per-node G] [--time HH:MM:SS] [--partition P]
#        [--account A] [--mode M] [--dry-run] [--key value ...]      (python -m finetune_launcher.submit --help for all options)
source "$(dirname "$0")/python_env.sh"
py="$(ftl_python)" || exit 1
PYTHONPATH="$FTL_ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m finetune_launcher.submit "$@"
