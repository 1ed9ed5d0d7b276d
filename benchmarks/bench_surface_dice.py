"""Surface Dice and HD95 on real KiTS19 label volumes: napari-kidseg against DeepMind's
surface-distance called as the KiTS evaluation calls it, and against MONAI's compute_surface_dice
(surface elements with areas, ``use_subvoxels=True``, and boundary voxels, its default) and
compute_hausdorff_distance; and the time per case.

    python benchmarks/bench_surface_dice.py [--cases 20] [--data ../shared/data/kits19-masks]

Each reference is scored against perturbed copies of itself with known effects: shifted by a
voxel or two (every surface moves), the tumor dilated by one voxel, and the reference itself
(every score 1, HD95 0). MONAI needs torch and monai (``pip install monai``); without it only
the timings are printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_kidseg.evaluation import REGIONS, TOLERANCES_MM, case_scores, region_masks  # noqa: E402
from napari_kidseg.io import readers, volumes  # noqa: E402
from napari_kidseg.metrics import bounding_box  # noqa: E402


def perturbations(ref: np.ndarray) -> dict:
    out = {"itself": ref}
    out["shift z1 y2"] = np.roll(ref, (1, 2), axis=(0, 1))
    out["shift x1"] = np.roll(ref, 1, axis=2)
    dil = ref.copy()
    dil[ndimage.binary_dilation(ref == 2) & (ref > 0)] = 2  # tumor grows into the kidney by a voxel
    out["tumor dilated 1"] = dil
    return out


def library_scores(pred, ref, spacing, tolerances):
    import surface_distance

    out = {}
    pm, rm = region_masks(pred), region_masks(ref)
    for region, tol in zip(REGIONS, tolerances):
        if pm[region].any() and rm[region].any():
            d = surface_distance.compute_surface_distances(rm[region], pm[region], list(spacing))
            out[f"surface_dice_{region}"] = float(surface_distance.compute_surface_dice_at_tolerance(d, tol))
            out[f"hd95_{region}"] = float(surface_distance.compute_robust_hausdorff(d, 95))
    return out


def monai_scores(pred, ref, spacing, tolerances):
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    out = {}
    pm, rm = region_masks(pred), region_masks(ref)
    for region, tol in zip(REGIONS, tolerances):
        p, r = pm[region], rm[region]
        if not p.any() or not r.any():
            continue
        box = bounding_box(p | r, 2)
        tp = torch.from_numpy(np.ascontiguousarray(p[box]))[None, None].float()
        tr = torch.from_numpy(np.ascontiguousarray(r[box]))[None, None].float()
        for sub in (True, False):
            v = compute_surface_dice(tp, tr, [tol], include_background=True, spacing=list(spacing), use_subvoxels=sub)
            out[f"surface_dice_{region}" + ("" if sub else "_voxels")] = float(v.item())
        hd = compute_hausdorff_distance(tp, tr, include_background=True, percentile=95, spacing=list(spacing))
        out[f"hd95_{region}"] = float(hd.item())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "kits19-masks"))
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--tolerances", default="kits21", choices=sorted(TOLERANCES_MM))
    args = ap.parse_args(argv)
    tol = TOLERANCES_MM[args.tolerances]
    cases = sorted(Path(args.data).glob("case_*"))[: args.cases]
    try:
        import monai  # noqa: F401

        have_monai = True
    except ImportError:
        have_monai = False
        print("monai is not installed: timings only")
    diffs = {}
    t_read, t_ours, t_lib, t_monai, n_scored, n_compared = 0.0, 0.0, 0.0, 0.0, 0, 0
    print(
        "| case | slices | spacing (mm) | perturbation | SD kid+masses | SD masses | SD tumor | HD95 kid+masses (mm) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for case in cases:
        t0 = time.process_time()
        ref = readers.read_labels(case / volumes.KITS_LABELS)
        t_read += time.process_time() - t0
        sp = ref.geometry.spacing
        for name, pred in perturbations(ref.array).items():
            t0 = time.process_time()
            ours = case_scores(pred, ref.array, sp, tol)
            t_ours += time.process_time() - t0
            n_scored += 1
            print(
                f"| {case.name} | {ref.array.shape[0]} | {sp[0]:.2f} x {sp[1]:.2f} | {name} | "
                + " | ".join(f"{ours[f'surface_dice_{r}']:.4f}" for r in REGIONS)
                + f" | {ours['hd95_kidney_masses']:.2f} |"
            )
            if name == "itself":
                continue
            n_compared += 1
            t0 = time.process_time()
            for k, v in library_scores(pred, ref.array, sp, tol).items():
                diffs.setdefault(("surface-distance", k), []).append(abs(v - ours[k]))
            t_lib += time.process_time() - t0
            if have_monai:
                t0 = time.process_time()
                theirs = monai_scores(pred, ref.array, sp, tol)
                t_monai += time.process_time() - t0
                for k, v in theirs.items():
                    base = k.replace("_voxels", "")
                    diffs.setdefault(("MONAI", k), []).append(abs(v - ours[base]))
    print(
        f"\n{len(cases)} cases, {n_scored} scored pairs; CPU: reading {t_read / len(cases):.2f} s per case, "
        f"napari-kidseg's three regions {t_ours / n_scored:.2f} s per pair, surface-distance's "
        f"{t_lib / max(n_compared, 1):.2f} s"
        + (f", MONAI's (both variants and HD95) {t_monai / max(n_compared, 1):.2f} s" if have_monai else "")
    )
    print("\n| napari-kidseg against | score | pairs | max abs difference | mean abs difference |")
    print("|---|---|---|---|---|")
    for (lib, k), d in sorted(diffs.items()):
        d = np.asarray(d)
        print(f"| {lib} | {k} | {len(d)} | {d.max():.2e} | {d.mean():.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
