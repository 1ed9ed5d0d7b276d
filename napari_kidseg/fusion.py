"""Fusion of coarse and refined probabilities into KiTS labels, fast enough for every slider move.

``p = alpha * p_coarse + (1 - alpha) * p_refined`` inside the refine patches, ``p_coarse``
elsewhere. Tumor where p(tumor) passes ``tumor_threshold``; kidney where p(kidney) + p(tumor)
passes ``kidney_threshold`` (KiTS's nesting: the kidney label encloses the tumor).

Probabilities are kept as two uint8 channels (0..255 for 0..1) at full resolution: the
kidney+tumor "meta" probability and the tumor probability. Fusion is linear, so blending those two
channels is the same as blending the three class probabilities, and the 1/255 quantisation is far
below any threshold step a user can set. Outside the patches the labels are two integer
comparisons per voxel; only the patch regions need floating point.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from .labels import CYST, KIDNEY, TUMOR

DEFAULT_ALPHA = 0.4  # the coarse stage's weight; best in the paper
DEFAULT_KIDNEY_THRESHOLD = 0.5
DEFAULT_TUMOR_THRESHOLD = 0.5
# the tumor-by-contrast rule (enhancement.py) after fusion; weights/README.md has the figures
DEFAULT_CONTRAST_TUMOR = True
# a tumor region smaller than this (26-connected, in 3D) is left as kidney: about a 10 mm sphere, the size under
# which a renal mass is "too small to characterise" on CT; the fused drafts' false tumor regions are mostly such
# specks (weights/README.md)
MIN_TUMOR_ML = 0.5


@dataclasses.dataclass
class RefinedRegion:
    """Refined probabilities on one slice: a rectangle (y0, x0) of the slice and where patches were."""

    y0: int
    x0: int
    meta: np.ndarray  # uint8 (h, w), p(kidney)+p(tumor)(+p(cyst)) * 255
    tumor: np.ndarray  # uint8 (h, w)
    covered: np.ndarray  # bool (h, w)
    cyst: np.ndarray | None = None  # uint8 (h, w), from a network with KiTS23's cyst class

    @property
    def window(self):
        h, w = self.meta.shape
        return slice(self.y0, self.y0 + h), slice(self.x0, self.x0 + w)


def _threshold_level(t: float) -> int:
    """A probability threshold as the uint8 level a probability must exceed.

    Blended (float) levels are compared against this level + 0.5, which gives the same answer
    as the integer comparison for every integer level: alpha = 0 or 1 reproduces the refined or
    coarse labels exactly.
    """
    return int(np.floor(np.clip(t, 0.0, 1.0) * 255.0))


def labels_from_levels(meta, tumor, kidney_threshold: float, tumor_threshold: float, cyst=None) -> np.ndarray:
    """KiTS labels from probability levels: uint8 (0..255), or float levels from :func:`blend`.

    With a ``cyst`` channel (a KiTS23 network), a mass over the tumor threshold is a cyst where
    p(cyst) is the larger of the two, a tumor otherwise."""
    meta, tumor = np.asarray(meta), np.asarray(tumor)
    kl, tl = _threshold_level(kidney_threshold), _threshold_level(tumor_threshold)
    if meta.dtype != np.uint8:
        kl, tl = kl + 0.5, tl + 0.5
    labels = (meta > kl).astype(np.uint8)  # KIDNEY == 1
    if cyst is None:
        labels[tumor > tl] = TUMOR
        return labels
    cyst = np.asarray(cyst)
    labels[(tumor > tl) & (tumor >= cyst)] = TUMOR
    labels[(cyst > tl) & (cyst > tumor)] = CYST
    return labels


def blend(coarse: np.ndarray, refined: np.ndarray, alpha: float) -> np.ndarray:
    """alpha * coarse + (1 - alpha) * refined, on uint8 probability levels, as float32 levels."""
    alpha = float(np.clip(alpha, 0.0, 1.0))
    return alpha * coarse.astype(np.float32) + (1.0 - alpha) * refined.astype(np.float32)


def _fuse_region(
    labels, coarse_meta, coarse_tumor, region: RefinedRegion, alpha, kidney_threshold, tumor_threshold, coarse_cyst=None
) -> None:
    """Overwrite one slice's labels inside its refine patches with the blended probabilities."""
    win, cov = region.window, region.covered
    m = blend(coarse_meta[win][cov], region.meta[cov], alpha)
    t = blend(coarse_tumor[win][cov], region.tumor[cov], alpha)
    c = None if coarse_cyst is None or region.cyst is None else blend(coarse_cyst[win][cov], region.cyst[cov], alpha)
    labels[win][cov] = labels_from_levels(m, t, kidney_threshold, tumor_threshold, c)


