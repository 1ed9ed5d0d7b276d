"""The fine-tune defaults' site study (model card, "Fine-tuning defaults: the site study").

    python scripts/site_study.py --out runs/site-study [--site-cases 4] [--configs rule,fixed,refine-only]
    python scripts/site_study.py --real --out runs/site-study [--configs rule,fixed] [--threads 1]

``--real``: the real proxy. The shared real CT with its kidney labels is the one corrected case
(exported as the widget would, every slice reviewed); both stages are fine-tuned from the bundled
models with each setting; the children are scored on the shared 20-slice DICOM series, which holds
no kidney (its false kidney in mL, and how much of it lies on the spleen and the liver by
``dicom-series-organs.nii.gz``), on the 27 real KiTS19 tumor slices (kidney+tumor and tumor Dice,
anatomy check off: see :func:`kits_slices_scores`) and on the real CT itself (training data then).

A "site" is phantoms of one scanner and protocol: built on the 10 held-out FLARE maps (never
trained on), one phase and slice thickness, tissue HU, blur and noise drawn once and varied
little (``make_labelmap_phantom(site=...)``). Leave-one-out: each site case in turn is the one
"corrected" case (its true labels exported as a correction), both stages are fine-tuned from the
bundled models with a setting, and the children are scored on the site's other cases (the gain
the issue asks for) and on cases of other sites (procedural phantoms of held-out seeds and the
shared real CT: what a fine-tune may cost elsewhere). Everything is written to ``OUT/results.json``
as it is measured, so an interrupted study keeps what it has; a rerun skips what is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from napari_kidseg import kits_slices, metrics
from napari_kidseg.cascade import Cascade
from napari_kidseg.finetuning import STAGES, finetune_models
from napari_kidseg.io import files, readers, volumes
from napari_kidseg.models import bundled_checkpoint
from napari_kidseg.phantoms.labelmap import find_label_maps, split_label_maps
from napari_kidseg.phantoms.writer import write_phantom_cases
from napari_kidseg.training import FinetuneSettings

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FIXED = {"schedule": "fixed", "lr": 2e-5}  # the earlier defaults: 5 x 20 steps at 2e-5, 8 replayed phantoms
CONFIGS = {
    "rule": {},  # today's default: the held-out rule
    "rule-no-lesson": {"lesson_weight": 0.0},
    "rule-lesson20": {"lesson_weight": 20.0},  # the changed voxels weigh 21x (the default: 5x)
    "rule-lr2e-5": {"lr": 2e-5},  # the held-out rule from the old defaults' learning rate
    "rule-refine-only": {"stages": ("refine",)},  # the coarse stage left as it is
    "rule-frozen": {"freeze_encoder": True},  # the held-out rule moving the decoders only
    "fixed": FIXED,
    "fixed-10x50-5e-5": {**FIXED, "epochs": 10, "steps_per_epoch": 50, "lr": 5e-5},
    "lr2e-4": {**FIXED, "lr": 2e-4},
    "refine-only": {**FIXED, "stages": ("refine",)},
    "20x50": {**FIXED, "epochs": 20},
    "no-replay": {**FIXED, "n_replay": 0},
    "5x50-replay8": {**FIXED, "epochs": 5, "n_replay": 8},
    "short-frozen": {**FIXED, "freeze_encoder": True},
    "mid-frozen": {**FIXED, "epochs": 10, "lr": 5e-5, "freeze_encoder": True},
}
SITES = {
    # a portal-venous protocol at 3 mm with the phase's own HU (a site like the training data)
    "venous-3mm": {"phase": "venous", "slice_thickness": 3.0, "random_contrast": 0.0, "site": 1, "n_tumors": 1},
    # an unusual one: 5 mm arterial slices whose tissue contrasts were drawn at random once
    "odd-5mm": {"phase": "arterial", "slice_thickness": 5.0, "random_contrast": 1.0, "site": 2, "n_tumors": 1},
}


def setting(name: str, **more) -> tuple[FinetuneSettings, tuple]:
    """A configuration's settings (the defaults with its changes and ``more``) and its stages."""
    changes = {k: v for k, v in {**CONFIGS[name], **more}.items() if k != "stages"}
    return dataclasses.replace(FinetuneSettings(), **changes), tuple(CONFIGS[name].get("stages", STAGES))


