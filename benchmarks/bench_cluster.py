"""Cases per minute: one process against a Dask local cluster, drafting the same phantom worklist.

    python benchmarks/bench_cluster.py [--cases 12] [--workers 2] [--matrix 512] [--max-slices 80]
                                       [--cluster tcp://HOST:8786] [--coarse C --refine R --device cpu]

The same N phantom cases are drafted (``kidseg draft``'s work: read, cascade, draft written to
the cache) three ways, each into a fresh state folder: by one process with 1 torch thread, by one
process with as many threads as the cluster has workers (the best single-process setting on a
small machine), and by a cluster of W workers x 1 thread (a local one, or the scheduler given).
Each single-process run is a fresh process; every timer starts once the models are loaded (the
cluster's start-up is printed apart). The drafts of the three runs are compared byte for byte.
The scheduler overhead per case is the worker time not spent in a case,
``(W x wall - sum of the cases' own seconds) / N``, which also counts the workers idle at the end;
and the round trip of a no-op task, for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed_draft(*args):
    """worklist.draft_case, and the seconds it took in the worker."""
    from napari_kidseg.worklist import draft_case

    t0 = time.perf_counter()
    info = draft_case(*args)
    return {**info, "seconds": time.perf_counter() - t0}


def one_process(folder, state, threads, coarse, refine, device) -> dict:
    import torch

    from napari_kidseg.cascade import Cascade
    from napari_kidseg.worklist import Worklist, draft_all

    torch.set_num_threads(threads)
    cascade = Cascade(coarse, refine, device=device)
    wl = Worklist(folder, state)
    t0 = time.perf_counter()
    n = draft_all(wl, cascade)
    wall = time.perf_counter() - t0
    wl.close()
    return {"cases": n, "wall": wall}


def on_cluster(folder, state, spec, coarse, refine, device) -> dict:
    from napari_kidseg import batch
    from napari_kidseg.worklist import Worklist

    models = batch.checked_models(coarse, refine, device)
    t0 = time.perf_counter()
    with batch.DaskCluster(spec, models=models, dashboard_address=":0") as cluster:
        startup = time.perf_counter() - t0
        workers = cluster.n_workers
        t0 = time.perf_counter()
        cluster.client.gather([cluster.submit(int, retries=0) for _ in range(100)])
        noop = (time.perf_counter() - t0) / 100
        wl = Worklist(folder, state)
        seconds = []
        cases = []
        for i in wl.to_draft():
            row = wl.rows[i]
            args = (str(row.ct_path), row.series_uid, str(wl.draft_path(row)), *models)
            cases.append(batch.Case(row.case, _timed_draft, args, outputs=(wl.draft_path(row),)))

        def record(case, info):
            seconds.append(info.get("seconds", 0.0))
            wl.record_draft(wl.rows[wl.index_of(case.name)], info)

        t0 = time.perf_counter()
        progress = batch.run_cases(cluster, cases, on_result=record)
        wall = time.perf_counter() - t0
        wl.close()
    return {
        "cases": progress.done,
        "failed": progress.failed,
        "wall": wall,
        "startup": startup,
        "workers": workers,
        "task_seconds": sum(seconds),
        "noop": noop,
    }


def same_drafts(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in (a / "drafts").glob("*.npz"))
    if names != sorted(p.name for p in (b / "drafts").glob("*.npz")):
        return False
    for name in names:
        with np.load(a / "drafts" / name) as fa, np.load(b / "drafts" / name) as fb:
            if fa.files != fb.files or not all(np.array_equal(fa[k], fb[k]) for k in fa.files):
                return False
    return True


def differing_values(a: Path, b: Path) -> int:
    """How many stored values (quantised probabilities, labels) differ between two runs' drafts."""
    n = 0
    for pa in sorted((a / "drafts").glob("*.npz")):
        with np.load(pa) as fa, np.load(b / "drafts" / pa.name) as fb:
            n += sum(int(np.count_nonzero(fa[k] != fb[k])) for k in fa.files if fa[k].shape == fb[k].shape)
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2, help="local cluster workers (ignored with --cluster)")
    ap.add_argument("--cluster", help="an existing scheduler instead of a local cluster")
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--max-slices", type=int, default=80)
    ap.add_argument("--coarse")
    ap.add_argument("--refine")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", help="keep the phantoms here between runs")
    ap.add_argument("--one-process", nargs=3, metavar=("FOLDER", "STATE", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_process:
        folder, state, threads = args.one_process
        print(json.dumps(one_process(folder, state, int(threads), args.coarse, args.refine, args.device)))
        return

    from napari_kidseg.phantoms.writer import write_phantom_cases

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-cluster-"))
    folder = work / "cases"
    if not folder.exists() or len(list(folder.iterdir())) < args.cases:
        write_phantom_cases(folder, args.cases, seed=900, matrix=args.matrix, max_slices=args.max_slices, n_tumors=1)
    spec = args.cluster or f"local:{args.workers}"
    load_before = os.getloadavg()
    extra = [a for k in ("coarse", "refine") if getattr(args, k) for a in (f"--{k}", getattr(args, k))]
    extra += ["--device", args.device]
    runs = {}
    threads_best = args.workers if not args.cluster else 2
    for threads in sorted({1, threads_best}):
        state = work / f"state-1x{threads}"
        cmd = [sys.executable, __file__, "--one-process", str(folder), str(state), str(threads), *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        runs[f"one process, {threads} thread(s)"] = (json.loads(out), state)
    state = work / "state-cluster"
    c = on_cluster(folder, state, spec, args.coarse, args.refine, args.device)
    runs[f"cluster {spec}, {c['workers']} worker(s) x 1 thread"] = (c, state)
    load_after = os.getloadavg()

    base = runs["one process, 1 thread(s)"][0]
    base_rate = 60.0 * base["cases"] / base["wall"]
    print(f"{args.cases} phantom cases {args.matrix} x {args.matrix} x <= {args.max_slices}, device {args.device}")
    print("| setup | cases | wall s | cases/min | vs one process, 1 thread |")
    print("|---|---|---|---|---|")
    for name, (r, _) in runs.items():
        rate = 60.0 * r["cases"] / r["wall"]
        print(f"| {name} | {r['cases']} | {r['wall']:.1f} | {rate:.2f} | {rate / base_rate:.2f}x |")
    overhead = (c["workers"] * c["wall"] - c["task_seconds"]) / max(1, c["cases"])
    print(f"cluster start-up (workers started, models loaded): {c['startup']:.1f} s")
    print(f"scheduler overhead per case (worker time outside a case, idle tail included): {overhead:.3f} s")
    print(f"no-op task round trip: {1000 * c['noop']:.1f} ms")
    # Like with like: the cluster's workers run 1 thread each, as the first single process does, and
    # must give the same bytes. A second torch thread changes the order of float sums, which flips
    # a few stored 8-bit probabilities: counted, not hidden.
    one = runs["one process, 1 thread(s)"][1]
    same = same_drafts(one, state)
    print(f"cluster drafts identical to the 1-thread process: {'yes' if same else 'NO'}")
    for name, (_, other) in runs.items():
        if other not in (one, state):
            print(f"{name} vs 1 thread: {differing_values(one, other)} stored values differ (thread-count rounding)")
    print(f"load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f} on {os.cpu_count()} CPU(s)")


if __name__ == "__main__":
    main()
