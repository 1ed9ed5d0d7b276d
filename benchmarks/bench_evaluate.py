"""Time of ``kidseg evaluate`` on a folder of real KiTS19 cases (target: 50 cases in 2 minutes).

    python benchmarks/bench_evaluate.py [--cases 50] [--self] [--workdir DIR] [--data ../shared/data/kits19-masks]

The predictions are the references shifted by one slice and two rows (kept in ``--workdir``
between runs, written once), or with ``--self`` links to the references themselves (no writing:
the same reading and scoring work, every score 1); the references are the KiTS19 case folders.
Prints the wall and CPU time of the evaluation alone, and its mean row.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_kidseg.cli import main as kidseg  # noqa: E402
from napari_kidseg.io import readers, volumes  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "kits19-masks"))
    ap.add_argument("--cases", type=int, default=50)
    ap.add_argument("--self", action="store_true", help="score each reference against itself (links)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "kidseg-bench-evaluate"))
    args = ap.parse_args(argv)
    cases = sorted(Path(args.data).glob("case_*"))[: args.cases]
    pred = Path(args.workdir) / ("self" if args.self else "pred")
    pred.mkdir(parents=True, exist_ok=True)
    for case in cases:
        out = pred / f"{case.name}.nii.gz"
        if args.self and not out.exists():
            out.symlink_to((case / volumes.KITS_LABELS).resolve())
        elif not out.exists():
            ref = readers.read_labels(case / volumes.KITS_LABELS)
            volumes.write_labels(out, np.roll(ref.array, (1, 2), axis=(0, 1)), ref)
    for stale in pred.glob("case_*.nii.gz"):
        if stale.name[: -len(".nii.gz")] not in {c.name for c in cases}:
            stale.unlink()
    wall, cpu = time.perf_counter(), time.process_time()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = kidseg(["evaluate", str(pred), str(args.data)])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    lines = buf.getvalue().splitlines()
    print(lines[0])
    print(next(line for line in lines if line.startswith("mean")))
    print(
        f"\nkidseg evaluate, {len(cases)} KiTS19 cases: {wall:.1f} s wall, {cpu:.1f} s CPU "
        f"({wall / len(cases):.2f} s per case); exit status {rc} (1: references without a prediction)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
