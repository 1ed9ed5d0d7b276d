"""Synthetic CTs built around real abdominal organ label maps (FLARE 2022 layout).

The procedural phantom (:mod:`procedural`) draws organs as smooth blobs; networks trained on it
call the real spleen, liver and psoas kidney. Here every case keeps the real shapes and
neighbours of 13 organs from one real label map (SynthSeg's idea, Billot et al. 2023: real
anatomy, synthetic images) and adds what the map lacks, consistent with it:

* **Geometry**: a random in-plane scale, rotation and smooth elastic warp, a random in-plane
  spacing, slice thickness and matrix; maps are resampled by nearest neighbour through one
  precomputed index map (cheap: a gather, not an interpolation, per voxel).
* **The frame**: per slice, the midline is the midpoint of the aorta and IVC, and the spine's
  front edge is the aorta's back edge (as in the anatomy check's atlas). Behind it: vertebral
  bodies and discs, the canal, the posterior arch and spinous process, transverse processes,
  psoas (growing downwards), quadratus lumborum and erector spinae; ribs on the upper slices and
  the lung bases behind the liver dome.
* **Body**: a superellipse per slice enclosing the organs and muscles, with skin,
  subcutaneous fat and an abdominal wall of random thickness; visceral fat inside.
* **Bowel**: the free peritoneal space in front of the retroperitoneum is filled with loops from
  a smooth random field (walls, and air, fluid, stool or oral-contrast content).
* **Lesions**: kidney tumors (solid, necrotic or cystic-appearing; endophytic or exophytic,
  1-12 cm) and simple cysts in the real kidneys; as hard negatives labelled background, liver
  and splenic cysts and lesions (hypo- and hyperdense), adrenal nodules and vertebral lesions.
* **Intensities**: tissue HU by contrast phase with per-case jitter, or, with probability
  ``random_contrast``, every tissue at an independent random HU (SynthSeg-style); organ
  textures; partial volume (blur) and correlated noise; often the scanner table.

Labels: FLARE's kidneys (2 right, 13 left) become KiTS label 1, inserted tumors 2, cysts 1.
A map with only one kidney makes a one-kidney case (with a note in ``info``).
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import KidsegError
from ..io import geometry, volumes
from ..labels import BACKGROUND, FLARE_TO_ORGAN, KIDNEY, ORGAN_CODE, TUMOR, organ_map_from
from .shapes import Blob, Grid, paint_table
from .tissues import (
    DISK_LAYOUTS,
    PHASES,
    SOFT_TISSUES,
    TISSUE_HU,
    PhantomCase,
    cyst_label,
    draw_tumor_look,
    phase_hu,
    randomise_contrast,
    tumor_texture,
)
from .tumor_shapes import TRANSPLANT_SHARE, kidney_side, load_library, paint_transplant

# Bumped whenever the same map and seed draw a different case (caches are keyed by it).
LABELMAP_GENERATOR_REVISION = 2

FLARE_LABELS = {
    1: "liver",
    2: "right_kidney",
    3: "spleen",
    4: "pancreas",
    5: "aorta",
    6: "ivc",
    7: "right_adrenal",
    8: "left_adrenal",
    9: "gallbladder",
    10: "esophagus",
    11: "stomach",
    12: "duodenum",
    13: "left_kidney",
}
RIGHT_KIDNEY, LEFT_KIDNEY = 2, 13  # FLARE labels
KIDNEY_LABELS = (RIGHT_KIDNEY, LEFT_KIDNEY)
HELD_OUT_MAPS = 10  # the last 10 maps of a sorted folder (FLARE22_Tr_0041-0050) are never trained on

# extra tissues on top of the procedural phantom's (non-contrast, arterial, venous)
_EXTRA_HU = {
    "gallbladder": (10, 10, 12),
    "stomach_wall": (40, 90, 100),
    "esophagus": (40, 60, 70),
    "lung": (-860, -860, -860),
    "disc": (80, 80, 80),
    "liver_cyst": (8, 10, 12),
    "liver_lesion_hypo": (35, 50, 60),
    "liver_lesion_hyper": (70, 200, 140),
    "spleen_lesion": (30, 60, 70),
    "adrenal_nodule": (20, 50, 60),
    "bone_lytic": (40, 40, 40),
    "bone_sclerotic": (900, 900, 900),
}
# SynthSeg-style random contrast: the procedural phantom's soft tissues and these
RANDOMISED = (
    *(t for t in SOFT_TISSUES if t != "node"),
    "gallbladder",
    "stomach_wall",
    "esophagus",
    "liver_lesion_hypo",
    "liver_lesion_hyper",
    "spleen_lesion",
    "adrenal_nodule",
)  # (no lymph nodes here)


def find_label_maps(folder) -> list[Path]:
    """The label maps (NIfTI/NRRD/MHA) of a folder, sorted; a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KidsegError("not a folder of label maps (--anatomy)", folder)
    maps = sorted(p for p in folder.iterdir() if p.is_file() and volumes.volume_format(p) not in (None, "dicom"))
    if not maps:
        raise KidsegError("no label maps (.nii.gz, .nrrd, .mha) in this folder (--anatomy)", folder)
    return maps


