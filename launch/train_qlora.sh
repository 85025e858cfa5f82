#!/usr/bin/env bash
# usage: bash launch/train_qlora.sh [CONFIG.yaml] [--zero 2|3] [--offload] [--launcher fork|torchrun|accelerate|deepspeed] [--key value ...]
source "$(dirname "$0")/common.sh"
ftl_launch --mode qlora "$@"
