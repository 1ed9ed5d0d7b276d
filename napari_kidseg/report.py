"""What leaves the tool: a case report with kidney and tumor descriptors.

``describe_case`` measures, from the labels alone (and the CT where a descriptor needs it), the
parts of the R.E.N.A.L. nephrometry score that a segmentation can give, per kidney and per tumor,
and scores R.E.N.A.L., PADUA and the C-index from them (:mod:`napari_kidseg.nephrometry`).
Every figure is computed from the segmentation and says so in the report; the methods are the
ones written in the README ("The case report"):

- side: each 26-connected kidney+tumor region goes to the side of its centre relative to the
  midline (the spine's, found in the CT, else the image centre); a tumor takes its region's side;
- volumes: voxel count x voxel volume; craniocaudal length: the z extent of the kidney+tumor
  voxels of that side;
- largest 3D diameter: the longest distance between two voxel centres of the tumor (exact, on
  its convex hull); largest axial diameter: the same within one axial slice, the slice kept;
- exophytic share: the tumor's voxels outside the kidney's outline. Per slice, the outline is
  the parenchyma's outermost radius in each direction from its centre; where the tumor, not
  parenchyma, is outermost (it bulges out), the outline is interpolated from the directions on
  either side. A slice with no parenchyma counts wholly outside;
- anterior/posterior: the tumor centre against the kidney's parenchyma centre (more than 5 mm);
- polar position: the tumor centre in the upper, middle or lower third of its kidney's
  parenchyma extent (upper pole / interpolar / lower pole);
- distance to the renal sinus fat: fat-density voxels (-200..-30 HU) inside the parenchyma's axial
  outline (its per-slice convex hull less the outer 3 mm) that are not labelled; the shortest
  distance from the tumor to them, when at least 0.5 mL of such fat is found.
"""

from __future__ import annotations

import csv
import io as _stdio
import json
import textwrap
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import __version__
from .errors import KidsegError
from .labels import BACKGROUND, KIDNEY, TUMOR, check_label_values
from .metrics import bounding_box, farthest_pair
from .nephrometry import SINUS_FAT_HU, hull_per_slice, kidney_landmarks, score_tumor, summary

_STRUCT_3D = np.ones((3, 3, 3), bool)
MIN_SINUS_FAT_ML = 0.5
AP_MARGIN_MM = 5.0
FOURIER_MIN_KNOWN = 0.5  # share of directions the outline must be seen in to fit its shape
SIDES = ("right", "left")
METHOD_NOTE = "computed from the segmentation, not read by a radiologist"


# ----------------------------------------------------------------------------------------------
# Geometry of point sets
# ----------------------------------------------------------------------------------------------


def _surface_points(mask: np.ndarray) -> np.ndarray:
    """Indices of a mask's boundary voxels (the farthest pair always lies on the boundary)."""
    return np.argwhere(mask & ~ndimage.binary_erosion(mask))


def largest_diameters(mask: np.ndarray, spacing) -> dict:
    """Largest 3D and largest axial diameter (mm) of a mask, with the axial one's slice and ends."""
    sp = np.asarray(spacing, float)
    d3, _, _ = farthest_pair(_surface_points(mask) * sp)
    best = {"diameter_mm": d3, "axial_diameter_mm": 0.0, "axial_slice": None, "axial_ends_yx": None}
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        pts = _surface_points(mask[z]).astype(float)
        d, a, b = farthest_pair(pts * sp[1:])
        if d > best["axial_diameter_mm"] or best["axial_slice"] is None:
            best.update(
                axial_diameter_mm=d, axial_slice=int(z), axial_ends_yx=[(a / sp[1:]).tolist(), (b / sp[1:]).tolist()]
            )
    return best


# ----------------------------------------------------------------------------------------------
# Descriptors
# ----------------------------------------------------------------------------------------------


