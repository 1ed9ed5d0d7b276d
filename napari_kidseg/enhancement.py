"""Tumor by contrast: a focal part of a kidney region that enhances clearly less than the kidney.

A renal tumor enhances less than the kidney's cortex in most contrast-enhanced CTs: in 85% of
the 39 real KiTS19 slices that show both it is darker than its kidney, by a median 60 HU
(weights/README.md). The bundled networks find the kidney+tumor outline on real CTs but call
most real tumors kidney, so after fusion a rule relabels, slice by slice, the parts of the
kidney+tumor region that are

- darker than the kidney's enhanced tissue by ``DROP_HU`` (the 75th percentile of the smoothed HU
  of all kidney+tumor labels stands for the cortex: a tumor that fills half the region would pull
  a median down to its own HU),
- brighter than ``FLOOR_HU`` (sinus fat and urine, and simple cysts, are darker; a tumor in a
  contrast phase enhances),
- wider than the renal pyramids (an opening of ``OPEN_MM`` radius), at least ``MIN_AREA_MM2`` on
  the slice and, in a whole volume, ``MIN_VOLUME_ML`` in 3D (a slice fused alone for a slider
  skips that last test until the volume is fused again, a moment later).

It acts only when the kidney is enhanced (reference at least ``ENHANCED_HU``): without contrast a
tumor and its kidney differ by a few HU. It runs after the anatomy check, which judges kidney
voxels (a false region turned tumor first would escape it), and it never adds or removes
kidney+tumor voxels; it only turns kidney into tumor. The figures that chose it are in weights/README.md.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .labels import KIDNEY, TUMOR
from .roi import component_grid_step

DROP_HU = 40.0
FLOOR_HU = 20.0
ENHANCED_HU = 100.0
OPEN_MM = 3.0
MIN_AREA_MM2 = 300.0
MIN_VOLUME_ML = 2.0  # a volume's marked parts smaller than this in 3D stay kidney
CORTEX_PERCENTILE = 75
SMOOTH_PX = 1.0  # in-plane Gaussian before any HU is read: CT noise (20-40 HU SD) would speckle the rule
# the rule reads HU only where p(kidney or tumor) >= 0.05 (or in a refine window): a kidney threshold
# under 0.05 labels voxels it leaves as they are
_LOW_LEVEL = 13
_REACH_PX = 4  # the smoothing's reach (4 sigma), read around a box and not written


def tissue_levels(ct: np.ndarray, coarse_meta: np.ndarray, windows=()) -> np.ndarray:
    """The CT smoothed in-plane and clipped to 0-255 HU as uint8, where labels can appear: the
    boxes around the coarse stage's regions of p(kidney or tumor) >= 0.05 and the refine
    windows (``windows`` as (z, y0, x0, height, width)); 0 elsewhere, which the rule reads as "not
    enhancing". Boxes per region, not one around them all: stray low-probability voxels far
    apart would make one box the whole CT (2.4 s on the 512x512x300 benchmark). Each box is
    smoothed with the smoothing's reach around it and only its own voxels are written, so where
    boxes overlap the values are those of the whole CT smoothed at once."""
    out = np.zeros(ct.shape, np.uint8)
    # regions found on roi's coarser component grid: cheap (one under a step wide can be missed: far under 300 mm2)
    step = component_grid_step(ct.shape[1:])
    coarse = coarse_meta[:, ::step, ::step] >= _LOW_LEVEL
    parts, _ = ndimage.label(coarse)
    boxes = [
        (b[0].start, b[0].stop, b[1].start * step, b[1].stop * step, b[2].start * step, b[2].stop * step)
        for b in ndimage.find_objects(parts)
        if b is not None
    ]
    boxes += [(z, z + 1, y0, y0 + h, x0, x0 + w) for z, y0, x0, h, w in windows]
    ny, nx = ct.shape[1:]
    for z0, z1, y0, y1, x0, x1 in boxes:  # each widened by a grid step: what the grid's rounding leaves out
        y0, x0, y1, x1 = max(y0 - step, 0), max(x0 - step, 0), min(y1 + step, ny), min(x1 + step, nx)
        ry0, rx0, ry1, rx1 = (
            max(y0 - _REACH_PX, 0),
            max(x0 - _REACH_PX, 0),
            min(y1 + _REACH_PX, ny),
            min(x1 + _REACH_PX, nx),
        )
        crop = ct[z0:z1, ry0:ry1, rx0:rx1].astype(np.float32)
        smooth = ndimage.gaussian_filter(crop, sigma=(0, SMOOTH_PX, SMOOTH_PX), truncate=_REACH_PX / SMOOTH_PX)
        inner = smooth[:, y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0]
        np.clip(inner + 0.5, 0, 255, out=inner)  # + 0.5: the cast below truncates
        out[z0:z1, y0:y1, x0:x1] = inner.astype(np.uint8)
    return out


def kidney_reference_hu(labels: np.ndarray, tissue: np.ndarray) -> float | None:
    """The HU that stands for the enhanced kidney: the 75th percentile over all kidney+tumor labels
    of the CT, both kidneys together (a tumor that fills its kidney leaves the other kidney's
    cortex to set it; a reference per side measured worse, see weights/README.md); None without a
    kidney+tumor region. Voxels outside the tissue boxes (0) do not count."""
    region = (labels > 0) & (tissue > 0)
    return float(np.percentile(tissue[region], CORTEX_PERCENTILE)) if region.any() else None


def describe(reference_hu: float | None, made_ml: float) -> str | None:
    """What the rule did, in one line (None without a kidney+tumor region)."""
    if reference_hu is None:
        return None
    if reference_hu < ENHANCED_HU:
        return (
            f"tumor by contrast: not applied, the kidneys read {reference_hu:.0f} HU "
            f"(not contrast-enhanced: under {ENHANCED_HU:.0f} HU)"
        )
    return (
        f"tumor by contrast: {made_ml:.1f} mL of kidney made tumor "
        f"(at least {DROP_HU:.0f} HU darker than the kidneys' {reference_hu:.0f} HU)"
    )


def _disk(radius_px: float) -> np.ndarray:
    r = int(np.ceil(radius_px))
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return (x * x + y * y) <= radius_px * radius_px + 1e-6


def mark_hypodense_tumor(labels: np.ndarray, tissue: np.ndarray, spacing, reference_hu: float | None) -> np.ndarray:
    """``labels`` (a volume, or one slice with its 2D ``tissue``) with the hypodense parts of
    the kidney regions turned into tumor; the same array when the kidney is not enhanced."""
    if reference_hu is None or reference_hu < ENHANCED_HU:
        return labels
    volume = labels if labels.ndim == 3 else labels[None]
    levels = tissue if tissue.ndim == 3 else tissue[None]
    dark = (volume == KIDNEY) | (volume == TUMOR)
    dark &= (levels < reference_hu - DROP_HU) & (levels > FLOOR_HU)
    if not dark.any():
        return labels
    out = volume.copy()
    sy, sx = float(spacing[-2]), float(spacing[-1])
    disk = _disk(OPEN_MM / min(sy, sx))
    min_px = MIN_AREA_MM2 / (sy * sx)
    marked = np.zeros(volume.shape, bool)
    for z in np.flatnonzero(dark.any(axis=(1, 2))):
        opened = ndimage.binary_opening(dark[z], disk)
        parts, n = ndimage.label(opened)
        if not n:
            continue
        sizes = ndimage.sum_labels(opened, parts, np.arange(1, n + 1))
        marked[z] = np.isin(parts, 1 + np.flatnonzero(sizes >= min_px))
    if MIN_VOLUME_ML > 0 and labels.ndim == 3 and marked.any():
        parts, n = ndimage.label(marked)
        ml = ndimage.sum_labels(marked, parts, np.arange(1, n + 1)) * float(np.prod(spacing)) / 1000.0
        marked = np.isin(parts, 1 + np.flatnonzero(ml >= MIN_VOLUME_ML))
    out[marked & (out == KIDNEY)] = TUMOR
    return out if labels.ndim == 3 else out[0]
