"""How long the case report takes on a 512 x 512 x 300 case; prints figures (target: <= 2 s).

    python benchmarks/bench_report.py [--slices 300] [--workdir runs/bench-report] [--repeats 3]

The case is the phantom ``kidseg bench`` times (seed 1234 + slices, 0.5 mm slices, one tumor) with
its true labels, made once and kept in the workdir. Timed: :func:`describe_case` with the CT (the
spine midline and the sinus fat included) and, apart, writing the four files (json, csv, png, pdf).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_kidseg.phantoms.procedural import make_phantom
from napari_kidseg.report import describe_case, report_text, write_report


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--workdir", default="runs/bench-report")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cache = Path(args.workdir) / f"case{args.slices}.npz"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        case = make_phantom(1234 + args.slices, matrix=512, max_slices=args.slices, min_slices=args.slices,
                            slice_thickness=0.5, n_tumors=1)  # fmt: skip
        np.savez(cache, ct=case.ct.array, labels=case.labels, spacing=np.asarray(case.ct.geometry.spacing))
    data = np.load(cache)
    ct, labels, spacing = data["ct"], data["labels"], tuple(data["spacing"])
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        report = describe_case(labels, spacing, ct=ct)
        times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_report(report, tmp, ct=ct, labels=labels, spacing=spacing)
        write_s = time.perf_counter() - t0
    print(report_text(report))
    print(f"\ncase {labels.shape} at {tuple(round(float(s), 3) for s in spacing)} mm, {len(report['tumors'])} tumor(s)")
    print(f"describe_case (with CT): median {statistics.median(times):.2f} s of {args.repeats} (target 2 s)")
    print(f"writing json, csv, png, pdf: {write_s:.2f} s")


if __name__ == "__main__":
    main()
