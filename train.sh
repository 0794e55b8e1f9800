#!/usr/bin/env bash
# Train one architecture on one fold (or all): ./train.sh ARCH FOLD [key=value ...] [--config FILE] [--gpus N]
#   ./train.sh proposed fold0                      # the built-in demo data when no data set is configured
#   ./train.sh resnet50 all data.root=/data/C-NMC_training_data lr=3e-4 epochs=20
#   ./train.sh resnet50 fold0 --gpus 4             # data-parallel on 4 GPUs of this machine (torchrun)
#   ./train.sh resnet50 full                       # one final model on every image (no validation fold)
# Creates .venv on first use.
set -euo pipefail
cd "$(dirname "$0")"
if [ $# -lt 2 ]; then
  echo "usage: ./train.sh ARCH FOLD [key=value ...] [--gpus N]   e.g. ./train.sh proposed fold0" >&2
  echo "ARCH: proposed alexnet vgg16 resnet50 inception_v3 (or any timm model); FOLD: fold0..fold4, all, or full (every image)" >&2
  exit 2
fi
gpus=1
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) gpus=${2:?"--gpus needs a number"}; shift 2 ;;
    --gpus=*) gpus=${1#--gpus=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
case "$gpus" in ''|*[!0-9]*|0) echo "--gpus $gpus: give a whole number of GPUs, 1 or more" >&2; exit 2 ;; esac
source scripts/ensure-venv.sh
if [ "$gpus" -gt 1 ]; then
  exec .venv/bin/torchrun --standalone --nproc_per_node "$gpus" -m alldetect train "${args[@]}"
fi
exec .venv/bin/alldetect train "${args[@]}"
