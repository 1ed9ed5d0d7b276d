"""Dice, Jaccard, the KiTS composite, lesion-wise tumor detection, volumes in mL and tumor
diameters in mm.

KiTS19 scores two regions: kidney+tumor (label > 0) and tumor (label == 2); the composite is the
mean of their Dice scores. Empty versus empty counts as a perfect match (Dice = Jaccard = 1): a
case without tumor whose prediction has no tumor is right, and scoring it 0 or NaN would punish or
hide a correct answer. Empty versus non-empty is 0.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .labels import BACKGROUND, KIDNEY, TUMOR


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def jaccard(pred: np.ndarray, ref: np.ndarray) -> float:
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    union = int(np.logical_or(pred, ref).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, ref).sum()) / union


def volume_ml(mask: np.ndarray, spacing) -> float:
    return float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0


def farthest_pair(points_mm: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """The largest distance between two of the points and the pair; exact (on their convex hull)."""
    from scipy.spatial import ConvexHull, QhullError
    from scipy.spatial.distance import cdist

    pts = np.asarray(points_mm, float)
    if len(pts) < 2:
        return 0.0, pts[0] if len(pts) else np.zeros(pts.shape[1]), pts[0] if len(pts) else np.zeros(pts.shape[1])
    try:
        pts_hull = pts[ConvexHull(pts).vertices]
    except (QhullError, ValueError):  # flat or collinear point sets: every point is a candidate
        pts_hull = pts if len(pts) <= 3000 else pts[np.linspace(0, len(pts) - 1, 3000).astype(int)]
    d = cdist(pts_hull, pts_hull)
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    return float(d[i, j]), pts_hull[i], pts_hull[j]


def bounding_box(mask: np.ndarray, pad=0) -> tuple[slice, ...] | None:
    """The slices around a mask's voxels (``pad`` voxels more on each side, one number or one per
    axis), or None when empty; from axis projections, so much cheaper than labelling the volume."""
    mask = np.asarray(mask)
    pads = np.broadcast_to(np.asarray(pad, int), (mask.ndim,))
    box = []
    for axis in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not len(idx):
            return None
        p = int(pads[axis])
        box.append(slice(max(0, int(idx[0]) - p), min(mask.shape[axis], int(idx[-1]) + 1 + p)))
    return tuple(box)


def largest_diameter_mm(mask: np.ndarray, spacing) -> float:
    """Largest distance between two voxel centres of the largest connected region, in mm (exact:
    the farthest pair lies on the region's surface and on the convex hull of that surface)."""
    box = bounding_box(mask)
    if box is None:
        return 0.0
    mask = np.asarray(mask[box], bool)
    lab, n = ndimage.label(mask)
    if n > 1:
        largest = int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
        mask = lab == largest
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    sub = mask[box]
    surface = sub & ~ndimage.binary_erosion(sub)
    return farthest_pair(np.argwhere(surface) * np.asarray(spacing, np.float64))[0]


def _check_same_grid(pred: np.ndarray, ref: np.ndarray) -> None:
    if np.shape(pred) != np.shape(ref):
        from .errors import KidsegError

        raise KidsegError(f"prediction grid {np.shape(pred)} differs from the reference grid {np.shape(ref)}")


def kits21_scores(pred: np.ndarray, ref: np.ndarray) -> dict:
    """KiTS21/23's hierarchical Dice: kidney and masses (labels 1-3), masses (tumor and cyst, 2-3)
    and tumor (2), and their mean."""
    _check_same_grid(pred, ref)
    pred, ref = np.asarray(pred), np.asarray(ref)
    out = {
        "kidney_masses_dice": dice(pred > BACKGROUND, ref > BACKGROUND),
        "masses_dice": dice(pred >= TUMOR, ref >= TUMOR),
    }
    out["kits21_mean_dice"] = float(np.mean([*out.values(), dice(pred == TUMOR, ref == TUMOR)]))
    return out


def false_ml(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """mL labelled where the reference has none of it: kidney+tumor outside the reference's
    kidney+tumor (``false_kidney_ml``), and tumor outside the reference's tumor (``false_tumor_ml``)."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    _check_same_grid(pred, ref)
    return {
        "false_kidney_ml": volume_ml((pred > BACKGROUND) & (ref == BACKGROUND), spacing),
        "false_tumor_ml": volume_ml((pred == TUMOR) & (ref != TUMOR), spacing),
    }


def kits_scores(pred: np.ndarray, ref: np.ndarray) -> dict:
    """Dice and Jaccard of kidney+tumor and of tumor, and the KiTS composite (mean of the Dice)."""
    _check_same_grid(pred, ref)
    kt_p, kt_r = pred > BACKGROUND, ref > BACKGROUND
    t_p, t_r = pred == TUMOR, ref == TUMOR
    out = {
        "kidney_tumor_dice": dice(kt_p, kt_r),
        "kidney_tumor_jaccard": jaccard(kt_p, kt_r),
        "tumor_dice": dice(t_p, t_r),
        "tumor_jaccard": jaccard(t_p, t_r),
    }
    out["kits_composite"] = (out["kidney_tumor_dice"] + out["tumor_dice"]) / 2.0
    return out


TUMOR_SIZE_BINS_ML = (5.0, 50.0, 200.0)  # edges: < 5 mL (under about 2 cm), 5-50, 50-200, >= 200


def tumor_detection(pred: np.ndarray, ref: np.ndarray, spacing, *, min_recall: float = 0.1) -> dict:
    """Lesion-wise tumor scores: each reference tumor (a connected region of label 2) with its
    volume, the share of it that is predicted tumor, and whether it was found (that share at least
    ``min_recall``); and the predicted tumor regions that touch no reference tumor (false tumors).

    A case's tumor Dice mixes these: a missed 1 mL tumor and a found 400 mL one average to a
    number that describes neither. Regions are 26-connected, as a reader would see them in 3D.
    """
    _check_same_grid(pred, ref)
    pred_t, ref_t = np.asarray(pred) == TUMOR, np.asarray(ref) == TUMOR
    ml = float(np.prod(spacing)) / 1000.0
    full = np.ones((3, 3, 3), bool)
    ref_lab, n_ref = ndimage.label(ref_t, full)
    tumors = []
    if n_ref:
        sizes = np.bincount(ref_lab.ravel(), minlength=n_ref + 1)
        hits = np.bincount(ref_lab[pred_t], minlength=n_ref + 1)
        for i in range(1, n_ref + 1):
            recall = hits[i] / sizes[i]
            tumors.append(
                {"volume_ml": float(sizes[i] * ml), "recall": float(recall), "found": bool(recall >= min_recall)}
            )
    pred_lab, n_pred = ndimage.label(pred_t, full)
    false = []
    if n_pred:
        touching = np.zeros(n_pred + 1, bool)
        touching[np.unique(pred_lab[ref_t])] = True
        sizes = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)
        false = [float(sizes[i] * ml) for i in range(1, n_pred + 1) if not touching[i]]
    return {"tumors": tumors, "false_tumors_ml": sorted(false, reverse=True)}


def detection_by_size(cases: list[dict], bins_ml=TUMOR_SIZE_BINS_ML) -> list[dict]:
    """Pool :func:`tumor_detection` results of many cases into rows by reference tumor volume:
    how many tumors, how many found, and the mean share of each that was predicted (``to_ml`` of
    the last row is None: no upper bound, and valid JSON)."""
    edges = (0.0, *bins_ml, float("inf"))
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        ts = [t for c in cases for t in c["tumors"] if lo <= t["volume_ml"] < hi]
        rows.append(
            {
                "from_ml": lo,
                "to_ml": hi if np.isfinite(hi) else None,
                "tumors": len(ts),
                "found": sum(t["found"] for t in ts),
                "mean_recall": float(np.mean([t["recall"] for t in ts])) if ts else float("nan"),
            }
        )
    return rows


def measurements(labels: np.ndarray, spacing) -> dict:
    """Kidney and tumor volumes (mL) and the largest tumor diameter (mm), overall and per side.

    Sides are the patient's: in the canonical LPS grid, x below the middle column is the right.
    """
    labels = np.asarray(labels)
    mid = labels.shape[2] // 2
    out = {}
    for side, sl in (("right", np.s_[:, :, :mid]), ("left", np.s_[:, :, mid:])):
        part = labels[sl]
        out[side] = {
            "kidney_ml": volume_ml(part == KIDNEY, spacing),
            "tumor_ml": volume_ml(part == TUMOR, spacing),
            "tumor_diameter_mm": largest_diameter_mm(part == TUMOR, spacing),
        }
    out["total"] = {
        "kidney_ml": volume_ml(labels == KIDNEY, spacing),
        "tumor_ml": volume_ml(labels == TUMOR, spacing),
        "tumor_diameter_mm": largest_diameter_mm(labels == TUMOR, spacing),
    }
    return out
