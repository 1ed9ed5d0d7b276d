#!/usr/bin/env bash
# Reproduces napari_kidseg/weights/{coarse,refine}.safetensors (see weights/README.md).
# Trained on this project's phantoms only; on 2 CPU cores the two stages ran side by side with
# one thread each, bounded by --max-minutes. On a GPU raise --max-minutes / --epochs freely.
# INIT_DIR=folder with coarse/refine.safetensors continues from those weights (the model card
# says which earlier weights each bundled version started from).
set -euo pipefail
DATA=${DATA:-runs/bundled-data}
OUT=${OUT:-runs/bundled}
KIDSEG=${KIDSEG:-kidseg}
MINUTES=${MINUTES:-50}
LR=${LR:-1e-3}
[ -d "$DATA/val" ] || scripts/make_bundled_data.sh "$DATA"
mkdir -p "$OUT"
TRAIN="$DATA/train-m128 $DATA/train-m256 $DATA/train-m512"
COMMON="--preset small --input-size 128 --context-slices 1 --epochs 60 --steps-per-epoch 100 --batch-size 16 \
  --lr $LR --patience 10 --workers 0 --seed 0 --max-minutes $MINUTES --val $DATA/val --overwrite"
for stage in coarse refine; do
  INIT=""
  [ -n "${INIT_DIR:-}" ] && INIT="--init $INIT_DIR/$stage.safetensors"
  OMP_NUM_THREADS=1 $KIDSEG train $TRAIN --stage $stage -o "$OUT/$stage.safetensors" $COMMON $INIT \
    > "$OUT/$stage.log" 2>&1 &
done
wait