def _midline_mm(shape, spacing, ct=None) -> np.ndarray:
    """The patient's midline x (mm) per slice, from the spine when the CT shows one."""
    from .anatomy import find_spine, midline_mm

    return midline_mm(None if ct is None else find_spine(ct, spacing), shape, spacing)


def exophytic_share(
    tumor: np.ndarray, parenchyma: np.ndarray, spacing, n_dirs: int = 36, edge_px: float = 0.5
) -> float:
    """Share of the tumor's voxels outside the kidney's outline (see the module's description)."""
    sp = np.asarray(spacing, float)
    outside = 0
    total = int(tumor.sum())
    if not total:
        return 0.0
    tol = edge_px * float(np.mean(sp[1:]))  # parenchyma's outermost centres lie half a pixel inside its edge
    for z in np.flatnonzero(tumor.any(axis=(1, 2))):
        t_yx = np.argwhere(tumor[z]) * sp[1:]
        p_yx = np.argwhere(parenchyma[z]) * sp[1:]
        if len(p_yx) < 3:
            outside += len(t_yx)
            continue
        centre = p_yx.mean(axis=0)
        outline = _outline_radius(p_yx - centre, t_yx - centre, n_dirs)
        dt = t_yx - centre
        rho = np.hypot(dt[:, 0], dt[:, 1])
        bins = _direction_bins(dt, n_dirs)
        outside += int(np.count_nonzero(rho > outline[bins] + tol))
    return outside / total


def _direction_bins(d_yx: np.ndarray, n_dirs: int) -> np.ndarray:
    theta = np.arctan2(d_yx[:, 0], d_yx[:, 1])
    return ((theta + np.pi) / (2 * np.pi) * n_dirs).astype(int) % n_dirs


def _outline_radius(p: np.ndarray, t: np.ndarray, n_dirs: int) -> np.ndarray:
    """The kidney outline's radius per direction bin: the parenchyma's outermost radius where
    parenchyma is outermost, interpolated (around the circle) where the tumor bulges past it."""
    rp = np.full(n_dirs, -np.inf)
    rt = np.full(n_dirs, -np.inf)
    np.maximum.at(rp, _direction_bins(p, n_dirs), np.hypot(p[:, 0], p[:, 1]))
    np.maximum.at(rt, _direction_bins(t, n_dirs), np.hypot(t[:, 0], t[:, 1]))
    known = np.isfinite(rp) & (rp >= rt)
    if not known.any():
        return np.where(np.isfinite(rp), rp, 0.0)
    idx = np.arange(n_dirs)
    outline = rp.copy()
    if known.sum() >= FOURIER_MIN_KNOWN * n_dirs:
        # an axial kidney outline is close to an ellipse, whose radius around the centre is a
        # second-order Fourier series: fitted to the known directions, it carries the curve across
        # the bulge (straight interpolation would cut the convex outline short, like a chord)
        theta = (idx + 0.5) / n_dirs * 2 * np.pi - np.pi
        basis = np.stack([np.ones_like(theta)] + [f(k * theta) for k in (1, 2) for f in (np.cos, np.sin)], axis=1)
        coef, *_ = np.linalg.lstsq(basis[known], rp[known], rcond=None)
        outline[~known] = basis[~known] @ coef
    else:
        outline[~known] = np.interp(idx[~known], idx[known], rp[known], period=n_dirs)
    return outline


def _sinus_fat(ct_box: np.ndarray, region_box: np.ndarray, parenchyma_box: np.ndarray, sp, hull=None) -> np.ndarray:
    """Fat-density voxels of the renal sinus that are not labelled (the sinus of
    :func:`napari_kidseg.nephrometry.sinus_region`, from the labels alone)."""
    from .nephrometry import sinus_region

    lo, hi = SINUS_FAT_HU
    return sinus_region(region_box, parenchyma_box, sp, hull) & (ct_box >= lo) & (ct_box <= hi)


