"""The organ ablation: two coarse stages trained on the same data for the same steps, with and
without organ classes, scored as coarse stages (alpha = 1, so the refine stage does not count).

    python scripts/organ_ablation.py --with C_ORGANS --with-refine R_ORGANS --without C_PLAIN --without-refine R_PLAIN

Sets: the shared real DICOM series (no kidney: all labelled is false; how much of it lies on its
spleen), the 27 real KiTS19 tumor slices, and the shared real CT (a training case).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from napari_kidseg import kits_slices, metrics  # noqa: E402
from napari_kidseg.cascade import Cascade  # noqa: E402
from napari_kidseg.io import readers, volumes  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL = SHARED / "realct" / "totalseg-abdomen-3mm"


def score(coarse, refine) -> dict:
    cascade = Cascade(coarse, refine, device="cpu")
    out = {}
    series = volumes.read_ct(REAL / "dicom-series")
    r = cascade.run(series.array, series.geometry.spacing)
    lab = r.fuse(alpha=1.0)
    vox_ml = float(np.prod(series.geometry.spacing)) / 1000
    out["dicom_false_kidney_ml"] = float((lab > 0).sum() * vox_ml)
    organs = readers.read_labels(REAL / "dicom-series-organs.nii.gz", like=series).array  # TotalSegmentator's
    out["dicom_false_kidney_on_spleen_ml"] = float(((lab > 0) & (organs == 1)).sum() * vox_ml)
    s = kits_slices.evaluate(cascade, SHARED / "kits19-slices", alpha=1.0)["summary"]
    out.update({f"slices_{k}": v for k, v in s.items()})
    ct = volumes.read_ct(REAL / "ct.nii.gz")
    ref = readers.read_labels(REAL / "kidneys.nii.gz", like=ct)
    r = cascade.run(ct.array, ct.geometry.spacing)
    out["real_ct_kidney_dice"] = metrics.dice(r.fuse(alpha=1.0) > 0, ref.array > 0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--with", dest="with_organs", required=True)
    ap.add_argument("--with-refine", required=True)
    ap.add_argument("--without", required=True)
    ap.add_argument("--without-refine", required=True)
    args = ap.parse_args()
    report = {
        "with organs": score(args.with_organs, args.with_refine),
        "without organs": score(args.without, args.without_refine),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
