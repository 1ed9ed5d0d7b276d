"""Real renal tumor shapes from KiTS19 label volumes, transplanted into the phantoms' kidneys.

The procedural tumors are smooth blobs at a random spot of the kidney's surface. Real ones are
not: KiTS19's 160 label volumes hold 200+ tumors with their own outlines and their own relation
to their kidney (endophytic, exophytic, polar, hilar). A *template* keeps one tumor's mask on a
1.5 mm grid and where its centre lies relative to its kidney (the offset from the kidney's centre
in units of the kidney's half-extent per axis), so that it can be put into another kidney at the
same relative place, mirrored for the other side, scaled by 0.8-1.25 and turned by up to 20
degrees in-plane (within what KiTS shows). Only the label volumes are used, never a CT, and the
cases behind ``../shared/data/kits19-slices`` (the real tumor slices kept for evaluation) are
left out of the library so that no evaluation tumor is trained on.

The library is built once per folder (a few minutes: 160 volumes are decoded) and cached as one
``.npz`` under the training cache folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import KidsegError
from ..io import files, readers, volumes
from ..labels import BACKGROUND, KIDNEY, TUMOR
from .tissues import tumor_texture

TEMPLATE_MM = 1.5
MIN_TUMOR_ML = 0.5
LIBRARY_REVISION = 1


@dataclasses.dataclass
class TumorTemplate:
    mask: np.ndarray  # bool (z, y, x) on a TEMPLATE_MM grid, the tumor centred in it
    offset: np.ndarray  # tumor centre - kidney centre, in kidney half-extents (z, y, x)
    side: int  # +1: the kidney lay at +x (the patient's left in the canonical orientation), -1: -x
    volume_ml: float
    inside_share: float  # share of the tumor's outline inside the kidney's box: 1 endophytic, 0 exophytic
    case: str


def evaluation_cases(folder) -> set[str]:
    """The KiTS case ids (``case_00025``) behind a folder of evaluation slices (``case_00025_z0064``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return set()
    return {m.group(1) for p in folder.iterdir() if (m := re.match(r"^(case_\d{5})", p.name))}


def templates_of_case(labels: np.ndarray, spacing) -> list[TumorTemplate]:
    """Every tumor of one KiTS label volume (canonical (z, y, x)) of MIN_TUMOR_ML or more."""
    sp = np.asarray(spacing, float)
    vox_ml = float(np.prod(sp)) / 1000.0
    tumor = labels == TUMOR
    if not tumor.any():
        return []
    meta, _ = ndimage.label(labels > BACKGROUND, structure=np.ones((3, 3, 3)))
    parts, n = ndimage.label(tumor, structure=np.ones((3, 3, 3)))
    midline_x = np.median(np.nonzero(labels > BACKGROUND)[2]) * sp[2]  # between the kidneys: left of it, right
    out = []
    for i, box in enumerate(ndimage.find_objects(parts), start=1):
        m = parts[box] == i
        if m.sum() * vox_ml < MIN_TUMOR_ML:
            continue
        # its kidney: the kidney voxels of the kidney+tumor region the tumor belongs to
        region = np.bincount(meta[box][m]).argmax()
        kidney = (meta == region) & (labels == KIDNEY)
        if kidney.sum() * vox_ml < 5.0:  # a tumor that replaced its kidney has no kidney frame
            continue
        kz = np.argwhere(kidney[::2, ::4, ::4]) * [2, 4, 4] * sp
        k_centre = kz.mean(0)
        k_half = np.maximum((kz.max(0) - kz.min(0)) / 2, 5.0)
        t_centre = (np.argwhere(m).mean(0) + [s.start for s in box]) * sp
        # the tumor on the template grid (nearest neighbour), centred
        step = np.maximum(1, np.round(TEMPLATE_MM / sp)).astype(int)
        small = m[:: step[0], :: step[1], :: step[2]]
        if small.sum() < 8:
            continue
        zoom = sp * step / TEMPLATE_MM
        small = ndimage.zoom(small.astype(np.float32), zoom, order=1) > 0.5
        if not small.any():
            continue
        kbox = np.concatenate([kz.min(0), kz.max(0)])
        tz = np.argwhere(small) * TEMPLATE_MM + np.array([s.start for s in box]) * sp
        inside = np.all((tz >= kbox[:3]) & (tz <= kbox[3:]), axis=1).mean()
        side = 1 if t_centre[2] >= midline_x else -1
        out.append(
            TumorTemplate(
                mask=small,
                offset=(t_centre - k_centre) / k_half,
                side=side,
                volume_ml=float(m.sum() * vox_ml),
                inside_share=float(inside),
                case="",
            )
        )
    return out


def _library_file(root: Path, exclude: set[str]) -> Path:
    from ..training import cache_root

    stamp = f"{LIBRARY_REVISION}|{root.resolve()}|{sorted(exclude)}"
    return cache_root() / f"tumor-library-{hashlib.sha1(stamp.encode()).hexdigest()[:12]}.npz"


def _case_templates(case: Path) -> list[TumorTemplate]:
    lab = readers.read_labels(case / volumes.KITS_LABELS)
    return templates_of_case(lab.array, lab.geometry.spacing)


def _map(fn, items, jobs: int):
    """``fn`` over ``items`` in order, in ``jobs`` processes when more than one."""
    if jobs <= 1:
        yield from map(fn, items)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(fn, items)


def build_library(root, exclude=(), progress=None, jobs: int = 1) -> Path:
    """Read every ``case_XXXXX/segmentation.nii.gz`` under ``root`` (but ``exclude``d case ids)
    and cache their tumor templates; returns the cache file (re-used when it exists)."""
    root, exclude = Path(root), set(exclude)
    out = _library_file(root, exclude)
    if out.exists():
        return out
    if not root.is_dir():
        raise KidsegError("not a folder of KiTS label volumes", root)
    cases = sorted(
        p
        for p in root.iterdir()
        if volumes.CASE_RE.match(p.name) and p.name not in exclude and (p / volumes.KITS_LABELS).exists()
    )
    if not cases:
        raise KidsegError("holds no case_XXXXX/segmentation.nii.gz to take tumor shapes from", root)
    payload, meta = {}, []
    for n, (case, templates) in enumerate(zip(cases, _map(_case_templates, cases, jobs)), 1):
        for t in templates:
            k = len(meta)
            payload[f"mask_{k}"] = np.packbits(t.mask)
            meta.append(
                {
                    "shape": list(t.mask.shape),
                    "offset": t.offset.tolist(),
                    "side": t.side,
                    "volume_ml": round(t.volume_ml, 2),
                    "inside_share": round(t.inside_share, 3),
                    "case": case.name,
                }
            )
        if progress:
            progress(n, len(cases))
    if not meta:
        raise KidsegError("holds no tumor of 0.5 mL or more to take a shape from", root)
    out.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(out, overwrite=True) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **payload)
    return out


