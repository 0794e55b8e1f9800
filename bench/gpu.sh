#!/usr/bin/env bash
# The GPU benchmark, for a lent GPU machine (a bare image with PyTorch, timm and OpenCV, and no network), in one
# call of about 7 minutes:
#   1. `alldetect bench models`: training and inference images/s of the five architectures, plain fp32 NCHW eager
#      against bf16, channels_last, torch.compile and CUDA graphs, at each config's batch and at a batch that fills
#      the card; a verdict line per architecture against issue 24's goals and the settings its config should hold
#      (compiled settings only while BUDGET seconds are not spent: compiling takes tens of seconds a graph)
#   2. real training runs on demo data (decode-once cache, GPU augmentation, as ./train.sh runs them): ResNet50 at
#      224 and the proposed network at 300: images/s and the share of each epoch spent waiting for data
# Writes everything to ${OUT:-bench/results}/gpu.txt as it goes (a run stopped at its limit keeps what it measured).
# On an H100 (bench/h100-2026-11-28.txt) the eager part of 1. took 130-300 s, each compiled setting about a minute,
# each real run 1.5-2 minutes: the whole does not fit one 10-minute call. PART=models or PART=runs runs one half
# (each about 5 minutes with the default BUDGET=120 seconds of compiled settings); PART=all (the default) both.
# Missing Python packages travel as wheels in .whl/ (albumentations and pydantic and their needs: bench/README.md).
# A dry run on a CPU: MODELS=resnet18 BUDGET=0 EPOCHS=2 SIZE=64 P_SIZE=64 PER_SUBJECT=10 R50_BATCH=16 bench/gpu.sh
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
say() { echo "[gpu.sh $((SECONDS - start)) s] $*" | tee -a "$log"; }
start=$SECONDS
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi: no GPU"
  python3 -c "import torch, timm; print('torch', torch.__version__, '| timm', timm.__version__, '| cpus', __import__('os').cpu_count())"
  git log -1 --format='commit %h %s' 2>/dev/null || true
} | tee -a "$log"
workers=$(( $(nproc) > 13 ? 12 : $(nproc) - 1 ))

# demo data for the real runs, made on the CPUs while the GPU benchmark runs (9,600 cells)
part=${PART:-all}
demo=
if [ "$part" != models ]; then
  ad demo-data data/bench-demo --subjects 24 --per-subject "${PER_SUBJECT:-400}" --seed 0 > /tmp/demo.log 2>&1 &
  demo=$!
fi

if [ "$part" != runs ]; then
  # shellcheck disable=SC2086
  ad bench models ${MODELS:-} --budget "${BUDGET:-120}" --out "$log" 2>&1 | grep -v "^models\|^ \|^speedup\|^verdict" || true
  say "models done"
fi
[ "$part" != models ] || { say "done (PART=models); tables in $log"; exit 0; }
wait "$demo" || { cat /tmp/demo.log; exit 1; }

real_run() {  # ARCH SIZE BATCH EXTRA...: one fold of ./train.sh's training, its steady epochs summarised
  local arch=$1 size=$2 batch=$3; shift 3
  ad train "$arch" fold0 data.root=data/bench-demo data.k=5 data.cache=true data.cache_dir=/tmp/cache \
    augment_on=gpu input_size="$size" batch_size="$batch" epochs="${EPOCHS:-6}" data.num_workers="$workers" \
    wandb=off runs_dir=/tmp/gpu-runs folds_dir=/tmp/gpu-folds overwrite=true "$@" > "/tmp/train-$arch.log" 2>&1 \
    || { tail -20 "/tmp/train-$arch.log" | tee -a "$log"; cp "/tmp/train-$arch.log" "$out/failed-$arch-$#.log"; return 0; }
  cp "/tmp/train-$arch.log" "$out/" 2>/dev/null || true
  grep " epoch " "/tmp/train-$arch.log" | tail -"${EPOCHS:-6}" | tee -a "$log"
  python3 - "$log" "$arch" "$size" "$batch" "$*" <<'PY'
import sys, pandas as pd
log, arch, size, batch, extra = sys.argv[1:]
h = pd.read_csv(f"/tmp/gpu-runs/{arch}/fold0/history.csv")
steady = h.iloc[1:]  # the first epoch compiles and warms up cuDNN and the loader workers
line = (f"real run {arch} {size} px, batch {batch}, cache + gpu augmentation, {extra or 'config settings'}: "
        f"{steady['images_per_s'].mean():.0f} images/s, data wait {steady['data_wait'].mean():.1%} of the epoch "
        f"(epochs 2-{len(h)}; first epoch {h['seconds'].iloc[0]:.0f} s, later {steady['seconds'].mean():.1f} s)")
print(line)
open(log, "a").write(line + "\n")
PY
}
real_run resnet50 "${SIZE:-224}" "${R50_BATCH:-256}" compile=true
say "resnet50 run done"
if [ $((SECONDS - start)) -lt "${LATEST_PROPOSED:-420}" ]; then
  real_run proposed "${P_SIZE:-300}" 32 compile=true compile_mode=reduce-overhead
  [ -f /tmp/gpu-runs/proposed/fold0/history.csv ] || real_run proposed "${P_SIZE:-300}" 32 compile=false
  say "proposed run done"
fi
echo; cat "$log" | grep -A100 "^models (images/s)" | grep -v "^\[gpu.sh"
say "done; tables in $log"
