"""How many inputs it takes to correct a trapped draft with the review tools (issue 26's count).

The real case behind issue 26 (a portal-venous CT kept outside this repository) had two traps:
a liver cyst on the right upper pole drafted as "tumor" with a rim of "kidney" joined to the
right kidney, and the spleen's tip drafted as kidney joined to the left kidney. A radiologist
needed about 57 inputs to reach Dice 0.915 with the tools of version 4. This script builds a case
of the same kind on a real FLARE 2022 label map (a label-map phantom, its organ map saying where
the liver and spleen are), puts the same two traps into the draft, and plays the correction a
radiologist would make with today's tools through the same review session the dock calls
(``review.session.ReviewSession``: delete and cut are the dock's click tools), counting the
inputs each step takes in the dock:

- a tool key (Shift-D delete, Shift-U cut) when the click mode changes: 1;
- going to a slice: 1 (a click on the region table's row, or one scroll gesture);
- a cut line: 2 clicks (its two ends), and 1 more when the join is thicker than the default
  10 mm **Cut through** (typing a new value);
- a click on a region: 1 (parts under 1 mL that a cut leaves are not clicked).

The radiologist here is an oracle: the script knows the reference, so it clicks the right region
and draws the line along the true join (through the contact between the false part and the
kidney, on the slice in the middle of the join, extended 3 mm past the contact at each end). A
human takes longer to decide but not more inputs. Two drafts: the reference with the traps (the
tools' own cost), and the bundled cascade's draft on the same phantom with the traps (what a real
draft adds: its own boundary errors, which this script does not paint). "Before" is version 4's
tools on the same traps, modelled as a lower bound: no cut tool and a delete that took the whole
kidney+tumor region, so each join is erased by hand, one eraser stroke per slice it spans, then
one delete click per false part.

    python scripts/correction_count.py [--map ../shared/data/flare22-labels/FLARE22_Tr_0003.nii.gz]

Prints a table per draft; asserts nothing (the figures are for the README and the closing note).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_kidseg.labels import KIDNEY, ORGAN_CODE, TUMOR  # noqa: E402

FLARE = ROOT.parent / "shared" / "data" / "flare22-labels"
STRUCT = np.ones((3, 3, 3), bool)


def foreground_dice(a, b) -> float:
    a, b = a > 0, b > 0
    s = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / s if s else 1.0


def distance_mm(mask, spacing):
    return ndimage.distance_transform_edt(~mask, sampling=spacing)


def kidney_sides(reference, spacing):
    """(right kidney, left kidney) masks of the reference: the two largest regions, by x (LPS: +x left)."""
    lab, n = ndimage.label(reference > 0, structure=STRUCT)
    counts = np.bincount(lab.ravel())[1:]
    big = np.argsort(-counts)[:2] + 1
    xs = [np.nonzero(lab == i)[2].mean() for i in big]
    right, left = (big[0], big[1]) if xs[0] < xs[1] else (big[1], big[0])
    return lab == right, lab == left


def liver_cyst_trap(reference, organs, spacing, right, radius_mm=25.0, rim_mm=7.0):
    """A ball in the liver overlapping the right kidney's surface by ~3 mm: its core drafted as
    tumor, its rim (outside the kidney) as kidney, so the rim joins the right kidney."""
    liver = organs == ORGAN_CODE["liver"]
    d_kid = distance_mm(right, spacing)
    candidates = liver & (np.abs(d_kid - (radius_mm - 3.0)) < 2.0)
    if not candidates.any():
        return None
    pts = np.argwhere(candidates)
    centre = pts[np.argmin(np.abs(d_kid[candidates] - (radius_mm - 3.0)))]  # the first that fits
    grid = np.indices(reference.shape, sparse=True)
    r = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)))
    ball = (r <= radius_mm) & (reference == 0)
    trap = np.zeros(reference.shape, np.uint8)
    trap[ball] = KIDNEY
    trap[ball & (r <= radius_mm - rim_mm)] = TUMOR
    return trap


def spleen_tip_trap(reference, organs, spacing, left, reach_mm=20.0):
    """The spleen within ``reach_mm`` of the left kidney drafted as kidney, with the fat between
    them (a real draft fills the gap too), so it joins the left kidney."""
    spleen = organs == ORGAN_CODE["spleen"]
    d_kid = distance_mm(left, spacing)
    near = spleen & (d_kid < reach_mm)
    if not near.any():
        return None
    gap = float(d_kid[spleen].min()) + 3.0
    bridge = (d_kid < gap) & (distance_mm(spleen, spacing) < gap)
    trap = np.zeros(reference.shape, np.uint8)
    trap[(near | bridge) & (reference == 0)] = KIDNEY
    return trap


class Counter:
    def __init__(self):
        self.rows = []
        self.mode = None
        self.view = None  # the slice in view

    def add(self, what, n):
        self.rows.append((what, n))

    def key(self, mode, name):
        if self.mode != mode:
            self.add(f"key {name}", 1)
            self.mode = mode

    @property
    def total(self):
        return sum(n for _, n in self.rows)


def cut_line(false_part, kidney, z0, z1):
    """Two (row, column) ends of a straight cut between ``false_part`` and ``kidney`` on slices
    z0..z1: along the contact's long axis, shifted to the false side of every contact point (so
    a kidney bulging into the false part stays whole), and as long as the false part is wide
    there, plus 3 voxels at each end."""
    near_kidney = ndimage.binary_dilation(kidney[z0 : z1 + 1], structure=STRUCT)
    contact = np.argwhere(false_part[z0 : z1 + 1] & near_kidney)[:, 1:].astype(float)
    part = np.argwhere(false_part[z0 : z1 + 1])[:, 1:].astype(float)
    if len(contact) < 2:
        return None
    mean = contact.mean(0)
    _, _, vt = np.linalg.svd(contact - mean, full_matrices=False)
    axis, normal = vt[0], vt[1]
    if (part.mean(0) - mean) @ normal < 0:
        normal = -normal  # towards the false part
    offset = float(((contact - mean) @ normal).max()) + 1.5
    t = (part - mean) @ axis
    base = mean + offset * normal
    return base + (t.min() - 3) * axis, base + (t.max() + 3) * axis


def joined_to_kidney(session, kidney, still) -> bool:
    lab, _ = ndimage.label(session.labels > 0, structure=STRUCT)
    ids = set(np.unique(lab[kidney & (session.labels > 0)])) & set(np.unique(lab[still]))
    ids.discard(0)
    return bool(ids)


def remove_joined_part(session, reference, false_mask, counter, name, spacing):
    """Cut ``false_mask`` (the trap still on the labels) from the kidney it joins, slab by slab
    along the join, then delete what came apart."""
    kidney = (reference > 0) & (session.labels > 0)
    still = false_mask & (session.labels > 0)
    joined = ndimage.binary_dilation(kidney, structure=STRUCT) & still
    zs = np.flatnonzero(joined.any((1, 2)))
    if len(zs) and joined_to_kidney(session, kidney, still):
        # one line through the whole false part's slices: lines that differ from slice to slice
        # leave each slice's kidney-side scrap touching the next slice's false side, and a slab
        # shorter than the false part leaves the scrap joined to it around the slab's ends
        counter.key("cut", "Shift-U")
        pz = np.flatnonzero(still.any((1, 2)))
        slab_mm = max(10.0, float((pz.max() - pz.min() + 3) * spacing[0]))
        z = int(round((pz.min() + pz.max()) / 2))
        if slab_mm > 10.0:
            counter.add(f"{name}: Cut through {slab_mm:.1f} mm", 1)
        half = int(np.floor(slab_mm / 2.0 / spacing[0] + 1e-9))
        ends = cut_line(still, kidney, max(0, z - half), min(len(still) - 1, z + half))
        if ends is not None:
            ch = session.plan_cut(z, ends[0], ends[1], slab_mm=slab_mm)
            session.apply_change(ch, seen=z)
            counter.view = z
            counter.add(f"{name}: go to slice {z}, cut line ({ch.summary.split(';')[-1].strip()[:44]})", 3)
    # delete each false part that no longer touches a kidney: a click on it
    for _ in range(8):
        still = false_mask & (session.labels > 0)
        lab, _ = ndimage.label(session.labels > 0, structure=STRUCT)
        ml = float(np.prod(spacing)) / 1000.0
        ids = [  # scraps under 1 mL are not worth a click (they barely move Dice)
            i for i in np.unique(lab[still]) if i and not (lab == i)[kidney].any() and (lab == i).sum() * ml >= 1.0
        ]
        if not ids:
            break
        part = lab == ids[0]
        counter.key("delete", "Shift-D")
        if counter.view is not None and part[counter.view].any():  # the part is in view: click it there
            y, x = np.argwhere(part[counter.view])[0]
            z, where, n = counter.view, "in view", 1
        else:
            z, y, x = np.argwhere(part)[0]
            where, n = f"go to slice {z}", 2
        ch = session.plan_region_edit(int(z), int(y), int(x), "delete component")
        session.apply_change(ch, seen=int(z))
        counter.view = int(z)
        counter.add(f"{name}: {where}, delete click ({ch.summary})", n)
    left = false_mask & (session.labels > 0)
    if left.any():
        counter.add(f"{name}: {np.count_nonzero(left) * float(np.prod(spacing)) / 1000:.1f} mL still on the kidney", 0)


def split_off_part(session, reference, false_mask, counter, name, spacing, ct):
    """Split ``false_mask`` off the kidney it joins with **Split off**: on the slice in the middle
    of the join, a click deep in the false part, then one deep in the kidney; again while more
    than 5 mL of it is left joined (a part that came apart is deleted with a click)."""
    ml = float(np.prod(spacing)) / 1000.0
    kidney = (reference > 0) & (session.labels > 0)
    for _ in range(4):
        still = false_mask & (session.labels > 0)
        if np.count_nonzero(still) * ml < 5.0:  # a scrap of a few mL is not worth two more clicks
            break
        if not joined_to_kidney(session, kidney, still):
            remove_joined_part(session, reference, false_mask, counter, name, spacing)
            break
        joined = ndimage.binary_dilation(kidney, structure=STRUCT) & still
        zs = np.flatnonzero(joined.any((1, 2)))
        z = int(zs[len(zs) // 2])
        counter.key("split", "Shift-A")
        if counter.view != z:
            counter.add(f"{name}: go to slice {z}", 1)
            counter.view = z
        lab, _ = ndimage.label(session.labels > 0, structure=STRUCT)
        comp = lab == lab[z][joined[z]][0]  # the kidney this false part joins (not the other side's)
        deep = [ndimage.distance_transform_edt(m[z], sampling=spacing[1:]) for m in (still & comp, kidney & comp)]
        a = (z, *np.unravel_index(np.argmax(deep[0]), deep[0].shape))
        b = (z, *np.unravel_index(np.argmax(deep[1]), deep[1].shape))
        if os.environ.get("COUNT_DEBUG"):
            print(name, "clicks", a, b, session.labels[a], session.labels[b], reference[a], reference[b])
        ch = session.plan_split_off(a, b, ct)
        session.apply_change(ch, seen=z)
        counter.add(f"{name}: click the false part, click the kidney ({ch.summary})", 2)
    left = false_mask & (session.labels > 0)
    if left.any():
        counter.add(f"{name}: {np.count_nonzero(left) * ml:.1f} mL still on the kidney", 0)


def play(result, reference, base, traps, spacing, title, ct=None):
    """Correct the draft (``base`` with the traps); ``ct``: with **Split off** (else the cut)."""
    from napari_kidseg.review.session import ReviewSession

    session = ReviewSession(result)
    draft = base.copy()
    for t in traps:
        draft = np.where(t > 0, t, draft)
    session.fused[...] = draft  # the draft as shown: the cascade's (or the reference) with the traps
    session.labels[...] = draft
    counter = Counter()
    start = foreground_dice(session.labels, reference)
    if ct is not None:  # one split takes the cyst's false tumor and its rim together
        split_off_part(session, reference, traps[0] > 0, counter, "liver cyst", spacing, ct)
        split_off_part(session, reference, traps[1] > 0, counter, "spleen tip", spacing, ct)
    else:
        # the false tumor core first: a delete click on the tumor label takes only the tumor
        core = (traps[0] == TUMOR) & (session.labels == TUMOR)
        if core.any():
            z, y, x = np.argwhere(core)[len(np.argwhere(core)) // 2]
            counter.key("delete", "Shift-D")
            counter.add(f"liver cyst: go to slice {z}", 1)
            ch = session.plan_region_edit(int(z), int(y), int(x), "delete")
            session.apply_change(ch, seen=int(z))
            counter.view = int(z)
            counter.add(f"liver cyst: delete click on the false tumor ({ch.summary})", 1)
        remove_joined_part(session, reference, traps[0] > 0, counter, "liver cyst rim", spacing)
        remove_joined_part(session, reference, traps[1] > 0, counter, "spleen tip", spacing)
    end = foreground_dice(session.labels, reference)
    tool = "split off" if ct is not None else "cut"
    print(f"\n### {title}, with {tool}: kidney+tumor Dice {start:.3f} -> {end:.3f} in {counter.total} inputs\n")
    print("| step | inputs |\n|---|---|")
    for what, n in counter.rows:
        print(f"| {what} | {n} |")
    return counter.total, start, end


def before_count(reference, traps, spacing):
    """Version 4's tools (no cut; delete took the whole kidney+tumor region): erase each join by
    hand, a stroke per slice it spans (a lower bound), then a delete click per false part."""
    kidney = reference > 0
    strokes = 0
    for t in traps:
        contact = (t > 0) & ndimage.binary_dilation(kidney, structure=STRUCT)
        strokes += int(contact.any((1, 2)).sum())
    return strokes + 2 * len(traps) + 2  # strokes, a slice jump and a click per part, the two tool keys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--map", type=Path, default=FLARE / "FLARE22_Tr_0003.nii.gz")
    ap.add_argument("--seed", type=int, default=26)
    args = ap.parse_args(argv)
    if not args.map.exists():
        sys.exit(f"{args.map}: not found (the FLARE 2022 label maps live in ../shared/data)")
    from napari_kidseg.cascade import Cascade
    from napari_kidseg.phantoms.labelmap import make_labelmap_phantom

    case = make_labelmap_phantom(args.map, args.seed, matrix=512, phase="venous", n_tumors=0)
    spacing = case.ct.geometry.spacing
    reference = case.labels
    right, left = kidney_sides(reference, spacing)
    traps = [
        liver_cyst_trap(reference, case.organs, spacing, right),
        spleen_tip_trap(reference, case.organs, spacing, left),
    ]
    if any(t is None for t in traps):
        sys.exit(f"{args.map}: no liver next to the right kidney or no spleen next to the left one; pick another map")
    ml = float(np.prod(spacing)) / 1000.0
    print(
        f"case: {args.map.name}, seed {args.seed}, {reference.shape}, "
        f"spacing {tuple(round(s, 2) for s in spacing)} mm; "
        f"traps: liver cyst {np.count_nonzero(traps[0] == TUMOR) * ml:.0f} mL tumor + "
        f"{np.count_nonzero(traps[0] == KIDNEY) * ml:.0f} mL kidney rim, "
        f"spleen tip {np.count_nonzero(traps[1]) * ml:.0f} mL kidney"
    )
    result = Cascade(device="cpu").run(case.ct.array, spacing)
    from napari_kidseg.review.session import ReviewSession

    cascade_draft = ReviewSession(result).labels.copy()
    print(
        f"the bundled cascade's own draft (no traps): kidney+tumor Dice {foreground_dice(cascade_draft, reference):.3f}"
    )
    for ct in (None, case.ct.array):
        play(result, reference, reference.astype(np.uint8), traps, spacing, "reference + traps", ct)
        play(result, reference, cascade_draft, traps, spacing, "bundled cascade's draft + traps", ct)
    print(f"\nbefore (version 4's tools, modelled lower bound): {before_count(reference, traps, spacing)} inputs")


if __name__ == "__main__":
    main()
