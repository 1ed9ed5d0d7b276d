#!/usr/bin/env bash
# The GPU recipe of the bundled weights (weights/README.md says which run made them): 2.5x the
# CPU recipe's phantoms, half of them with random tissue contrasts, made with 16 processes, then
# both stages from scratch on one GPU side by side, 7 loader workers each, batch 32.
# MINUTES bounds each stage's training time; RESUME=1 continues in $OUT (same data: the phantoms
# are regenerated bit for bit from their seeds when $DATA is gone).
set -euo pipefail
export DATA=${DATA:-runs/bundled-data-gpu} OUT=${OUT:-runs/bundled-gpu}
export N128=${N128:-32} N256=${N256:-48} N512=${N512:-24} RANDOM_CONTRAST=${RANDOM_CONTRAST:-0.5} JOBS=${JOBS:-16}
export DEVICE=${DEVICE:-cuda} WORKERS=${WORKERS:-7} BATCH=${BATCH:-32} STEPS=${STEPS:-300}
export EPOCHS=${EPOCHS:-200} PATIENCE=${PATIENCE:-30} LR=${LR:-1e-3} THREADS=${THREADS:-2}
[ -d "$DATA/val" ] || scripts/make_bundled_data.sh "$DATA"
exec scripts/train_bundled.sh
