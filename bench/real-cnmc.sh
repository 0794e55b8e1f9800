#!/usr/bin/env bash
# Recipes x architectures on real C-NMC cells (not a test: it downloads nothing and takes hours on a CPU):
#   ../shared/tools/get-cnmc-fold1.sh GIT_DIR /data/cnmc-fold1        # once: the 3,581 real images of fold_1
#   bench/real-cnmc.sh /data/cnmc-fold1/C-NMC_training_data [--archs resnet18,proposed] [--seeds 42,43,44]
# Makes 3 subject-grouped folds (fold_1 has 3 normal people: one per fold), trains every fold of every recipe
# (report, previous defaults, current defaults, the plain timm reference) at 96 x 96 for 15 epochs, and prints
# out-of-fold weighted F1 per recipe (mean and spread over folds), pooled F1 and ROC-AUC, and minutes.
# Results and runs go to bench/results/real-cnmc/ (table.txt, results.csv); a rerun skips finished runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-venv.sh
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
exec .venv/bin/python bench/real_cnmc.py "$@"
