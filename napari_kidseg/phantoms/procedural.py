"""Synthetic abdominal CTs with kidneys, tumors and cysts, in HU, with KiTS19 labels.

No CT dataset can be downloaded here, so the sample data, the tests and the bundled weights
all come from this generator. Every case is a deterministic function of its seed.

Anatomy (all sizes in millimetres, laid out in the canonical LPS grid of :mod:`geometry`): body
outline with skin, subcutaneous fat and an abdominal-wall muscle ring; visceral fat; vertebral
bodies with cortex, cancellous bone and canal, posterior elements, ribs on the upper slices;
paraspinal (erector spinae), quadratus lumborum and psoas muscles; iliac wings with gluteal
and iliacus muscles and the bladder below the iliac crest; liver, spleen, aorta and IVC; a
crowded abdomen of small-bowel loops and colon (air, fluid, stool or oral contrast), pancreas,
duodenum, adrenals, lymph nodes and random soft-tissue lumps; two kidneys (cortex, medulla,
renal sinus fat opening at the hilum, pelvis) in perirenal fat, tilted as in life, the left one
higher; 0-3 tumors (solid, necrotic or cystic-appearing; endophytic or exophytic; on
one or both kidneys); simple cysts; then partial volume (blur), noise, and sometimes a circular
reconstruction field of view padded with -3024 as GE scanners write it, and often the
scanner table. ``random_contrast`` relights a case with random tissue HU (for training).

Labels follow KiTS19: 0 background, 1 kidney, 2 tumor. A simple cyst touching a kidney is part
of label 1 (KiTS19 had no cyst class; it is not tumor), renal sinus fat is background.

Matched against the real data in ../shared/data (figures measured by ``tests/test_phantom.py``
and the statistics script in the model card's history):

* Kidney volume: KiTS19 labels give about 150-250 mL per kidney (e.g. case 0: 215 and 180 mL;
  case 1: 244 and 238 mL); kidney semi-axes here are drawn so one kidney is 110-300 mL.
* Kidney in-plane extent: 75-95 mm in KiTS19; here 70-100 mm.
* Tumors: KiTS19 tumors range from about 1 cm to over 10 cm (median about 4 cm); here 0-3
  tumors of 1-12 cm diameter, log-uniform, so small ones are common and large ones occur.
* HU on the real portal-venous/low-contrast CT (totalseg-abdomen-3mm): fat about -100, muscle
  20-60, liver 46, kidney median 14 (5-95%: -25..39, a poorly enhanced kidney), air -1024.
  Phases here: non-contrast (kidney 25-45 HU), arterial (cortex 150-260, medulla 60-110) and
  venous (kidney 130-200); every tissue's HU is further jittered per case (domain
  randomisation, as in SynthSeg) so a model does not learn one scanner's numbers.
* Spacing and size: in-plane 0.5-1.0 mm at 512 x 512 (field of view 300-500 mm), slices
  0.5-5 mm, 80-600 slices; orientation on disk varies (KiTS's I-P-L, LPS, RAS, ...).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from ..io import geometry, volumes
from ..labels import BACKGROUND, KIDNEY, TUMOR
from .shapes import Blob, Grid, Painter, paint_table, rotation
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
from .tumor_shapes import load_library, paint_transplant

# Bumped whenever the same seed draws a different phantom. Caches of generated phantoms (the
# fine-tune replay cases, the benchmark's CTs) are keyed by it, so none outlives a revision.
GENERATOR_REVISION = 6


def make_phantom(
    seed: int,
    *,
    matrix: int = 512,
    max_slices: int = 600,
    min_slices: int = 1,
    slice_thickness: float | None = None,
    phase: str | None = None,
    n_tumors: int | None = None,
    disk_layout: str | None = None,
    random_contrast: float = 0.0,
    labels: str = "kits19",
    tumor_library=None,
) -> PhantomCase:
    """One synthetic abdominal CT and its labels, deterministic in ``seed``.

    ``matrix`` sets the in-plane size (512 like a real CT; tests use 96-128, which gives a coarser
    spacing over the same field of view); ``max_slices`` bounds the slice count by thickening
    slices, as a scanner protocol would. ``random_contrast`` is the probability that every tissue
    gets an independent random HU instead of its phase's (SynthSeg-style domain randomisation for
    training: a network then has to recognise a kidney by shape and place, not by brightness).
    ``labels``: "kits19" (a simple cyst is kidney, 1) or "kits23" (cysts get their own label, 3);
    the CT is the same either way. ``tumor_library``: a :mod:`tumor_shapes` library file; then
    most tumors take a real KiTS19 tumor's shape and place relative to its kidney.

    The sections below draw in this order, each from its stream; reordering them (or their draws)
    changes every phantom of every seed, which the golden-checksum tests catch.
    """
    rng = np.random.default_rng(seed)
    phase = phase or str(rng.choice(PHASES, p=[0.25, 0.35, 0.40]))
    jitter = phase_hu(rng, TISSUE_HU, PHASES.index(phase))
    # what later revisions added draws from their own streams, so the old anatomy of a seed stays put
    rng2 = np.random.default_rng([seed, 2])
    rng3 = np.random.default_rng([seed, 3])  # revision 5's draws
    shuffled = randomise_contrast(rng2, jitter, random_contrast, SOFT_TISSUES, ("fluid", "cyst", "pelvis"))

    scan, fat_sc = _scan_frame(rng, jitter, matrix, max_slices, min_slices, slice_thickness)
    _paint_body_wall(rng, scan, fat_sc)
    _paint_spine_and_muscles(rng, rng2, scan)
    _paint_great_vessels(rng, scan)
    _paint_liver_and_spleen(rng, rng3, scan)
    _paint_bowel_loops(rng, scan)
    kw = {"kid_z": scan.kid_z, "z_lo": scan.z_lo, "body_ax": scan.body_ax, "spine_y": scan.spine_y}
    _paint_pelvis(rng2, scan.paint, jitter, **kw)
    _pack_abdomen(rng2, scan.paint, jitter, post=scan.post, **kw)
    kidneys, info_kidneys = _paint_kidneys(rng, rng2, rng3, scan)
    cysts = _paint_cysts(rng, scan, kidneys, cyst_label(labels))
    tumors = _paint_tumors(rng, scan, kidneys, n_tumors, phase, rng3, tumor_library)
    if rng2.random() < 0.6:  # the scanner table under the patient's back
        paint_table(rng2, scan.grid, scan.hu, scan.post * float(scan.scale_z.max()) + 10)
    ct_arr, look = _form_image(rng, scan)

    layout = disk_layout or str(rng.choice(DISK_LAYOUTS))
    grid = scan.grid
    ct = volumes.volume_in_memory(ct_arr, grid.spacing, grid.origin, geometry.direction_from_code(layout))
    info = {
        "generator_revision": GENERATOR_REVISION,
        "seed": seed,
        **({"labels": labels} if labels != "kits19" else {}),
        "phase": phase,
        "shape_zyx": list(grid.shape),
        "spacing_zyx_mm": [round(float(s), 4) for s in grid.spacing],
        "disk_layout": layout,
        **look,
        "random_contrast": shuffled,
        "kidneys": info_kidneys,
        "tumors": tumors,
        "cysts": cysts,
    }
    scan.paint.organs[scan.labels > BACKGROUND] = 0  # a tumor grown into bowel is tumor
    return PhantomCase(ct=ct, labels=scan.labels, info=info, organs=scan.paint.organs)


@dataclasses.dataclass
class _Scan:
    """What every section of :func:`make_phantom` draws into, and the body frame it draws around
    (mm; x to the patient's left, y posterior, z superior, the kidneys' level at z = 0)."""

    grid: Grid
    hu: np.ndarray
    labels: np.ndarray
    paint: Painter
    jitter: dict
    fov: float
    body_ax: float  # left-right semi-axis of the body
    body_ap: float
    kid_z: float
    z_lo: float
    z_hi: float
    scale_z: np.ndarray | None = None  # the body outline's wobble along z
    post: float = 0.0  # posterior body extent
    spine_y: float = 0.0


def _scan_frame(rng, jitter, matrix, max_slices, min_slices, slice_thickness) -> tuple[_Scan, float]:
    """Body habitus and scan range: field of view, body size, slices; an empty (air) volume."""
    fov = rng.uniform(300, 500)
    sxy = fov / matrix
    body_ax = rng.uniform(115, min(185, 0.49 * fov + 25))
    body_ap = body_ax * rng.uniform(0.62, 0.85)
    fat_sc = rng.uniform(6, 35)
    kid_z = 0.0
    z_lo = kid_z - rng.uniform(90, 200)
    z_hi = kid_z + rng.uniform(90, 170)
    dz = slice_thickness or float(rng.choice([0.5, 0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0]))
    dz = max(dz, (z_hi - z_lo) / max_slices)
    nz = max(min_slices, int(round((z_hi - z_lo) / dz)))
    shape = (nz, matrix, matrix)
    center_shift = rng.normal(0, 10, 2)
    origin = np.array([z_lo, -fov / 2 + center_shift[0], -fov / 2 + center_shift[1]])
    grid = Grid(shape, (dz, sxy, sxy), origin)
    hu = np.full(shape, jitter["air"], np.float32)
    labels = np.zeros(shape, np.uint8)
    organs = np.zeros(shape, np.uint8)
    scan = _Scan(
        grid, hu, labels, Painter(grid, hu, labels, organs=organs), jitter, fov, body_ax, body_ap, kid_z, z_lo, z_hi
    )
    return scan, fat_sc


def _paint_body_wall(rng, scan: _Scan, fat_sc: float):
    """Skin, subcutaneous fat, muscle wall and visceral fat: an elliptic cylinder wobbling along z."""
    grid, hu, jitter, shape = scan.grid, scan.hu, scan.jitter, scan.grid.shape
    z, y, x = grid.coords((slice(None),) * 3)
    scan.scale_z = 1 + 0.06 * np.sin((z - scan.z_lo) / 90.0 + rng.uniform(0, 6))
    rb = np.sqrt((x / (scan.body_ax * scan.scale_z)) ** 2 + ((y - 10) / (scan.body_ap * scan.scale_z)) ** 2)
    hu[np.broadcast_to(rb < 1.0, shape)] = jitter["skin"]
    inner = 1 - 2.5 / scan.body_ap
    hu[np.broadcast_to(rb < inner, shape)] = jitter["fat"]
    wall_out = inner - fat_sc / scan.body_ap
    wall_in = wall_out - rng.uniform(8, 16) / scan.body_ap
    hu[np.broadcast_to(rb < wall_out, shape)] = jitter["muscle"]
    hu[np.broadcast_to(rb < wall_in, shape)] = jitter["fat"]  # visceral fat
    scan.paint.allowed = np.broadcast_to(rb < inner, shape)
    scan.post = scan.body_ap * scan.scale_z.mean()
    scan.spine_y = 10 + 0.42 * scan.post  # leaves the paraspinal muscles their 4-6 cm behind the vertebrae


def _paint_spine_and_muscles(rng, rng2, scan: _Scan):
    """Paraspinal, quadratus lumborum and psoas muscles, vertebrae, ribs."""
    paint, jitter, spine_y, kid_z = scan.paint, scan.jitter, scan.spine_y, scan.kid_z
    for side in (-1, 1):
        paint.blob(Blob.random(rng, (0, spine_y + 28, side * 32), (400, 28, 26), 2, 0.05), jitter["muscle"])
        # erector spinae fill the back to the skin; quadratus lumborum lies behind each kidney
        paint.blob(
            Blob.random(
                rng2,
                (0, spine_y + rng2.uniform(32, 42), side * rng2.uniform(32, 42)),
                (400, rng2.uniform(25, 35), rng2.uniform(28, 38)),
                2,
                0.05,
            ),
            jitter["muscle"] + rng2.normal(0, 4),
        )
        paint.blob(
            Blob.random(
                rng2,
                (kid_z - 30, spine_y + rng2.uniform(5, 15), side * rng2.uniform(55, 70)),
                (110, rng2.uniform(10, 16), rng2.uniform(16, 24)),
                8,
                0.1,
            ),
            jitter["muscle"] + rng2.normal(0, 4),
        )
    for vz in np.arange(scan.z_lo - 20, scan.z_hi + 30, 32.0):
        paint.blob(Blob.random(rng, (vz, spine_y, 0), (13, 17, 20), 3, 0.0), jitter["bone_cortex"])
        paint.blob(
            Blob.random(rng, (vz, spine_y, 0), (11.5, 15, 18), 3, 0.0), jitter["bone_cancellous"] + rng.normal(0, 30)
        )
        paint.blob(Blob.random(rng, (vz, spine_y + 32, 0), (10, 14, 10), 3, 0.0), jitter["bone_cortex"])
        paint.blob(Blob.random(rng, (vz, spine_y + 24, 0), (16, 6, 7), 0, 0.0), jitter["fluid"])
    for side in (-1, 1):
        # psoas: thin at the top, thicker towards the pelvis
        for k, pz in enumerate(np.arange(kid_z - 40, scan.z_lo - 80, -40.0)):
            r = 8 + 5 * k
            paint.blob(Blob.random(rng, (pz, spine_y - 5, side * (28 + r)), (30, r, r * 1.1), 5, 0.1), jitter["muscle"])
    for rz in np.arange(kid_z + 30, scan.z_hi + 30, rng.uniform(22, 30)):
        for side in (-1, 1):
            for ang in np.linspace(0.15, 1.25, 4):
                ry = 10 + np.cos(ang) * scan.post * 0.85
                rx = side * np.sin(ang) * scan.body_ax * 0.92
                paint.blob(Blob.random(rng, (rz - 10 * ang, ry, rx), (5, 5, 9), 20, 0.0), jitter["bone_cortex"])


def _paint_great_vessels(rng, scan: _Scan):
    """Aorta (left of the midline) and inferior vena cava (right), in front of the spine."""
    aorta_r = rng.uniform(9, 14)
    for vz in np.arange(scan.z_lo - 20, scan.z_hi + 30, 25.0):
        scan.paint.blob(
            Blob.random(rng, (vz, scan.spine_y - 30, 14), (20, aorta_r, aorta_r), 2, 0.02),
            scan.jitter["aorta"],
            organ="vessel",
        )
        scan.paint.blob(
            Blob.random(rng, (vz, scan.spine_y - 28, -26), (20, 11, 15), 2, 0.05), scan.jitter["ivc"], organ="vessel"
        )


def _paint_liver_and_spleen(rng, rng3, scan: _Scan):
    """Liver (patient's right, -x) and spleen (left, posterior), both in the upper abdomen."""
    liver = Blob.random(
        rng,
        (scan.kid_z + rng.uniform(60, 95), 5, -scan.body_ax * 0.38),
        (rng.uniform(70, 95), scan.post * 0.62, scan.body_ax * 0.55),
        10,
        0.12,
    )
    scan.paint.blob(
        liver, scan.jitter["liver"], texture=lambda r: rng.normal(0, 6, r.shape).astype(np.float32), organ="liver"
    )
    # a real spleen is 8-13 cm long and up to 8 cm across; revision 5 draws its in-plane size
    # (it was fixed at 56 x 44 mm, smaller than the spleen next to the left kidney on real CT)
    spleen = Blob.random(
        rng,
        (scan.kid_z + rng.uniform(45, 80), scan.spine_y - 5, scan.body_ax * 0.62),
        (rng.uniform(40, 60), rng3.uniform(26, 42), rng3.uniform(20, 32)),
        15,
        0.12,
    )
    scan.paint.blob(spleen, scan.jitter["spleen"], organ="spleen")


def _paint_bowel_loops(rng, scan: _Scan):
    """Bowel loops in the anterior half: air, fluid or oral contrast inside a wall."""
    jitter, post = scan.jitter, scan.post
    for _ in range(int(rng.integers(8, 20))):
        c = (
            rng.uniform(scan.z_lo, scan.kid_z + 40),
            rng.uniform(-post * 0.7, post * 0.1),
            rng.uniform(-0.6, 0.6) * scan.body_ax,
        )
        r = rng.uniform(10, 22)
        loop = Blob.random(rng, c, (r * rng.uniform(1, 2.5), r, r * rng.uniform(0.8, 1.6)), 40, 0.15)
        content = jitter[str(rng.choice(["air", "fluid", "contrast"], p=[0.45, 0.35, 0.2]))]
        scan.paint.blob(loop, jitter["bowel_wall"], organ="bowel")
        scan.paint.blob(loop, content, inside=0.8, organ="bowel")


def _paint_kidneys(rng, rng2, rng3, scan: _Scan) -> tuple[list, list]:
    """Both kidneys, labelled 1: the left (+x) higher, long axis tilted, hilum facing
    antero-medially; cortex, medullary pyramids, perirenal fat, renal sinus fat and pelvis."""
    grid, hu, labels, paint, jitter = scan.grid, scan.hu, scan.labels, scan.paint, scan.jitter
    kidneys = []
    info_kidneys = []
    for side in (-1, 1):
        length = rng.uniform(48, 66)
        width = rng.uniform(26, 34)
        depth = rng.uniform(21, 27)
        kz = scan.kid_z + (rng.uniform(5, 25) if side > 0 else rng.uniform(-15, 5))
        kc = np.array([kz, scan.spine_y + rng.uniform(-8, 10) - 6, side * rng.uniform(58, 80)])
        rot = rotation(rng, 6)
        tilt = np.deg2rad(rng.uniform(8, 20)) * side
        tz = np.array([[np.cos(tilt), 0, np.sin(tilt)], [0, 1, 0], [-np.sin(tilt), 0, np.cos(tilt)]])
        blob = Blob(
            kc,
            np.array([length, depth, width]),
            tz @ rot,
            rng.normal(size=(3, 3)) * 1.5,
            rng.uniform(0, 2 * np.pi, 3),
            0.05,
        )
        kidneys.append((side, blob))
        # perirenal fat (inside Gerota's fascia): what separates a kidney from bowel, liver, spleen.
        # In lean patients it is a line of 1-3 mm, and after blurring at 3 mm pixels a kidney
        # touches the liver, spleen and muscles with no dark rim: a network must not learn
        # "kidney = the bright blob inside a fat ring" (revision 5; the old margins stay drawn)
        fat_margin = rng2.uniform(3, 16)
        if rng3.random() < 0.4:
            fat_margin = rng3.uniform(0.5, 3.0)
        paint.blob(dataclasses.replace(blob, semi=blob.semi + fat_margin), jitter["fat"])
        sl, rho = paint.blob(blob, jitter["cortex"], label=KIDNEY)
        if sl is None:
            continue
        # medulla: pyramids inside the cortex, distinct only with arterial enhancement
        zz, yy, xx = grid.coords(sl)
        theta = np.arctan2(zz - kc[0], (yy - kc[1]) + 0 * xx)
        pyramids = (rho < 0.78) & (rho > 0.3) & (np.cos(7 * theta + rng.uniform(0, 6)) > -0.3)
        hu[sl][pyramids] = jitter["medulla"]
        # renal sinus: fat at the hilum (medial), with the pelvis inside it
        hilum = blob.surface_point([0, -0.3, -side])
        sinus = Blob.random(
            rng,
            blob.center + 0.75 * (hilum - blob.center),  # opens at the hilum
            (length * 0.45, depth * 0.4, width * 0.35),
            5,
            0.1,
        )
        s_sl, s_rho = sinus.radius_field(grid)
        if s_sl is not None:
            m = (s_rho < 1) & paint.allowed[s_sl]
            hu[s_sl][m] = jitter["fat"]
            labels[s_sl][m & (labels[s_sl] == KIDNEY)] = BACKGROUND
            pel = s_rho < 0.45
            hu[s_sl][pel] = jitter["pelvis"]
            labels[s_sl][pel] = KIDNEY
        info_kidneys.append(
            {
                "side": "left" if side > 0 else "right",
                "center_zyx_mm": kc.round(1).tolist(),
                "semi_axes_mm": [round(length, 1), round(depth, 1), round(width, 1)],
                "perirenal_fat_mm": round(float(fat_margin), 1),
            }
        )
    return kidneys, info_kidneys


def _paint_cysts(rng, scan: _Scan, kidneys, label: int) -> list[dict]:
    """Simple cysts: water density, sharp wall; kidney (KiTS19) or cyst (KiTS23), never tumor."""
    cysts = []
    for _ in range(int(rng.choice([0, 0, 1, 1, 2]))):
        side, kb = kidneys[int(rng.integers(2))]
        d = rng.normal(size=3)
        c = kb.surface_point(d)
        r = rng.uniform(5, 25)
        cyst = Blob.random(rng, kb.center + 0.85 * (c - kb.center), (r, r, r), 0, 0.02)
        scan.paint.blob(cyst, scan.jitter["cyst"], label=label)
        cysts.append({"side": "left" if side > 0 else "right", "diameter_mm": round(2 * r, 1)})
    return cysts


def _paint_tumors(rng, scan: _Scan, kidneys, n_tumors: int | None, phase: str, rng3, tumor_library=None) -> list[dict]:
    """Tumors, labelled 2: 1-12 cm, exophytic, endophytic or mixed, each with the look of a renal
    tumor subtype (:func:`draw_tumor_look`, drawn from ``rng3`` so the anatomy stays put)."""
    jitter = scan.jitter
    if n_tumors is None:
        n_tumors = int(rng.choice([0, 1, 1, 1, 1, 2, 2, 3]))
    tumors = []
    library = ()
    if tumor_library:
        library = load_library(tumor_library)
    for _ in range(n_tumors):
        side, kb = kidneys[int(rng.integers(2))]
        if library and rng3.random() < 0.6:
            drawn = _transplant_tumor(rng3, scan, library, side, phase)
            if drawn is not None:
                tumors.append(drawn)
            continue
        diam = float(np.exp(rng.uniform(np.log(10), np.log(120))))
        r = diam / 2
        growth = str(rng.choice(["exophytic", "endophytic", "mixed"], p=[0.45, 0.25, 0.3]))
        d = rng.normal(size=3)
        d[0] *= 0.6
        surf = kb.surface_point(d)
        depth = {"exophytic": 0.45, "mixed": 0.0, "endophytic": -0.6}[growth] * r
        out = (surf - kb.center) / np.linalg.norm(surf - kb.center)
        c = surf + out * depth if growth != "endophytic" else surf + out * min(depth, -0.3 * r)
        tb = Blob.random(rng, c, r * rng.uniform(0.8, 1.15, 3), 30, 0.1)
        look = draw_tumor_look(rng3, jitter, phase)
        scan.paint.blob(
            tb, 0.0, label=TUMOR, texture=lambda q, look=look: tumor_texture(rng3, q, scan.grid.spacing, look)
        )
        tumors.append(
            {
                "side": "left" if side > 0 else "right",
                "diameter_mm": round(diam, 1),
                "subtype": look["subtype"],
                "core": look["core"],
                "mean_hu": round(look["hu"], 1),
                "growth": growth,
            }
        )
    return tumors


def _transplant_tumor(rng, scan: _Scan, library, side: int, phase: str) -> dict | None:
    """A library tumor (:mod:`tumor_shapes`) in the kidney on ``side`` (+1 left, at +x)."""
    x = scan.grid.axes[2]
    both = scan.labels == KIDNEY
    own = both & ((x[None, None, :] > 0) == (side > 0))
    if not own.any():
        return None
    growable = (scan.hu < 400) & (scan.paint.allowed if scan.paint.allowed is not None else True)
    look = draw_tumor_look(rng, scan.jitter, phase)
    drawn = paint_transplant(rng, library, own, side, scan.grid.spacing, growable, look, scan.hu, scan.labels)
    if drawn is None:
        return None
    return {"side": "left" if side > 0 else "right", "subtype": look["subtype"], "core": look["core"], **drawn}


def _form_image(rng, scan: _Scan) -> tuple[np.ndarray, dict]:
    """Image formation: partial volume (blur), correlated noise, a circular reconstruction field of
    view (padding outside it); the int16 CT and how it looks."""
    grid, hu = scan.grid, scan.hu
    sigma_mm = rng.uniform(0.4, 1.2)
    sigma = [max(0.3, sigma_mm / s) if s < 2.5 * sigma_mm else 0 for s in grid.spacing]
    ndimage.gaussian_filter(hu, sigma, output=hu, truncate=3.0)
    noise_sd = rng.uniform(6, 22)
    hu += rng.standard_normal(grid.shape, dtype=np.float32) * noise_sd
    ndimage.gaussian_filter(hu, [0, 0.5, 0.5], output=hu, truncate=2.0)  # correlated, like filtered back-projection
    # noise on air must not dip below -1024 HU, which volumes reserves for padding (read as air): a
    # phantom then reads back bit for bit
    np.maximum(hu, volumes.AIR_HU, out=hu)
    padded = bool(rng.random() < 0.3)
    if padded:
        origin, fov = grid.origin, scan.fov
        yy = grid.axes[1][:, None] - origin[1] - fov / 2
        xx = grid.axes[2][None, :] - origin[2] - fov / 2
        hu[:, (yy**2 + xx**2) > (fov / 2 * 0.98) ** 2] = -3024
    ct_arr = np.clip(np.round(hu), -3024, 3071).astype(np.int16)
    scan.hu = None  # the float volume is not needed any more
    look = {"noise_sd_hu": round(noise_sd, 1), "blur_sigma_mm": round(sigma_mm, 2), "fov_padding": padded}
    return ct_arr, look


def _paint_pelvis(rng, paint: Painter, jitter: dict, *, kid_z, z_lo, body_ax, spine_y):
    """Iliac wings with the gluteal and iliacus muscles around them, below the iliac crest.

    Large muscles beside bone are what a network trained without them takes for kidneys on the
    lower slices of a real abdomen-pelvis CT.
    """
    crest = kid_z - rng.uniform(95, 135)
    if crest <= z_lo:
        return
    for side in (-1, 1):
        for z in np.arange(crest, z_lo - 10, -6.0):
            depth = (crest - z) / 80.0  # the wing widens and turns forward going down
            # gluteal muscles behind/outside the wing, iliacus in front/inside it
            paint.blob(
                Blob.random(
                    rng,
                    (z, spine_y + 25 - 15 * depth, side * body_ax * rng.uniform(0.5, 0.6)),
                    (8, 32 + 10 * depth, 40),
                    10,
                    0.1,
                ),
                jitter["muscle"] + rng.normal(0, 4),
            )
            paint.blob(
                Blob.random(rng, (z, spine_y - 20, side * body_ax * 0.45), (8, 18, 22), 10, 0.1),
                jitter["muscle"] + rng.normal(0, 4),
            )
            for t in np.linspace(0, 1, 9):  # the wing: a curved plate from the sacroiliac joint outwards
                y = spine_y + 15 - t * (45 + 20 * depth)
                x = side * (35 + t * (body_ax * 0.62 - 35))
                paint.blob(
                    Blob.random(rng, (z, y, x), (4, 5 + 2 * (1 - t), 5 + 2 * (1 - t)), 20, 0.0),
                    jitter["bone_cortex"] * rng.uniform(0.4, 0.9),
                )
    paint.blob(
        Blob.random(rng, (z_lo + 10, spine_y - rng.uniform(80, 110), 0), (35, 30, 40), 10, 0.1), jitter["fluid"]
    )  # bladder


def _pack_abdomen(rng, paint: Painter, jitter: dict, *, kid_z, z_lo, post, body_ax, spine_y):
    """What crowds a real abdomen around the kidneys, drawn before them (they are painted over it).

    Small-bowel loops packed in front and beside the kidneys (mostly soft-tissue or fluid
    content, as on a CT without oral contrast), ascending and descending colon in the flanks, the
    pancreas and duodenum in front of the kidneys and spine, adrenals above them, lymph nodes,
    and a few random soft-tissue lumps: the look-alikes a kidney detector must learn to reject.
    """

    def soft(name, sd=15):
        return jitter[name] + rng.normal(0, sd)

    for _ in range(int(rng.integers(25, 60))):
        c = (rng.uniform(z_lo, kid_z + 50), rng.uniform(-post * 0.75, spine_y - 10), rng.uniform(-0.75, 0.75) * body_ax)
        r = rng.uniform(7, 16)
        loop = Blob.random(rng, c, (r * rng.uniform(1, 3), r, r * rng.uniform(0.8, 2)), 60, 0.2)
        content = str(rng.choice(["feces", "fluid", "air", "contrast"], p=[0.45, 0.3, 0.17, 0.08]))
        paint.blob(loop, soft("bowel_wall"), organ="bowel")
        paint.blob(loop, jitter[content] + (rng.normal(0, 10) if content != "air" else 0), inside=0.75, organ="bowel")
    for side in (-1, 1):  # colon: a column of haustra down each flank, stool mottled with gas
        x = side * body_ax * rng.uniform(0.6, 0.75)
        y = rng.uniform(-0.1, 0.35) * post
        for cz in np.arange(z_lo + 20, kid_z + rng.uniform(40, 90), 18.0):
            r = rng.uniform(14, 24)
            b = Blob.random(rng, (cz, y + rng.normal(0, 6), x + rng.normal(0, 6)), (12, r, r), 20, 0.15)
            paint.blob(b, soft("bowel_wall"), organ="bowel")
            gas = lambda q: np.where(rng.random(q.shape) < 0.3, -900.0, 0.0).astype(np.float32)
            paint.blob(b, jitter["feces"], inside=0.8, texture=gas, organ="bowel")
    pz = kid_z + rng.uniform(0, 30)  # pancreas: across the spine in front of the left kidney
    for t in np.linspace(-0.4, 1.0, 6):
        paint.blob(
            Blob.random(rng, (pz + rng.normal(0, 5), spine_y - 45 + 10 * t, t * 60), (14, 10, 16), 15, 0.2),
            soft("pancreas"),
            organ="pancreas",
        )
    for t in np.linspace(0, 1, 5):  # duodenum: a C around the pancreatic head, in front of the right kidney
        paint.blob(
            Blob.random(
                rng,
                (kid_z - 10 + 40 * t, spine_y - 40 - 10 * np.sin(np.pi * t), -35 - 15 * np.sin(np.pi * t)),
                (12, 10, 10),
                20,
                0.15,
            ),
            soft("bowel_wall"),
            organ="bowel",
        )
    for side in (-1, 1):  # adrenals: thin limbs above and medial to each kidney
        paint.blob(
            Blob.random(rng, (kid_z + rng.uniform(55, 75), spine_y - 10, side * 40), (12, 14, 3), 30, 0.2),
            soft("adrenal"),
            organ="adrenal",
        )
    for _ in range(int(rng.integers(0, 8))):  # para-aortic and mesenteric nodes
        c = (rng.uniform(z_lo, kid_z + 40), spine_y - rng.uniform(20, 70), rng.uniform(-50, 50))
        paint.blob(Blob.random(rng, c, rng.uniform(4, 12, 3), 30, 0.1), soft("node"))
    for _ in range(int(rng.integers(0, 5))):  # random extra "organs" anywhere (SynthSeg-style)
        c = (rng.uniform(z_lo, kid_z + 80), rng.uniform(-post * 0.6, spine_y), rng.uniform(-0.7, 0.7) * body_ax)
        paint.blob(Blob.random(rng, c, rng.uniform(10, 45, 3), 45, 0.25), rng.uniform(-20, 220))