def describe_case(labels: np.ndarray, spacing, *, ct: np.ndarray | None = None, provenance: dict | None = None) -> dict:
    """Per-kidney and per-tumor descriptors of a KiTS label volume (canonical ``(z, y, x)``).

    ``ct`` (HU, same grid) gives the midline from the spine and the renal sinus fat; without it the
    image centre is the midline and the sinus distance is left out. ``provenance``: what made the
    labels (models, alpha, thresholds, voxels corrected by hand), copied into the report.
    """
    labels = np.asarray(labels)
    check_label_values(labels, cysts=True)  # a KiTS23 cyst counts with its kidney, not as parenchyma
    shape = [int(v) for v in labels.shape]
    if ct is not None and np.shape(ct) != labels.shape:
        raise KidsegError(f"labels of shape {labels.shape} do not match the CT's {np.shape(ct)}")
    sp = tuple(float(s) for s in spacing)
    voxel_ml = float(np.prod(sp)) / 1000.0
    mid_full = _midline_mm(labels.shape, sp, ct)
    # everything below works on the labelled voxels' box (plus room for the sinus fat and outline)
    pad = [int(np.ceil(20.0 / s)) for s in sp]
    box = bounding_box(labels, pad) or tuple(slice(0, n) for n in labels.shape)
    offset = np.array([b.start for b in box])
    labels = labels[box]
    ct = None if ct is None else np.asarray(ct)[box]
    mid = mid_full[box[0]] - offset[2] * sp[2]
    regions, n = ndimage.label(labels > BACKGROUND, structure=_STRUCT_3D)
    side_of_region = {}
    for i, sl in enumerate(ndimage.find_objects(regions), 1):
        zz, _, xx = np.nonzero(regions[sl] == i)
        cz = int(round(zz.mean())) + sl[0].start
        side_of_region[i] = "left" if (xx.mean() + sl[2].start) * sp[2] > mid[cz] else "right"  # LPS: +x is left

    kidneys = {}
    for side in SIDES:
        ids = [i for i, s in side_of_region.items() if s == side]
        mask = np.isin(regions, ids) if ids else np.zeros(labels.shape, bool)
        zs = np.flatnonzero(mask.any(axis=(1, 2)))
        kidneys[side] = {
            "side": side,
            "present": bool(ids),
            "parenchyma_ml": round(float(np.count_nonzero(mask & (labels == KIDNEY))) * voxel_ml, 2),
            "tumor_ml": round(float(np.count_nonzero(mask & (labels == TUMOR))) * voxel_ml, 2),
            "length_mm": round(float((zs.max() - zs.min() + 1) * sp[0]), 1) if len(zs) else 0.0,
        }

    tumors = []
    tlab, nt = ndimage.label(labels == TUMOR, structure=_STRUCT_3D)
    region_boxes = ndimage.find_objects(regions)
    kidney_cache = {}
    for j, sl in enumerate(ndimage.find_objects(tlab), 1):
        t = _describe_tumor(j, tlab, sl, labels, regions, region_boxes, side_of_region, sp, ct, kidney_cache)
        for key in ("axial_slice", "axial_ends_yx", "centre_zyx"):  # back to the whole volume's indices
            t[key] = _shift(t[key], offset)
        if t["renal"]["polar_lines_slices"]:
            t["renal"]["polar_lines_slices"] = [_shift(v, offset) for v in t["renal"]["polar_lines_slices"]]
        tumors.append(t)
    tumors.sort(key=lambda t: -t["volume_ml"])
    for k, t in enumerate(tumors, 1):
        t["tumor"] = k
    return {
        "kidneys": [kidneys[s] for s in SIDES],
        "tumors": tumors,
        "spacing_mm": list(sp),
        "shape_zyx": shape,
        "method": METHOD_NOTE,
        "provenance": {"software": f"napari-kidseg {__version__}", **(provenance or {})},
        "notes": [] if n else ["no kidney or tumor in the labels"],
    }


