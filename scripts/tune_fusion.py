"""Choose the fusion defaults (alpha, tumor and kidney thresholds) on validation phantoms.

    python scripts/tune_fusion.py --coarse C --refine R VAL_FOLDER... [--alphas 0.2 0.4 0.6]
        [--tumor 0.3 0.4 0.5 0.6] [--kidney 0.5] [--out grid.json]

The folders are the training run's validation sets (seeds 8000+ in scripts/make_bundled_data.sh),
never the held-out evaluation sets (9000+): choosing the defaults on the sets that report them
would flatter the figures. Each case runs through the networks once; every grid point is a
re-fusion (the widget's sliders do the same), scored with the anatomy check on, as a user sees it.
The table is sorted by the KiTS composite (mean of kidney+tumor and tumor Dice).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
from pathlib import Path

from napari_kidseg.cascade import Cascade
from napari_kidseg.io import readers, volumes

_spec = importlib.util.spec_from_file_location("evaluate_bundled", Path(__file__).with_name("evaluate_bundled.py"))
evaluate_bundled = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_bundled)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="KiTS-layout validation folders")
    ap.add_argument("--coarse")
    ap.add_argument("--refine")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--tumor", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6])
    ap.add_argument("--kidney", type=float, nargs="+", default=[0.5])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cascade = Cascade(args.coarse, args.refine, device="cpu")
    cases = []
    for folder in args.folders:
        for case in volumes.kits_cases(folder):
            ct, ref = readers.read_kits_case(case)
            cases.append((cascade.run(ct.array, ct.geometry.spacing), ref.array, ct.geometry.spacing))
            print(f"ran {case}", flush=True)
    grid = []
    for alpha, kt, tt in itertools.product(args.alphas, args.kidney, args.tumor):
        rows = []
        for result, ref, spacing in cases:
            fused = result.fuse(alpha=alpha, kidney_threshold=kt, tumor_threshold=tt)
            rows.append(evaluate_bundled._set_row(fused, ref, spacing, result.verdict.removed_ml()))
        s = evaluate_bundled._summarise(rows)
        s.update(alpha=alpha, kidney_threshold=kt, tumor_threshold=tt)
        s["composite"] = (s["kidney_tumor_dice"] + s["tumor_dice"]) / 2
        grid.append(s)
        print(json.dumps(s), flush=True)
    grid.sort(key=lambda s: -s["composite"])
    print(f"{len(cases)} validation cases from {', '.join(map(str, args.folders))}")
    print("| alpha | kidney thr | tumor thr | K+T Dice | tumor Dice | composite | false tumor mL | regions |")
    print("|---|---|---|---|---|---|---|---|")
    for s in grid:
        print(
            f"| {s['alpha']} | {s['kidney_threshold']} | {s['tumor_threshold']} | {s['kidney_tumor_dice']:.3f} "
            f"| {s['tumor_dice']:.3f} | {s['composite']:.3f} | {s['false_tumor_ml']:.1f} "
            f"| {s['false_tumor_regions_per_case']:.1f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(grid, indent=1))


if __name__ == "__main__":
    main()
