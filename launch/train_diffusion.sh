#!/usr/bin/env bash
# usage: bash launch/train_diffusion.sh [CONFIG.yaml] [--mode lora|qlora|full] [--zero 2|3] [--launcher fork|torchrun|accelerate|deepspeed] [--key value ...]
source "$(dirname "$0")/common.sh"
ftl_launch --recipe diffusion "$@"
