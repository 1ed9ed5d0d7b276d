#!/usr/bin/env bash
# Reproduces napari_kidseg/weights/{coarse,refine}.safetensors (see weights/README.md).
# Trained on this project's phantoms only. The two stages train side by side, each bounded by
# --max-minutes. The defaults are the CPU recipe (2 cores: one thread and no loader workers per
# stage); scripts/train_bundled_gpu.sh sets the GPU recipe through the same variables.
# INIT_DIR=folder with coarse/refine.safetensors continues from those weights (the model card
# says which earlier weights each bundled version started from). RESUME=1 continues an
# interrupted or time-bounded run in $OUT from its .last/.state files.
set -euo pipefail
DATA=${DATA:-runs/bundled-data}
OUT=${OUT:-runs/bundled}
KIDSEG=${KIDSEG:-kidseg}
MINUTES=${MINUTES:-50}
LR=${LR:-1e-3}
[ -d "$DATA/val" ] || scripts/make_bundled_data.sh "$DATA"
mkdir -p "$OUT"
# version 4 and 5: procedural phantoms, phantoms on 40 real label maps, and the shared real CT
TRAIN="$DATA/train-m128 $DATA/train-m256 $DATA/train-m512 $DATA/anat-m128 $DATA/anat-m256 $DATA/anat-m512 $DATA/realct"
# version 5: --organs (the neighbours as classes of their own); from version 4 the head is widened
COMMON="${ORGANS---organs} --preset small --input-size 128 --context-slices 1 --epochs ${EPOCHS:-60} --steps-per-epoch ${STEPS:-100}
  --batch-size ${BATCH:-16} --lr $LR --patience ${PATIENCE:-10} --workers ${WORKERS:-0} --seed 0
  --device ${DEVICE:-auto} --max-minutes $MINUTES --val $DATA/val $DATA/anat-val ${BN_MOMENTUM:+--bn-momentum $BN_MOMENTUM}
  ${CT_NOISE_HU:+--ct-noise-hu $CT_NOISE_HU} ${CT_BLUR_PX:+--ct-blur-px $CT_BLUR_PX}"
for stage in ${STAGES:-coarse refine}; do  # STAGES=coarse: one stage only (the organ ablation)
  START="--overwrite"
  [ -n "${INIT_DIR:-}" ] && START="--overwrite --init $INIT_DIR/$stage.safetensors"
  [ -n "${RESUME:-}" ] && START="--resume"
  OMP_NUM_THREADS=${THREADS:-1} $KIDSEG train $TRAIN --stage $stage -o "$OUT/$stage.safetensors" $COMMON $START \
    >> "$OUT/$stage.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done  # set -e: a failed stage fails the script
