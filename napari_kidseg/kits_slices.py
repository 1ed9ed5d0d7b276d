"""The real KiTS19 tumor slices of ``../shared/data/kits19-slices`` as short CT volumes, and their scores.

Those slices were recovered from 8-bit demo images: pixel = clip(round(HU), 0, 255). Everything at
or below 0 HU reads 0, so air and fat are lost. Mapping back (a stated choice, as their README asks):
a 0 connected to the image border is air outside the body (-1000 HU); any other 0 is inside the
body, and there nearly all of it is fat, so -100 HU (the kidney window starts at -100, so fat and
water-dense fluid look alike there either way). 255 stays 255 (the window ends at 300).

A slice is repeated into a short volume (``REPEAT`` slices, given a slice distance of ``SLAB_MM``
whatever the case's own, so that the slab spans 45 mm: the anatomy check removes anything shorter
than a kidney can be, and a 5-slice slab of 0.5 mm slices is 2.5 mm long). The 2.5D networks see
the same slice as its neighbours either way; only the middle slice is scored. These
slices are for evaluation only: never train on them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import metrics
from .io import readers, volumes
from .labels import TUMOR, kits_foreground

CT_FILE = "ct_clip0-255HU.nii.gz"
REPEAT = 9
SLAB_MM = 5.0
OUTSIDE_HU, INSIDE_ZERO_HU = -1000, -100


def slice_cases(root) -> list[Path]:
    root = Path(root)
    return sorted(p for p in root.iterdir() if (p / CT_FILE).exists()) if root.is_dir() else []


def hu_from_8bit(pixels: np.ndarray) -> np.ndarray:
    """(y, x) 8-bit clipped pixels -> HU as stated in the module docstring."""
    zero = pixels <= 0
    outside, _ = ndimage.label(zero)
    border = np.unique(np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]]))
    border = border[border > 0]
    hu = pixels.astype(np.int16)
    hu[zero] = INSIDE_ZERO_HU
    hu[np.isin(outside, border)] = OUTSIDE_HU
    return hu


def read_slice_case(case: Path) -> tuple[np.ndarray, tuple, np.ndarray]:
    """(CT volume of REPEAT copies in HU, its spacing, the reference labels of the one slice)."""
    ct = volumes.read_volume(case / CT_FILE)
    ref = readers.read_labels(case / volumes.KITS_LABELS, like=ct).array[0]
    hu = hu_from_8bit(np.asarray(ct.array[0]))
    spacing = (SLAB_MM, *ct.geometry.spacing[1:])
    return np.repeat(hu[None], REPEAT, axis=0), spacing, ref


def score_slice(pred: np.ndarray, ref: np.ndarray) -> dict:
    """Dice of kidney+tumor and of tumor on one slice, and whether the tumor was touched."""
    pairs = [(kits_foreground(pred), kits_foreground(ref)), (pred == TUMOR, ref == TUMOR)]
    inter = [int((p & r).sum()) for p, r in pairs]
    return {
        "kidney_tumor_dice": metrics.dice(*pairs[0]),
        "tumor_dice": metrics.dice(*pairs[1]),
        "touched": inter[1] > 0,
        "inter": inter,  # per region, for the Dice pooled over all slices
        "sums": [int(p.sum() + r.sum()) for p, r in pairs],
    }


def stages_on_tumor(result, ref: np.ndarray) -> dict:
    """What each stage says on the reference tumor's pixels of the middle slice (medians, in the
    results' 1/255 levels): the coarse stage's p(kidney or tumor) and p(tumor), the refine stage's
    p(tumor) where its patches cover the tumor (None when they cover none of it), and the coarse
    organ map's share of the tumor pixels per organ ("none" where no organ passes 0.5)."""
    from .labels import ORGANS

    mid, tumor = REPEAT // 2, ref == TUMOR
    out = {
        "coarse_kidney_or_tumor": float(np.median(result.coarse_meta[mid][tumor])),
        "coarse_tumor": float(np.median(result.coarse_tumor[mid][tumor])),
        "refine_tumor": None,
        "organ_pixels": {},
    }
    region = result.refined.get(mid)
    if region is not None:
        covered_tumor = tumor[region.window] & region.covered
        if covered_tumor.any():
            out["refine_tumor"] = float(np.median(region.tumor[covered_tumor]))
    if result.organs is not None:
        codes, counts = np.unique(result.organs[mid][tumor], return_counts=True)
        names = ("none", *ORGANS)
        out["organ_pixels"] = {names[int(c)]: int(n) for c, n in zip(codes, counts)}
    return out


def evaluate(cascade, root, *, alpha=0.4, anatomy_check=True, smooth_noise=False, stages=False, progress=None) -> dict:
    """Run ``cascade`` on every slice case under ``root``: per-slice rows and the summary (mean
    per-slice Dice, Dice pooled over all slices' pixels, share of tumors touched). ``stages``: each
    row also says what each stage answered on its tumor (:func:`stages_on_tumor`), and the summary
    the organ map's share of all tumor pixels."""
    rows = []
    cases = slice_cases(root)
    for n, case in enumerate(cases, 1):
        ct, spacing, ref = read_slice_case(case)
        result = cascade.run(ct, spacing, smooth_noise=smooth_noise)
        pred = result.fuse(alpha=alpha, anatomy_check=anatomy_check)[REPEAT // 2]
        rows.append({"case": case.name, **score_slice(pred, ref)})
        if stages:
            rows[-1]["stages"] = stages_on_tumor(result, ref)
        if progress:
            progress(n, len(cases))
    if not rows:
        return {"rows": [], "summary": {}}
    inter = np.sum([r["inter"] for r in rows], axis=0)
    sums = np.sum([r["sums"] for r in rows], axis=0)
    summary = {
        "slices": len(rows),
        "kidney_tumor_dice_mean": float(np.mean([r["kidney_tumor_dice"] for r in rows])),
        "tumor_dice_mean": float(np.mean([r["tumor_dice"] for r in rows])),
        "kidney_tumor_dice_pooled": float(2 * inter[0] / max(sums[0], 1)),
        "tumor_dice_pooled": float(2 * inter[1] / max(sums[1], 1)),
        "touched": int(sum(r["touched"] for r in rows)),
    }
    if stages:
        pixels = Counter()
        for r in rows:
            pixels.update(r["stages"]["organ_pixels"])
        total = max(sum(pixels.values()), 1)
        summary["organ_share_of_tumor_pixels"] = {k: round(v / total, 3) for k, v in sorted(pixels.items())}
    return {"rows": rows, "summary": summary}
