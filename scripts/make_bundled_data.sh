#!/usr/bin/env bash
# The phantom data the bundled weights were trained on (seeds never reused for evaluation,
# which uses seeds 9000+). Mixed matrices give the networks a range of pixel spacings:
# 128 px (about 3 mm, like the shared real CT) up to 512 px (0.6-1 mm, like KiTS). A share of the
# training cases get random tissue contrasts (SynthSeg-style), validation keeps the real phases.
# Case counts, the random-contrast share and the parallel processes (JOBS) come from the
# environment; the defaults are the CPU recipe, scripts/train_bundled_gpu.sh sets the GPU one.
# A case is the same whatever JOBS is (case i of a folder has seed first_seed + i).
set -euo pipefail
OUT=${1:-runs/bundled-data}
KIDSEG=${KIDSEG:-kidseg}
JOBS=${JOBS:-1}
RC="--random-contrast ${RANDOM_CONTRAST:-0.35}"
$KIDSEG phantom "$OUT/train-m128" --cases "${N128:-14}" --seed 1000 --matrix 128 --max-slices 90 $RC --jobs $JOBS ${OVERWRITE:-} & pids+=($!)
$KIDSEG phantom "$OUT/train-m256" --cases "${N256:-18}" --seed 2000 --matrix 256 --max-slices 120 $RC --jobs $JOBS ${OVERWRITE:-} & pids+=($!)
$KIDSEG phantom "$OUT/train-m512" --cases "${N512:-10}" --seed 3000 --matrix 512 --max-slices 100 $RC --jobs $JOBS ${OVERWRITE:-} & pids+=($!)
$KIDSEG phantom "$OUT/val" --cases 6 --seed 8000 --matrix 256 --max-slices 100 --jobs $JOBS ${OVERWRITE:-} & pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done  # set -e: a failed job fails the script
