"""Nephrometry scores of a renal tumor from its segmentation: R.E.N.A.L. (Kutikov and Uzzo 2009),
PADUA (Ficarra et al. 2009) and the C-index (Simmons et al. 2010), after the segmentation-based
definitions of Heller et al. (KiTS19 labels; their open "seg-to-nephrometry").

Each part carries its continuous value beside its points. Geometry, in the canonical ``(z, y, x)``
grid (+z superior, +y posterior, +x the patient's left), on one tumor and its kidney (the
kidney+tumor region the tumor belongs to; parenchyma = its kidney voxels):

- renal sinus: per axial slice, the parenchyma's convex hull less its outer 3 mm, where the voxels
  are not labelled (sinus fat, vessels, collecting system) or, given the CT, are labelled kidney
  but have fat's density (-200..-30 HU): KiTS's labels draw the sinus as kidney, so on KiTS-style
  labels without the CT the sinus is mostly not found. Under 0.5 mL: "no renal sinus found";
- renal hilum: per slice, the unlabelled notches of the parenchyma's convex hull that open to its
  edge, reach at least 5 mm deep and lie medial of the parenchyma's centre; their largest 3D
  connected part. The polar lines are its first and last slice, the axial renal midline the slice
  half way between;
- R (and PADUA's size): the tumor's largest 3D diameter; R <= 40 mm 1, 40-70 mm 2, >= 70 mm 3;
  PADUA <= 40 mm 1, 40-70 mm 2, > 70 mm 3;
- E (and PADUA's exophytic rate): the exophytic share of the case report; >= 50% 1, < 50% 2, none
  (entirely endophytic) 3;
- N: the shortest distance from the tumor to the sinus; >= 7 mm 1, 4-7 mm 2, <= 4 mm 3;
- A: the report's anterior / posterior / central (x) position (more than 5 mm from the
  parenchyma's centre in y);
- L: the share of the tumor between the polar lines; none 1, up to 50% 2 (it crosses a line), more
  than 50% or crossing the axial renal midline 3; 'h' (hilar) where the tumor comes within 2 mm of
  the hilum (the renal vessels are not labelled, so the hilum stands for them);
- PADUA: polar location (more than 50% of the tumor between the sinus lines, the sinus's first and
  last slice: 2, else 1); renal rim (the tumor's centre medial of the parenchyma's centre: 2,
  lateral 1); renal sinus involved (tumor within 2 mm of the sinus: 2, else 1); collecting system:
  1 where the tumor keeps 2 mm from the sinus (the collecting system lies inside it), else not
  assessable (labels do not show the collecting system within the sinus);
- C-index: the distance from the tumor's centre to the kidney's centre (the centre of the
  kidney+tumor region on the slice half way between its poles), over the tumor's radius (half its
  largest axial diameter).

Where a part cannot be had honestly (no sinus, no hilum, the kidney mostly replaced: parenchyma
under 20% of its region), it says "not assessable" and why; the total is then the range the
missing parts allow ("7-9"), and the composite carries it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from .metrics import bounding_box

SINUS_RIM_MM = 3.0
SINUS_FAT_HU = (-200.0, -30.0)
MIN_SINUS_ML = 0.5
HILUM_MIN_DEPTH_MM = 5.0
SINUS_CONTACT_MM = 2.0  # PADUA's sinus involvement and the 'h' suffix
MIN_PARENCHYMA_SHARE = 0.2
NOT_ASSESSABLE = "not assessable"


def hull_per_slice(mask: np.ndarray) -> np.ndarray:
    """Each axial slice's convex hull of the mask (each slice cropped to its own box first)."""
    from skimage.morphology import convex_hull_image

    hull = np.zeros_like(mask, dtype=bool)
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        box = bounding_box(mask[z])
        hull[z][box] = convex_hull_image(mask[z][box])
    return hull


