#!/usr/bin/env bash
# The phantom data the bundled weights were trained on (seeds never reused for evaluation,
# which uses seeds 9000+). Version 4 adds phantoms built on the 40 training label maps of FLARE
# 2022 (../shared/data/flare22-labels, maps 0001-0040; 0041-0050 stay held out) and the one real
# CT that ../shared/data allows for training (realct/totalseg-abdomen-3mm, Apache-2.0). Version 5
# (generator revisions 6 and 2) adds organ maps (organs.nii.gz) to every case, real-looking tumor
# subtypes and hard negatives touching the kidneys.
# Mixed matrices give the networks a range of pixel spacings: 128 px (about 3 mm, like the
# shared real CT) up to 512 px (0.6-1 mm, like KiTS). A share of the training cases get random
# tissue contrasts (SynthSeg-style), validation keeps the real phases.
# Version 5 made fewer of the large cases than version 4 (6 procedural and 8 label-map phantoms at
# 512 px, 24 label-map ones at 256 px), for CPU time: it was made and trained on 2 cores.
# Case counts, the random-contrast share and the parallel processes (JOBS) come from the
# environment; the defaults are the CPU recipe, scripts/train_bundled_gpu.sh sets the GPU one.
# A case is the same whatever JOBS is (case i of a folder has seed first_seed + i).
set -euo pipefail
OUT=${1:-runs/bundled-data}
KIDSEG=${KIDSEG:-kidseg}
JOBS=${JOBS:-1}
SHARED=${SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
RC="--random-contrast ${RANDOM_CONTRAST:-0.35}"
ANAT="--anatomy $SHARED/flare22-labels --maps train"
# version 5: real tumor shapes from the KiTS19 label volumes, never from the cases of the real
# tumor slices kept for evaluation (training cases only: validation keeps procedural tumors)
SHAPES="--tumor-shapes $SHARED/kits19-masks --not-from $SHARED/kits19-slices"
# procedural phantoms (generator revision 5)
$KIDSEG phantom "$OUT/train-m128" --cases "${N128:-14}" --seed 1000 --matrix 128 --max-slices 90 $RC $SHAPES --jobs $JOBS ${OVERWRITE:-}
$KIDSEG phantom "$OUT/train-m256" --cases "${N256:-18}" --seed 2000 --matrix 256 --max-slices 120 $RC $SHAPES --jobs $JOBS ${OVERWRITE:-}
$KIDSEG phantom "$OUT/train-m512" --cases "${N512:-6}" --seed 3000 --matrix 512 --max-slices 100 $RC $SHAPES --jobs $JOBS ${OVERWRITE:-}
$KIDSEG phantom "$OUT/val" --cases 6 --seed 8000 --matrix 256 --max-slices 100 --jobs $JOBS ${OVERWRITE:-}
# phantoms on real anatomy (label-map generator revision 1)
$KIDSEG phantom "$OUT/anat-m128" --cases "${A128:-16}" --seed 4000 --matrix 128 $ANAT $RC $SHAPES --jobs $JOBS ${OVERWRITE:-}
$KIDSEG phantom "$OUT/anat-m256" --cases "${A256:-24}" --seed 5000 --matrix 256 $ANAT $RC $SHAPES --jobs $JOBS ${OVERWRITE:-}
$KIDSEG phantom "$OUT/anat-m512" --cases "${A512:-8}" --seed 6000 --matrix 512 --max-slices 100 $ANAT $RC $SHAPES --jobs $JOBS ${OVERWRITE:-}
$KIDSEG phantom "$OUT/anat-val" --cases 6 --seed 8100 --matrix 256 $ANAT --jobs $JOBS ${OVERWRITE:-}
# the real CT as KiTS cases (links, never a copy of ../shared/data). REAL_COPIES cases link the
# same scan: sampling is per slice over all cases, so 4 links make it about 4% of what the coarse
# network sees (1% with one): often enough not to be forgotten, too rarely to be memorised
# Version 5: its organs too, TotalSegmentator's own labels for slices 82-111 (model-made), mapped to
# the organ groups of napari_kidseg/labels.py; the other slices' background is "unlabelled" (255),
# which training ignores. A derived file in $OUT, never a copy of ../shared/data.
mkdir -p "$OUT/realct"
${PYTHON:-python} - "$SHARED/realct/totalseg-abdomen-3mm" "$OUT/realct/organs.nii.gz" <<'PY'
import sys
from pathlib import Path

from napari_kidseg import labels
from napari_kidseg.io import readers, volumes

src, out = Path(sys.argv[1]), Path(sys.argv[2])
ct = volumes.read_ct(src / "ct.nii.gz")
organs = readers.read_labels(src / "organs.nii.gz", like=ct).array
volumes.write_labels(out, labels.organ_map_from(labels.TOTALSEG_TO_ORGAN, organs, unlabelled=255), ct, overwrite=True)
PY
for i in $(seq 0 $(( ${REAL_COPIES:-4} - 1 ))); do
  case_dir="$OUT/realct/case_$(printf %05d "$i")"
  mkdir -p "$case_dir"
  ln -sf "$SHARED/realct/totalseg-abdomen-3mm/ct.nii.gz" "$case_dir/imaging.nii.gz"
  ln -sf "$SHARED/realct/totalseg-abdomen-3mm/kidneys.nii.gz" "$case_dir/segmentation.nii.gz"
  ln -sf "$(cd "$OUT/realct" && pwd)/organs.nii.gz" "$case_dir/organs.nii.gz"
done
