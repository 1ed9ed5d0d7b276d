"""Score a pair of checkpoints on the 27 real KiTS19 tumor slices (../shared/data/kits19-slices).

    python scripts/evaluate_real_tumors.py [--coarse C --refine R] [--alpha A] [--stages] [--json out.json]

Evaluation only: these slices are never trained on (napari_kidseg/kits_slices.py says how the
8-bit slices are mapped back to HU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from napari_kidseg import kits_slices  # noqa: E402
from napari_kidseg.cascade import Cascade  # noqa: E402

SLICES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kits19-slices"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coarse")
    ap.add_argument("--refine")
    ap.add_argument("--root", default=str(SLICES))
    ap.add_argument("--no-anatomy-check", action="store_true")
    ap.add_argument("--smooth-noise", action="store_true", help="Cascade.run(smooth_noise=True)")
    ap.add_argument("--alpha", type=float, default=0.4, help="fusion weight (1: the coarse stage alone, 0: refine)")
    ap.add_argument("--stages", action="store_true", help="also what each stage says on each tumor")
    ap.add_argument("--json", help="write rows and summary here")
    args = ap.parse_args()
    if not kits_slices.slice_cases(args.root):
        print(f"no KiTS19 slices under {args.root}", file=sys.stderr)
        return 2
    cascade = Cascade(args.coarse, args.refine, device="cpu")
    check, smooth = not args.no_anatomy_check, args.smooth_noise
    out = kits_slices.evaluate(
        cascade, args.root, alpha=args.alpha, anatomy_check=check, smooth_noise=smooth, stages=args.stages
    )
    for r in out["rows"]:
        kt, t = r["kidney_tumor_dice"], r["tumor_dice"]
        line = f"{r['case']:22s} kidney+tumor {kt:.3f}  tumor {t:.3f}  touched {r['touched']}"
        if args.stages:
            st = r["stages"]
            refine = "-" if st["refine_tumor"] is None else f"{st['refine_tumor']:.0f}"
            line += (
                f"  on the tumor (/255): coarse p(kidney or tumor) {st['coarse_kidney_or_tumor']:.0f}, "
                f"p(tumor) {st['coarse_tumor']:.0f}, refine p(tumor) {refine}"
            )
        print(line)
    s = out["summary"]
    print(
        f"{s['slices']} slices: kidney+tumor Dice {s['kidney_tumor_dice_mean']:.3f} "
        f"(pooled {s['kidney_tumor_dice_pooled']:.3f}), tumor Dice {s['tumor_dice_mean']:.3f} "
        f"(pooled {s['tumor_dice_pooled']:.3f}), tumors touched {s['touched']} of {s['slices']}"
    )
    if args.stages:
        print(f"the coarse organ map on all tumor pixels: {s['organ_share_of_tumor_pixels']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
