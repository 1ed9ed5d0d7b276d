#!/usr/bin/env bash
# The GPU recipe of the bundled weights (version 3; weights/README.md has the figures). On one
# H100 with 16 CPU cores it took 2 min for the phantoms and 2 x 5 min of training per stage.
#   data: 2.5x the CPU recipe's phantoms, half of them with random tissue contrasts (16 processes)
#   phase 1: both stages from scratch side by side, lr 1e-3, 4.9 min each
#   phase 2: from phase 1's last epoch, lr 2.5e-4, BatchNorm momentum 0.01, 5 min each
# The bundled files are phase 2's best epochs on the validation phantoms
# ($OUT/phase2/{coarse,refine}.safetensors; the model card says how that choice was checked).
# Training is bounded by minutes, not epochs, so a slower GPU or CPU does fewer epochs.
set -euo pipefail
export DATA=${DATA:-runs/bundled-data-gpu}
ROOT=${OUT:-runs/bundled-gpu}
export N128=${N128:-32} N256=${N256:-48} N512=${N512:-24} RANDOM_CONTRAST=${RANDOM_CONTRAST:-0.5} JOBS=${JOBS:-16}
export DEVICE=${DEVICE:-cuda} WORKERS=${WORKERS:-7} BATCH=${BATCH:-32} STEPS=${STEPS:-300}
export EPOCHS=${EPOCHS:-200} PATIENCE=${PATIENCE:-30} THREADS=${THREADS:-2}
[ -d "$DATA/val" ] || scripts/make_bundled_data.sh "$DATA"
OUT=$ROOT/phase1 LR=1e-3 MINUTES=${MINUTES1:-4.9} scripts/train_bundled.sh
mkdir -p "$ROOT/phase1-last"
for s in coarse refine; do cp "$ROOT/phase1/$s.last.safetensors" "$ROOT/phase1-last/$s.safetensors"; done
OUT=$ROOT/phase2 LR=2.5e-4 BN_MOMENTUM=0.01 INIT_DIR=$ROOT/phase1-last MINUTES=${MINUTES2:-5} scripts/train_bundled.sh
