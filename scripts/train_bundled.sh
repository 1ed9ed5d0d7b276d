#!/usr/bin/env bash
# Reproduces napari_kidseg/weights/{coarse,refine}.safetensors (see weights/README.md).
# Trained on this project's phantoms only; on 2 CPU cores the two stages ran side by side with
# one thread each, bounded by --max-minutes. On a GPU raise --max-minutes / --epochs freely.
set -euo pipefail
DATA=${DATA:-runs/bundled-data}
OUT=${OUT:-runs/bundled}
KIDSEG=${KIDSEG:-kidseg}
MINUTES=${MINUTES:-50}
[ -d "$DATA/val" ] || scripts/make_bundled_data.sh "$DATA"
mkdir -p "$OUT"
TRAIN="$DATA/train-m128 $DATA/train-m256 $DATA/train-m512"
COMMON="--preset small --input-size 128 --context-slices 1 --epochs 60 --steps-per-epoch 100 --batch-size 16 \
  --lr 1e-3 --patience 10 --workers 0 --seed 0 --max-minutes $MINUTES --val $DATA/val --overwrite"
OMP_NUM_THREADS=1 $KIDSEG train $TRAIN --stage coarse -o "$OUT/coarse.safetensors" $COMMON > "$OUT/coarse.log" 2>&1 &
OMP_NUM_THREADS=1 $KIDSEG train $TRAIN --stage refine -o "$OUT/refine.safetensors" $COMMON > "$OUT/refine.log" 2>&1 &
wait
