"""Score variants of the rules after fusion (napari_kidseg/enhancement.py, fusion.MIN_TUMOR_ML) on phantom folders.

    kidseg phantom runs/eval/val --cases 10 --seed 8000 --matrix 256 --max-slices 100
    kidseg phantom runs/eval/anat-val --cases 10 --seed 8100 --matrix 256 \
        --anatomy ../shared/data/flare22-labels --maps train
    python scripts/tune_contrast.py runs/eval/val runs/eval/anat-val \
        --variants '[{}, {"MIN_AREA_MM2": 150, "MIN_VOLUME_ML": 0}, {"OPEN_MM": 5}, {"MIN_TUMOR_ML": 0}]'

Validation phantoms only (seeds 8000+ and 8100+ on training maps): the held-out sets of
scripts/evaluate_bundled.py stay for the figures. Each case runs the bundled cascade once (its
result cached under --cache); each variant, a dict of enhancement.py's constants (and fusion.py's
MIN_TUMOR_ML, the tumor specks left as kidney), is then scored
from the cache: kidney+tumor and tumor Dice, tumors found, false tumor mL and regions per case,
and false tumor per contrast phase. The first row is tumor by contrast off.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from napari_kidseg import enhancement, fusion, metrics  # noqa: E402
from napari_kidseg.cascade import Cascade, CascadeResult  # noqa: E402
from napari_kidseg.io import readers, volumes  # noqa: E402

KNOBS = ("DROP_HU", "FLOOR_HU", "ENHANCED_HU", "OPEN_MM", "MIN_AREA_MM2", "MIN_VOLUME_ML", "CORTEX_PERCENTILE")
FUSION_KNOBS = ("MIN_TUMOR_ML",)  # fusion.py's: the smallest tumor region kept as tumor


def cached_cases(folder: Path, cache: Path, cascade_factory):
    """(saved result, reference labels, spacing, phase) of every case, running the cascade once."""
    out = []
    for case in volumes.kits_cases(folder):
        saved = cache / folder.name / f"{case.name}.npz"
        ct, ref = readers.read_kits_case(case)
        if not saved.exists():
            saved.parent.mkdir(parents=True, exist_ok=True)
            cascade_factory().run(ct.array, ct.geometry.spacing).save_probabilities(saved)
        info = case / "phantom.json"
        phase = json.loads(info.read_text()).get("phase", "?") if info.exists() else "?"
        out.append((saved, ref.array, ct.geometry.spacing, phase))
    return out


def score(cases, rule_on: bool) -> str:
    rows, found, mid_found, false_ml, regions, by_phase = [], [], [], [], [], {}
    for saved, ref, spacing, phase in cases:
        result, _ = CascadeResult.load_probabilities(saved)
        if result.tissue is None:
            raise SystemExit(f"{saved}: cached without CT levels (an older napari-kidseg); delete the cache")
        labels = result.fuse(contrast_tumor=rule_on)
        rows.append(metrics.kits_scores(labels, ref))
        d = metrics.tumor_detection(labels, ref, spacing)
        found += [t["found"] for t in d["tumors"]]
        mid_found += [t["found"] for t in d["tumors"] if 5.0 <= t["volume_ml"] < 50.0]
        false_ml.append(sum(d["false_tumors_ml"]))
        regions.append(len(d["false_tumors_ml"]))
        by_phase.setdefault(phase, []).append(false_ml[-1])
    phases = " ".join(f"{p} {np.mean(v):.0f}" for p, v in sorted(by_phase.items()))
    return (
        f"kidney+tumor {np.mean([r['kidney_tumor_dice'] for r in rows]):.3f}  "
        f"tumor {np.mean([r['tumor_dice'] for r in rows]):.3f}  found {sum(found)}/{len(found)}  "
        f"5-50 mL {sum(mid_found)}/{len(mid_found)}  false tumor {np.mean(false_ml):.1f} mL "
        f"(max {max(false_ml):.0f}), {np.mean(regions):.1f} regions/case; by phase (mL): {phases}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--variants", default="[{}]", help="JSON list of dicts of enhancement.py constants")
    ap.add_argument("--cache", type=Path, default=Path("runs/eval/cache"))
    args = ap.parse_args()
    variants = json.loads(args.variants)
    for v in variants:
        unknown = set(v) - set(KNOBS) - set(FUSION_KNOBS)
        if unknown:
            known = ", ".join(KNOBS + FUSION_KNOBS)
            ap.error(f"--variants: {sorted(unknown)} are not constants of enhancement.py or fusion.py ({known})")
    factory = functools.cache(lambda: Cascade(device="cpu"))  # loaded once, only if a case is not cached
    sets = {f.name: cached_cases(f, args.cache, factory) for f in args.folders}
    defaults = {k: getattr(enhancement, k) for k in KNOBS} | {k: getattr(fusion, k) for k in FUSION_KNOBS}
    for v in [None, *variants]:
        for k, value in {**defaults, **(v or {})}.items():
            setattr(fusion if k in FUSION_KNOBS else enhancement, k, value)
        name = "rule off" if v is None else json.dumps(v)
        for folder, cases in sets.items():
            print(f"{folder:16s} {name:40s} {score(cases, v is not None)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
