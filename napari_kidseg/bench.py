"""Speed and memory benchmark of the cascade (``kidseg bench``; ``benchmarks/bench_cascade.py``).

For each size, a 512 x 512 x N phantom is written as .nii.gz and pushed through the whole
pipeline in a fresh process (so peak RSS belongs to that size alone): read, coarse, ROI, refine,
fusion, the anatomy check (finding the spine and judging the regions, with its share of the
cascade's time), write; then the latency of ``fuse`` for one slice and for the whole volume. Prints a
table; nothing here asserts a target, the figures are for people to read.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ct_file(n: int, workdir) -> Path:
    """The benchmark CT of n slices in workdir; named by the phantom revision, so a kept
    workdir never times an old generator's phantom."""
    from .phantoms.procedural import GENERATOR_REVISION

    return Path(workdir) / f"ct{n}-rev{GENERATOR_REVISION}.nii.gz"


def make_ct(n: int, workdir: Path) -> None:
    """The benchmark's 512 x 512 x n phantom, written once (its own process: generating it takes
    far more memory than segmenting it, and must not count in the pipeline's peak RSS)."""
    from .io import volumes
    from .phantoms.procedural import make_phantom

    case = make_phantom(1234 + n, matrix=512, max_slices=n, min_slices=n, slice_thickness=0.5, n_tumors=1)
    volumes.write_volume(ct_file(n, workdir), case.ct.array, case.ct)


def _one_size(n: int, coarse, refine, device: str, preset: str | None, workdir: Path) -> dict:
    import numpy as np

    from .cascade import Cascade
    from .io import volumes

    ct_path = ct_file(n, workdir)
    if not ct_path.exists():
        make_ct(n, workdir)
    if preset:  # random weights of a preset architecture: speed only
        from .models import build_model, model_config, save_checkpoint

        for stage in ("coarse", "refine"):
            cfg = model_config(stage, preset)
            p = workdir / f"{preset}-{stage}.safetensors"
            if not p.exists():
                save_checkpoint(p, build_model(cfg), cfg)
        coarse, refine = workdir / f"{preset}-coarse.safetensors", workdir / f"{preset}-refine.safetensors"
    cascade = Cascade(coarse, refine, device=device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"slices": n, "device": cascade.device}
    t0 = time.perf_counter()
    ct = volumes.read_ct(ct_path)
    row["read_s"] = time.perf_counter() - t0
    if cascade.is_cuda:  # warm-up: cudnn autotuning is not part of a run
        cascade.run(ct.array[: min(n, 64)], ct.geometry.spacing)
    t0 = time.perf_counter()
    result = cascade.run(ct.array, ct.geometry.spacing)
    row["cascade_s"] = time.perf_counter() - t0
    row.update({k: result.timings[k] for k in ("coarse", "roi", "refine", "tissue")})
    row["patches"] = len(result.patches)
    row["coarse_slices_per_s"] = n / result.timings["coarse"]
    row["refine_patches_per_s"] = (
        len(result.patches) / result.timings["refine"] if len(result.patches) else float("nan")
    )
    t0 = time.perf_counter()
    labels = result.fuse(anatomy_check=False)
    row["fusion_s"] = time.perf_counter() - t0
    from .anatomy import check_anatomy
    from .fusion import specks_to_kidney, tumor_specks

    t0 = time.perf_counter()  # the anatomy check: the spine (found during the run), the verdict, the specks
    result.verdict = check_anatomy(labels, result.spacing, result.spine)
    labels = result.verdict.apply(labels)
    labels = specks_to_kidney(labels, tumor_specks(labels, result.spacing)[0])
    row["anatomy_s"] = time.perf_counter() - t0 + result.timings["spine"]
    row["anatomy_pct"] = 100.0 * row["anatomy_s"] / (row["cascade_s"] + row["fusion_s"])
    zs = sorted(result.refined) or [n // 2]
    t0 = time.perf_counter()
    for z in zs[:: max(1, len(zs) // 20)][:20]:
        result.fuse(z=z)
    row["fuse_slice_ms"] = (time.perf_counter() - t0) / min(20, len(zs[:: max(1, len(zs) // 20)])) * 1000
    t0 = time.perf_counter()
    volumes.write_labels(workdir / f"labels{n}.nii.gz", labels, ct, overwrite=True)
    row["write_s"] = time.perf_counter() - t0
    row["end_to_end_s"] = (
        row["read_s"] + row["cascade_s"] + row["fusion_s"] + row["anatomy_s"] - result.timings["spine"] + row["write_s"]
    )
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["rss_beyond_models_mb"] = row["peak_rss_mb"] - base_rss
    row["peak_gpu_mb"] = result.timings.get("peak_gpu_mb", 0.0)
    row["kidney_ml"] = float(np.count_nonzero(labels)) * ct.geometry.voxel_volume_ml
    return row


COLUMNS = [
    ("slices", "N", "{:d}"),
    ("device", "dev", "{}"),
    ("read_s", "read s", "{:.2f}"),
    ("coarse", "coarse s", "{:.2f}"),
    ("roi", "ROI s", "{:.2f}"),
    ("refine", "refine s", "{:.2f}"),
    ("tissue", "tissue s", "{:.2f}"),
    ("fusion_s", "fusion s", "{:.2f}"),
    ("anatomy_s", "anatomy s", "{:.2f}"),
    ("anatomy_pct", "anat %", "{:.1f}"),
    ("write_s", "write s", "{:.2f}"),
    ("end_to_end_s", "total s", "{:.1f}"),
    ("coarse_slices_per_s", "coarse sl/s", "{:.1f}"),
    ("patches", "patches", "{:d}"),
    ("refine_patches_per_s", "refine p/s", "{:.1f}"),
    ("fuse_slice_ms", "fuse 1 sl ms", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("rss_beyond_models_mb", "RSS-models MB", "{:.0f}"),
    ("peak_gpu_mb", "GPU MB", "{:.0f}"),
]


def format_table(rows) -> str:
    head = " | ".join(h for _, h, _ in COLUMNS)
    lines = [f"| {head} |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(f.format(r[k]) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def run_benchmark(sizes, coarse=None, refine=None, device="auto", preset=None, workdir=None) -> list[dict]:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="kidseg-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in sizes:
        if not ct_file(n, workdir).exists():
            subprocess.run(
                [sys.executable, "-c", f"from napari_kidseg.bench import make_ct; make_ct({int(n)}, {str(workdir)!r})"],
                check=True,
            )
        cmd = [
            sys.executable,
            "-c",
            (
                "import json,sys; from pathlib import Path; from napari_kidseg.bench import _one_size;"
                f"print('ROW'+json.dumps(_one_size({int(n)}, {coarse!r}, {refine!r}, {device!r}, {preset!r}, "
                f"Path({str(workdir)!r}))))"
            ),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW")), None)
        if line is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise RuntimeError(f"benchmark of {n} slices failed")
        rows.append(json.loads(line[3:]))
        print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    return rows