def _shift(value, offset):
    """Indices of the cropped box back to the whole volume: a slice, a (y, x) pair list or a (z, y, x)."""
    if isinstance(value, int):
        return int(value + offset[0])
    if isinstance(value[0], list):
        return [[round(float(a + offset[1]), 2), round(float(b + offset[2]), 2)] for a, b in value]
    return [round(float(v + o), 1) for v, o in zip(value, offset)]


def _describe_tumor(j, tlab, sl, labels, regions, region_boxes, side_of_region, sp, ct, kidneys) -> dict:
    # the kidney the tumor belongs to: its 26-connected kidney+tumor region, padded for context
    region_id = int(np.bincount(regions[sl][tlab[sl] == j]).argmax())
    rsl = region_boxes[region_id - 1]
    pad = [int(np.ceil(15.0 / s)) for s in sp]  # 15 mm around: the sinus fat and the outline
    box = tuple(slice(max(0, r.start - p), min(n, r.stop + p)) for r, p, n in zip(rsl, pad, labels.shape))
    tumor = tlab[box] == j
    in_region = regions[box] == region_id
    parenchyma = in_region & (labels[box] == KIDNEY)
    zz, yy, xx = np.nonzero(tumor)
    origin = np.array([b.start for b in box])
    centre = np.array([zz.mean(), yy.mean(), xx.mean()])
    diam = largest_diameters(tumor, sp)
    out = {
        "side": side_of_region[region_id],
        "volume_ml": round(float(len(zz)) * float(np.prod(sp)) / 1000.0, 3),
        "diameter_mm": round(diam["diameter_mm"], 1),
        "axial_diameter_mm": round(diam["axial_diameter_mm"], 1),
        "axial_slice": int(diam["axial_slice"] + origin[0]),
        "axial_ends_yx": [[float(a[0] + origin[1]), float(a[1] + origin[2])] for a in diam["axial_ends_yx"]],
        "centre_zyx": [float(c + o) for c, o in zip(centre, origin)],
        "exophytic_share": round(exophytic_share(tumor, parenchyma, sp), 3),
    }
    pz = np.flatnonzero(parenchyma.any(axis=(1, 2)))
    if len(pz):
        py = np.nonzero(parenchyma)[1].mean()
        dy_mm = (centre[1] - py) * sp[1]  # +y is posterior
        out["ap_position"] = (
            "anterior" if dy_mm < -AP_MARGIN_MM else ("posterior" if dy_mm > AP_MARGIN_MM else "central")
        )
        frac = (centre[0] - pz.min()) / max(pz.max() - pz.min(), 1)  # +z is superior
        out["polar_position"] = "upper pole" if frac > 2 / 3 else ("lower pole" if frac < 1 / 3 else "interpolar")
    else:
        out["ap_position"] = out["polar_position"] = "no parenchyma found"
    medial_sign = 1 if out["side"] == "right" else -1  # LPS: the right kidney's midline is at +x
    if region_id not in kidneys:  # a kidney's sinus and hilum serve all its tumors
        ct_box = None if ct is None else np.asarray(ct)[box]
        hull = hull_per_slice(parenchyma)
        kidneys[region_id] = kidney_landmarks(in_region, parenchyma, sp, medial_sign=medial_sign, hull=hull, ct=ct_box)
        kidneys[region_id]["hull"] = hull
    out.update(
        score_tumor(
            tumor,
            kidneys[region_id],
            sp,
            medial_sign=medial_sign,
            diameter_mm=diam["diameter_mm"],
            axial_diameter_mm=diam["axial_diameter_mm"],
            exophytic_share=out["exophytic_share"],
            ap_position=out["ap_position"],
        )
    )
    lines = out["renal"]["polar_lines_slices"]
    if lines:
        out["renal"]["polar_lines_slices"] = [int(v + origin[0]) for v in lines]
    out["sinus_fat_distance_mm"] = None
    if ct is not None:
        fat = _sinus_fat(np.asarray(ct)[box], in_region, parenchyma, sp, kidneys[region_id]["hull"])
        if np.count_nonzero(fat) * float(np.prod(sp)) / 1000.0 >= MIN_SINUS_FAT_ML:
            dist = ndimage.distance_transform_edt(~fat, sampling=sp)
            out["sinus_fat_distance_mm"] = round(float(dist[tumor].min()), 1)
    return out