@lru_cache(maxsize=4)
def load_library(path) -> tuple[TumorTemplate, ...]:
    with np.load(path) as f:
        meta = json.loads(bytes(f["meta"]).decode())
        out = []
        for k, m in enumerate(meta):
            mask = np.unpackbits(f[f"mask_{k}"])[: int(np.prod(m["shape"]))].reshape(m["shape"]).astype(bool)
            out.append(
                TumorTemplate(mask, np.array(m["offset"]), m["side"], m["volume_ml"], m["inside_share"], m["case"])
            )
    return tuple(out)


def transplant(rng, template: TumorTemplate, kidney: np.ndarray, spacing, side: int) -> tuple[np.ndarray, tuple]:
    """The template's tumor placed in ``kidney`` (a bool mask on a grid of ``spacing``) at its
    relative place, mirrored to ``side``, randomly scaled (0.8-1.25) and turned (+-20 degrees
    in-plane). Returns (mask in the box, the box as slices); an empty mask when it does not fit."""
    sp = np.asarray(spacing, float)
    step = np.maximum(1, (np.array(kidney.shape) // np.array([64, 96, 96])))
    kz = np.argwhere(kidney[:: step[0], :: step[1], :: step[2]]) * step * sp
    k_centre = kz.mean(0)
    k_half = np.maximum((kz.max(0) - kz.min(0)) / 2, 5.0)
    offset = template.offset.copy()
    mask = template.mask
    if side != template.side:  # the other kidney: mirror left-right
        offset[2] = -offset[2]
        mask = mask[:, :, ::-1]
    scale = float(rng.uniform(0.8, 1.25))
    angle = np.radians(rng.uniform(-20, 20))
    centre_mm = k_centre + offset * k_half
    half_mm = np.array(mask.shape) * TEMPLATE_MM / 2 * scale * 1.45  # room for the rotation
    lo = np.maximum(0, np.floor((centre_mm - half_mm) / sp).astype(int))
    hi = np.minimum(kidney.shape, np.ceil((centre_mm + half_mm) / sp).astype(int) + 1)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    if any(b <= a for a, b in zip(lo, hi)):
        return np.zeros((0, 0, 0), bool), box
    zz, yy, xx = (np.arange(a, b) * s - c for a, b, s, c in zip(lo, hi, sp, centre_mm))
    # target -> template coordinates: undo the turn (in-plane, about z) and the scale
    cy, cx = np.cos(angle), np.sin(angle)
    ty = (cy * yy[:, None] + cx * xx[None, :]) / scale
    tx = (-cx * yy[:, None] + cy * xx[None, :]) / scale
    tz = zz / scale
    iz = np.round(tz / TEMPLATE_MM + mask.shape[0] / 2 - 0.5).astype(int)
    iy = np.round(ty / TEMPLATE_MM + mask.shape[1] / 2 - 0.5).astype(int)
    ix = np.round(tx / TEMPLATE_MM + mask.shape[2] / 2 - 0.5).astype(int)
    ok_z = (iz >= 0) & (iz < mask.shape[0])
    ok_yx = (iy >= 0) & (iy < mask.shape[1]) & (ix >= 0) & (ix < mask.shape[2])
    out = np.zeros(tuple(b - a for a, b in zip(lo, hi)), bool)
    plane = mask[np.clip(iz, 0, mask.shape[0] - 1)][
        :, np.clip(iy, 0, mask.shape[1] - 1), np.clip(ix, 0, mask.shape[2] - 1)
    ]
    out[:] = plane & ok_z[:, None, None] & ok_yx[None]
    return out, box


def radius_field(mask: np.ndarray, spacing) -> np.ndarray:
    """1 at a mask's outline, 0 at its deepest point: what :func:`tissues.tumor_texture` shades by."""
    depth = ndimage.distance_transform_edt(mask, sampling=spacing)
    return (1.0 - depth / max(float(depth.max()), 1e-6)).astype(np.float32)


TRANSPLANT_SHARE = 0.6  # of a phantom's tumors when a library is given; the rest stay procedural


def paint_transplant(
    rng, library, kidney: np.ndarray, side: int, spacing, growable: np.ndarray, look: dict, hu, labels
):
    """Put one library tumor into ``kidney`` (bool mask; ``side`` as in :func:`transplant`), where
    ``growable`` allows, shaded by ``look`` (:func:`tissues.draw_tumor_look`); labels it tumor (2).
    Returns its description for the phantom's info, or None when it did not fit."""
    template = library[int(rng.integers(len(library)))]
    mask, box = transplant(rng, template, kidney, spacing, side)
    if mask.size == 0:
        return None
    mask &= growable[box]
    if mask.sum() < 8:
        return None
    region = hu[box]
    region[mask] = tumor_texture(rng, radius_field(mask, spacing), spacing, look)[mask]
    labels[box][mask] = TUMOR
    vox_ml = float(np.prod(spacing)) / 1000.0
    return {"shape_from": template.case, "volume_ml": round(float(mask.sum()) * vox_ml, 1)}


def kidney_side(kidney: np.ndarray, both: np.ndarray) -> int:
    """+1 when a kidney lies at +x of the two kidneys' middle, else -1 (the templates' convention)."""
    return 1 if np.argwhere(kidney[::2, ::4, ::4])[:, 2].mean() >= np.argwhere(both[::2, ::4, ::4])[:, 2].mean() else -1
