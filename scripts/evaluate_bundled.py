"""The figures of napari_kidseg/weights/README.md: held-out phantoms, the real CT, fine-tuning.

    python scripts/evaluate_bundled.py [--coarse C --refine R] [--skip-finetune] [--out DIR] [--figure PNG]
    python scripts/evaluate_bundled.py --sets --cases 30 [--coarse C --refine R] [--out DIR]

``--sets`` (version 4): every evaluation set, each scored with the anatomy check on and off:
procedural phantoms of held-out seeds (9000+), phantoms built on the 10 held-out FLARE maps
(seeds 9100+), the shared real CT (a training case from version 4 on) and the shared real DICOM
series (20 upper-abdomen slices with no kidney: everything labelled is false). Per set: mean
kidney+tumor and tumor Dice, false kidney and false tumor mL, false tumor regions per case,
tumors 5-50 mL found, and what the anatomy check removed.

1. Held-out phantoms (seeds 9000+, never used in training): KiTS scores of coarse alone
   (alpha = 1) and of the fused cascade (alpha = 0.4), and the fused cascade's lesion-wise tumor
   detection by tumor volume (``--cases 30`` gives that table enough tumors to mean something).
2. The real CT in ../shared/data/realct/totalseg-abdomen-3mm: kidney Dice (label > 0 against
   kidneys.nii.gz), and where the errors lie (by thirds of the kidneys' extent).
3. Fine-tuning loop: the real CT with its reference labels as a "corrected case"; fine-tune the
   refine model from the given weights (what the widget's button does), then also the coarse
   model; kidney Dice on the real CT and scores on the held-out phantoms before and after each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_kidseg import metrics
from napari_kidseg.cascade import Cascade
from napari_kidseg.finetuning import finetune_stage
from napari_kidseg.io import readers, volumes
from napari_kidseg.phantoms.writer import write_phantom_cases
from napari_kidseg.review.corrections_folder import export_correction
from napari_kidseg.training import FinetuneSettings

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realct" / "totalseg-abdomen-3mm"


def phantom_scores(cascade, cases, detections=None, mirror=False):
    """Mean KiTS scores of coarse alone and of the fused cascade; with a list as ``detections``,
    each case's lesion-wise tumor detection (fused) is appended to it."""
    rows = {"coarse": [], "fused": []}
    for c in cases:
        ct, ref = readers.read_kits_case(c)
        r = cascade.run(ct.array, ct.geometry.spacing, mirror=mirror)
        fused = r.fuse(alpha=0.4)
        rows["coarse"].append(metrics.kits_scores(r.fuse(alpha=1.0), ref.array))
        rows["fused"].append(metrics.kits_scores(fused, ref.array))
        if detections is not None:
            detections.append(metrics.tumor_detection(fused, ref.array, ct.geometry.spacing))
    return {k: {m: float(np.mean([x[m] for x in v])) for m in v[0]} for k, v in rows.items()}


def read_real_ct():
    ct = volumes.read_ct(REAL / "ct.nii.gz")
    return ct, readers.read_labels(REAL / "kidneys.nii.gz", like=ct)


def real_kidney_dice(cascade, real, result=None):
    """Kidney Dice of coarse alone and of the fused cascade on the real CT (``result``: a run
    already made on it, so the networks do not run twice)."""
    ct, ref = real
    r = result or cascade.run(ct.array, ct.geometry.spacing)
    return {
        "coarse": metrics.dice(r.fuse(alpha=1.0) > 0, ref.array > 0),
        "fused": metrics.dice(r.fuse(alpha=0.4) > 0, ref.array > 0),
    }


def real_kidney_errors(result, real):
    """Where the fused cascade is right and wrong on the real CT: recall and precision of kidney
    in the inferior, middle and superior thirds of the kidneys' z range, and false-positive mL
    below, within and above that range."""
    ct, ref = real
    pred = result.fuse(alpha=0.4) > 0
    ref = ref.array > 0
    ml = float(np.prod(ct.geometry.spacing)) / 1000.0
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    z0, z1 = int(zs.min()), int(zs.max())
    out = {}
    for name, zz in zip(("inferior_third", "middle_third", "superior_third"), np.array_split(np.arange(z0, z1 + 1), 3)):
        hit = int((ref[zz] & pred[zz]).sum())
        out[name] = {"recall": hit / max(int(ref[zz].sum()), 1), "precision": hit / max(int(pred[zz].sum()), 1)}
    fp = (pred & ~ref).sum(axis=(1, 2)) * ml
    out["false_positive_ml"] = {
        "below": float(fp[:z0].sum()),
        "within": float(fp[z0 : z1 + 1].sum()),
        "above": float(fp[z1 + 1 :].sum()),
    }
    out["reference_ml"] = float(ref.sum() * ml)
    return out