def split_label_maps(maps: list[Path]) -> tuple[list[Path], list[Path]]:
    """The fixed split: all but the last ``HELD_OUT_MAPS`` train, the last ones are held out."""
    if len(maps) <= HELD_OUT_MAPS:
        return list(maps), []
    return list(maps[:-HELD_OUT_MAPS]), list(maps[-HELD_OUT_MAPS:])


@lru_cache(maxsize=4)
def read_label_map(path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A FLARE-style organ map in the canonical orientation, checked; cached per process."""
    vol = volumes.read_volume(path)
    arr = np.asarray(vol.array)
    if arr.ndim != 3:
        raise KidsegError(f"a label map must be 3D, this one has shape {arr.shape}", path)
    if not np.issubdtype(arr.dtype, np.integer) and not np.all(np.mod(arr, 1) == 0):
        raise KidsegError("a label map must hold whole numbers", path)
    values = np.unique(arr)
    unknown = [int(v) for v in values if int(v) not in FLARE_LABELS and int(v) != 0]
    if unknown:
        raise KidsegError(f"unknown label(s) {unknown[:5]}: a FLARE 2022 map has 0-13", path)
    if not any(int(v) in KIDNEY_LABELS for v in values):
        raise KidsegError("the map has no kidney (labels 2 and 13)", path)
    return arr.astype(np.uint8), tuple(float(s) for s in vol.geometry.spacing)


# --------------------------------------------------------------------------------------------- geometry
def _resample(labels, spacing, rng, matrix: int, slice_thickness: float | None, max_slices: int):
    """The map on a new random grid: scale, rotation, elastic warp, spacing; nearest neighbour."""
    nz, ny, nx = labels.shape
    sz, sy, sx = spacing
    organs = np.argwhere(labels.any(axis=0))
    cy, cx = (organs.min(0) + organs.max(0)) / 2.0 * (sy, sx)  # organ centre in mm
    scale = rng.uniform(0.9, 1.1)
    angle = np.deg2rad(rng.uniform(-8, 8))
    fov = rng.uniform(330, 480)
    pix = fov / matrix
    dz = slice_thickness or float(rng.choice([1.25, 1.5, 2.0, 2.5, 3.0, 5.0], p=[0.1, 0.1, 0.2, 0.3, 0.2, 0.1]))
    z_len = nz * sz * rng.uniform(0.92, 1.08)
    dz = max(dz, z_len / max_slices)
    onz = max(1, int(round(z_len / dz)))
    # output pixel centres (mm, relative to the output centre) -> source mm
    oy = (np.arange(matrix) - (matrix - 1) / 2.0) * pix
    ox = oy.copy()
    yy, xx = np.meshgrid(oy, ox, indexing="ij")
    ca, sa = np.cos(angle), np.sin(angle)
    src_y = (ca * yy - sa * xx) / scale + cy
    src_x = (sa * yy + ca * xx) / scale + cx
    # a smooth elastic warp: low-frequency displacement of up to a few mm
    coarse = rng.normal(0, rng.uniform(2, 6), (2, 6, 6))
    warp = [ndimage.zoom(c, (matrix / 6, matrix / 6), order=3)[:matrix, :matrix] for c in coarse]
    src_y += warp[0]
    src_x += warp[1]
    iy = np.round(src_y / sy).astype(np.int64)
    ix = np.round(src_x / sx).astype(np.int64)
    outside = (iy < 0) | (iy >= ny) | (ix < 0) | (ix >= nx)
    iy, ix = np.clip(iy, 0, ny - 1), np.clip(ix, 0, nx - 1)
    iz = np.clip(np.round((np.arange(onz) + 0.5) * dz / (z_len / nz) - 0.5).astype(np.int64), 0, nz - 1)
    out = labels[iz][:, iy, ix]
    out[:, outside] = 0
    return out, (float(dz), float(pix), float(pix))


def _frame(labels, spacing):
    """Per slice: midline x and the spine's front edge y (mm), from the aorta and IVC."""
    nz = labels.shape[0]
    _, sy, sx = spacing
    mid, front = np.full(nz, np.nan), np.full(nz, np.nan)
    for z in range(nz):
        ya, xa = np.nonzero(labels[z] == 5)
        if len(ya) < 3:
            continue
        _, xi = np.nonzero(labels[z] == 6)
        x_ivc = xi.mean() if len(xi) >= 3 else xa.mean() - 30.0 / sx
        mid[z] = (xa.mean() + x_ivc) / 2 * sx
        front[z] = (ya.max() + 1) * sy
    ok = np.isfinite(mid)
    if ok.sum() < 2:  # no aorta: between and in front of the kidneys
        kid = np.argwhere(np.isin(labels, KIDNEY_LABELS))
        mid[:] = kid[:, 2].mean() * sx
        front[:] = kid[:, 1].mean() * sy - 20.0
        return mid, front
    idx = np.arange(nz)
    mid, front = np.interp(idx, idx[ok], mid[ok]), np.interp(idx, idx[ok], front[ok])
    sig = max(1.0, 10.0 / spacing[0])
    return ndimage.gaussian_filter1d(mid, sig, mode="nearest"), ndimage.gaussian_filter1d(front, sig, mode="nearest")


# --------------------------------------------------------------------------------------------- tissues
@dataclasses.dataclass
class _Canvas:
    """The case being drawn: HU, labels and the grid's coordinates (mm)."""

    hu: np.ndarray
    labels: np.ndarray
    organs: np.ndarray  # the resampled FLARE map
    spacing: tuple[float, float, float]
    y: np.ndarray  # (1, ny, 1) mm
    x: np.ndarray  # (1, 1, nx) mm

    def ellipse(self, z0, z1, cy, cx, ry, rx):
        """Mask of per-slice ellipses on slices [z0, z1) (centres and radii per slice or scalars)."""
        n = z1 - z0
        cy, cx, ry, rx = (np.broadcast_to(np.asarray(v, np.float32), (n,))[:, None, None] for v in (cy, cx, ry, rx))
        # separable: a (z, y) and a (z, x) term, so only the sum and the comparison touch every voxel
        return ((self.y - cy) / ry) ** 2 + ((self.x - cx) / rx) ** 2 < 1.0

    @classmethod
    def blank(cls, organs, spacing, air_hu):
        """Air everywhere, no labels, on the resampled map's grid."""
        _, ny, nx = organs.shape
        _, dy, dx = spacing
        return cls(
            np.full(organs.shape, air_hu, np.float32),
            np.zeros(organs.shape, np.uint8),
            organs,
            spacing,
            (np.arange(ny, dtype=np.float32) * dy)[None, :, None],
            (np.arange(nx, dtype=np.float32) * dx)[None, None, :],
        )


def _jitter(rng, phase_idx, random_contrast):
    hu = phase_hu(rng, {**TISSUE_HU, **_EXTRA_HU}, phase_idx)
    fluids = ("fluid", "cyst", "pelvis", "gallbladder", "liver_cyst")
    return hu, randomise_contrast(rng, hu, random_contrast, RANDOMISED, fluids)


def make_labelmap_phantom(
    label_map,
    seed: int,
    *,
    matrix: int = 512,
    max_slices: int = 600,
    slice_thickness: float | None = None,
    phase: str | None = None,
    n_tumors: int | None = None,
    random_contrast: float = 0.0,
    disk_layout: str | None = None,
    site: int | None = None,
    labels: str = "kits19",
    tumor_library=None,
) -> PhantomCase:
    """One synthetic CT around a real organ label map (a path, or ``(array, spacing)``).

    ``tumor_library``: a :mod:`tumor_shapes` library file; then most tumors take a real KiTS19
    tumor's shape and place relative to its kidney instead of a blob's.

    ``site``: the cases of one scanner and protocol. Tissue HU (randomised with probability
    ``random_contrast``), blur and noise are drawn once from the site number and varied little per
    case (HU by 4, blur and noise by 10%); give ``phase`` and ``slice_thickness`` too for a whole
    protocol. The anatomy of a seed is the same with or without a site: the case's own draws are
    made either way, and only the appearance is replaced.

    The sections below run in draw order (every random draw comes from ``rng`` in this order, which
    the golden checksums in tests/test_labelmap_phantom.py pin): spine and back muscles, body
    outline, lungs and ribs, bowel, the spine's HU, organs, lesions, table, image formation.
    """
    src, src_spacing, map_name = _source_map(label_map)
    rng = np.random.default_rng(seed)
    phase = phase or str(rng.choice(PHASES, p=[0.25, 0.35, 0.40]))
    jit, shuffled = _jitter(rng, PHASES.index(phase), random_contrast)
    site_look = None
    if site is not None:
        jit, shuffled, site_look = _site_appearance(seed, site, phase, random_contrast)
    organs, spacing = _resample(src, src_spacing, rng, matrix, slice_thickness, max_slices)
    c = _Canvas.blank(organs, spacing, jit["air"])
    mid, front = _frame(organs, spacing)
    z_mm = np.arange(organs.shape[0]) * spacing[0]
    kid_top, kid_bot, notes = _kidney_span(organs, z_mm)

    structures, bone_shift = _draw_spine_and_back_muscles(rng, c, mid, front, z_mm, kid_top, kid_bot)
    body, wall_out, wall_in, bcy, by1 = _paint_body_outline(rng, c, jit, structures, mid, front)
    free, lung = _paint_lungs_and_ribs(
        rng, c, jit, structures, wall_out, wall_in, mid, front, bcy, z_mm, kid_top, kid_bot
    )
    # -------- bowel: loops from a smooth random field in the free space in front of the spine
    peritoneal = free & ~lung & (c.y < front[:, None, None] + rng.uniform(-5, 15))
    bowel = _paint_bowel(rng, c, jit, peritoneal)
    _shade_spine_and_muscles(rng, c.hu, jit, structures, bone_shift)
    kidney = _paint_organs(rng, c, jit)

    # -------- lesions: hard negatives first, then cysts and tumors in the kidneys
    grid = Grid(organs.shape, spacing, (0.0, 0.0, 0.0))
    negatives = _paint_hard_negatives(rng, c, grid, jit, organs, structures)
    library = load_library(tumor_library) if tumor_library else ()
    cysts = _paint_kidney_lesions(rng, c, grid, jit, kidney, body, n_tumors, cyst_label(labels), phase, library)
    tumors = cysts.pop("tumors")

    if rng.random() < 0.6:
        paint_table(rng, grid, c.hu, float(np.max(by1)) + 5)

    ct_arr, sigma_mm, noise_sd = _form_image(rng, c.hu, spacing, site_look)
    origin = (0.0, -matrix * spacing[1] / 2, -matrix * spacing[2] / 2)
    layout = disk_layout or str(rng.choice(DISK_LAYOUTS))
    ct = volumes.volume_in_memory(ct_arr, spacing, origin, geometry.direction_from_code(layout))
    info = {
        "generator": "labelmap",
        "labelmap_generator_revision": LABELMAP_GENERATOR_REVISION,
        "label_map": map_name,
        "seed": seed,
        "phase": phase,
        "shape_zyx": list(ct_arr.shape),
        "spacing_zyx_mm": [round(s, 4) for s in spacing],
        "disk_layout": layout,
        "noise_sd_hu": round(noise_sd, 1),
        "blur_sigma_mm": round(sigma_mm, 2),
        "random_contrast": shuffled,
        "site": site,
        "tumors": tumors,
        "cysts": cysts["cysts"],
        "hard_negatives": negatives,
        "notes": notes,
    }
    organ_map = organ_map_from(FLARE_TO_ORGAN, organs)
    organ_map[bowel] = ORGAN_CODE["bowel"]
    organ_map[c.labels > BACKGROUND] = 0  # a tumor grown into bowel is tumor
    return PhantomCase(ct=ct, labels=c.labels, info=info, organs=organ_map)


def _source_map(label_map):
    """The organ map, its spacing and the name the case's info gives it."""
    if isinstance(label_map, (str, Path)):
        src, src_spacing = read_label_map(str(label_map))
        return src, src_spacing, Path(label_map).name
    return np.asarray(label_map[0], np.uint8), tuple(label_map[1]), "array"


def _kidney_span(organs, z_mm):
    """Top and bottom of the map's kidneys (mm; a guess without any), and a note for a one-kidney map."""
    kid_z = np.flatnonzero(np.isin(organs, KIDNEY_LABELS).any(axis=(1, 2)))
    kid_top = z_mm[kid_z.max()] if len(kid_z) else z_mm[-1] * 0.6
    kid_bot = z_mm[kid_z.min()] if len(kid_z) else z_mm[-1] * 0.2
    notes = []
    present = set(np.unique(organs).tolist())
    if not all(k in present for k in KIDNEY_LABELS):
        notes.append("one-kidney case: the map has only one kidney in view")
    return kid_top, kid_bot, notes


def _site_appearance(seed: int, site: int, phase: str, random_contrast: float):
    """One site's tissue HU and (blur, noise), drawn from the site number, varied a little per case."""
    site_rng, vary = np.random.default_rng([site, 17]), np.random.default_rng([seed, site, 18])
    site_hu, shuffled = _jitter(site_rng, PHASES.index(phase), random_contrast)
    jit = {k: v + vary.normal(0, 4) for k, v in site_hu.items()}
    site_look = (
        site_rng.uniform(0.4, 1.2) * vary.uniform(0.9, 1.1),
        site_rng.uniform(6, 22) * vary.uniform(0.9, 1.1),
    )
    return jit, shuffled, site_look


def _draw_spine_and_back_muscles(rng, c: _Canvas, mid, front, z_mm, kid_top, kid_bot):
    """Spine and back muscles, drawn where the map has no organ: the structures map (1 bone
    cortex, 2 cancellous, 3 disc, 4 canal, 5 muscle) and the case's cancellous-bone HU shift."""
    organs = c.organs
    nz = organs.shape[0]
    body_ry = rng.uniform(15, 20)  # lumbar vertebral body semi-axes (AP, LR): 30-40 x 40-56 mm
    body_rx = body_ry * rng.uniform(1.3, 1.4)
    period = rng.uniform(30, 36)
    disc = rng.uniform(7, 10)
    phase0 = rng.uniform(0, period)
    vcy = front + body_ry
    structures = np.zeros(organs.shape, np.uint8)  # 1 bone cortex, 2 cancellous, 3 disc, 4 canal, 5 muscle
    bone_shift = rng.normal(0, 25)
    in_disc = ((z_mm + phase0) % period) < disc
    vert = c.ellipse(0, nz, vcy, mid, body_ry, body_rx)
    inner = c.ellipse(0, nz, vcy, mid, body_ry - 2, body_rx - 2)
    structures[vert] = 1
    structures[inner] = 2
    structures[vert & in_disc[:, None, None]] = 3
    canal_r = rng.uniform(7, 10)
    canal_cy = vcy + body_ry + canal_r + 2
    arch = c.ellipse(0, nz, canal_cy, mid, canal_r + 5, canal_r + 6)
    structures[arch & (structures == 0)] = 1
    spin_len = rng.uniform(30, 45)
    spinous = c.ellipse(0, nz, canal_cy + canal_r + spin_len / 2, mid, spin_len / 2, 4)
    structures[spinous & ~in_disc[:, None, None]] = 1
    # transverse processes: a thin bar each side at the arch, on vertebra levels only
    tp = c.ellipse(0, nz, canal_cy - canal_r * 0.3, mid, 4, body_rx + rng.uniform(18, 28))
    structures[tp & (structures == 0) & ~in_disc[:, None, None]] = 1
    structures[c.ellipse(0, nz, canal_cy, mid, canal_r, canal_r)] = 4
    # psoas: thin at the upper pole of the kidneys, thicker downwards
    grow = np.clip((kid_top - 0.3 * (kid_top - kid_bot) - z_mm) / 120.0, 0, 1)
    ps_r = np.where(grow > 0, 6 + grow * rng.uniform(14, 22), 0.01)
    muscles = np.zeros(organs.shape, bool)
    for side in (-1, 1):
        muscles |= c.ellipse(0, nz, front + body_ry * 0.7, mid + side * (body_rx + ps_r * 0.8), ps_r, ps_r * 1.15)
        ql = np.where(z_mm < kid_top - 0.3 * (kid_top - kid_bot), rng.uniform(8, 14), 0.01)
        muscles |= c.ellipse(
            0, nz, front + 2 * body_ry + rng.uniform(0, 10), mid + side * (body_rx + rng.uniform(38, 55)), ql, ql * 1.6
        )
        er_ry, er_rx = rng.uniform(20, 30), rng.uniform(24, 34)
        muscles |= c.ellipse(0, nz, canal_cy + er_ry * 0.9, mid + side * (er_rx * 0.9 + 5), er_ry, er_rx)
    structures[muscles & (structures == 0)] = 5
    structures[organs > 0] = 0  # the map's organs win where a drawn shape overlaps them
    return structures, bone_shift


def _paint_body_outline(rng, c: _Canvas, jit, structures, mid, front):
    """The body outline: a superellipse around organs, spine and muscles, per slice, with skin,
    subcutaneous fat, the abdominal wall and the fat inside it. Returns the body, the outer and
    inner edges of the wall (masks), and the outline's centre (y) and back edge per slice (mm)."""
    organs = c.organs
    nz, ny, nx = organs.shape
    dz, dy, dx = c.spacing
    inside = (organs > 0) | (structures > 0)
    rows = inside.any(axis=2)
    cols = inside.any(axis=1)
    y_front = np.where(rows.any(1), rows.argmax(1) * dy, np.nan)
    y_back = np.where(rows.any(1), (ny - rows[:, ::-1].argmax(1)) * dy, np.nan)
    x_half = np.where(
        cols.any(1),
        np.maximum(
            np.abs(np.where(cols.any(1), cols.argmax(1), 0) * dx - mid),
            np.abs((nx - cols[:, ::-1].argmax(1)) * dx - mid),
        ),
        np.nan,
    )
    idx = np.arange(nz)
    ok = np.isfinite(y_front)
    y_front, y_back, x_half = (np.interp(idx, idx[ok], v[ok]) for v in (y_front, y_back, x_half))
    sig = max(1.0, 15.0 / dz)
    y_front = ndimage.minimum_filter1d(y_front, int(3 * sig) | 1)
    y_back = ndimage.maximum_filter1d(y_back, int(3 * sig) | 1)
    x_half = ndimage.maximum_filter1d(x_half, int(3 * sig) | 1)
    y_front, y_back, x_half = (ndimage.gaussian_filter1d(v, sig, mode="nearest") for v in (y_front, y_back, x_half))
    fat_sc = rng.uniform(5, 40)
    wall = rng.uniform(7, 15)
    margin_front = fat_sc + wall + rng.uniform(2, 15)
    margin_side = fat_sc + wall + rng.uniform(5, 20)
    by0, by1 = y_front - margin_front, y_back + fat_sc * rng.uniform(0.4, 1.0) + 3
    bcy, bry = (by0 + by1) / 2, (by1 - by0) / 2
    brx = x_half + margin_side
    p = rng.uniform(2.0, 2.8)  # 2: an ellipse; larger: a boxier body, flat at the back
    # rb**p = (|y - cy| / ry)**p + (|x - cx| / rx)**p: a (z, y) and a (z, x) term; each shell of
    # constant thickness t is rb < 1 - t / r, compared as powers so no full-volume root is taken
    ay = ((np.abs(c.y - bcy[:, None, None]) / bry[:, None, None]) ** p).astype(np.float32)
    ax = ((np.abs(c.x - mid[:, None, None]) / brx[:, None, None]) ** p).astype(np.float32)
    rbp = ay + ax
    scale_r = np.minimum(bry, brx)[:, None, None]

    def shell(t_mm):
        return (np.clip(1.0 - t_mm / scale_r, 0, 1) ** p).astype(np.float32)

    body = rbp < 1.0
    subcut = rbp < shell(2.5)
    wall_out = rbp < shell(2.5 + fat_sc)
    wall_in = rbp < shell(2.5 + fat_sc + wall)
    del rbp
    hu = c.hu
    hu[body] = jit["skin"]
    hu[subcut] = jit["fat"]
    hu[wall_out] = jit["muscle"]
    hu[wall_in] = jit["fat"]  # visceral and retroperitoneal fat
    return body, wall_out, wall_in, bcy, by1


def _paint_lungs_and_ribs(rng, c: _Canvas, jit, structures, wall_out, wall_in, mid, front, bcy, z_mm, kid_top, kid_bot):
    """Lungs behind the liver dome, ribs on the upper slices; returns the free space inside the
    wall (no organ, no spine or muscle) and the lungs (masks)."""
    organs, hu = c.organs, c.hu
    dz, dy, dx = c.spacing
    liver_z = np.flatnonzero((organs == 1).any(axis=(1, 2)))
    thorax_from = z_mm[liver_z.max()] - rng.uniform(30, 60) if len(liver_z) else np.inf
    free = wall_in & (organs == 0) & (structures == 0)
    lung = free & (z_mm > thorax_from)[:, None, None] & (c.y > front[:, None, None] - 30)
    hu[lung] = jit["lung"] + rng.normal(0, 30)
    rib_z = z_mm > kid_top - (kid_top - kid_bot) * rng.uniform(0.2, 0.6)
    rz, ry_, rx_ = np.nonzero((~wall_in) & wall_out & rib_z[:, None, None])
    ang = np.arctan2(rx_ * dx - mid[rz], ry_ * dy - bcy[rz])  # 0 = straight back
    rib_phase = (z_mm[rz] / rng.uniform(20, 28) + ang / (2 * np.pi) * 3) % 1.0
    keep = (rib_phase < 0.35) & (np.abs(ang) < 2.4)
    hu[rz[keep], ry_[keep], rx_[keep]] = jit["bone_cortex"] * rng.uniform(0.5, 0.9)
    return free, lung


def _shade_spine_and_muscles(rng, hu, jit, structures, bone_shift):
    """The HU of the drawn spine, canal and back muscles."""
    hu[structures == 5] = jit["muscle"] + rng.normal(0, 4)
    hu[structures == 1] = jit["bone_cortex"]
    hu[structures == 2] = jit["bone_cancellous"] + bone_shift
    hu[structures == 3] = jit["disc"]
    hu[structures == 4] = jit["fluid"]


def _paint_organs(rng, c: _Canvas, jit):
    """The map's organs with textures, the contents of stomach and bowel, and the kidneys (labelled
    kidney); returns the kidney mask."""
    organs, hu = c.organs, c.hu
    texture = _smooth_noise(rng, organs.shape, c.spacing, 6.0)
    for lab, name, sd in (
        (1, "liver", 6),
        (3, "spleen", 5),
        (4, "pancreas", 12),
        (5, "aorta", 4),
        (6, "ivc", 6),
        (7, "adrenal", 6),
        (8, "adrenal", 6),
        (9, "gallbladder", 3),
        (10, "esophagus", 6),
        (11, "stomach_wall", 8),
        (12, "bowel_wall", 8),
    ):
        m = organs == lab
        if m.any():
            hu[m] = jit[name] + sd * texture[m]
    _hollow_organ(rng, c, jit, organs == 11, ("air", "fluid", "feces", "contrast"), (0.35, 0.35, 0.2, 0.1))
    _hollow_organ(rng, c, jit, organs == 12, ("fluid", "air", "feces"), (0.6, 0.2, 0.2))
    kidney = np.isin(organs, KIDNEY_LABELS)
    c.labels[kidney] = KIDNEY
    _paint_kidneys(rng, c, jit, kidney, organs)
    return kidney


def _form_image(rng, hu, spacing, site_look):
    """Image formation: partial volume (blur), correlated noise (a site's own when given); the
    int16 CT, the blur (mm) and the noise (HU)."""
    sigma_mm = rng.uniform(0.4, 1.2)
    noise_sd = rng.uniform(6, 22)
    if site_look:
        sigma_mm, noise_sd = site_look
    sigma = [max(0.3, sigma_mm / s) if s < 2.5 * sigma_mm else 0 for s in spacing]
    ndimage.gaussian_filter(hu, sigma, output=hu, truncate=3.0)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * noise_sd
    ndimage.gaussian_filter(hu, [0, 0.5, 0.5], output=hu, truncate=2.0)
    np.maximum(hu, volumes.AIR_HU, out=hu)
    ct_arr = np.clip(np.round(hu), -3024, 3071).astype(np.int16)
    return ct_arr, sigma_mm, noise_sd


def _smooth_noise(rng, shape, spacing, sigma_mm, step=4):
    """Unit-variance smooth noise, made on a coarse grid and enlarged (cheap for 512 x 512)."""
    small_shape = (shape[0], -(-shape[1] // step), -(-shape[2] // step))
    n = rng.standard_normal(small_shape).astype(np.float32)
    sig = [
        max(0.5, sigma_mm / spacing[0]),
        max(0.5, sigma_mm / (spacing[1] * step)),
        max(0.5, sigma_mm / (spacing[2] * step)),
    ]
    ndimage.gaussian_filter(n, sig, output=n)
    n /= max(float(n.std()), 1e-6)
    # blocks, then a box filter of one block's width: a piecewise-linear enlargement at a fraction
    # of the cost of a spline zoom
    big = np.repeat(np.repeat(n, step, axis=1), step, axis=2)[:, : shape[1], : shape[2]]
    ndimage.uniform_filter1d(big, step, axis=1, output=big, mode="nearest")
    ndimage.uniform_filter1d(big, step, axis=2, output=big, mode="nearest")
    return big


def _paint_bowel(rng, c: _Canvas, jit, space):
    """Loops with walls and contents where a smooth random field is high; mesenteric fat between.
    Returns the loops' mask (bowel, for the organ map)."""
    if not space.any():
        return space
    field = _smooth_noise(rng, space.shape, c.spacing, rng.uniform(7, 12), step=4)
    level = rng.uniform(-0.6, 0.1)
    loops = space & (field > level)
    wall = loops & (field < level + rng.uniform(0.15, 0.3))
    content = _smooth_noise(rng, space.shape, c.spacing, 15.0, step=8)
    kinds = ("feces", "fluid", "air", "contrast")
    probs = np.array([0.4, 0.35, 0.17, 0.08])
    edges = np.quantile(content[loops], np.cumsum(probs)[:-1]) if loops.any() else [0, 0, 0]
    c.hu[loops] = jit["fluid"]
    for k, name in enumerate(kinds):
        lo = -np.inf if k == 0 else edges[k - 1]
        hi = np.inf if k == len(kinds) - 1 else edges[k]
        m = loops & (content >= lo) & (content < hi)
        c.hu[m] = jit[name] + (rng.normal(0, 10) if name != "air" else 0)
    c.hu[wall] = jit["bowel_wall"] + rng.normal(0, 8)
    return loops


def _hollow_organ(rng, c: _Canvas, jit, mask, contents, probs):
    """A stomach or duodenum: wall kept, the inside filled with one drawn content."""
    if not mask.any():
        return
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    sub = mask[box]
    step = np.array(c.spacing)
    depth = ndimage.distance_transform_edt(sub, sampling=step)
    lumen = depth > rng.uniform(2.5, 5)
    name = str(rng.choice(contents, p=probs))
    region = c.hu[box]
    region[lumen] = jit[name] + (rng.normal(0, 8) if name != "air" else 0)


def _paint_kidneys(rng, c: _Canvas, jit, kidney, organs):
    """Cortex, medulla and the pelvis inside the map's kidneys."""
    if not kidney.any():
        return
    for lab in KIDNEY_LABELS:
        m = organs == lab
        if not m.any():
            continue
        box = ndimage.find_objects(m.astype(np.uint8))[0]
        sub = m[box]
        depth = ndimage.distance_transform_edt(sub, sampling=c.spacing)
        region = c.hu[box]
        region[sub] = jit["cortex"] + rng.normal(0, 6)
        cortex = rng.uniform(4, 7)
        medulla = sub & (depth > cortex)
        pyramids = medulla & (_smooth_noise(rng, sub.shape, c.spacing, 4.0, step=2) > -0.2)
        region[pyramids] = jit["medulla"] + rng.normal(0, 6)
        deep = sub & (depth > max(cortex + 3, 0.7 * float(depth.max())))
        region[deep] = jit["pelvis"]


def _surface_point(rng, mask):
    """A random voxel on the surface of a mask (index), or None."""
    surf = mask & ~ndimage.binary_erosion(mask)
    pts = np.argwhere(surf)
    if not len(pts):
        return None
    return pts[int(rng.integers(len(pts)))]


def _blob_mask(grid: Grid, blob: Blob, inside=1.0):
    sl, rho = blob.radius_field(grid)
    if sl is None:
        return None, None, None
    return sl, rho < inside, rho


def _paint_hard_negatives(rng, c: _Canvas, grid: Grid, jit, organs, structures) -> list[dict]:
    """Liver and splenic cysts and lesions, adrenal nodules, vertebral lesions: all background."""
    drawn = []
    sp = np.array(c.spacing)
    plans = [
        (1, "liver_cyst", 0.45, (4, 45)),
        (1, "liver_lesion_hypo", 0.35, (6, 40)),
        (1, "liver_lesion_hyper", 0.2, (5, 25)),
        (3, "spleen_lesion", 0.25, (5, 25)),
        (3, "liver_cyst", 0.15, (5, 30)),
        (7, "adrenal_nodule", 0.2, (8, 25)),
        (8, "adrenal_nodule", 0.2, (8, 25)),
    ]
    for organ, kind, prob, (r0, r1) in plans:
        for _ in range(int(rng.integers(1, 4)) if rng.random() < prob else 0):
            m = organs == organ
            pts = np.argwhere(m[:, ::4, ::4]) * [1, 4, 4]
            if not len(pts):
                break
            centre = pts[int(rng.integers(len(pts)))] * sp
            r = float(np.exp(rng.uniform(np.log(r0), np.log(r1)))) / 2
            blob = Blob.random(rng, centre, r * rng.uniform(0.8, 1.2, 3), 30, 0.08)
            sl, inside, _ = _blob_mask(grid, blob)
            if sl is None:
                continue
            allowed = (organs[sl] == organ) | ((organs[sl] == 0) & (organ in (7, 8)))
            inside &= allowed & (c.labels[sl] == BACKGROUND)
            c.hu[sl][inside] = jit[kind] + rng.normal(0, 8)
            drawn.append({"organ": FLARE_LABELS[organ], "kind": kind, "diameter_mm": round(2 * r, 1)})
    drawn += _paint_touching_negatives(rng, c, grid, jit, organs)
    if rng.random() < 0.15:  # a lytic or sclerotic vertebral lesion
        pts = np.argwhere(structures[:, ::4, ::4] == 2) * [1, 4, 4]
        if len(pts):
            centre = pts[int(rng.integers(len(pts)))] * sp
            r = rng.uniform(4, 12)
            kind = str(rng.choice(["bone_lytic", "bone_sclerotic"]))
            sl, inside, _ = _blob_mask(grid, Blob.random(rng, centre, (r, r, r), 0, 0.05))
            if sl is not None:
                inside &= structures[sl] == 2
                c.hu[sl][inside] = jit[kind]
                drawn.append({"organ": "vertebra", "kind": kind, "diameter_mm": round(2 * r, 1)})
    return drawn


# hard negatives that touch a kidney, in a fixed share of cases (revision 2): what real drafts
# called kidney or tumor because it lay on a pole (a liver cyst on the right upper pole, the
# spleen's lesions against the left one); they stay their organ in the organ map
TOUCHING_NEGATIVES = (
    # (organ, kidney it touches, kind, share of cases, diameter range mm)
    (1, 2, "liver_cyst", 0.3, (20, 70)),
    (1, 2, "liver_lesion_hypo", 0.15, (15, 45)),
    (3, 13, "spleen_lesion", 0.2, (10, 35)),
)


def _paint_touching_negatives(rng, c: _Canvas, grid: Grid, jit, organs) -> list[dict]:
    drawn = []
    sp = np.array(c.spacing)
    for organ, kidney, kind, share, (d0, d1) in TOUCHING_NEGATIVES:
        if rng.random() >= share:
            continue
        near = ndimage.distance_transform_edt(organs[:, ::4, ::4] != kidney, sampling=sp * [1, 4, 4])
        pts = np.argwhere((organs[:, ::4, ::4] == organ) & (near < 12.0)) * [1, 4, 4]
        if not len(pts):
            continue
        r = float(rng.uniform(d0, d1)) / 2
        blob = Blob.random(rng, pts[int(rng.integers(len(pts)))] * sp, r * rng.uniform(0.85, 1.15, 3), 30, 0.06)
        sl, inside, _ = _blob_mask(grid, blob)
        if sl is None:
            continue
        inside &= (organs[sl] == organ) & (c.labels[sl] == BACKGROUND)
        c.hu[sl][inside] = jit[kind] + rng.normal(0, 6)
        drawn.append({"organ": FLARE_LABELS[organ], "kind": kind, "diameter_mm": round(2 * r, 1), "touches": "kidney"})
    return drawn


def _paint_kidney_lesions(
    rng, c: _Canvas, grid: Grid, jit, kidney, body, n_tumors, cyst: int, phase: str, library=()
) -> dict:
    """Simple cysts (label 1) and tumors (label 2) in and on the map's kidneys."""
    sp = np.array(c.spacing)
    labs = [lab for lab in KIDNEY_LABELS if (c.organs == lab).any()]
    out = {"cysts": [], "tumors": []}
    if not labs:
        return out
    # tumors and cysts may grow into fat, bowel and the kidney, never into another organ or bone
    growable = body & ((c.organs == 0) | kidney) & (c.hu < 400)
    for _ in range(int(rng.choice([0, 0, 1, 1, 2]))):
        lab = labs[int(rng.integers(len(labs)))]
        pt = _surface_point(rng, c.organs[:, ::2, ::2] == lab)
        if pt is None:
            continue
        r = rng.uniform(5, 25)
        blob = Blob.random(rng, pt * [1, 2, 2] * sp, (r, r, r), 0, 0.02)
        sl, inside, _ = _blob_mask(grid, blob)
        if sl is None:
            continue
        inside &= growable[sl]
        c.hu[sl][inside] = jit["cyst"]
        c.labels[sl][inside] = cyst
        out["cysts"].append({"side": "right" if lab == RIGHT_KIDNEY else "left", "diameter_mm": round(2 * r, 1)})
    if n_tumors is None:
        n_tumors = int(rng.choice([0, 1, 1, 1, 1, 2, 2, 3]))
    for _ in range(n_tumors):
        lab = labs[int(rng.integers(len(labs)))]
        if library and rng.random() < TRANSPLANT_SHARE:
            look = draw_tumor_look(rng, jit, phase)
            own = c.organs == lab
            drawn = paint_transplant(rng, library, own, kidney_side(own, kidney), sp, growable, look, c.hu, c.labels)
            if drawn is not None:
                side = "right" if lab == RIGHT_KIDNEY else "left"
                out["tumors"].append({"side": side, "subtype": look["subtype"], "core": look["core"], **drawn})
            continue
        mask = c.organs[:, ::2, ::2] == lab
        pt = _surface_point(rng, mask)
        if pt is None:
            continue
        centroid = np.argwhere(mask).mean(0)
        diam = float(np.exp(rng.uniform(np.log(10), np.log(120))))
        r = diam / 2
        growth = str(rng.choice(["exophytic", "endophytic", "mixed"], p=[0.45, 0.25, 0.3]))
        surf = pt * [1, 2, 2] * sp
        centre_mm = centroid * [1, 2, 2] * sp
        outward = (surf - centre_mm) / max(np.linalg.norm(surf - centre_mm), 1e-6)
        shift = {"exophytic": 0.45, "mixed": 0.0, "endophytic": -0.6}[growth] * r
        blob = Blob.random(rng, surf + outward * shift, r * rng.uniform(0.8, 1.15, 3), 30, 0.1)
        sl, inside, rho = _blob_mask(grid, blob)
        if sl is None:
            continue
        inside &= growable[sl]
        if not inside.any():
            continue
        look = draw_tumor_look(rng, jit, phase)
        c.hu[sl][inside] = tumor_texture(rng, rho, c.spacing, look)[inside]
        c.labels[sl][inside] = TUMOR
        out["tumors"].append(
            {
                "side": "right" if lab == RIGHT_KIDNEY else "left",
                "diameter_mm": round(diam, 1),
                "subtype": look["subtype"],
                "core": look["core"],
                "mean_hu": round(look["hu"], 1),
                "growth": growth,
            }
        )
    return out