def sinus_region(region: np.ndarray, parenchyma: np.ndarray, spacing, hull=None, ct=None) -> np.ndarray:
    """The renal sinus: voxels deep inside the parenchyma's axial outline (its per-slice convex hull
    less the outer ``SINUS_RIM_MM``, where the outline's shallow dents would otherwise count) that
    are not labelled, and, given the CT, those labelled kidney that have fat's density (KiTS-style
    labels draw the sinus fat as kidney)."""
    hull = hull_per_slice(parenchyma) if hull is None else hull
    rim = [0] + [max(1, int(round(SINUS_RIM_MM / s))) for s in spacing[1:]]
    deep = ndimage.binary_erosion(hull, structure=np.ones([2 * r + 1 for r in rim], bool))
    sinus = deep & ~region
    if ct is not None:
        lo, hi = SINUS_FAT_HU
        sinus |= deep & parenchyma & (ct >= lo) & (ct <= hi)
    return sinus


def hilum_region(region: np.ndarray, parenchyma: np.ndarray, spacing, medial_sign: int, hull=None) -> np.ndarray:
    """The renal hilum: unlabelled notches of the parenchyma's per-slice hull that open to the
    hull's edge, at least ``HILUM_MIN_DEPTH_MM`` deep, medial of the parenchyma's centre; the
    largest 3D connected part of them."""
    sp = np.asarray(spacing, float)
    hull = hull_per_slice(parenchyma) if hull is None else hull
    out = np.zeros_like(region, dtype=bool)
    min_area = HILUM_MIN_DEPTH_MM**2 / 2 / (sp[1] * sp[2])  # a notch that deep holds at least this many pixels
    for z in np.flatnonzero(parenchyma.any(axis=(1, 2))):
        box = bounding_box(hull[z], 1)
        h = hull[z][box]
        notch = h & ~region[z][box]
        if np.count_nonzero(notch) < min_area:
            continue
        lab, n = ndimage.label(notch)
        edge = h & ~ndimage.binary_erosion(h)
        candidates = np.setdiff1d(np.unique(lab[edge]), [0])
        if not len(candidates):
            continue
        depth = ndimage.distance_transform_edt(h, sampling=sp[1:])  # box has an empty margin: the hull's edge
        cx = np.nonzero(parenchyma[z][box])[1].mean()
        for i in candidates:
            part = lab == i
            if depth[part].max() >= HILUM_MIN_DEPTH_MM and (np.nonzero(part)[1].mean() - cx) * medial_sign > 0:
                out[z][box] |= part
    lab, n = ndimage.label(out, structure=np.ones((3, 3, 3), bool))
    if n > 1:
        out = lab == (int(np.argmax(np.bincount(lab.ravel())[1:])) + 1)
    return out


