"""Scoring by the KiTS standard: Dice, Surface Dice at a tolerance and the 95th-percentile
Hausdorff distance on KiTS21/23's three nested regions, one case or a folder of cases.

The regions (KiTS21/23's "hierarchical evaluation classes"): kidney and masses (labels 1-3),
masses (tumor and cyst, 2-3) and tumor (2). On KiTS19 labels (no cysts) masses and tumor are the
same voxels.

Surface Dice (Nikolov et al. 2018) is the share of both surfaces that lies within a tolerance of
the other surface, each surface element weighted by its area; the tolerance is the 95th percentile
of the surface distances between annotators, published per region by the KiTS organisers:

- KiTS21: kidney and masses 2.178 mm, masses 1.393 mm, tumor 1.536 mm;
- KiTS23: 1.033 mm, 1.133 mm, 1.150 mm.

Surfaces and distances come from DeepMind's ``surface-distance`` library, the code the KiTS21 and
KiTS23 evaluations call, so the figures are the leaderboard's (on the voxel grid with its real,
often anisotropic, spacing). MONAI's ``compute_surface_dice`` was compared on the same KiTS19 cases
(``benchmarks/bench_surface_dice.py``): with ``use_subvoxels=True`` it follows the same surface
elements and agrees to about 1e-3; counting boundary voxels instead (its default) differs by up to
a few hundredths, because a voxel face seen at 5 mm slice spacing and one seen at 0.8 mm weigh the
same there.

Empty regions follow the KiTS evaluation: both empty is a perfect match (Dice and Surface Dice 1,
HD95 0 mm); one empty is a miss (Dice and Surface Dice 0, HD95 undefined: None in JSON, left out
of the mean and median, which say over how many cases they run).
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import KidsegError
from .labels import BACKGROUND, TUMOR
from .metrics import bounding_box, dice

REGIONS = ("kidney_masses", "masses", "tumor")
REGION_TITLES = {"kidney_masses": "kidney and masses", "masses": "masses", "tumor": "tumor"}
TOLERANCES_MM = {  # the KiTS organisers' labels.py (kits21 and kits23 repositories), full precision
    "kits21": (2.1780822681004897, 1.3929527150618852, 1.536272517110166),
    "kits23": (1.0330772532390826, 1.1328796488598762, 1.1498198361434828),
}
HD_PERCENT = 95.0


def region_masks(labels: np.ndarray) -> dict:
    labels = np.asarray(labels)
    return {"kidney_masses": labels > BACKGROUND, "masses": labels >= TUMOR, "tumor": labels == TUMOR}


def parse_tolerances(text: str) -> tuple[float, float, float]:
    """``kits21``, ``kits23`` or three numbers in mm (``1,1.5,1.5``): one per region."""
    key = str(text).strip().lower()
    if key in TOLERANCES_MM:
        return TOLERANCES_MM[key]
    parts = [p for p in re.split(r"[,\s]+", key) if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise KidsegError(
            f"--tolerances {text!r}: give kits21, kits23 or three tolerances in mm (kidney and masses, masses, "
            "tumor), e.g. 2,1.5,1.5"
        )
    return values


@functools.lru_cache(maxsize=32)
def _surfel_area_table(spacing: tuple) -> np.ndarray:
    from surface_distance import lookup_tables

    if len(spacing) == 2:
        return lookup_tables.create_table_neighbour_code_to_contour_length(spacing)
    return lookup_tables.create_table_neighbour_code_to_surface_area(spacing)


def surface_elements(mask: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """The surface elements of a 2D or 3D mask as the library defines them: every 2 x 2 (x 2)
    neighbourhood of voxels that is neither all inside nor all outside, at the voxels' shared
    corner, with its area in mm^2 (length in mm in 2D) from the library's table for this spacing.
    Returns their corner positions in mm and their areas."""
    from surface_distance import lookup_tables

    mask = np.asarray(mask, bool)
    kernel = (
        lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL if mask.ndim == 3 else lookup_tables.ENCODE_NEIGHBOURHOOD_2D_KERNEL
    )
    full = 0b11111111 if mask.ndim == 3 else 0b1111
    box = bounding_box(mask)
    if box is None:
        return np.zeros((0, mask.ndim)), np.zeros(0)
    # the library's crop: the mask's box with one empty voxel more at the far end of each axis
    crop = np.pad(mask[box], [(0, 1)] * mask.ndim).astype(np.uint8)
    code = ndimage.correlate(crop, kernel, mode="constant", cval=0)
    border = (code != 0) & (code != full)
    sp = tuple(float(s) for s in spacing)
    areas = _surfel_area_table(sp)[code[border]]
    origin = np.array([b.start for b in box], float)
    return (np.argwhere(border) + origin) * np.asarray(sp), areas


def surface_scores(pred: np.ndarray, ref: np.ndarray, spacing, tolerance_mm: float) -> dict:
    """Surface Dice at ``tolerance_mm`` and HD95 (mm) of two masks on one grid (``spacing`` in the
    arrays' axis order), with the empty rules of the module's description.

    The surface elements and their areas are the library's (:func:`surface_elements`); the
    distance from each element to the other surface is found with a k-d tree over the other
    surface's elements instead of the library's two distance transforms of the whole box (the
    same nearest element, so the same distance, in a fraction of the time: the transforms of a
    512 x 512 x 600 KiTS case take seconds). ``tests/test_evaluation.py`` and
    ``benchmarks/bench_surface_dice.py`` check the figures against the library's own functions.
    """
    from scipy.spatial import cKDTree

    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise KidsegError(f"prediction grid {pred.shape} differs from the reference grid {ref.shape}")
    p_any, r_any = bool(pred.any()), bool(ref.any())
    if not p_any and not r_any:
        return {"surface_dice": 1.0, "hd95_mm": 0.0}
    if not p_any or not r_any:
        return {"surface_dice": 0.0, "hd95_mm": None}
    pts_r, area_r = surface_elements(ref, spacing)
    pts_p, area_p = surface_elements(pred, spacing)
    d_r = cKDTree(pts_p).query(pts_r)[0]  # reference elements to the predicted surface
    d_p = cKDTree(pts_r).query(pts_p)[0]
    overlap = area_r[d_r <= tolerance_mm].sum() + area_p[d_p <= tolerance_mm].sum()
    return {
        "surface_dice": float(overlap / (area_r.sum() + area_p.sum())),
        "hd95_mm": max(_area_percentile(d_r, area_r, HD_PERCENT), _area_percentile(d_p, area_p, HD_PERCENT)),
    }


def _area_percentile(dist: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """The distance below which ``percent`` of the surface area lies, by the library's rule (the
    elements sorted by distance, then area; the first whose cumulative share reaches it)."""
    order = np.lexsort((areas, dist))
    cum = np.cumsum(areas[order]) / areas.sum()
    idx = int(np.searchsorted(cum, percent / 100.0))
    return float(dist[order][min(idx, len(dist) - 1)])


def case_scores(pred: np.ndarray, ref: np.ndarray, spacing, tolerances=TOLERANCES_MM["kits23"]) -> dict:
    """KiTS21/23's scores of one case: per region the Dice (``kidney_masses_dice``, ``masses_dice``,
    ``tumor_dice``), the Surface Dice at that region's tolerance (``surface_dice_*``) and the HD95
    in mm (``hd95_*``), with ``*`` = kidney_masses, masses, tumor; and the means over the three
    regions (``kits21_mean_dice``, ``mean_surface_dice``)."""
    from .metrics import kits21_scores

    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise KidsegError(f"prediction grid {pred.shape} differs from the reference grid {ref.shape}")
    box = bounding_box((pred > BACKGROUND) | (ref > BACKGROUND))  # every region lies in it; the rest is background
    if box is not None:
        pred, ref = pred[box], ref[box]
    out = kits21_scores(pred, ref)
    out["tumor_dice"] = dice(pred == TUMOR, ref == TUMOR)
    pm, rm = region_masks(pred), region_masks(ref)
    for region, tol in zip(REGIONS, tolerances):
        s = surface_scores(pm[region], rm[region], spacing, tol)
        out[f"surface_dice_{region}"] = s["surface_dice"]
        out[f"hd95_{region}"] = s["hd95_mm"]
    out["mean_surface_dice"] = float(np.mean([out[f"surface_dice_{r}"] for r in REGIONS]))
    return out


SCORE_KEYS = (
    *(f"{r}_dice" for r in REGIONS),
    "kits21_mean_dice",
    *(f"surface_dice_{r}" for r in REGIONS),
    "mean_surface_dice",
    *(f"hd95_{r}" for r in REGIONS),
)


def aggregate(rows: list[dict], keys) -> dict:
    """Mean and median per key over the cases where it is defined (None is left out), and how
    many cases that was (``n``)."""
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if r.get(k) is not None]
        out[k] = {
            "mean": float(np.mean(vals)) if vals else None,
            "median": float(np.median(vals)) if vals else None,
            "n": len(vals),
        }
    return out


# ----------------------------------------------------------------------------------------------
# Pairing predictions with references
# ----------------------------------------------------------------------------------------------

_CASE_IN_NAME = re.compile(r"case_\d{5}")
# a case folder's labels: KiTS19/23's file, else KiTS21's majority vote of its annotators
CASE_LABEL_FILES = ("segmentation.nii.gz", "aggregated_MAJ_seg.nii.gz")


def _label_files(folder: Path) -> dict:
    """{key: path} of a folder's label volumes: KiTS case folders (``case_XXXXX/segmentation.nii.gz``,
    KiTS21's ``aggregated_MAJ_seg.nii.gz``)
    and label files (``case_XXXXX.nii.gz`` or any other name), keyed by the KiTS case name where
    there is one, else by the file name without its suffix."""
    from .io import volumes

    found = {}
    for p in sorted(folder.iterdir()):
        inside = [p / name for name in CASE_LABEL_FILES if p.is_dir() and (p / name).is_file()]
        if inside:
            key, path = p.name, inside[0]
        elif p.is_file() and volumes.volume_format(p) not in (None, "dicom"):
            key, path = _stem(p.name), p
        else:
            continue
        m = _CASE_IN_NAME.search(key)
        key = m.group(0) if m else key
        if key in found:
            raise KidsegError(f"two label volumes for {key}: {found[key].name} and {path.name}", folder)
        found[key] = path
    return found


def _stem(name: str) -> str:
    from .io.volumes import VOLUME_SUFFIXES

    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def pair_cases(pred_dir, ref_dir) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """Pairs (case, prediction, reference) of two folders, by KiTS case name or file name, and one
    line per prediction or reference left without a partner."""
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for folder in (pred_dir, ref_dir):
        if not folder.is_dir():
            raise KidsegError("not a folder", folder)
    preds, refs = _label_files(pred_dir), _label_files(ref_dir)
    if not preds:
        raise KidsegError("no predictions found (KiTS case folders or label files)", pred_dir)
    pairs = [(k, preds[k], refs[k]) for k in sorted(preds) if k in refs]
    problems = [f"{preds[k]}: no reference named {k} in {ref_dir}; not scored" for k in sorted(preds) if k not in refs]
    missing = [k for k in sorted(refs) if k not in preds]
    if missing:  # one line: scoring 50 cases against KiTS's 300 references is normal
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        problems.append(f"{ref_dir}: {len(missing)} reference(s) without a prediction ({shown}); not scored")
    return pairs, problems
