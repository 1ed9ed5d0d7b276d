"""Dice, Jaccard, the KiTS composite, volumes in mL and tumor diameters in mm.

KiTS19 scores two regions: kidney+tumor (label > 0) and tumor (label == 2); the composite is the
mean of their Dice scores. Empty versus empty counts as a perfect match (Dice = Jaccard = 1): a
case without tumor whose prediction has no tumor is right, and scoring it 0 or NaN would punish or
hide a correct answer. Empty versus non-empty is 0.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


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


def largest_diameter_mm(mask: np.ndarray, spacing, max_points: int = 4000) -> float:
    """Largest distance between two voxel centres of the largest connected region, in mm.

    Exact on the region's surface voxels (the farthest pair always lies on the surface); very
    large surfaces are subsampled evenly, which can underestimate by at most about a voxel.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return 0.0
    lab, n = ndimage.label(mask)
    if n > 1:
        largest = int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
        mask = lab == largest
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    sub = mask[box]
    surface = sub & ~ndimage.binary_erosion(sub)
    pts = np.argwhere(surface).astype(np.float64) * np.asarray(spacing, np.float64)
    if len(pts) > max_points:
        pts = pts[np.linspace(0, len(pts) - 1, max_points).astype(int)]
    if len(pts) == 1:
        return 0.0
    from scipy.spatial.distance import pdist

    return float(pdist(pts).max())


def kits_scores(pred: np.ndarray, ref: np.ndarray) -> dict:
    """Dice and Jaccard of kidney+tumor and of tumor, and the KiTS composite (mean of the Dice)."""
    if pred.shape != ref.shape:
        from .errors import KidsegError

        raise KidsegError(f"prediction grid {pred.shape} differs from the reference grid {ref.shape}")
    kt_p, kt_r = pred > 0, ref > 0
    t_p, t_r = pred == 2, ref == 2
    out = {
        "kidney_tumor_dice": dice(kt_p, kt_r),
        "kidney_tumor_jaccard": jaccard(kt_p, kt_r),
        "tumor_dice": dice(t_p, t_r),
        "tumor_jaccard": jaccard(t_p, t_r),
    }
    out["kits_composite"] = (out["kidney_tumor_dice"] + out["tumor_dice"]) / 2.0
    return out


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
            "kidney_ml": volume_ml(part == 1, spacing),
            "tumor_ml": volume_ml(part == 2, spacing),
            "tumor_diameter_mm": largest_diameter_mm(part == 2, spacing),
        }
    out["total"] = {
        "kidney_ml": volume_ml(labels == 1, spacing),
        "tumor_ml": volume_ml(labels == 2, spacing),
        "tumor_diameter_mm": largest_diameter_mm(labels == 2, spacing),
    }
    return out
