"""Kidney ROIs and refine patches from a coarse result.

Kidney and tumor together form one "meta class". Its largest connected regions (at most two, one
per kidney; regions under ``min_volume_ml`` dropped) are the kidney ROIs, left and right kept
apart. Around each ROI, slice by slice, refine patches are cut.

Large kidneys (a kidney with a 12 cm tumor at 0.5 mm spacing spans 300+ pixels) do not fit one
256 x 256 patch. Instead of shrinking them (which would change the refine network's scale
between cases), a slice's footprint that is larger than one patch is *tiled* with overlapping
patches at the same resolution; where they overlap their outputs are blended with a Gaussian
weight (:func:`cascade.patch_weight`). So every voxel of a kidney ROI, plus a margin, lies inside
at least one patch.

The training code cuts its refine patches with :func:`refine_patches` too, so patches at
training and at inference come from the same function.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

PATCH_DTYPE = np.dtype([("roi", np.int16), ("z", np.int32), ("y0", np.int32), ("x0", np.int32)])


@dataclasses.dataclass(frozen=True)
class KidneyROI:
    """One kidney region found in a coarse segmentation."""

    id: int
    side: str  # "right" or "left" (patient's), from the centroid
    volume_ml: float
    bbox: tuple[slice, slice, slice]  # in the full-resolution grid (z, y, x)
    centroid_zyx: tuple[float, float, float]


def component_grid_step(shape_yx) -> int:
    """Connected components are found on a grid at most 128 voxels wide: 16x fewer voxels on a
    512 x 512 CT, and a kidney is still hundreds of voxels there."""
    return max(1, int(np.ceil(max(shape_yx) / 128)))


@dataclasses.dataclass(frozen=True)
class RoiMap:
    """ROI ids (int8, 0 = none) on the component grid: every ``step``-th voxel in-plane."""

    ids: np.ndarray
    step: int
    shape: tuple[int, int, int]  # the full grid

    def full(self) -> np.ndarray:
        """The ids on the full grid (nearest neighbour), for display and tests."""
        s = self.step
        if s == 1:
            return self.ids
        up = np.repeat(np.repeat(self.ids, s, axis=1), s, axis=2)
        return np.ascontiguousarray(up[:, : self.shape[1], : self.shape[2]])


def kidney_rois(
    meta: np.ndarray,
    spacing_zyx,
    *,
    min_volume_ml: float = 5.0,
    max_rois: int = 2,
    level: int = 127,
) -> tuple[list[KidneyROI], RoiMap]:
    """The kidney ROIs of a kidney+tumor mask (bool, or uint8 probability levels > ``level``).

    ROI ids start at 1, ordered by the patient's side (right first). Only every ``step``-th
    voxel in-plane is looked at, so a 512 x 512 x 600 volume costs a 128 x 128 x 600 labelling.
    """
    meta = np.asarray(meta)
    step = component_grid_step(meta.shape[1:])
    small = meta[:, ::step, ::step]
    small = small > level if small.dtype == np.uint8 else small.astype(bool)
    empty = RoiMap(np.zeros(small.shape, np.int8), step, tuple(meta.shape))
    lab, n = ndimage.label(small)
    if n == 0:
        return [], empty
    counts = np.bincount(lab.ravel())[1:]
    vox_ml = float(np.prod(spacing_zyx)) * step * step / 1000.0
    order = np.argsort(counts)[::-1]
    keep = [int(i) + 1 for i in order[:max_rois] if counts[i] * vox_ml >= min_volume_ml]
    if not keep:
        return [], empty
    coms = ndimage.center_of_mass(small, lab, keep)
    # right kidney (patient's right = low x in LPS) first
    keep_sorted = sorted(zip(keep, coms), key=lambda kc: kc[1][2])
    lut = np.zeros(n + 1, np.int8)
    for new_id, (old, _) in enumerate(keep_sorted, start=1):
        lut[old] = new_id
    ids = lut[lab]
    boxes = ndimage.find_objects(ids)
    mid_x = meta.shape[2] / 2.0
    rois = []
    for new_id, (old, com) in enumerate(keep_sorted, start=1):
        box = boxes[new_id - 1]
        bbox = (
            box[0],
            slice(box[1].start * step, min(meta.shape[1], box[1].stop * step)),
            slice(box[2].start * step, min(meta.shape[2], box[2].stop * step)),
        )
        centroid = (float(com[0]), float(com[1] * step), float(com[2] * step))
        if len(keep_sorted) == 2:
            side = "right" if new_id == 1 else "left"
        else:
            side = "right" if centroid[2] < mid_x else "left"
        rois.append(KidneyROI(new_id, side, float(counts[old - 1] * vox_ml), bbox, centroid))
    return rois, RoiMap(ids, step, tuple(meta.shape))


def _tile_starts(lo: int, hi: int, size: int, extent: int) -> list[int]:
    """Starts of windows of ``size`` covering [lo, hi) (overlapping evenly when tiled).

    Windows may reach outside [0, extent): the patch is then padded with air.
    """
    width = hi - lo
    if width <= size:
        centre = (lo + hi) / 2.0
        start = int(round(centre - size / 2.0))
        # stay inside the image where the image is large enough, so no patch is mostly padding
        if extent >= size:
            start = min(max(start, 0), extent - size)
        return [start]
    n = int(np.ceil(width / size))
    stride = (width - size) / (n - 1)
    return [int(round(lo + i * stride)) for i in range(n)]


def refine_patches(
    roi_map: RoiMap | np.ndarray,
    spacing_zyx,
    *,
    patch_px: int = 256,
    margin_mm: float = 12.0,
    z_margin_mm: float = 6.0,
) -> np.ndarray:
    """Patches (structured array of roi, z, y0, x0; each ``patch_px`` square) around every ROI.

    For each ROI, each slice within ``z_margin_mm`` of it gets patches covering the ROI's
    footprint over the neighbouring slices (so the ends of a kidney are not cut off), grown by
    ``margin_mm`` in-plane; a footprint wider than one patch is tiled. On a subsampled
    :class:`RoiMap` each footprint is widened by the sampling step, so it can only grow.
    """
    if not isinstance(roi_map, RoiMap):
        roi_map = RoiMap(np.asarray(roi_map), 1, tuple(np.shape(roi_map)))
    ids, step = roi_map.ids, roi_map.step
    nz, ny, nx = roi_map.shape
    dz, dy, dx = (float(s) for s in spacing_zyx)
    mz = int(np.ceil(z_margin_mm / dz))
    my, mx = int(np.ceil(margin_mm / dy)), int(np.ceil(margin_mm / dx))
    sy, sx = ids.shape[1], ids.shape[2]
    out = []
    for roi in range(1, int(ids.max(initial=0)) + 1):
        present = ids == roi
        rows = present.any(axis=2)  # (z, y)
        cols = present.any(axis=1)  # (z, x)
        zs = np.flatnonzero(rows.any(axis=1))
        if zs.size == 0:
            continue
        # per-slice extents on the full grid, then the union over a window of +-mz slices
        big = np.iinfo(np.int32).max
        y_lo = np.where(rows.any(1), rows.argmax(1) * step, big)
        y_hi = np.where(rows.any(1), (sy - rows[:, ::-1].argmax(1)) * step, -1)
        x_lo = np.where(cols.any(1), cols.argmax(1) * step, big)
        x_hi = np.where(cols.any(1), (sx - cols[:, ::-1].argmax(1)) * step, -1)
        win = 2 * mz + 1
        y_lo = ndimage.minimum_filter1d(y_lo, win, mode="constant", cval=big)
        x_lo = ndimage.minimum_filter1d(x_lo, win, mode="constant", cval=big)
        y_hi = np.minimum(ndimage.maximum_filter1d(y_hi, win, mode="constant", cval=-1), ny)
        x_hi = np.minimum(ndimage.maximum_filter1d(x_hi, win, mode="constant", cval=-1), nx)
        for z in range(max(0, zs[0] - mz), min(nz, zs[-1] + mz + 1)):
            if y_hi[z] < 0:
                continue
            ys = _tile_starts(y_lo[z] - my, y_hi[z] + my, patch_px, ny)
            xs = _tile_starts(x_lo[z] - mx, x_hi[z] + mx, patch_px, nx)
            out.extend((roi, z, y0, x0) for y0 in ys for x0 in xs)
    return np.array(out, dtype=PATCH_DTYPE)


def patch_coverage(patches: np.ndarray, shape, patch_px: int = 256) -> np.ndarray:
    """Boolean map of the voxels inside at least one patch."""
    covered = np.zeros(shape, bool)
    for p in patches:
        y0, x0 = max(0, int(p["y0"])), max(0, int(p["x0"]))
        covered[p["z"], y0 : max(0, p["y0"] + patch_px), x0 : max(0, p["x0"] + patch_px)] = True
    return covered


def patch_rois(patches: np.ndarray, shape, patch_px: int = 256) -> np.ndarray:
    """Map of each patch's voxels set to its ROI number (1, 2; 0 outside every patch): the refine
    patches as the widget outlines them."""
    rois = np.zeros(shape, np.int8)
    for p in patches:
        y0, x0 = max(0, int(p["y0"])), max(0, int(p["x0"]))
        rois[p["z"], y0 : max(0, p["y0"] + patch_px), x0 : max(0, p["x0"] + patch_px)] = p["roi"]
    return rois


def cut_patch(slice_2d: np.ndarray, y0: int, x0: int, size: int, fill) -> np.ndarray:
    """A ``size`` x ``size`` window of a 2D slice starting at (y0, x0), padded with ``fill`` outside."""
    out = np.full((size, size) + slice_2d.shape[2:], fill, dtype=slice_2d.dtype)
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(slice_2d.shape[0], y0 + size), min(slice_2d.shape[1], x0 + size)
    if ye > ys and xe > xs:
        out[ys - y0 : ye - y0, xs - x0 : xe - x0] = slice_2d[ys:ye, xs:xe]
    return out