# ----------------------------------------------------------------------------------------------
# Text, tables, figure
# ----------------------------------------------------------------------------------------------


def report_text(report: dict) -> str:
    """The report as plain text, for the clipboard and dictation software."""
    lines = [f"Kidney segmentation report ({report['method']})."]
    for k in report["kidneys"]:
        if not k["present"]:
            lines.append(f"{k['side'].capitalize()} kidney: not segmented.")
            continue
        lines.append(
            f"{k['side'].capitalize()} kidney: parenchyma {k['parenchyma_ml']:.0f} mL, tumor {k['tumor_ml']:.1f} mL, "
            f"craniocaudal length {k['length_mm']:.0f} mm."
        )
    for t in report["tumors"]:
        sinus = t["sinus_fat_distance_mm"]
        lines.append(
            f"Tumor {t['tumor']} ({t['side']}): {t['volume_ml']:.1f} mL, largest diameter {t['diameter_mm']:.0f} mm "
            f"(axial {t['axial_diameter_mm']:.0f} mm, slice {t['axial_slice']}), {100 * t['exophytic_share']:.0f}% "
            f"exophytic, {t['ap_position']}, {t['polar_position']}"
            + (f", {sinus:.0f} mm from the renal sinus fat." if sinus is not None else ".")
        )
        if "renal" in t:
            lines.append(f"  Nephrometry of tumor {t['tumor']}: {summary(t)}.")
    if not report["tumors"]:
        lines.append("No tumor segmented.")
    lines += report.get("notes", [])
    if report.get("provenance"):
        lines.append(_made_by(report["provenance"]))
    return "\n".join(lines)


def _made_by(prov: dict) -> str:
    """What made the report, as the referring physician reads it: the software and where the labels
    came from. The figures behind it (checkpoints and their stamps, fusion settings, the count of
    hand-edited voxels) are for the record: they stay in report.json."""
    parts = [str(prov.get("software", "napari-kidseg"))]
    if prov.get("labels"):
        parts.append(f"labels from {Path(str(prov['labels'])).name}")
    elif "hand_edited_voxels" in prov:
        parts.append("automatic segmentation " + ("corrected by hand" if prov["hand_edited_voxels"] else "not edited"))
    return "Made by " + ", ".join(parts) + "."


CSV_FIELDS = (
    "kind", "side", "tumor", "volume_ml", "parenchyma_ml", "tumor_ml", "length_mm", "diameter_mm",
    "axial_diameter_mm", "axial_slice", "exophytic_share", "ap_position", "polar_position", "sinus_fat_distance_mm",
    "renal", "padua", "c_index",
)  # fmt: skip


def _scores(t: dict) -> dict:
    """A tumor's nephrometry as three cells: the composites and the C-index."""
    if "renal" not in t:
        return {}
    return {"renal": t["renal"]["score"], "padua": t["padua"]["score"], "c_index": t["c_index"]["value"]}


def report_rows(report: dict) -> list[dict]:
    rows = [{"kind": "kidney", **k} for k in report["kidneys"]]
    rows += [{"kind": "tumor", **t, **_scores(t)} for t in report["tumors"]]
    return [{f: r.get(f, "") for f in CSV_FIELDS} for r in rows]


