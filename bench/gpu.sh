#!/usr/bin/env bash
# The GPU benchmark, for a lent GPU machine (a bare image with PyTorch, timm and OpenCV, and no network):
#   1. data pipeline images/s at 300 x 300 (naive / uncached / cached), 2 and 8 loader workers
#   2. training and inference images/s of the five architectures, optimised (channels_last + bf16 AMP)
#      against plain fp32 NCHW, at each config's batch size
#   3. a real training run of ResNet50 at 224 (cache + GPU augmentation): images/s and data-wait share
# Writes everything to ${OUT:-bench/results}/gpu.txt. About 5 minutes on one H100 or H200.
# Missing Python packages travel as wheels in .whl/ (albumentations, pydantic, ...: see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
log="$out/gpu.txt"
: > "$log"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
ad() { python3 -m alldetect "$@"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi: no GPU"
  python3 -c "import torch, timm; print('torch', torch.__version__, '| timm', timm.__version__, '| cpus', __import__('os').cpu_count())"
} | tee -a "$log"

start=$SECONDS
# Smaller settings for a dry run on a CPU: PER_SUBJECT=4 IMAGES=64 MODELS=resnet18 EPOCHS=1 SIZE=64 bench/gpu.sh
ad demo-data data/bench-demo --subjects 24 --per-subject "${PER_SUBJECT:-300}" --seed 0 >/dev/null  # 7,200 cells
echo "[gpu.sh] demo data in $((SECONDS - start)) s" | tee -a "$log"

for workers in 2 8; do
  ad bench pipeline --data data/bench-demo --images "${IMAGES:-1200}" --workers "$workers" --out "$log" \
    --cache-dir /tmp/cache
done
# shellcheck disable=SC2086
ad bench models ${MODELS:-} ${MODELS:+--max-batch 2 --steps 1} --out "$log"

ad train resnet50 fold0 data.root=data/bench-demo data.k=5 data.cache=true data.cache_dir=/tmp/cache \
  augment_on=gpu input_size="${SIZE:-224}" batch_size=128 epochs="${EPOCHS:-4}" data.num_workers=8 wandb=off runs_dir=/tmp/gpu-runs \
  folds_dir=/tmp/gpu-folds overwrite=true 2>&1 | tail -8 | tee -a "$log"
python3 - "$log" <<'PY'
import sys, pandas as pd
h = pd.read_csv("/tmp/gpu-runs/resnet50/fold0/history.csv")
steady = h.iloc[1:]  # the first epoch warms up cuDNN and the loader workers
line = (f"resnet50 224 training, batch 128, cache + gpu augmentation: {steady['images_per_s'].mean():.0f} images/s, "
        f"data wait {steady['data_wait'].mean():.1%} of the epoch (epochs 2-{len(h)})")
print(line)
open(sys.argv[1], "a").write(line + "\n")
PY
if [ $((SECONDS - start)) -lt 330 ]; then  # time left: what torch.compile adds for ResNet50
  ad bench models resnet50 --compile --out "$log"
fi
echo "[gpu.sh] done in $((SECONDS - start)) s; tables in $log"