def fuse_slice(
    coarse_meta: np.ndarray,
    coarse_tumor: np.ndarray,
    region: RefinedRegion | None,
    alpha: float,
    kidney_threshold: float,
    tumor_threshold: float,
    coarse_cyst: np.ndarray | None = None,
) -> np.ndarray:
    """Labels of one slice (2D) from its coarse channels and its refined region, if any."""
    labels = labels_from_levels(coarse_meta, coarse_tumor, kidney_threshold, tumor_threshold, coarse_cyst)
    if region is not None:
        _fuse_region(labels, coarse_meta, coarse_tumor, region, alpha, kidney_threshold, tumor_threshold, coarse_cyst)
    return labels


def fuse_volume(
    coarse_meta: np.ndarray,
    coarse_tumor: np.ndarray,
    refined: dict[int, RefinedRegion],
    alpha: float,
    kidney_threshold: float,
    tumor_threshold: float,
    coarse_cyst: np.ndarray | None = None,
) -> np.ndarray:
    """Labels of the whole volume: one vectorised pass for the coarse part, then the patch regions."""
    labels = labels_from_levels(coarse_meta, coarse_tumor, kidney_threshold, tumor_threshold, coarse_cyst)
    for z, region in refined.items():
        cz = None if coarse_cyst is None else coarse_cyst[z]
        _fuse_region(labels[z], coarse_meta[z], coarse_tumor[z], region, alpha, kidney_threshold, tumor_threshold, cz)
    return labels


def refined_only_labels(shape, refined: dict[int, RefinedRegion], kidney_threshold, tumor_threshold) -> np.ndarray:
    """Labels from the refine network alone, inside its patches (0 elsewhere)."""
    labels = np.zeros(shape, np.uint8)
    for z, region in refined.items():
        sub = labels[z][region.window]
        sub[region.covered] = labels_from_levels(
            region.meta, region.tumor, kidney_threshold, tumor_threshold, region.cyst
        )[region.covered]
    return labels


def tumor_specks(labels: np.ndarray, spacing, min_ml: float | None = None) -> tuple[np.ndarray, int]:
    """(flat indices into ``labels``, a volume, of the tumor voxels in 26-connected masses (tumor
    and cyst together) under ``min_ml``, default :data:`MIN_TUMOR_ML`; how many such masses): what
    a draft should call kidney, not tumors. A solid nodule on a large cystic mass is not a speck."""
    min_ml = MIN_TUMOR_ML if min_ml is None else min_ml
    labels = np.asarray(labels)
    # the masses' bounding box from max projections (TUMOR and CYST are the top labels): no
    # whole-volume temporaries, whose fresh pages cost 0.5 s on a 512 x 512 x 300 CT
    zs = np.flatnonzero(labels.max(axis=(1, 2)) >= TUMOR)
    if not len(zs) or min_ml <= 0:
        return np.zeros(0, np.int64), 0
    slab = labels[zs[0] : zs[-1] + 1]
    ys, xs = (np.flatnonzero(slab.max(axis=a) >= TUMOR) for a in ((0, 2), (0, 1)))
    box = tuple(slice(int(v[0]), int(v[-1]) + 1) for v in (zs, ys, xs))
    sub = labels[box]
    mass = (sub == TUMOR) | (sub == CYST)
    parts, n = ndimage.label(mass, structure=np.ones((3, 3, 3), bool))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    tumor = sub == TUMOR
    small = np.bincount(parts.ravel(), minlength=n + 1) * voxel_ml < min_ml
    small &= np.bincount(parts[tumor], minlength=n + 1) > 0  # a small cyst alone is no tumor speck
    small[0] = False
    where = np.nonzero(small[parts] & tumor)
    flat = np.ravel_multi_index(tuple(w + b.start for w, b in zip(where, box)), labels.shape)
    return flat.astype(np.int64), int(small.sum())


def describe_specks(n: int, ml: float) -> str | None:
    """What the speck step did, in one line (None when it found none)."""
    if not n:
        return None
    what = f"{n} tumor speck(s) under {MIN_TUMOR_ML:g} mL ({ml:.2f} mL in all)"
    return f"{what} left as kidney: too small to call a tumor"


def specks_to_kidney(labels: np.ndarray, specks: np.ndarray, z: int | None = None) -> np.ndarray:
    """``labels`` (a volume, or slice ``z`` of one) with the tumor voxels at ``specks`` (flat indices
    into the volume, :func:`tumor_specks`) made kidney; the same array when none is there."""
    if z is not None:  # this slice's specks, as indices into it
        n = labels.size
        lo, hi = np.searchsorted(specks, (z * n, (z + 1) * n))
        specks = specks[lo:hi] - z * n
    if not len(specks):
        return labels
    out = labels.copy()
    flat = out.reshape(-1)
    flat[specks[flat[specks] == TUMOR]] = KIDNEY
    return out