def summary_row(report: dict, case: str) -> dict:
    """One CSV row per case (``kidseg predict --report``)."""
    k = {x["side"]: x for x in report["kidneys"]}
    t = report["tumors"]
    return {
        "case": case,
        "right_kidney_ml": k["right"]["parenchyma_ml"],
        "right_tumor_ml": k["right"]["tumor_ml"],
        "left_kidney_ml": k["left"]["parenchyma_ml"],
        "left_tumor_ml": k["left"]["tumor_ml"],
        "tumors": len(t),
        "largest_tumor_mm": max((x["diameter_mm"] for x in t), default=0.0),
        "largest_tumor_side": t[0]["side"] if t else "",
        "largest_tumor_exophytic_share": t[0]["exophytic_share"] if t else "",
        **{
            f"largest_tumor_{k}": v
            for k, v in (_scores(t[0]) if t else dict.fromkeys(("renal", "padua", "c_index"), "")).items()
        },
    }


def rows_to_csv(rows: list[dict]) -> str:
    buf = _stdio.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def report_figure(report: dict, ct: np.ndarray, labels: np.ndarray, spacing):
    """A matplotlib figure: the text, a coronal overview, and per tumor (up to 4) the axial slice of
    its largest diameter with outlines, the diameter drawn and a 10 mm scale bar (soft-tissue window)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .layers import CT_WINDOW, LABEL_COLORS

    sp = np.asarray(spacing, float)
    tumors = report["tumors"][:4]
    fig = Figure(figsize=(8.27, 11.69), dpi=100)  # one A4 page
    text = "\n".join(textwrap.fill(line, 110, subsequent_indent="  ") for line in report_text(report).splitlines())
    block = fig.text(0.04, 0.985, text, va="top", ha="left", fontsize=7, family="monospace")
    FigureCanvasAgg(fig)  # a renderer, to measure where the text ends
    text_bottom = block.get_window_extent(fig.canvas.get_renderer()).y0 / fig.bbox.height
    crops = [_tumor_crop(t, labels.shape, sp) for t in tumors]
    ax, tumor_axes = _page_axes(fig, text_bottom - 0.005, labels.shape, sp, crops)
    # the coronal slice through the largest tumor's centre, else through the kidneys
    kt = labels > BACKGROUND
    y = (
        int(round(tumors[0]["centre_zyx"][1]))
        if tumors
        else (int(np.nonzero(kt)[1].mean()) if kt.any() else labels.shape[1] // 2)
    )
    ax.imshow(ct[:, y, :], cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], origin="lower", aspect=sp[0] / sp[2])
    _outline(ax, labels[:, y, :], LABEL_COLORS)
    ax.set_title(f"coronal, slice y={y} (head up, patient's right on the left)", fontsize=8)
    _scale_bar(ax, sp[2], labels.shape[2])
    ax.set_axis_off()
    for t, ax, (y0, y1, x0, x1) in zip(tumors, tumor_axes, crops):
        z = t["axial_slice"]
        ax.imshow(ct[z, y0:y1, x0:x1], cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], aspect=sp[1] / sp[2])
        _outline(ax, labels[z, y0:y1, x0:x1], LABEL_COLORS)
        (ay, axx), (by, bx) = t["axial_ends_yx"]
        ax.plot([axx - x0, bx - x0], [ay - y0, by - y0], color="#ff4040", lw=1.5)
        ax.set_title(f"tumor {t['tumor']} ({t['side']}), axial slice {z}: {t['axial_diameter_mm']:.0f} mm", fontsize=8)
        _scale_bar(ax, sp[2], x1 - x0)
        ax.set_axis_off()
    return fig


def _tumor_crop(t: dict, shape, sp) -> tuple[int, int, int, int]:
    """The axial window shown for a tumor: at least 4 cm around its axial diameter, in the image."""
    cy, cx = (np.asarray(t["axial_ends_yx"][0]) + t["axial_ends_yx"][1]) / 2
    half = max(40.0, t["axial_diameter_mm"]) / sp[1:]
    y0, y1 = int(max(0, cy - half[0])), int(min(shape[1], cy + half[0]))
    x0, x1 = int(max(0, cx - half[1])), int(min(shape[2], cx + half[1]))
    return y0, y1, x0, x1


def _page_axes(fig, top: float, shape, sp, crops, bottom: float = 0.03):
    """The coronal overview's axes and one per tumor (two a row), sized to their images' own
    proportions and stacked under the text without a gap; all shrink together when the page is too
    short for them (many tumors, a long field of view). Returns (coronal axes, [tumor axes])."""
    w_in, h_in = fig.get_size_inches()
    title, gap = 0.3, 0.15  # inches: above each image for its title, between the two of a row
    width = 0.92 * w_in
    cor_aspect = shape[0] * sp[0] / (shape[2] * sp[2])  # height / width in mm
    tumor_aspect = max(((y1 - y0) * sp[1] / ((x1 - x0) * sp[2]) for y0, y1, x0, x1 in crops), default=1.0)
    rows = (len(crops) + 1) // 2
    fixed = title + rows * title
    scalable = width * cor_aspect + rows * (width - gap) / 2 * tumor_aspect
    scale = min(1.0, ((top - bottom) * h_in - fixed) / scalable)
    y = top * h_in - title
    w, h = scale * width, scale * width * cor_aspect
    cor = fig.add_axes(((w_in - w) / 2 / w_in, (y - h) / h_in, w / w_in, h / h_in))
    y -= h + title
    wt = scale * (width - gap) / 2
    ht = wt * tumor_aspect
    left = (w_in - (2 * wt + gap)) / 2
    axes = []
    for k in range(len(crops)):
        if k and k % 2 == 0:
            y -= ht + title
        x = left + (k % 2) * (wt + gap)
        axes.append(fig.add_axes((x / w_in, (y - ht) / h_in, wt / w_in, ht / h_in)))
    return cor, axes


def _outline(ax, labels2d, colors):
    for value in (KIDNEY, TUMOR):
        m = labels2d == value
        if m.any():
            ax.contour(m, levels=[0.5], colors=[colors[value]], linewidths=0.8)


def _scale_bar(ax, pixel_mm, width_px):
    length = 10.0 / pixel_mm  # 10 mm
    x0 = width_px * 0.05
    ylim = ax.get_ylim()
    yb = ylim[0] - 0.05 * (ylim[0] - ylim[1])
    ax.plot([x0, x0 + length], [yb, yb], color="white", lw=2)
    ax.text(x0, yb - 0.02 * (ylim[0] - ylim[1]), "10 mm", color="white", fontsize=7, va="bottom")


REPORT_FILES = ("report.json", "report.csv", "report.png", "report.pdf")


def write_report(report: dict, out_dir, *, ct=None, labels=None, spacing=None, overwrite=False) -> list[Path]:
    """Write report.json, report.csv and (given the CT) report.png and a one-page report.pdf.

    Every file is checked before any is written (an existing one is refused without
    ``overwrite``), and each is written atomically.
    """
    from .io.files import atomic_path

    out = Path(out_dir)
    names = REPORT_FILES if ct is not None else REPORT_FILES[:2]
    if not overwrite:
        for name in names:
            if (out / name).exists():
                raise KidsegError("already exists; not overwriting it (use --overwrite)", out / name)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with atomic_path(out / "report.json", overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    written.append(out / "report.json")
    with atomic_path(out / "report.csv", overwrite=overwrite) as tmp:
        tmp.write_text(rows_to_csv(report_rows(report)))
    written.append(out / "report.csv")
    if ct is not None:
        fig = report_figure(report, np.asarray(ct), np.asarray(labels), spacing)
        for name in ("report.png", "report.pdf"):
            with atomic_path(out / name, overwrite=overwrite) as tmp:
                fig.savefig(tmp, format=name.rsplit(".", 1)[1], dpi=110 if name.endswith("png") else None)
            written.append(out / name)
    return written