def case_scores(cascade: Cascade, case: Path) -> dict:
    ct, ref = readers.read_kits_case(case)
    fused = cascade.run(ct.array, ct.geometry.spacing).fuse()
    s = metrics.kits_scores(fused, ref.array)
    s["false_tumor_ml"] = metrics.false_ml(fused, ref.array, ct.geometry.spacing)["false_tumor_ml"]
    return {k: float(v) for k, v in s.items()}


def real_ct_dice(cascade: Cascade) -> float:
    real = SHARED / "realct" / "totalseg-abdomen-3mm"
    ct = volumes.read_ct(real / "ct.nii.gz")
    ref = readers.read_labels(real / "kidneys.nii.gz", like=ct)
    return float(metrics.dice(cascade.run(ct.array, ct.geometry.spacing).fuse() > 0, ref.array > 0))


def kits_slices_scores(cascade: Cascade) -> dict:
    """Mean kidney+tumor and tumor Dice of the fused cascade on the 27 real KiTS19 tumor slices
    (napari_kidseg.kits_slices), anatomy check off as in the study's first runs (then on a 21 mm
    slab of the repeated slice, where it removed nearly every kidney)."""
    s = kits_slices.evaluate(cascade, SHARED / "kits19-slices", anatomy_check=False)["summary"]
    return {"slices": s["slices"], "kidney_tumor_dice": s["kidney_tumor_dice_mean"], "tumor_dice": s["tumor_dice_mean"]}


def dicom_series_false_kidney(cascade: Cascade) -> dict:
    """The shared 20-slice DICOM series holds no kidney: mL labelled there, and how much of it on the spleen."""
    real = SHARED / "realct" / "totalseg-abdomen-3mm"
    ct = volumes.read_ct(real / "dicom-series")
    organs = readers.read_labels(real / "dicom-series-organs.nii.gz", like=ct).array
    fused = cascade.run(ct.array, ct.geometry.spacing).fuse() > 0
    sp = ct.geometry.spacing
    return {
        "false_kidney_ml": metrics.volume_ml(fused, sp),
        "on_spleen_ml": metrics.volume_ml(fused & (organs == 1), sp),
        "on_liver_ml": metrics.volume_ml(fused & (organs == 5), sp),
    }


def real_proxy_scores(coarse, refine) -> dict:
    """The real proxy: the DICOM series' false kidney, the 27 tumor slices, the shared real CT."""
    cascade = Cascade(coarse, refine)
    return {
        "dicom_series": dicom_series_false_kidney(cascade),
        "kits19_slices": kits_slices_scores(cascade),
        "realct_kidney_dice": real_ct_dice(cascade),
    }