def real_ct_figure(result, real, path):
    """Coronal and axial slices of the real CT with the reference kidneys (green), the fused
    cascade (red) and the coarse probability: where the errors of the report lie."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ct, ref = real
    a, g = ct.array, ref.array > 0
    fused, p = result.fuse(alpha=0.4) > 0, result.coarse_meta / 255.0
    dz, dy, dx = ct.geometry.spacing
    zs, ys, _ = np.nonzero(g)
    y = int(np.median(ys))
    z_hi = int(zs.max())
    picks = [("coronal", y, None), ("axial", None, int(np.percentile(zs, 50))), ("axial", None, z_hi)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.5))
    for col, (view, yy, zz) in enumerate(picks):
        img, gt, fu, pr = (
            (a[:, yy], g[:, yy], fused[:, yy], p[:, yy]) if view == "coronal" else (a[zz], g[zz], fused[zz], p[zz])
        )
        aspect = dz / dx if view == "coronal" else dy / dx
        title = f"{view}, y = {yy * dy:.0f} mm" if view == "coronal" else f"axial, z = {zz * dz:.0f} mm"
        for row, label in enumerate(("fused (red) vs reference (green)", "coarse p(kidney)")):
            ax = axes[row, col]
            ax.imshow(
                img, cmap="gray", vmin=-160, vmax=240, origin="lower" if view == "coronal" else "upper", aspect=aspect
            )
            if row == 0:
                ax.contour(fu, [0.5], colors="red", linewidths=1)
            else:
                ax.imshow(
                    np.ma.masked_less(pr, 0.1),
                    cmap="autumn",
                    alpha=0.5,
                    vmin=0,
                    vmax=1,
                    aspect=aspect,
                    origin="lower" if view == "coronal" else "upper",
                )
            ax.contour(gt, [0.5], colors="lime", linewidths=1)
            ax.set_title(f"{title}: {label}", fontsize=9)
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=50)
    plt.close(fig)


SHARED = REAL.parents[1]


def _set_row(pred, ref, spacing, removed_ml=None):
    d = metrics.tumor_detection(pred, ref, spacing)
    return {
        **metrics.kits_scores(pred, ref),
        **metrics.false_ml(pred, ref, spacing),
        "detection": d,
        "removed": removed_ml,
    }


def score_sets(cascade, work: Path, n_cases: int) -> dict:
    """Every evaluation set, with the anatomy check on and off, and on with the tumor specks kept
    (``keep_specks``, as before session 15), from one network run per case."""
    from napari_kidseg.phantoms.labelmap import find_label_maps, split_label_maps

    sets = {}
    proc = work / "heldout-procedural"
    if not proc.exists():
        write_phantom_cases(proc, n_cases, 9000, matrix=256, max_slices=100, jobs=2)
    sets["procedural phantoms (held-out seeds)"] = [(c, None) for c in volumes.kits_cases(proc)[:n_cases]]
    anat = work / "heldout-anatomy"
    if not anat.exists() and (SHARED / "flare22-labels").exists():
        _, held = split_label_maps(find_label_maps(SHARED / "flare22-labels"))
        write_phantom_cases(anat, n_cases, 9100, matrix=256, label_maps=held, jobs=2)
    if anat.exists():
        sets["phantoms on held-out FLARE maps"] = [(c, None) for c in volumes.kits_cases(anat)[:n_cases]]
    if REAL.exists():
        sets["shared real CT (training case)"] = [(REAL / "ct.nii.gz", REAL / "kidneys.nii.gz")]
        sets["shared real DICOM series (no kidney)"] = [(REAL / "dicom-series", None)]
    out = {}
    for name, items in sets.items():
        rows = {"on": [], "off": [], "on_specks_kept": []}
        for src, ref_path in items:
            if ref_path is None and Path(src).is_dir() and (Path(src) / volumes.KITS_IMAGE).exists():
                ct, ref = readers.read_kits_case(src)
                ref = ref.array
            else:
                ct = volumes.read_ct(src)
                ref = readers.read_labels(ref_path, like=ct).array if ref_path else np.zeros(ct.array.shape, np.uint8)
            r = cascade.run(ct.array, ct.geometry.spacing)
            sp = ct.geometry.spacing
            rows["off"].append(_set_row(r.fuse(alpha=0.4, anatomy_check=False), ref, sp))
            rows["on_specks_kept"].append(
                _set_row(r.fuse(alpha=0.4, keep_specks=True), ref, sp, r.verdict.removed_ml())
            )
            on = r.fuse(alpha=0.4)
            rows["on"].append(_set_row(on, ref, sp, r.verdict.removed_ml()))
        out[name] = {k: _summarise(v) for k, v in rows.items()}
        out[name]["cases"] = len(items)
        print(f"{name}: {json.dumps(out[name])}", flush=True)
    return out


def _summarise(rows):
    mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    tumors = [t for r in rows for t in r["detection"]["tumors"]]
    mid = [t for t in tumors if 5.0 <= t["volume_ml"] < 50.0]
    out = {
        "kidney_tumor_dice": mean("kidney_tumor_dice"),
        "tumor_dice": mean("tumor_dice"),
        "false_kidney_ml": mean("false_kidney_ml"),
        "false_tumor_ml": mean("false_tumor_ml"),
        "max_false_tumor_ml": float(max(r["false_tumor_ml"] for r in rows)),
        "false_tumor_regions_per_case": float(np.mean([len(r["detection"]["false_tumors_ml"]) for r in rows])),
        "tumors_5_50_ml_found": f"{sum(t['found'] for t in mid)}/{len(mid)}",
        "tumors_found": f"{sum(t['found'] for t in tumors)}/{len(tumors)}",
    }
    if rows[0]["removed"] is not None:
        out["anatomy_removed_kidney_ml"] = float(np.mean([r["removed"]["kidney"] for r in rows]))
        out["anatomy_removed_tumor_ml"] = float(np.mean([r["removed"]["tumor"] for r in rows]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--coarse")
    ap.add_argument("--refine")
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument(
        "--mirror", action="store_true", help="run the cascade with mirror averaging (kidseg predict --mirror)"
    )
    ap.add_argument("--figure", help="write a PNG of the real CT with reference and predicted kidneys here")
    ap.add_argument("--sets", action="store_true", help="score every evaluation set with the anatomy check on/off")
    ap.add_argument(
        "--bn-momentum",
        type=float,
        default=FinetuneSettings().bn_momentum,
        help="fine-tuning's BatchNorm momentum (default: FinetuneSettings()'s, as kidseg finetune)",
    )
    args = ap.parse_args()
    if args.mirror and not args.skip_finetune:
        ap.error("--mirror scores the cascade only: add --skip-finetune")
    work = Path(args.out or tempfile.mkdtemp(prefix="kidseg-eval-"))
    if args.sets:
        cascade = Cascade(args.coarse, args.refine, device="cpu")
        report = {
            "coarse": str(cascade.coarse_path),
            "refine": str(cascade.refine_path),
            "sets": score_sets(cascade, work, args.cases),
        }
        if args.figure and REAL.exists():
            real = read_real_ct()
            real_ct_figure(cascade.run(real[0].array, real[0].geometry.spacing), real, args.figure)
        print(json.dumps(report, indent=1))
        return
    held = work / "heldout"
    if not held.exists():
        write_phantom_cases(held, args.cases, 9000, matrix=256, max_slices=100, jobs=2)
    cases = volumes.kits_cases(held)
    cascade = Cascade(args.coarse, args.refine, device="cpu")
    detections = []
    report = {
        "heldout_phantoms": phantom_scores(cascade, cases, detections, args.mirror),
        "n_heldout": len(cases),
        "mirror": args.mirror,
    }
    report["heldout_tumor_detection_by_size"] = metrics.detection_by_size(detections)
    report["heldout_false_tumors"] = {
        "count": sum(len(d["false_tumors_ml"]) for d in detections),
        "ml": sum(sum(d["false_tumors_ml"]) for d in detections),
    }
    real = read_real_ct() if REAL.exists() else None
    if real:
        result = cascade.run(real[0].array, real[0].geometry.spacing, mirror=args.mirror)
        report["real_ct_kidney_dice"] = real_kidney_dice(cascade, real, result)
        report["real_ct_kidney_errors"] = real_kidney_errors(result, real)
        if args.figure:
            real_ct_figure(result, real, args.figure)
    if not args.skip_finetune and real:
        corr = work / "corrections"
        if not corr.exists():
            ct, ref = real
            export_correction(corr, ct, ref.array)
        stamp = int(time.time())
        # the widget's loop fine-tunes the refine model; fine-tuning the coarse one as well is the
        # CLI's `kidseg finetune --stage coarse`: both are measured
        t0 = time.time()
        refine_child = work / f"refine-ft-{stamp}.safetensors"
        ft = finetune_stage(
            corr,
            cascade.refine_path,
            refine_child,
            FinetuneSettings(device="cpu", bn_momentum=args.bn_momentum),
            coarse_checkpoint=cascade.coarse_path,
            log=lambda s: None,
        )
        refine_minutes = (time.time() - t0) / 60
        after = Cascade(cascade.coarse_path, refine_child, device="cpu")
        report["finetune_refine"] = {
            "minutes": refine_minutes,
            "real_ct_kidney_dice_before": report["real_ct_kidney_dice"]["fused"],
            "real_ct_kidney_dice_after": real_kidney_dice(after, real)["fused"],
            "heldout_phantoms_after": phantom_scores(after, cases)["fused"],
            "cascade_scores_on_the_corrected_case": ft,
        }
        t0 = time.time()
        coarse_child = work / f"coarse-ft-{stamp}.safetensors"
        ft = finetune_stage(
            corr,
            cascade.coarse_path,
            coarse_child,
            FinetuneSettings(device="cpu", bn_momentum=args.bn_momentum),
            stage="coarse",
            log=lambda s: None,
        )
        coarse_minutes = (time.time() - t0) / 60
        both = Cascade(coarse_child, refine_child, device="cpu")
        report["finetune_refine_then_coarse"] = {
            "minutes": refine_minutes + coarse_minutes,
            "real_ct_kidney_dice_after": real_kidney_dice(both, real)["fused"],
            "heldout_phantoms_after": phantom_scores(both, cases)["fused"],
            "coarse_stage_scores_on_the_corrected_case": ft,
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
