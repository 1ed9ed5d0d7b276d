"""Nephrometry of the real KiTS19 label volumes: the distribution of R.E.N.A.L., PADUA and C-index
over their tumors, how often each part is not assessable, the time per case and any failure.

    python benchmarks/bench_nephrometry.py [--cases 160] [--mirrored 20] [--data ../shared/data/kits19-masks]

Only the labels are public here (no CT), so the renal sinus is what the labels leave unlabelled
inside the kidney's outline; KiTS draws most of the sinus as kidney, which the figures show.
``--mirrored N``: the first N cases are scored again mirrored left-right; every score must be the
same, on the other side (a check with a known answer).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_kidseg.io import readers, volumes  # noqa: E402
from napari_kidseg.nephrometry import NOT_ASSESSABLE, PADUA_PARTS  # noqa: E402
from napari_kidseg.report import describe_case  # noqa: E402


def scores(t):
    return (t["renal"]["score"], t["padua"]["score"], t["c_index"]["value"], round(t["volume_ml"], 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "kits19-masks"))
    ap.add_argument("--cases", type=int, default=160)
    ap.add_argument("--mirrored", type=int, default=20)
    args = ap.parse_args(argv)
    cases = sorted(Path(args.data).glob("case_*"))[: args.cases]
    times, tumors, failures, mirror_diffs, n_mirrored = [], [], [], [], 0
    for k, case in enumerate(cases):
        labels = readers.read_labels(case / volumes.KITS_LABELS)
        t0 = time.process_time()
        try:
            report = describe_case(labels.array, labels.geometry.spacing)
        except Exception as exc:  # noqa: BLE001 - a benchmark lists failures instead of stopping
            failures.append(f"{case.name}: {type(exc).__name__}: {exc}")
            continue
        times.append(time.process_time() - t0)
        tumors += [{"case": case.name, **t} for t in report["tumors"]]
        if k < args.mirrored:
            n_mirrored += 1
            flipped = describe_case(labels.array[:, :, ::-1], labels.geometry.spacing)
            a = sorted(scores(t) for t in report["tumors"])
            b = sorted(scores(t) for t in flipped["tumors"])
            if a != b:
                mirror_diffs.append(f"{case.name}: {a} mirrored {b}")
        print(f"{case.name}: {len(report['tumors'])} tumor(s), {times[-1]:.2f} s", flush=True)
    print(f"\n{len(cases)} cases, {len(tumors)} tumors, {len(failures)} failure(s)")
    for f in failures:
        print("  FAILED", f)
    t = np.asarray(times)
    print(
        f"describe_case (report and nephrometry, CPU): median {np.median(t):.2f} s, 90th percentile "
        f"{np.percentile(t, 90):.2f} s, max {t.max():.2f} s per case"
    )
    big = [x for x in tumors if x["volume_ml"] >= 0.5]  # KiTS19 holds specks of a few voxels
    print(f"\ntumors of at least 0.5 mL: {len(big)} (the rest are specks of {len(tumors) - len(big)} labels)")
    print("\n| part | points | not assessable |\n|---|---|---|")
    for name, get in [(p, lambda x, p=p: x["renal"][p]) for p in "RENL"] + [
        (f"PADUA {p}", lambda x, p=p: x["padua"][p]) for p in PADUA_PARTS
    ]:
        pts = Counter(get(x)["points"] for x in big)
        na = pts.pop(NOT_ASSESSABLE, 0)
        print(f"| {name} | " + ", ".join(f"{k}: {v}" for k, v in sorted(pts.items())) + f" | {na} |")
    for key in ("renal", "padua"):
        exact = Counter(x[key]["points"] for x in big if x[key]["points"] is not None)
        ranged = sum(x[key]["points"] is None for x in big)
        print(f"\n{key} totals: " + ", ".join(f"{k}: {v}" for k, v in sorted(exact.items())) + f"; a range: {ranged}")
        print(
            f"{key} bands: "
            + ", ".join(
                f"{k}: {v}"
                for k, v in Counter(x[key]["complexity" if key == "renal" else "risk"] for x in big).most_common()
            )
        )
    c = np.asarray([x["c_index"]["value"] for x in big if isinstance(x["c_index"]["value"], float)])
    print(
        f"\nC-index: {len(c)} assessable, median {np.median(c):.2f}, IQR {np.percentile(c, 25):.2f}-"
        f"{np.percentile(c, 75):.2f}, range {c.min():.2f}-{c.max():.2f}"
    )
    print("A: " + ", ".join(f"{k}: {v}" for k, v in Counter(x["renal"]["A"]["letter"] for x in big).items()))
    print(f"\nmirrored left-right: {n_mirrored} cases, {len(mirror_diffs)} with different scores")
    for d in mirror_diffs:
        print("  ", d)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
