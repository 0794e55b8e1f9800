#!/usr/bin/env bash
# Train one architecture on one fold (or all): ./train.sh ARCH FOLD [key=value ...] [--config FILE]
#   ./train.sh proposed fold0                      # the built-in demo data when no data set is configured
#   ./train.sh resnet50 all data.root=/data/C-NMC_training_data lr=3e-4 epochs=20
# Creates .venv on first use.
set -euo pipefail
cd "$(dirname "$0")"
if [ $# -lt 2 ]; then
  echo "usage: ./train.sh ARCH FOLD [key=value ...]   e.g. ./train.sh proposed fold0" >&2
  echo "ARCH: proposed alexnet vgg16 resnet50 inception_v3 (or any timm model); FOLD: fold0..fold4 or all" >&2
  exit 2
fi
source scripts/ensure-venv.sh
exec .venv/bin/alldetect train "$@"
