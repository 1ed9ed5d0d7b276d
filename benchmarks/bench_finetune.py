"""The default fine-tune of both stages on one 512 x 512 x 150 corrected case; prints a table.

    python benchmarks/bench_finetune.py [--slices 150] [--threads N] [--workdir DIR] [--schedule heldout|fixed]

The corrected case is a phantom (512 x 512, ``--slices`` slices, its true labels exported as the
correction, every slice reviewed); ``kidseg finetune``'s defaults fine-tune the bundled models on it
(the held-out rule, 8 replayed phantoms, 2 held-out guard phantoms). Printed: seconds for running
the parents on the case (the lessons and the before scores), for each stage (all of it, and its
training steps alone, which the time budget counts, with seconds per step) and for scoring the
children; the load average before the run (the machine is shared); the target is both
stages within 180 s on the project's 2-core machine. The phantoms are made once in ``--workdir``
(the replay and guard phantoms in the usual cache) and the first run also pays for making them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from napari_kidseg.finetuning import finetune_models, guard_phantoms, replay_cases
from napari_kidseg.io import volumes
from napari_kidseg.phantoms.procedural import make_phantom
from napari_kidseg.review.corrections_folder import MANIFEST, export_correction
from napari_kidseg.training import FinetuneSettings


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=150)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--schedule", default="heldout", choices=["heldout", "fixed"])
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kidseg-bench-ft-"))
    corr = work / f"corrections-{args.slices}"
    t0 = time.time()
    if not (corr / MANIFEST).exists():
        case = make_phantom(77, matrix=512, max_slices=args.slices, min_slices=args.slices, n_tumors=1)
        export_correction(corr, case.ct, case.labels)
    replay_cases(8, 50_000)
    guard_phantoms()
    prep = time.time() - t0
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    ct = volumes.read_ct(corr / "case_00000" / volumes.KITS_IMAGE)
    t0 = time.time()
    settings = FinetuneSettings(schedule=args.schedule, device=args.device)
    report = finetune_models(corr, work / f"run-{int(t0)}", settings, log=lambda s: print(s, flush=True))
    wall = time.time() - t0
    sec = report["seconds"]
    print(
        f"\ncorrected case {' x '.join(map(str, ct.array.shape[::-1]))} voxels; torch threads {torch.get_num_threads()}"
    )
    print(f"(phantoms made or found in {prep:.0f} s, not counted; load average before the run {load})\n")
    print("| part | s | training steps s | steps | s per step | stopped |")
    print("|---|---|---|---|---|---|")
    print(f"| parents on the case (lessons, before scores) | {sec['parents']:.1f} | | | | |")
    for stage in ("coarse", "refine"):
        stop = report["stopped"].get(stage) or {}
        steps = stop.get("steps", settings.epochs * settings.steps_per_epoch if args.schedule == "fixed" else None)
        trained = sec[f"{stage}_training"]
        per = f"{trained / steps:.2f}" if steps else ""
        why = f"best step {stop['best_step']} ({stop['reason']})" if stop else ""
        print(
            f"| {stage} stage (with its held-out checks) | {sec[stage]:.1f} | {trained:.1f} | {steps} | {per} | {why} |"
        )
    print(f"| both stages | {sec['coarse'] + sec['refine']:.1f} | | | | target <= 180 s |")
    print(f"| children scored (worse guard) | {sec['children']:.1f} | | | | |")
    print(f"| total | {wall:.1f} | | | | |")


if __name__ == "__main__":
    main()
