"""Derive the anatomy check's thresholds and kidney position atlas from real label maps.

    python scripts/derive_anatomy_priors.py [--data ../shared/data] [-o napari_kidseg/anatomy_priors.json]

- Position atlas: the kidneys of the 40 FLARE 2022 training maps (FLARE22_Tr_0001-0040; 0041-0050
  stay held out, as in the real-anatomy phantoms), in the spine frame: lateral distance from the
  midline and distance behind the spine's front edge, in mm. FLARE maps have no bone, so the
  midline is the midpoint of the aorta's and the IVC's centres and the spine's front edge is the
  aorta's back edge (the aorta lies on the vertebral bodies). 4 mm bins, smoothed by one bin.
- ``min_slice_log_density``: the lowest mean log-density any kidney reached on any slice (on the
  check's grid) in those 40 maps, less a margin of 1.0 (a factor e in density).
- From the 160 KiTS19 label volumes: ``min_kidney_ml`` and ``min_length_mm`` are half the smallest
  kidney+tumor region (volume, and shortest extent along any axis) of any side; ``fragment_mm``
  is 1.5 times the farthest any separate piece of kidney or tumor lay from its side's main region;
  ``kits_least_kidney_left_ml`` is the least kidney tissue (label 1) any tumor-bearing side's main
  region kept (the note of ``anatomy.tumor_without_kidney``).
The printout also says what share of the other FLARE organs' slice regions the position rule
removes on the 10 held-out maps, and that it removes no kidney slice there.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_kidseg import anatomy  # noqa: E402
from napari_kidseg.io import files, readers  # noqa: E402

BIN_MM = 4.0
DX_MM, DY_MM = (0.0, 200.0), (-120.0, 120.0)
FLARE_ORGANS = {
    "liver": (1,),
    "spleen": (3,),
    "pancreas": (4,),
    "adrenal": (7, 8),
    "gallbladder": (9,),
    "stomach": (11,),
    "duodenum": (12,),
}
FLARE_KIDNEYS = (2, 13)
N_TRAIN_MAPS = 40


def flare_frame(labels: np.ndarray, spacing) -> anatomy.SpineFrame:
    """The spine frame of a FLARE map from its aorta (5) and IVC (6), interpolated along z."""
    aorta, ivc = labels == 5, labels == 6
    nz = labels.shape[0]
    x = np.full(nz, np.nan)
    front = np.full(nz, np.nan)
    for z in np.flatnonzero(aorta.any((1, 2)) & ivc.any((1, 2))):
        ya, xa = np.nonzero(aorta[z])
        _, xi = np.nonzero(ivc[z])
        x[z] = (xa.mean() + xi.mean()) / 2 * spacing[2]
        front[z] = ya.max() * spacing[1]
    ok = np.isfinite(x)
    idx = np.arange(nz)
    return anatomy.SpineFrame(np.interp(idx, idx[ok], x[ok]), np.interp(idx, idx[ok], front[ok]), float(ok.mean()))


def read_flare(path):
    vol = readers.read_labels(path)
    return vol.array, np.asarray(vol.geometry.spacing, float)


def atlas_from(maps) -> np.ndarray:
    nb = (int((DX_MM[1] - DX_MM[0]) / BIN_MM), int((DY_MM[1] - DY_MM[0]) / BIN_MM))
    hist = np.zeros(nb)
    for labels, sp in maps:
        frame = flare_frame(labels, sp)
        zz, yy, xx = np.nonzero(np.isin(labels, FLARE_KIDNEYS))
        dx = np.abs(xx * sp[2] - frame.x_mm[zz])
        dy = yy * sp[1] - frame.front_y_mm[zz]
        h, _, _ = np.histogram2d(dx, dy, bins=nb, range=[DX_MM, DY_MM])
        hist += h
    dens = ndimage.gaussian_filter(hist, 1.0)
    dens /= dens.sum()
    return np.log(dens + 1e-7)


def slice_scores(labels, sp, organs, pr):
    """Mean atlas log-density of every 2D region of ``organs`` on the check's grid, per slice."""
    frame = flare_frame(labels, sp)
    s = anatomy.grid_step(labels.shape[1:])
    small = np.isin(labels[:, ::s, ::s], organs)
    spg = np.array([sp[0], sp[1] * s, sp[2] * s])
    blobs, n = ndimage.label(small, structure=anatomy._STRUCT_2D)
    if not n:
        return np.array([]), np.array([])
    zz, yy, xx = np.nonzero(small)
    logd = anatomy.atlas_log_density(zz, yy, xx, spg, frame, pr)
    b = blobs[zz, yy, xx]
    counts = np.bincount(b, minlength=n + 1)[1:]
    return np.bincount(b, weights=logd, minlength=n + 1)[1:] / counts, counts * spg.prod() / 1000.0


