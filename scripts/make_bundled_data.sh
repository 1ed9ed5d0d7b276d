#!/usr/bin/env bash
# The phantom data the bundled weights were trained on (seeds never reused for evaluation,
# which uses seeds 9000+). Mixed matrices give the networks a range of pixel spacings:
# 128 px (about 3 mm, like the shared real CT) up to 512 px (0.6-1 mm, like KiTS). A third of the
# training cases get random tissue contrasts (SynthSeg-style), validation keeps the real phases.
set -euo pipefail
OUT=${1:-runs/bundled-data}
KIDSEG=${KIDSEG:-kidseg}
RC="--random-contrast ${RANDOM_CONTRAST:-0.35}"
$KIDSEG phantom "$OUT/train-m128" --cases 14 --seed 1000 --matrix 128 --max-slices 90 $RC ${OVERWRITE:-} &
$KIDSEG phantom "$OUT/train-m256" --cases 18 --seed 2000 --matrix 256 --max-slices 120 $RC ${OVERWRITE:-} &
wait
$KIDSEG phantom "$OUT/train-m512" --cases 10 --seed 3000 --matrix 512 --max-slices 100 $RC ${OVERWRITE:-} &
$KIDSEG phantom "$OUT/val" --cases 6 --seed 8000 --matrix 256 --max-slices 100 ${OVERWRITE:-} &
wait