def results_store(folder: Path):
    """``folder/results.json`` as a dict (empty when new) and a function that writes it back atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}

    def save():
        with files.atomic_path(path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(results, indent=1))

    return results, save


def real_study(out: Path, names: list[str], time_cap: bool = True) -> dict:
    """The real proxy (module docstring), one fine-tune per setting; OUT/real/results.json."""
    from napari_kidseg.review.corrections_folder import export_correction

    out = out / "real"
    results, save = results_store(out)
    if "before" not in results:
        results["before"] = real_proxy_scores(bundled_checkpoint("coarse"), bundled_checkpoint("refine"))
        results["bundled"] = {s: bundled_checkpoint(s).name for s in ("coarse", "refine")}
        save()
    real = SHARED / "realct" / "totalseg-abdomen-3mm"
    for name in names:
        if name in results.setdefault("configs", {}):
            continue
        corr = out / f"corrections-{name}"
        if not corr.exists():
            ct = volumes.read_ct(real / "ct.nii.gz")
            # as the tool exports a reviewed draft: the labels corrected, the draft's organ map beside them
            draft = Cascade(bundled_checkpoint("coarse"), bundled_checkpoint("refine"), device="cpu")
            organs = draft.run(ct.array, ct.geometry.spacing).organs
            kidneys = readers.read_labels(real / "kidneys.nii.gz", like=ct).array
            export_correction(corr, ct, kidneys, organs=organs)
        t0 = time.time()
        settings, stages = setting(name, **({} if time_cap else {"max_minutes": None}))
        report = finetune_models(corr, corr / "models" / f"child-{int(t0)}", settings, stages=stages, log=print)
        results["configs"][name] = {
            "settings": {**dataclasses.asdict(settings), "stages": stages},
            "seconds": report["seconds"],
            "wall_s": time.time() - t0,
            "stopped": report["stopped"],
            "worse": report["worse_on"],
            "guard": {k: report[k] for k in ("before", "after", "phantoms_before", "phantoms_after")},
            "false_kidney_guard": {
                k: report.get(k) for k in ("false_kidney_guard", "false_kidney_before", "false_kidney_after")
            },
            "scores": real_proxy_scores(report["models"]["coarse"], report["models"]["refine"]),
        }
        save()
        print(f"{name}: {json.dumps(results['configs'][name], indent=1)}", flush=True)
    print_real_table(results)
    return results


def print_real_table(results):
    print(
        "| setting | DICOM series false kidney mL (on spleen) | 27 tumor slices kidney+tumor / tumor Dice | "
        "real CT kidney Dice (trained on) | held-out phantoms kidney+tumor | stopped | s (both stages) |"
    )
    print("|---|---|---|---|---|---|---|")

    def row(name, sc, guard="", stop="", secs=""):
        d, k = sc["dicom_series"], sc["kits19_slices"]
        print(
            f"| {name} | {d['false_kidney_ml']:.0f} ({d['on_spleen_ml']:.0f}) | {k['kidney_tumor_dice']:.3f} / "
            f"{k['tumor_dice']:.3f} | {sc['realct_kidney_dice']:.3f} | {guard} | {stop} | {secs} |"
        )

    row("bundled (before)", results["before"])
    for name, r in results.get("configs", {}).items():
        g = r["guard"]
        guard = (
            f"{g['phantoms_before']['kidney_tumor_dice']:.3f} -> {g['phantoms_after']['kidney_tumor_dice']:.3f}"
            if g.get("phantoms_before")
            else ""
        )
        stop = "; ".join(f"{k} step {v['best_step']}/{v['steps']} ({v['reason']})" for k, v in r["stopped"].items())
        secs = " + ".join(f"{r['seconds'][k]:.0f}" for k in ("coarse", "refine") if k in r["seconds"])
        row(name, r["scores"], guard, stop, f"{secs} (total {r['seconds']['total']:.0f})")


def score_set(coarse, refine, cases) -> dict:
    cascade = Cascade(coarse, refine)
    return {key(c): case_scores(cascade, c) for c in cases} | {"realct": {"kidney_dice": real_ct_dice(cascade)}}


def key(case: Path) -> str:
    return f"{case.parent.name}/{case.name}"  # site and other-site cases share names (case_00000...)


def mean(rows, key):
    vals = [r[key] for r in rows if key in r]
    return float(np.mean(vals)) if vals else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/site-study")
    ap.add_argument("--site", default="venous-3mm", choices=sorted(SITES))
    ap.add_argument("--site-cases", type=int, default=4)
    ap.add_argument("--matrix", type=int, default=256)
    ap.add_argument("--other", default="runs/eval/heldout-procedural", help="cases of other sites")
    ap.add_argument("--n-other", type=int, default=4)
    ap.add_argument("--configs", default="rule,fixed")
    ap.add_argument("--real", action="store_true", help="the real proxy instead of the phantom sites")
    ap.add_argument(
        "--no-time-cap",
        action="store_true",
        help="--real: no per-stage time budget, so that a loaded machine does not cut the runs short",
    )
    ap.add_argument("--folds", type=int, default=None, help="leave-one-out over the first N site cases")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.real:
        real_study(Path(args.out), args.configs.split(","), time_cap=not args.no_time_cap)
        return
    out = Path(args.out) / args.site
    results, save = results_store(out)
    site_dir = out / "cases"
    if len(volumes.kits_cases(site_dir) if site_dir.exists() else []) < args.site_cases:
        _, held_maps = split_label_maps(find_label_maps(SHARED / "flare22-labels"))
        t0 = time.time()
        write_phantom_cases(
            site_dir,
            args.site_cases,
            9300,
            overwrite=True,
            label_maps=held_maps,
            matrix=args.matrix,
            **SITES[args.site],
        )
        print(f"site cases written in {time.time() - t0:.0f} s", flush=True)
    site_cases = volumes.kits_cases(site_dir)[: args.site_cases]
    other_cases = volumes.kits_cases(Path(args.other))[: args.n_other]
    if "before" not in results:
        t0 = time.time()
        coarse, refine = bundled_checkpoint("coarse"), bundled_checkpoint("refine")
        results["before"] = score_set(coarse, refine, site_cases + other_cases)
        results["site"] = {"name": args.site, **SITES[args.site], "matrix": args.matrix}
        save()
        print(f"bundled scored in {time.time() - t0:.0f} s", flush=True)

    folds = site_cases[: args.folds or len(site_cases)]
    for name in args.configs.split(","):
        settings, stages = setting(name)
        runs = results.setdefault("configs", {}).setdefault(
            name, {"settings": {**dataclasses.asdict(settings), "stages": stages}}
        )
        for case in folds:
            if key(case) in runs:
                continue
            corr = out / "corrections" / f"{name}-{case.name}"
            (corr / "case_00000").mkdir(parents=True, exist_ok=True)
            for f in (volumes.KITS_IMAGE, volumes.KITS_LABELS):
                link = corr / "case_00000" / f
                if not link.exists():
                    os.symlink((case / f).resolve(), link)
            t0 = time.time()
            report = finetune_models(corr, corr / "models" / "child", settings, stages=stages, log=lambda *a: None)
            seconds = time.time() - t0
            models = report["models"]
            others = [c for c in site_cases if c != case] + other_cases
            scores = score_set(models["coarse"], models["refine"], others)
            runs[key(case)] = {"seconds": report["seconds"], "wall_s": seconds, "scores": scores}
            save()
            print(f"{name} trained on {case.name}: {seconds:.0f} s", flush=True)
    print_table(results, site_cases, other_cases)


def print_table(results, site_cases, other_cases):
    before = results["before"]
    other_names = [key(c) for c in other_cases]
    site_names = [key(c) for c in site_cases]
    print(
        "| setting | same site kidney+tumor Dice | same site tumor Dice | other sites kidney+tumor Dice | "
        "real CT kidney Dice | fine-tune s (both stages) |"
    )
    print("|---|---|---|---|---|---|")
    b_site = [before[n] for n in site_names]
    b_other = [before[n] for n in other_names]
    print(
        f"| bundled (before) | {mean(b_site, 'kidney_tumor_dice'):.3f} | {mean(b_site, 'tumor_dice'):.3f} | "
        f"{mean(b_other, 'kidney_tumor_dice'):.3f} | {before['realct']['kidney_dice']:.3f} | |"
    )
    for name, runs in results.get("configs", {}).items():
        folds = [v for k, v in runs.items() if k != "settings"]
        if not folds:
            continue
        # paired: each fold's gain is measured on the cases it did not train on, against the bundled models
        gains_kt, gains_t, other, real, secs = [], [], [], [], []
        for fold in folds:
            s = fold["scores"]
            for n in site_names:
                if n in s:
                    gains_kt.append(s[n]["kidney_tumor_dice"] - before[n]["kidney_tumor_dice"])
                    gains_t.append(s[n]["tumor_dice"] - before[n]["tumor_dice"])
            other.append(np.mean([s[n]["kidney_tumor_dice"] - before[n]["kidney_tumor_dice"] for n in other_names]))
            real.append(s["realct"]["kidney_dice"])
            secs.append(fold["seconds"]["total"])
        print(
            f"| {name} ({len(folds)} folds) | {mean(b_site, 'kidney_tumor_dice') + np.mean(gains_kt):.3f} "
            f"({np.mean(gains_kt):+.3f}) | {mean(b_site, 'tumor_dice') + np.mean(gains_t):.3f} "
            f"({np.mean(gains_t):+.3f}) | {mean(b_other, 'kidney_tumor_dice') + np.mean(other):.3f} "
            f"({np.mean(other):+.3f}) | {np.mean(real):.3f} | {np.mean(secs):.0f} |"
        )


if __name__ == "__main__":
    main()