def kits_limits(kits_root: Path) -> dict:
    vols, lengths, frags, kidney_left = [], [], [], []
    for f in sorted(glob.glob(str(kits_root / "case_*" / "segmentation.nii.gz"))):
        v = readers.read_labels(f)
        a, sp = v.array, np.asarray(v.geometry.spacing, float)
        s = anatomy.grid_step(a.shape[1:])
        grid = a[:, ::s, ::s]
        small = grid > 0
        spg = sp * [1, s, s]
        lab, n = ndimage.label(small, structure=anatomy._STRUCT_3D)
        counts = np.bincount(lab.ravel())[1:]
        com = ndimage.center_of_mass(small, lab, range(1, n + 1))
        mid = small.shape[2] / 2
        for side in (True, False):
            members = [i for i in range(n) if (com[i][2] > mid) == side]
            if not members:
                continue
            main = max(members, key=lambda i: counts[i])
            mask = lab == main + 1
            vols.append(counts[main] * spg.prod() / 1000.0)
            if (grid[mask] == 2).any():  # the kidney tissue a tumor-bearing side keeps
                kidney_left.append(np.count_nonzero(grid[mask] == 1) * spg.prod() / 1000.0)
            box = ndimage.find_objects(mask.astype(np.uint8))[0]
            lengths.append(min((b.stop - b.start) * d for b, d in zip(box, spg)))
            if len(members) > 1:
                dist = ndimage.distance_transform_edt(~mask, sampling=spg)
                frags += [float(dist[lab == i + 1].min()) for i in members if i != main]
        print(f"  {Path(f).parent.name}: sides {len(vols)}", end="\r", flush=True)
    print()
    return {
        "min_kidney_ml": round(0.5 * float(min(vols)), 1),
        "min_length_mm": round(0.5 * min(lengths), 1),
        "fragment_mm": round(max(10.0, 1.5 * max(frags, default=0.0)), 1),
        "kits_smallest_kidney_ml": round(float(min(vols)), 1),
        "kits_shortest_extent_mm": round(min(lengths), 1),
        "kits_farthest_fragment_mm": round(max(frags, default=0.0), 1),
        "kits_sides": len(vols),
        "kits_least_kidney_left_ml": round(float(min(kidney_left)), 1),
        "kits_tumor_sides": len(kidney_left),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("-o", "--output", default=str(anatomy.PRIORS_PATH))
    args = ap.parse_args(argv)
    data = Path(args.data)
    paths = sorted(glob.glob(str(data / "flare22-labels" / "FLARE22_Tr_*.nii.gz")))
    if len(paths) < N_TRAIN_MAPS + 1:
        raise SystemExit(f"{data / 'flare22-labels'}: expected 50 FLARE 2022 label maps, found {len(paths)}")
    print(f"reading {len(paths)} FLARE maps")
    maps = [read_flare(f) for f in paths]
    train, held = maps[:N_TRAIN_MAPS], maps[N_TRAIN_MAPS:]
    log_density = atlas_from(train)
    pr = {
        "atlas_bin_mm": BIN_MM,
        "atlas_dx_mm": list(DX_MM),
        "atlas_dy_mm": list(DY_MM),
        "atlas_log_density": log_density,
    }
    kid = [slice_scores(lab, sp, FLARE_KIDNEYS, pr) for lab, sp in train]
    kid_slices = np.concatenate([k[0] for k in kid])
    whole = []
    for lab, sp in train:
        frame = flare_frame(lab, sp)
        zz, yy, xx = np.nonzero(np.isin(lab, FLARE_KIDNEYS)[:, ::4, ::4])
        dx = np.abs(xx * 4 * sp[2] - frame.x_mm[zz])
        dy = yy * 4 * sp[1] - frame.front_y_mm[zz]
        ix = np.clip(((dx - DX_MM[0]) / BIN_MM).astype(int), 0, log_density.shape[0] - 1)
        iy = np.clip(((dy - DY_MM[0]) / BIN_MM).astype(int), 0, log_density.shape[1] - 1)
        whole.append(float(log_density[ix, iy].mean()))
    pr["min_slice_log_density"] = round(float(kid_slices.min()) - 1.0, 3)
    pr["typical_log_density"] = round(float(np.median(whole)), 3)
    pr["horseshoe_reach_mm"] = 40.0
    print(
        f"kidney slice regions (40 maps): {len(kid_slices)}, mean log-density min {kid_slices.min():.2f}, "
        f"1% {np.percentile(kid_slices, 1):.2f}, median {np.median(kid_slices):.2f}"
    )
    print(f"held-out maps ({len(held)}): share of slice regions (and of their mL) the position rule removes")
    for name, organ in [("kidney", FLARE_KIDNEYS)] + list(FLARE_ORGANS.items()):
        scores = [slice_scores(lab, sp, organ, pr) for lab, sp in held]
        sc = np.concatenate([s[0] for s in scores])
        ml = np.concatenate([s[1] for s in scores])
        gone = sc < pr["min_slice_log_density"]
        print(f"  {name:<12} {gone.mean():6.1%} of {len(sc)} ({ml[gone].sum() / max(ml.sum(), 1e-9):6.1%} of the mL)")
    print("KiTS19 limits")
    pr.update(kits_limits(data / "kits19-masks"))
    pr["atlas_log_density"] = np.round(log_density, 3).tolist()
    pr["source"] = (
        "derived by scripts/derive_anatomy_priors.py from FLARE 2022 label maps 0001-0040 "
        "(research use, Ma et al.) and the 160 KiTS19 label volumes (CC BY-NC-SA 4.0, Heller et al.)"
    )
    with files.atomic_path(args.output, overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps({k: pr[k] for k in sorted(pr)}, indent=None, separators=(",", ":")))
    print({k: v for k, v in pr.items() if k != "atlas_log_density"})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
