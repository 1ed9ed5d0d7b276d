"""The anatomy check: a hard "no" for what cannot be a kidney or a kidney tumor.

The networks see one slice (or one patch) at a time and call anything kidney-shaped and bright
kidney: on real CT that was the spleen, liver cysts, psoas and vertebrae. This module judges a
result's regions by where they lie and what they touch, using the CT only to find the spine,
and never runs a network, so it is a live control like alpha.

1. **The spine frame** (:func:`find_spine`): per slice, the vertebra is the most posterior
   compact bone region (HU > 180, holes filled, so an osteoporotic body inside its cortex counts;
   at least 3 cm2 and 15 mm across both ways) within 40 mm of the body's midline; its centre
   gives the midline ``x`` and its anterior edge the spine's front ``y``. Contrast-filled aorta
   and bowel (150-300 HU, which is why "bone = HU > 200" alone is not enough) lie in front of it;
   the table is a thin plate. A running median along z removes disc levels.
   No spine in view (a limb, a phantom slab) means the position rules are skipped, with a note.
2. **Position** (with a spine): every 2D region of kidney+tumor on every slice is scored by a
   kidney position atlas in the spine frame: (lateral distance from the midline, distance behind
   the spine's front edge) in mm, a log-density learned from the kidneys of 40 real FLARE 2022
   label maps (``scripts/derive_anatomy_priors.py``; the aorta's back edge stands for the
   spine's front edge there). A slice region whose mean log-density is below the lowest that a
   real kidney slice reached is removed. Judging per slice matters: in 3D a kidney and the
   spleen or liver are often one connected region.
3. **One kidney per side**: the 3D regions left are split by side of the midline; per side the
   region with the largest volume weighted by its atlas fit is the kidney, and other regions are
   kept only within ``fragment_mm`` of it (the farthest a separate piece of one kidney lay from
   its main part in the 160 KiTS19 label volumes; a duplex kidney is one organ, so it stays).
   A region that crosses the midline with kidney on both sides (a horseshoe kidney) is kept as
   both sides' kidney, with a note.
4. **Size**: a side's kidney region under ``min_kidney_ml`` or shorter than ``min_length_mm``
   along any axis is not a kidney (limits: half the smallest kidney+tumor in KiTS19).
5. **Organs** (networks that learned the neighbours, :mod:`labels`): a part of kidney+tumor (split
   at narrow joins) that the coarse stage's organ map mostly calls another organ, or whose outer
   shell is mostly liver or spleen (it lies inside that organ), is removed, naming the organ.
6. **Tumor attachment**: a tumor region (26-connected) that touches no kidney voxel that was
   kept is removed: a tumor that touches no kidney is not a kidney tumor.

Nothing is removed silently: every removed region is listed (:class:`RemovedRegion`: what, side,
mL, slice range in mm, why) so the CLI prints it and the widget shows it as a layer whose regions
can be restored one by one. The check works on the same 128-voxel-wide grid as :mod:`roi` (a
512 x 512 x 300 result costs a 128 x 128 x 300 labelling) and maps its verdict back to the full
grid, where only voxels of a removed region's own label are cleared.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from .labels import BACKGROUND, KIDNEY, ORGAN_CODE, ORGANS, TUMOR
from .roi import component_grid_step

PRIORS_PATH = Path(__file__).with_name("anatomy_priors.json")
BONE_HU = 180.0  # cancellous bone of a healthy vertebra is 150-300 HU, cortex far above
SPINE_BAND_MM = 40.0  # the vertebral body lies within 40 mm of the body's midline
MIN_VERTEBRA_MM2 = 300.0  # 3 cm2: more than a rib or a calcification, less than any lumbar body
MIN_VERTEBRA_EXTENT_MM = 15.0  # a vertebral body is 30-50 mm across; a table top is under 10 mm thick
SPINE_MEDIAN_MM = 60.0  # running median along z: two vertebrae and the disc between
MIN_SPINE_SLICES = 0.3  # the spine must be found on this share of slices, or it is "not in view"
_STRUCT_2D = np.array(
    [[[0, 0, 0], [0, 0, 0], [0, 0, 0]], [[1, 1, 1], [1, 1, 1], [1, 1, 1]], [[0, 0, 0], [0, 0, 0], [0, 0, 0]]], bool
)
_STRUCT_3D = np.ones((3, 3, 3), bool)
REASON_POSITION = "not where a kidney lies (position relative to the spine)"


@lru_cache(maxsize=1)
def priors() -> dict:
    """The thresholds and the position atlas, derived from real label maps (see the script)."""
    with open(PRIORS_PATH) as fh:
        data = json.load(fh)
    data["atlas_log_density"] = np.asarray(data["atlas_log_density"], np.float32)
    return data


# the in-plane sampling step: at most 128 voxels across, the grid of roi's components
grid_step = component_grid_step


# --------------------------------------------------------------------------------------------- spine
@dataclasses.dataclass(frozen=True)
class SpineFrame:
    """The spine's midline ``x`` and front edge ``y`` (mm from the array's first voxel) per slice."""

    x_mm: np.ndarray  # (nz,)
    front_y_mm: np.ndarray  # (nz,)
    found_share: float  # share of slices where a vertebra was seen before smoothing


def midline_mm(spine: SpineFrame | None, shape, spacing) -> np.ndarray:
    """The patient's midline x (mm) per slice: the spine's, or the image centre when no spine is
    in view (what decides a region's side everywhere: the anatomy check, the region table, the report)."""
    if spine is None:
        return np.full(shape[0], shape[2] * float(spacing[2]) / 2.0)
    return np.asarray(spine.x_mm, float)


def find_spine(ct: np.ndarray, spacing) -> SpineFrame | None:
    """The spine frame of a CT (canonical ``(z, y, x)`` HU), or None when no spine is in view."""
    ct = np.asarray(ct)
    if ct.ndim != 3 or ct.shape[0] == 0:
        return None
    s = grid_step(ct.shape[1:])
    dz, dy, dx = float(spacing[0]), float(spacing[1]) * s, float(spacing[2]) * s
    small = ct[:, ::s, ::s]
    nz, ny, nx = small.shape
    body = small > -500
    xs = np.arange(nx, dtype=np.float32) * dx
    body_cols = body.sum(axis=1)  # (z, x)
    with np.errstate(invalid="ignore", divide="ignore"):
        mid = (body_cols * xs).sum(1) / body_cols.sum(1)
    if not np.isfinite(mid).any():
        return None
    mid_x = float(np.nanmedian(mid))
    band = np.flatnonzero(np.abs(xs - mid_x) < SPINE_BAND_MM)
    if not len(band):
        return None
    # only the band's columns are looked at (a third of a slice at most), one column of margin
    # so a vertebra cut by the band's edge is not a region touching the border
    cols = slice(max(0, int(band[0]) - 1), min(nx, int(band[-1]) + 2))
    x0 = cols.start
    bone = small[:, :, cols] > BONE_HU
    bone[:, :, 0] = False
    bone[:, :, -1] = False
    bone = ndimage.binary_fill_holes(bone, structure=_STRUCT_2D)
    lab, n = ndimage.label(bone, structure=_STRUCT_2D)
    x_mm = np.full(nz, np.nan)
    front = np.full(nz, np.nan)
    if n:
        areas = np.bincount(lab.ravel())[1:] * dy * dx
        boxes = ndimage.find_objects(lab)
        best = np.zeros(nz, np.int64)  # per slice, the most posterior vertebra-like region
        best_y = np.full(nz, -np.inf)
        centre_y = ndimage.center_of_mass(bone, lab, range(1, n + 1))
        for i, box in enumerate(boxes):
            z = box[0].start
            h, w = (box[1].stop - box[1].start) * dy, (box[2].stop - box[2].start) * dx
            # a vertebra is compact and thick; the table is a thin plate, the spinous process a
            # thin bar; contrast-filled bowel and the aorta lie in front of the spine
            if areas[i] >= MIN_VERTEBRA_MM2 and min(h, w) >= MIN_VERTEBRA_EXTENT_MM and centre_y[i][1] > best_y[z]:
                best[z], best_y[z] = i + 1, centre_y[i][1]
        for z in np.flatnonzero(best):
            box = boxes[best[z] - 1]
            region = lab[z, box[1], box[2]] == best[z]
            yy, xx = np.nonzero(region)
            front[z] = (yy.min() + box[1].start) * dy
            x_mm[z] = (xx.mean() + box[2].start + x0) * dx
    ok = np.isfinite(front)
    share = float(ok.mean())
    if share < MIN_SPINE_SLICES:
        return None
    x_mm, front = _running_median(x_mm, dz), _running_median(front, dz)
    return SpineFrame(x_mm, front, share)


def _running_median(values: np.ndarray, dz: float) -> np.ndarray:
    """A nan-aware running median over ``SPINE_MEDIAN_MM`` along z, gaps filled by interpolation."""
    half = max(1, int(round(SPINE_MEDIAN_MM / 2 / dz)))
    n = len(values)
    out = np.full(n, np.nan)
    for z in range(n):
        w = values[max(0, z - half) : z + half + 1]
        if np.isfinite(w).any():
            out[z] = np.nanmedian(w)
    ok = np.isfinite(out)
    idx = np.arange(n)
    return np.interp(idx, idx[ok], out[ok])


# --------------------------------------------------------------------------------------------- verdict
@dataclasses.dataclass(frozen=True)
class RemovedRegion:
    """One region the check removed, with the reason a radiologist reads."""

    id: int
    label: str  # "kidney" (kidney+tumor) or "tumor"
    side: str  # "right", "left" or "midline"
    volume_ml: float
    z_mm: tuple[float, float]  # first and last slice, mm from the array's first slice
    reason: str
    slices: tuple[int, int] | None = None  # first and last slice index (napari's slice numbers)

    def describe(self) -> str:
        where = f"{self.z_mm[0]:.0f}-{self.z_mm[1]:.0f} mm"
        if self.slices is not None:
            where = slices_text(*self.slices, dz=None, mm=self.z_mm)
        return f"{self.volume_ml:.1f} mL of {self.label} ({self.side}, {where}): {self.reason}"


def slices_text(z0: int, z1: int, dz: float | None, mm: tuple[float, float] | None = None) -> str:
    """A slice range in the words of every message: slice numbers as napari shows them, then mm
    along the scan from its first slice (``dz``: the slice spacing, or ``mm`` given)."""
    mm = mm if mm is not None else (z0 * dz, z1 * dz)
    span = f"slice {z0}" if z0 == z1 else f"slices {z0}-{z1}"
    return f"{span}, {mm[0]:.0f}-{mm[1]:.0f} mm"


@dataclasses.dataclass
class AnatomyVerdict:
    """Which regions of a result are not kidney or kidney tumor, on the check's grid."""

    removed_ids: np.ndarray  # int16 on the check's grid: 0 kept, k = regions[k - 1]
    step: int
    shape: tuple[int, int, int]
    regions: list[RemovedRegion]
    notes: list[str]
    restored: set = dataclasses.field(default_factory=set)
    _boxes: list | None = dataclasses.field(default=None, repr=False)  # each region's box on the grid

    def active_regions(self) -> list[RemovedRegion]:
        """The regions still removed (not restored by the user)."""
        return [r for r in self.regions if r.id not in self.restored]

    def removal_map(self, z: int | None = None) -> np.ndarray:
        """Region ids on the full grid (whole volume, or slice ``z``), restored regions as 0."""
        ids = self.removed_ids if z is None else self.removed_ids[z : z + 1]
        if self.restored:
            ids = np.where(np.isin(ids, list(self.restored)), 0, ids)
        s = self.step
        if s > 1:
            ids = np.repeat(np.repeat(ids, s, axis=1), s, axis=2)[:, : self.shape[1], : self.shape[2]]
        return ids if z is None else ids[0]

    def apply(self, labels: np.ndarray, z: int | None = None) -> np.ndarray:
        """The labels with the removed regions cleared (a new array; ``z``: one slice's labels).

        Only each removed region's own bounding box is touched, so a slider move or a 600-slice
        volume costs what the removed regions cover, not the whole grid.
        """
        out = np.array(labels, copy=True)
        active = self.active_regions()
        if not active:
            return out
        vol = out if z is None else out[None]
        z0 = 0 if z is None else int(z)
        if self._boxes is None:
            self._boxes = ndimage.find_objects(self.removed_ids)
        s = self.step
        for r in active:
            box = self._boxes[r.id - 1] if r.id <= len(self._boxes) else None
            if box is None:
                continue
            zs = box[0] if z is None else slice(max(box[0].start, z0), min(box[0].stop, z0 + 1))
            if zs.start >= zs.stop:
                continue
            mine = self.removed_ids[zs, box[1], box[2]] == r.id
            if s > 1:
                mine = np.repeat(np.repeat(mine, s, axis=1), s, axis=2)
            y0, x0 = box[1].start * s, box[2].start * s
            y1, x1 = min(self.shape[1], y0 + mine.shape[1]), min(self.shape[2], x0 + mine.shape[2])
            mine = mine[:, : y1 - y0, : x1 - x0]
            target = vol[zs.start - z0 : zs.stop - z0, y0:y1, x0:x1]
            if r.label == "tumor":
                target[mine & (target == TUMOR)] = BACKGROUND
            else:
                target[mine & (target != BACKGROUND)] = BACKGROUND
        return out

    def removed_mask(self, labels: np.ndarray) -> np.ndarray:
        """Voxels of ``labels`` that :meth:`apply` clears (for the *removed* layer)."""
        return self.apply(labels) != labels

    def region_at(self, zyx) -> RemovedRegion | None:
        """The removed region at a full-grid voxel (for restore-by-click), or None."""
        z, y, x = (int(round(v)) for v in zyx)
        if not (0 <= z < self.shape[0] and 0 <= y < self.shape[1] and 0 <= x < self.shape[2]):
            return None
        rid = int(self.removed_ids[z, y // self.step, x // self.step])
        return next((r for r in self.regions if r.id == rid), None)

    def summary(self, min_ml: float = 1.0) -> list[str]:
        """What the CLI prints: one line per removed region of ``min_ml`` or more, the smaller
        ones summed per reason, then the notes."""
        active = self.active_regions()
        lines = [f"anatomy check removed {r.describe()}" for r in active if r.volume_ml >= min_ml]
        small: dict[str, list[RemovedRegion]] = {}
        for r in active:
            if r.volume_ml < min_ml:
                small.setdefault(r.reason.split(",")[0], []).append(r)
        for reason, rs in small.items():
            lines.append(
                f"anatomy check removed {len(rs)} region(s) under {min_ml:g} mL, "
                f"{sum(r.volume_ml for r in rs):.1f} mL in all: {reason}"
            )
        return lines + list(self.notes)

    def removed_ml(self) -> dict[str, float]:
        """mL of kidney (kidney+tumor) and of tumor the check removes, for the CLI and the Review box."""
        out = {"kidney": 0.0, "tumor": 0.0}
        for r in self.active_regions():
            out["tumor" if r.label == "tumor" else "kidney"] += r.volume_ml
        return out


@dataclasses.dataclass
class _Box:
    """The labelled voxels' bounding box on the check's grid (plus room for the dilations), and
    what the rules have removed from it so far: the kidneys are a few percent of a scan, so every
    rule looks only here. ``removed`` holds, per voxel, the 1-based index of its reason."""

    small: np.ndarray  # the labels in the box
    origin: tuple[int, int, int]  # (oz, oy, ox): the box's corner on the grid
    sp: np.ndarray  # the grid's spacing (z, y, x) mm
    mid: np.ndarray  # the spine's midline x (mm) per slice of the box
    removed: np.ndarray
    reasons: list  # (label, reason) per removal id

    def __post_init__(self):
        self.meta = self.small != BACKGROUND
        self.xs = (np.arange(self.small.shape[2]) + self.origin[2]) * self.sp[2]
        self.zz, self.yy, self.xx = np.nonzero(self.meta)  # the check looks only at labelled voxels

    def remove(self, mask, label, reason):
        self.reasons.append((label, reason))
        self.removed[mask & (self.removed == 0)] = len(self.reasons)


def check_anatomy(
    labels: np.ndarray,
    spacing,
    spine: SpineFrame | None,
    *,
    priors_data: dict | None = None,
    organs: np.ndarray | None = None,
) -> AnatomyVerdict:
    """Judge a result's regions (see the module's docstring); ``spine`` None skips the position rules.

    The numbered rules run in this order, each on what the ones before it kept: position (2),
    organs (5), one kidney per side of a kidney's size (3-4), tumor attachment (6)."""
    labels = np.asarray(labels)
    pr = priors_data or priors()
    s = grid_step(labels.shape[1:])
    grid = labels[:, ::s, ::s]
    sp = np.array([float(spacing[0]), float(spacing[1]) * s, float(spacing[2]) * s])
    notes: list[str] = []
    boxes = ndimage.find_objects((grid != BACKGROUND).astype(np.uint8))
    if not boxes:
        return AnatomyVerdict(np.zeros(grid.shape, np.int16), s, tuple(labels.shape), [], notes)
    crop = tuple(slice(max(0, b.start - m), min(n, b.stop + m)) for b, n, m in zip(boxes[0], grid.shape, (2, 3, 3)))
    oz, oy, ox = (c.start for c in crop)
    small = np.ascontiguousarray(grid[crop])
    mid_full = midline_mm(spine, grid.shape, sp)
    box = _Box(small, (oz, oy, ox), sp, mid_full[oz : oz + small.shape[0]], np.zeros(small.shape, np.int16), [])
    logd = None
    if spine is None:
        notes.append("no spine in view, so the position of the regions was not checked")
    else:
        logd = _rule_position(box, spine, pr, notes)
    if organs is not None:
        _rule_organs(box, np.asarray(organs)[:, ::s, ::s][crop], notes)
    _rule_one_kidney_per_side(box, logd, pr)
    _rule_tumor_attachment(box)

    # one reported region per connected group of removed voxels with one reason
    removed_full = np.zeros(grid.shape, np.int16)
    removed_full[crop] = box.removed
    verdict = _group(removed_full, box.reasons, grid, sp, mid_full, s, tuple(labels.shape), notes)
    for r in verdict.regions:  # a transplant or ectopic kidney lies where native ones do not
        if r.label == "kidney" and r.volume_ml >= pr["min_kidney_ml"] and r.reason == REASON_POSITION:
            verdict.notes.append(
                f"a kidney-sized region ({r.volume_ml:.0f} mL, {r.side}) was removed for its "
                "position: if it is a transplant or ectopic kidney, restore it"
            )
    return verdict


def _rule_position(box: _Box, spine: SpineFrame, pr: dict, notes: list) -> np.ndarray:
    """Rule 2, position, slice by slice; returns the atlas log-density of each labelled voxel.

    Only kidney-labelled voxels vote: a tumor may grow far out of its kidney (a 10 cm exophytic
    one pulls a region's centre off the kidney's place), while the parenchyma stays in the
    retroperitoneum. Tumor with no kidney on it is left to the attachment rule (6)."""
    small, meta, sp, mid, remove = box.small, box.meta, box.sp, box.mid, box.remove
    zz, yy, xx = box.zz, box.yy, box.xx
    oz, oy, ox = box.origin
    logd = atlas_log_density(zz + oz, yy + oy, xx + ox, sp, spine, pr)
    kid = (small[zz, yy, xx] == KIDNEY).astype(np.float64)
    blobs, nb = ndimage.label(meta, structure=_STRUCT_2D)
    b = blobs[zz, yy, xx]
    n_kid = np.bincount(b, weights=kid, minlength=nb + 1)
    mean_logd = np.bincount(b, weights=logd * kid, minlength=nb + 1) / np.maximum(n_kid, 1)
    dx = box.xs[xx] - mid[zz]
    left_reach, right_reach = np.zeros(nb + 1), np.zeros(nb + 1)
    np.maximum.at(left_reach, b, dx)
    np.maximum.at(right_reach, b, -dx)
    # a horseshoe joins two kidneys across the spine; a region reaching beyond where any
    # kidney lies (the atlas's lateral extent) is not one, however it crosses
    far = _atlas_lateral_extent_mm(pr)
    near = pr["horseshoe_reach_mm"]
    horseshoe = (left_reach >= near) & (right_reach >= near) & (left_reach <= far) & (right_reach <= far)
    bad = (mean_logd < pr["min_slice_log_density"]) & ~horseshoe & (n_kid > 0)
    bad[0] = False
    if bad.any():
        # a kidney touching the liver or spleen on a slice makes one region that fails as a
        # whole: split failing regions at their narrow joins and judge the parts again
        bad_mask = bad[blobs]
        parts = _split_at_necks(bad_mask, sp)
        p = parts[zz, yy, xx]
        n_parts = int(parts.max())
        part_kid = np.bincount(p, weights=kid, minlength=n_parts + 1)
        part_logd = np.bincount(p, weights=logd * kid, minlength=n_parts + 1) / np.maximum(part_kid, 1)
        passing = (part_logd >= pr["min_slice_log_density"]) | (part_kid == 0)
        passing[0] = False
        failed = bad_mask & ~passing[parts]
        # slice verdicts vote per 3D part, by their kidney voxels: a region is kept or removed
        # whole, so a kidney is not cut into slabs at its poles and a false region does not
        # fall into fragments
        parts3d = _split_at_necks_3d(meta, sp)
        q = parts3d[zz, yy, xx]
        n3 = int(parts3d.max())
        votes = np.bincount(q, weights=failed[zz, yy, xx] * kid, minlength=n3 + 1)
        share = votes / np.maximum(np.bincount(q, weights=kid, minlength=n3 + 1), 1)
        gone = share >= 0.5
        gone[0] = False
        remove(gone[parts3d], "kidney", REASON_POSITION)
    if horseshoe[1:].any():
        notes.append("a region crosses the spine with kidney on both sides: kept as a horseshoe kidney")
    return logd


def _rule_organs(box: _Box, organs_on_grid: np.ndarray, notes: list) -> None:
    """Rule 5, organs: what an organ-aware network calls another organ, or what lies inside the
    liver or the spleen, is not kidney (however well it sits in the atlas)."""
    organ_grid = np.ascontiguousarray(organs_on_grid)
    _judge_by_organs(box.meta & (box.removed == 0), organ_grid, box.sp, box.remove)
    seen = {name for name in ("liver", "spleen") if (organ_grid == ORGAN_CODE[name]).any()}
    if len(seen) < 2:  # a pelvis, a chest, a splenectomy: the rule had less to go on
        missing = " or ".join(n for n in ("liver", "spleen") if n not in seen)
        notes.append(f"the organ map finds no {missing} next to the kidneys' regions (not in view, or absent)")


def _rule_one_kidney_per_side(box: _Box, logd: np.ndarray | None, pr: dict) -> None:
    """Rules 3-4: one kidney per side (others only as its fragments), of a kidney's size."""
    small, sp, mid, remove = box.small, box.sp, box.mid, box.remove
    zz, xx = box.zz, box.xx
    vox_ml = float(np.prod(sp)) / 1000.0
    regions, n = ndimage.label(box.meta & (box.removed == 0), structure=_STRUCT_3D)
    if not n:
        return
    r = regions[zz, box.yy, xx]
    counts = np.bincount(r, minlength=n + 1).astype(float)
    safe = np.maximum(counts, 1)
    com_x = np.bincount(r, weights=box.xs[xx], minlength=n + 1) / safe
    com_z = np.clip(np.round(np.bincount(r, weights=zz, minlength=n + 1) / safe).astype(int), 0, small.shape[0] - 1)
    fit = np.ones(n + 1)
    if logd is not None:
        fit = np.minimum(1.0, np.exp(np.bincount(r, weights=logd, minlength=n + 1) / safe - pr["typical_log_density"]))
    score = counts * fit
    side = np.where(com_x > mid[com_z], "left", "right")  # LPS: +x is the patient's left
    boxes = ndimage.find_objects(regions)
    for sd in ("right", "left"):
        members = [m for m in range(1, n + 1) if side[m] == sd]
        if not members:
            continue
        main = max(members, key=lambda m: score[m])
        main_box = boxes[main - 1]
        extent = [(b.stop - b.start) * d for b, d in zip(main_box, sp)]
        if counts[main] * vox_ml < pr["min_kidney_ml"] or min(extent) < pr["min_length_mm"]:
            for m in members:  # too small for a kidney: every region of this side goes
                remove(regions == m, "kidney", "too small to be a kidney")
            continue
        for m in members:
            if m == main:
                continue
            d = _distance_mm(regions, main, m, boxes, sp)
            if d > pr["fragment_mm"]:
                remove(regions == m, "kidney", f"a second region on the {sd} side, {d:.0f} mm from its kidney")


def _rule_tumor_attachment(box: _Box) -> None:
    """Rule 6: a tumor region that touches no kept kidney voxel is not a kidney tumor."""
    small, removed = box.small, box.removed
    kidney_kept = (small == KIDNEY) & (removed == 0)
    tumors, nt = ndimage.label((small == TUMOR) & (removed == 0), structure=_STRUCT_3D)
    if nt:
        # two grid voxels: on a grid of every 4th voxel a tumor touching its kidney at full
        # resolution can sample a voxel apart from it (KiTS19 case 135)
        near_kidney = ndimage.binary_dilation(kidney_kept, structure=_STRUCT_3D, iterations=2)
        touching = np.unique(tumors[near_kidney & (tumors > 0)])
        lonely = np.setdiff1d(np.arange(1, nt + 1), touching)
        if len(lonely):
            lut = np.zeros(nt + 1, bool)
            lut[lonely] = True
            box.remove(lut[tumors], "tumor", "touches no kidney, so it is not a kidney tumor")


ON_ORGAN_SHARE = 0.5  # a region whose voxels the organ map gives mostly to one organ is that organ
INSIDE_ORGAN_SHARE = 0.7  # a region whose outer shell is mostly liver (or spleen) lies inside it


def _judge_by_organs(meta: np.ndarray, organ_grid: np.ndarray, sp, remove) -> None:
    """Step 2b: remove the parts of kidney+tumor (split at narrow joins, so a kidney touching the
    liver is judged apart from it) that the organ map calls another organ or that the liver or
    spleen enclose; the reason names the organ."""
    parts = _split_at_necks_3d(meta, sp)
    n = int(parts.max())
    if not n:
        return
    shell_of = ndimage.grey_dilation(parts, footprint=_STRUCT_3D.astype(bool)) * (~meta)
    for k in range(1, n + 1):
        m = parts == k
        on = np.bincount(organ_grid[m], minlength=len(ORGANS) + 1)[1 : len(ORGANS) + 1]
        shell = organ_grid[shell_of == k]
        best = int(on.argmax())
        if on[best] >= ON_ORGAN_SHARE * m.sum():
            remove(m, "kidney", f"the organ map calls it {ORGANS[best]}")
            continue
        for organ in ("liver", "spleen"):
            if len(shell) and (shell == ORGAN_CODE[organ]).mean() >= INSIDE_ORGAN_SHARE:
                remove(m, "kidney", f"lies inside the {organ}")
                break


def _atlas_lateral_extent_mm(pr) -> float:
    """The farthest lateral distance from the midline at which the atlas still places a kidney."""
    plausible = (pr["atlas_log_density"] >= pr["min_slice_log_density"]).any(axis=1)
    return float(pr["atlas_dx_mm"][0] + (np.flatnonzero(plausible).max() + 1) * pr["atlas_bin_mm"])


NECK_MM = 8.0  # joins narrower than about this are cut: a kidney touches the liver over a few mm


def _cropped(fn):
    """Run a per-mask function on the mask's bounding box only (plus a margin), pasting the
    int32 result back: the kidneys are a few percent of a scan's voxels."""

    def wrapper(mask: np.ndarray, sp) -> np.ndarray:
        out = np.zeros(mask.shape, np.int32)
        boxes = ndimage.find_objects(mask.astype(np.uint8))
        if not boxes:
            return out
        box = tuple(slice(max(0, b.start - 1), min(n, b.stop + 1)) for b, n in zip(boxes[0], mask.shape))
        out[box] = fn(np.ascontiguousarray(mask[box]), sp)
        return out

    wrapper.__doc__ = fn.__doc__
    return wrapper


@_cropped
def _split_at_necks(mask: np.ndarray, sp) -> np.ndarray:
    """Slice-by-slice parts of ``mask`` (int32 ids, 0 outside): regions eroded by half a neck
    width become seeds, and every voxel joins its nearest seed on its own slice; what no seed
    reaches on its slice (a region too thin to keep one) stays one part per 2D region."""
    iterations = max(1, int(round(NECK_MM / 2 / min(sp[1], sp[2]))))
    cores = ndimage.binary_erosion(mask, structure=_STRUCT_2D, iterations=iterations)
    seeds, n = ndimage.label(cores, structure=_STRUCT_2D)
    parts = np.zeros(mask.shape, np.int32)
    if n:
        # nearest seed: a huge z spacing keeps the search in-plane wherever the slice has a seed
        _, idx = ndimage.distance_transform_edt(seeds == 0, sampling=(1e6, sp[1], sp[2]), return_indices=True)
        zz = np.nonzero(mask)[0]
        same_slice = idx[0][mask] == zz
        nearest = seeds[idx[0][mask], idx[1][mask], idx[2][mask]]
        parts[mask] = np.where(same_slice, nearest, 0)
    return _number_the_rest(mask, parts, n, _STRUCT_2D)


@_cropped
def _split_at_necks_3d(mask: np.ndarray, sp) -> np.ndarray:
    """3D parts of ``mask`` (int32 ids): voxels deeper than half a neck width are seeds, every
    voxel joins its nearest seed; what no seed reaches within its own connected region keeps an
    id of its own."""
    depth = ndimage.distance_transform_edt(mask, sampling=sp)
    seeds, n = ndimage.label(depth > NECK_MM / 2, structure=_STRUCT_3D)
    parts = np.zeros(mask.shape, np.int32)
    if n:
        _, idx = ndimage.distance_transform_edt(seeds == 0, sampling=sp, return_indices=True)
        parts[mask] = seeds[idx[0][mask], idx[1][mask], idx[2][mask]]
        # a voxel may not join a seed of another connected region
        regions, _ = ndimage.label(mask, structure=_STRUCT_3D)
        seed_region = np.zeros(n + 1, np.int64)
        seed_region[seeds[seeds > 0]] = regions[seeds > 0]
        stray = mask & (seed_region[parts] != regions)
        parts[stray] = 0
    return _number_the_rest(mask, parts, n, _STRUCT_3D)


def _number_the_rest(mask, parts, n, structure) -> np.ndarray:
    """Give the voxels of ``mask`` that no seed took (``parts`` 0) ids of their own, one per
    connected piece, after the ``n`` seeds' ids."""
    lonely = mask & (parts == 0)
    if lonely.any():
        extra, _ = ndimage.label(lonely, structure=structure)
        parts[lonely] = extra[lonely] + n
    return parts


def atlas_log_density(zz, yy, xx, sp, spine: SpineFrame, pr) -> np.ndarray:
    """The kidney atlas's log-density at voxels (index arrays on a grid of spacing ``sp``)."""
    atlas = pr["atlas_log_density"]
    b = pr["atlas_bin_mm"]
    ix = np.floor((np.abs(xx * sp[2] - spine.x_mm[zz]) - pr["atlas_dx_mm"][0]) / b).astype(np.int64)
    iy = np.floor((yy * sp[1] - spine.front_y_mm[zz] - pr["atlas_dy_mm"][0]) / b).astype(np.int64)
    inside = (ix >= 0) & (ix < atlas.shape[0]) & (iy >= 0) & (iy < atlas.shape[1])
    out = np.full(len(ix), atlas.min(), np.float32)
    out[inside] = atlas[ix[inside], iy[inside]]
    return out


def _distance_mm(regions, a: int, b: int, boxes, sp) -> float:
    """Shortest distance (mm) from region ``b`` to region ``a``, within their joint bounding box."""
    box = tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(boxes[a - 1], boxes[b - 1]))
    sub = regions[box]
    dist = ndimage.distance_transform_edt(sub != a, sampling=sp)
    return float(dist[sub == b].min())


def side_of(dx_mm: float) -> str:
    """The side a region lies on, from its centre's distance to the midline (LPS: +x is the
    patient's left); within 15 mm of it, "midline"."""
    return "midline" if abs(dx_mm) < 15 else ("left" if dx_mm > 0 else "right")


def _group(removed, reasons, small, sp, mid, step, shape, notes) -> AnatomyVerdict:
    groups = np.zeros(removed.shape, np.int16)
    regions: list[RemovedRegion] = []
    vox_ml = float(np.prod(sp)) / 1000.0
    xs = np.arange(small.shape[2]) * sp[2]
    outer = ndimage.find_objects(removed)  # each reason's bounding box: label there, not everywhere
    for rid, (label, reason) in enumerate(reasons, start=1):
        if rid > len(outer) or outer[rid - 1] is None:
            continue
        ob = outer[rid - 1]
        lab, n = ndimage.label(removed[ob] == rid, structure=_STRUCT_3D)
        for k, inner in enumerate(ndimage.find_objects(lab), start=1):
            box = tuple(slice(o.start + i.start, o.start + i.stop) for o, i in zip(ob, inner))
            piece = lab[inner] == k
            what = small[box][piece]
            n_vox = int(np.count_nonzero(what == TUMOR) if label == "tumor" else np.count_nonzero(what))
            zz, _, xx = np.nonzero(piece)
            cz = int(round(zz.mean())) + box[0].start
            dx = float(xs[int(round(xx.mean())) + box[2].start] - mid[cz])
            side = side_of(dx)
            new_id = len(regions) + 1
            groups[box][piece] = new_id
            regions.append(
                RemovedRegion(
                    new_id,
                    label,
                    side,
                    round(n_vox * vox_ml, 1),
                    (float(box[0].start * sp[0]), float((box[0].stop - 1) * sp[0])),
                    reason,
                    (int(box[0].start), int(box[0].stop - 1)),
                )
            )
    if step > 1 and regions:
        # the grid sees every step-th voxel: a removed region's full-resolution edge falls on
        # grid points that read as background. Grow removed ids one grid voxel into background
        # (never into a kept region), so no rim of a removed region is left behind in fragments
        grown = ndimage.grey_dilation(groups, size=(1, 3, 3))
        edge = (groups == 0) & (small == BACKGROUND) & (grown > 0)
        groups[edge] = grown[edge]
    return AnatomyVerdict(groups, step, shape, regions, notes)


# --------------------------------------------------------------------------------------------- kidney left
@dataclasses.dataclass(frozen=True)
class TumorWithoutKidney:
    """A kidney+tumor region that holds tumor but less kidney tissue than any tumor-bearing kidney
    in KiTS19 kept: the draft calls (nearly) a whole kidney tumor. A note, nothing is changed."""

    side: str  # "right", "left" or "midline"
    tumor_ml: float
    kidney_ml: float

    def describe(self) -> str:
        least = priors()["kits_least_kidney_left_ml"]
        return (
            f"{self.side} kidney: {self.tumor_ml:.0f} mL called tumor with {self.kidney_ml:.0f} mL of kidney left, "
            f"less than any tumor-bearing kidney in KiTS19 keeps ({least:.0f} mL): check the tumor's outline"
        )


def tumor_without_kidney(labels: np.ndarray, spacing, spine: SpineFrame | None = None) -> list[TumorWithoutKidney]:
    """The kidney+tumor regions (26-connected, on the check's grid, at least ``min_kidney_ml``) whose
    tumor leaves less kidney than ``kits_least_kidney_left_ml``: in the 160 KiTS19 volumes every
    tumor-bearing side kept at least that much kidney, so such a draft has most likely called
    kidney tumor (a network guess on unenhanced CT looks like this). Regions cut by the volume's
    first or last slice are left out: a kidney partly in view may show only its tumor."""
    pr = priors()
    least = pr["kits_least_kidney_left_ml"]
    step = grid_step(labels.shape[1:])
    small = labels[:, ::step, ::step]
    sp = np.asarray(spacing, float) * [1, step, step]
    vox_ml = float(np.prod(sp)) / 1000.0
    parts, n = ndimage.label(small > BACKGROUND, structure=_STRUCT_3D)
    if not n:
        return []
    flat = parts.ravel()
    total = np.bincount(flat, minlength=n + 1) * vox_ml
    tumor = np.bincount(flat, weights=(small == TUMOR).ravel(), minlength=n + 1) * vox_ml
    kidney = np.bincount(flat, weights=(small == KIDNEY).ravel(), minlength=n + 1) * vox_ml
    mid = midline_mm(spine, labels.shape, spacing)
    out = []
    for j, box in enumerate(ndimage.find_objects(parts), start=1):
        if total[j] < pr["min_kidney_ml"] or tumor[j] == 0 or kidney[j] >= least:
            continue
        if box[0].start == 0 or box[0].stop == small.shape[0]:
            continue
        zz, _, xx = np.nonzero(parts[box] == j)
        cz = int(round(zz.mean())) + box[0].start
        dx = (xx.mean() + box[2].start) * sp[2] - mid[cz]
        out.append(TumorWithoutKidney(side_of(dx), round(float(tumor[j]), 1), round(float(kidney[j]), 1)))
    return out