def shortest_distance_mm(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """The shortest distance between two disjoint masks' voxel centres (mm): between their
    boundary voxels, with a k-d tree (no distance transform of the whole box)."""
    from scipy.spatial import cKDTree

    sp = np.asarray(spacing, float)

    def boundary_mm(mask):
        box = bounding_box(mask, 1)  # each mask's own box: an erosion of the kidney's box costs more
        m = mask[box]
        return (np.argwhere(m & ~ndimage.binary_erosion(m)) + [b.start for b in box]) * sp

    return float(cKDTree(boundary_mm(b)).query(boundary_mm(a))[0].min())


def _band(lo: float, hi: float, value: float, points: tuple) -> int:
    """Points by the conventional bands: <= lo, between, >= hi (R and N share this shape)."""
    return points[0] if value <= lo else (points[2] if value >= hi else points[1])


def _part(points, value=None, unit=None, why=None, **extra) -> dict:
    out = {"points": points, "value": None if value is None else round(float(value), 3)}
    if unit:
        out["unit"] = unit
    if points is None:
        out["points"] = NOT_ASSESSABLE
        out["why"] = why
    out.update(extra)
    return out


def _total(parts: dict, ranges: dict) -> tuple[int, int]:
    lo = hi = 0
    for key, part in parts.items():
        if isinstance(part["points"], int):
            lo, hi = lo + part["points"], hi + part["points"]
        else:
            lo, hi = lo + ranges[key][0], hi + ranges[key][1]
    return lo, hi


def _composite(lo: int, hi: int, suffix: str) -> str:
    return (f"{lo}" if lo == hi else f"{lo}-{hi}") + suffix


def renal_r(diameter_mm: float) -> int:
    return 1 if diameter_mm <= 40.0 else (3 if diameter_mm >= 70.0 else 2)


def padua_size(diameter_mm: float) -> int:
    return 1 if diameter_mm <= 40.0 else (3 if diameter_mm > 70.0 else 2)


def exophytic_points(share: float) -> int:
    """R.E.N.A.L.'s E and PADUA's exophytic rate: >= 50% 1, < 50% 2, entirely endophytic 3."""
    return 1 if share >= 0.5 else (3 if share <= 0.0 else 2)


def renal_n(distance_mm: float) -> int:
    return 1 if distance_mm >= 7.0 else (3 if distance_mm <= 4.0 else 2)


def renal_l(share_between: float, crosses_midline: bool) -> int:
    if crosses_midline or share_between > 0.5:
        return 3
    return 2 if share_between > 0.0 else 1


def kidney_landmarks(region: np.ndarray, parenchyma: np.ndarray, spacing, *, medial_sign: int, hull=None, ct=None):
    """What the scores need of a kidney, found once for all its tumors: its renal sinus and hilum
    (None where the kidney is mostly replaced) and whether it is. ``medial_sign``: +1 where the
    patient's midline lies towards +x (a right kidney), -1 for a left one; ``hull``: the
    parenchyma's per-slice convex hull where the caller has it; ``ct`` (HU, same grid): finds the
    sinus fat that the labels call kidney."""
    sp = np.asarray(spacing, float)
    voxel_ml = float(np.prod(sp)) / 1000.0
    n_par = int(np.count_nonzero(parenchyma))
    replaced = n_par < MIN_PARENCHYMA_SHARE * int(np.count_nonzero(region))
    out = {"region": region, "parenchyma": parenchyma, "sinus": None, "hilum": None, "sinus_ml": 0.0}
    out["why_replaced"] = f"the kidney is mostly replaced (parenchyma {n_par * voxel_ml:.0f} mL)" if replaced else None
    if replaced:
        return out
    hull = hull_per_slice(parenchyma) if hull is None else hull
    out["sinus"] = sinus_region(region, parenchyma, sp, hull, ct)
    out["sinus_ml"] = float(np.count_nonzero(out["sinus"])) * voxel_ml
    out["hilum"] = hilum_region(region, parenchyma, sp, medial_sign, hull)
    return out


@dataclasses.dataclass
class _TumorOnKidney:
    """What the three scores share: the tumor on its kidney's landmark grid, and why a landmark
    cannot be used (``why_*`` is None where it can)."""

    tumor: np.ndarray
    spacing: np.ndarray
    region: np.ndarray
    parenchyma: np.ndarray
    sinus: np.ndarray
    hilum: np.ndarray
    n_tumor: int
    centre: np.ndarray  # the tumor's centre, voxels (z, y, x)
    per_slice: np.ndarray  # tumor voxels per slice
    why_replaced: str | None
    dist_sinus: float | None
    why_sinus: str | None
    why_hilum: str | None

    @property
    def replaced(self) -> bool:
        return self.why_replaced is not None


def score_tumor(
    tumor: np.ndarray,
    kidney: dict,
    spacing,
    *,
    medial_sign: int,
    diameter_mm: float,
    axial_diameter_mm: float,
    exophytic_share: float,
    ap_position: str,
) -> dict:
    """``renal``, ``padua`` and ``c_index`` of one tumor, on the grid of its kidney's
    :func:`kidney_landmarks` (``medial_sign`` as there). The other arguments are the case
    report's measurements of the tumor (see :mod:`napari_kidseg.report`)."""
    t = _tumor_on_kidney(tumor, kidney, np.asarray(spacing, float))
    a_letter = {"anterior": "a", "posterior": "p", "central": "x"}.get(ap_position)
    renal = _renal_score(t, diameter_mm, exophytic_share, a_letter, ap_position)
    padua = _padua_score(t, renal["E"], medial_sign, diameter_mm, a_letter)
    cindex = _c_index(t, axial_diameter_mm)
    return {"renal": renal, "padua": padua, "c_index": cindex, "sinus_ml": round(kidney["sinus_ml"], 2)}


def _tumor_on_kidney(tumor: np.ndarray, kidney: dict, sp: np.ndarray) -> _TumorOnKidney:
    why_replaced = kidney["why_replaced"]
    replaced = why_replaced is not None
    sinus_ml = kidney["sinus_ml"]
    dist_sinus = None
    why_sinus = why_replaced
    if not replaced:
        if sinus_ml >= MIN_SINUS_ML:
            dist_sinus = shortest_distance_mm(tumor, kidney["sinus"], sp)
        else:
            why_sinus = f"no renal sinus found ({sinus_ml:.1f} mL)"
    why_hilum = why_replaced if replaced else (None if kidney["hilum"].any() else "no renal hilum found")
    zz, yy, xx = np.nonzero(tumor)
    return _TumorOnKidney(
        tumor=tumor,
        spacing=sp,
        region=kidney["region"],
        parenchyma=kidney["parenchyma"],
        sinus=kidney["sinus"],
        hilum=kidney["hilum"],
        n_tumor=int(np.count_nonzero(tumor)),
        centre=np.array([zz.mean(), yy.mean(), xx.mean()]),
        per_slice=np.bincount(zz, minlength=tumor.shape[0]),
        why_replaced=why_replaced,
        dist_sinus=dist_sinus,
        why_sinus=why_sinus,
        why_hilum=why_hilum,
    )


def _renal_score(t: _TumorOnKidney, diameter_mm, exophytic_share, a_letter, ap_position) -> dict:
    """R.E.N.A.L.: radius, exophytic share, nearness to the sinus, anterior/posterior, location
    against the polar lines (and h when the tumor touches the hilum)."""
    parts = {"R": _part(renal_r(diameter_mm), diameter_mm, "mm")}
    parts["E"] = (
        _part(None, exophytic_share, "share exophytic", t.why_replaced)
        if t.replaced
        else _part(exophytic_points(exophytic_share), exophytic_share, "share exophytic")
    )
    parts["N"] = (
        _part(renal_n(t.dist_sinus), t.dist_sinus, "mm to the renal sinus")
        if t.dist_sinus is not None
        else _part(None, None, "mm to the renal sinus", t.why_sinus)
    )
    hilar = None
    if t.why_hilum is None:
        hz = np.flatnonzero(t.hilum.any(axis=(1, 2)))
        lo, hi = int(hz.min()), int(hz.max())
        between = float(t.per_slice[lo : hi + 1].sum()) / t.n_tumor
        mids = {(lo + hi) // 2, (lo + hi + 1) // 2}
        crosses = any(t.per_slice[m] > 0 for m in mids)
        parts["L"] = _part(
            renal_l(between, crosses), between, "share between the polar lines", crosses_axial_midline=crosses
        )
        d_hilum = shortest_distance_mm(t.tumor, t.hilum, t.spacing)
        hilar = d_hilum <= SINUS_CONTACT_MM
        polar_lines = [lo, hi]
    else:
        parts["L"] = _part(None, None, "share between the polar lines", t.why_hilum)
        polar_lines = None
    lo, hi = _total(parts, dict.fromkeys(parts, (1, 3)))
    suffix = (a_letter or "") + ("h" if hilar else "")
    return {
        "score": _composite(lo, hi, suffix),
        "points": lo if lo == hi else None,
        "points_range": [lo, hi],
        **parts,
        "A": {"letter": a_letter or NOT_ASSESSABLE, "position": ap_position},
        "hilar": hilar if hilar is not None else NOT_ASSESSABLE,
        "polar_lines_slices": polar_lines,
        "complexity": _renal_complexity(lo, hi),
    }


def _padua_score(t: _TumorOnKidney, exophytic: dict, medial_sign: int, diameter_mm, a_letter) -> dict:
    """PADUA: polar location against the sinus lines, exophytic rate, renal rim, renal sinus,
    collecting system, size."""
    pp = {}
    if t.why_sinus is None:
        sz = np.flatnonzero(t.sinus.any(axis=(1, 2)))
        s_lo, s_hi = int(sz.min()), int(sz.max())
        between_sinus = float(t.per_slice[s_lo : s_hi + 1].sum()) / t.n_tumor
        pp["polar_location"] = _part(2 if between_sinus > 0.5 else 1, between_sinus, "share between the sinus lines")
    else:
        pp["polar_location"] = _part(None, None, "share between the sinus lines", t.why_sinus)
    pp["exophytic_rate"] = {**exophytic}
    if t.replaced:
        pp["renal_rim"] = _part(None, None, "mm medial of the kidney's centre", t.why_replaced)
    else:
        medial_mm = (t.centre[2] - np.nonzero(t.parenchyma)[2].mean()) * t.spacing[2] * medial_sign
        pp["renal_rim"] = _part(2 if medial_mm > 0 else 1, medial_mm, "mm medial of the kidney's centre")
    if t.dist_sinus is not None:
        involved = t.dist_sinus < SINUS_CONTACT_MM
        pp["renal_sinus"] = _part(2 if involved else 1, t.dist_sinus, "mm to the renal sinus")
        pp["collecting_system"] = (
            _part(
                None, t.dist_sinus, "mm to the renal sinus", "the labels do not show the collecting system in the sinus"
            )
            if involved
            else _part(1, t.dist_sinus, "mm to the renal sinus")
        )
    else:
        pp["renal_sinus"] = _part(None, None, "mm to the renal sinus", t.why_sinus)
        pp["collecting_system"] = _part(None, None, "mm to the renal sinus", t.why_sinus)
    pp["size"] = _part(padua_size(diameter_mm), diameter_mm, "mm")
    ranges = dict.fromkeys(pp, (1, 2))
    ranges.update(exophytic_rate=(1, 3), size=(1, 3))
    plo, phi = _total(pp, ranges)
    return {
        "score": _composite(plo, phi, a_letter if a_letter in ("a", "p") else ""),
        "points": plo if plo == phi else None,
        "points_range": [plo, phi],
        **pp,
        "risk": _padua_risk(plo, phi),
    }


def _c_index(t: _TumorOnKidney, axial_diameter_mm: float) -> dict:
    """C-index: the distance from the tumor's centre to the kidney's central slice centre, in tumor radii."""
    radius = axial_diameter_mm / 2.0
    if t.replaced:
        return {"value": NOT_ASSESSABLE, "why": t.why_replaced}
    if radius <= 0:
        return {"value": NOT_ASSESSABLE, "why": "the tumor has no axial extent"}
    rz = np.flatnonzero(t.region.any(axis=(1, 2)))
    kz = (int(rz.min()) + int(rz.max())) // 2
    ky, kx = np.nonzero(t.region[kz])
    kidney_centre = np.array([kz, ky.mean(), kx.mean()])
    d = float(np.linalg.norm((t.centre - kidney_centre) * t.spacing))
    return {"value": round(d / radius, 3), "distance_mm": round(d, 1), "radius_mm": round(radius, 1)}


def _renal_complexity(lo: int, hi: int) -> str:
    def band(v):
        return "low" if v <= 6 else ("moderate" if v <= 9 else "high")

    return band(lo) if band(lo) == band(hi) else f"{band(lo)} to {band(hi)}"


def _padua_risk(lo: int, hi: int) -> str:
    def band(v):
        return "low" if v <= 7 else ("intermediate" if v <= 9 else "high")

    return band(lo) if band(lo) == band(hi) else f"{band(lo)} to {band(hi)}"


def summary(t: dict) -> str:
    """One sentence of a tumor's scores for the report's text."""
    r, p, c = t["renal"], t["padua"], t["c_index"]

    def pts(part):
        return "?" if part["points"] == NOT_ASSESSABLE else str(part["points"])

    a = r["A"]["letter"] if r["A"]["letter"] != NOT_ASSESSABLE else "?"
    letters = f"R{pts(r['R'])} E{pts(r['E'])} N{pts(r['N'])} A{a} L{pts(r['L'])}"
    c_text = f"{c['value']:.2f}" if isinstance(c["value"], float) else c["value"]
    missing = sorted(
        {part["why"] for part in [*(r[k] for k in "RENL"), *(p[k] for k in PADUA_PARTS)] if part.get("why")}
    )
    return (
        f"R.E.N.A.L. {r['score']} ({letters}; {r['complexity']} complexity), PADUA {p['score']} ({p['risk']} risk), "
        f"C-index {c_text}" + (f"; not assessable: {'; '.join(missing)}" if missing else "")
    )


PADUA_PARTS = ("polar_location", "exophytic_rate", "renal_rim", "renal_sinus", "collecting_system", "size")
