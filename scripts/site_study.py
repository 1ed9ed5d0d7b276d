"""The fine-tune defaults' site study (model card, "Fine-tuning on one corrected case").

    python scripts/site_study.py --out runs/site-study [--site-cases 4] [--configs default,lr2e-4,refine-only]

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
import json
import os
import time
from pathlib import Path

import numpy as np

from napari_kidseg import files, metrics, volumes
from napari_kidseg.cascade import Cascade
from napari_kidseg.finetuning import DEFAULTS, finetune_models
from napari_kidseg.labelmap_phantom import find_label_maps, split_label_maps
from napari_kidseg.models import bundled_checkpoint
from napari_kidseg.phantom import write_phantom_cases

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CONFIGS = {
    "default": {},
    "lr2e-4": {"lr": 2e-4},
    "refine-only": {"stages": ("refine",)},
    "20x50": {"epochs": 20},
    "no-replay": {"n_replay": 0},
    "gentle": {"lr": 2e-5, "n_replay": 8},
    "5x50-replay8": {"epochs": 5, "n_replay": 8},
    "short": {"epochs": 5, "steps_per_epoch": 20, "lr": 2e-5, "n_replay": 8},
    "short-frozen": {"epochs": 5, "steps_per_epoch": 20, "lr": 2e-5, "n_replay": 8, "freeze_encoder": True},
    "mid-frozen": {"epochs": 10, "steps_per_epoch": 20, "lr": 5e-5, "n_replay": 8, "freeze_encoder": True},
}
SITES = {
    # a portal-venous protocol at 3 mm with the phase's own HU (a site like the training data)
    "venous-3mm": {"phase": "venous", "slice_thickness": 3.0, "random_contrast": 0.0, "site": 1, "n_tumors": 1},
    # an unusual one: 5 mm arterial slices whose tissue contrasts were drawn at random once
    "odd-5mm": {"phase": "arterial", "slice_thickness": 5.0, "random_contrast": 1.0, "site": 2, "n_tumors": 1},
}


def case_scores(cascade: Cascade, case: Path) -> dict:
    ct, ref = volumes.read_kits_case(case)
    fused = cascade.run(ct.array, ct.geometry.spacing).fuse()
    s = metrics.kits_scores(fused, ref.array)
    s["false_tumor_ml"] = metrics.false_ml(fused, ref.array, ct.geometry.spacing)["false_tumor_ml"]
    return {k: float(v) for k, v in s.items()}


def real_ct_dice(cascade: Cascade) -> float:
    real = SHARED / "realct" / "totalseg-abdomen-3mm"
    ct = volumes.read_ct(real / "ct.nii.gz")
    ref = volumes.read_labels(real / "kidneys.nii.gz", like=ct)
    return float(metrics.dice(cascade.run(ct.array, ct.geometry.spacing).fuse() > 0, ref.array > 0))


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
    ap.add_argument("--configs", default="default,lr2e-4,refine-only")
    ap.add_argument("--folds", type=int, default=None, help="leave-one-out over the first N site cases")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out) / args.site
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def save():
        with files.atomic_path(results_path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(results, indent=1))

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
        settings = {**DEFAULTS, **CONFIGS[name]}
        runs = results.setdefault("configs", {}).setdefault(
            name, {"settings": {k: str(v) for k, v in settings.items()}}
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
            kwargs = dict(CONFIGS[name])
            t0 = time.time()
            report = finetune_models(corr, corr / "models" / "child", **kwargs, log=lambda *a: None)
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
