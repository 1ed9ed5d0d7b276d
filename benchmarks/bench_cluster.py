"""Cases per minute: one process against a Dask local cluster, drafting the same phantom worklist.

    python benchmarks/bench_cluster.py [--cases 12] [--workers 2] [--matrix 512] [--max-slices 80]
                                       [--cluster tcp://HOST:8786] [--coarse C --refine R --device cpu]

The same N phantom cases are drafted (``kidseg draft``'s work: read, cascade, draft written to
the cache, the row recorded) three ways, each into a fresh state folder: by one process with 1
torch thread, by one process with as many threads as the cluster has workers (the best
single-process setting on a small machine), and by a cluster of W workers x 1 thread (a local
one, or the scheduler given). Each single-process run is a fresh process; every timer starts once
the models are loaded (the cluster's start-up is printed apart; the phantoms are made before any
timer). Every case runs the same function, :func:`timed_draft` (worklist.draft_case's steps with a
clock between them), in the process or on a worker; the drafts of the three runs are compared
byte for byte.

Printed besides cases per minute: each setup's mean split of a case (read, coarse, spine and ROIs,
refine, fuse + measure + write) with its CPU seconds (user, system) and page faults, and the
threads a case sees (torch's intra-op and inter-op threads, the OS threads of its process, the
OMP and malloc variables). The scheduler overhead per case is the time a worker waited for its
next case while cases were left (from the submission to its first case, and between the end of
one case and the start of its next), summed over workers and divided by N: the scheduling, the
task's and result's transfer and the worker's bookkeeping, nothing of the case itself. The idle
tail (workers with nothing left to run while the last cases end) is printed apart, and so is the
worker time outside any case, ``(W x wall - sum of the cases' own seconds) / N``, which counts both.
The round trip of a no-op task is printed for scale.
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

SPLIT = ("read", "coarse", "rois", "refine", "keep")


def _os_threads() -> int:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) for line in f if line.startswith("Threads:")), 0)


def timed_draft(ct_path, series_uid, draft_path, coarse, refine, device) -> dict:
    """worklist.draft_case's steps with a clock between them; what record_draft takes, and the
    split, the CPU seconds, the page faults and the threads this case saw."""
    import resource

    import torch

    from napari_kidseg.cascade import cached_cascade
    from napari_kidseg.io import volumes
    from napari_kidseg.review.worklist import _keep_draft, ct_identity

    start, r0 = time.time(), resource.getrusage(resource.RUSAGE_SELF)
    cascade = cached_cascade(coarse, refine, device)
    t0 = time.perf_counter()
    ct = volumes.read_ct(ct_path, series_uid=series_uid)
    read = time.perf_counter() - t0
    result = cascade.run(ct.array, ct.geometry.spacing)
    t0 = time.perf_counter()
    info = _keep_draft(result, cascade, Path(draft_path), ct_identity(ct))
    keep = time.perf_counter() - t0
    end, r1 = time.time(), resource.getrusage(resource.RUSAGE_SELF)
    t = result.timings
    split = dict(zip(SPLIT, (read, t["coarse"], t["spine"] + t["roi"], t["refine"], keep), strict=True))
    threads = {
        "torch": torch.get_num_threads(),
        "interop": torch.get_num_interop_threads(),
        "os threads": _os_threads(),
        **{k: os.environ.get(k, "-") for k in ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")},
    }
    return {
        **info,
        "seconds": end - start,
        "start": start,
        "end": end,
        "pid": os.getpid(),
        "split": split,
        "cpu": {
            "user": r1.ru_utime - r0.ru_utime,
            "sys": r1.ru_stime - r0.ru_stime,
            "faults": r1.ru_minflt - r0.ru_minflt,
        },
        "threads": threads,
    }


def _cases(wl, models) -> list[tuple]:
    return [
        (wl.rows[i], (str(wl.rows[i].ct_path), wl.rows[i].series_uid, str(wl.draft_path(wl.rows[i])), *models))
        for i in wl.to_draft()
    ]


def one_process(folder, state, threads, coarse, refine, device) -> dict:
    """What ``kidseg draft`` does (worklist.draft_all), one case after another, timed per case."""
    import torch

    from napari_kidseg import batch
    from napari_kidseg.cascade import cached_cascade
    from napari_kidseg.review.worklist import Worklist

    torch.set_num_threads(threads)
    models = batch.checked_models(coarse, refine, device)
    cached_cascade(*models)
    wl = Worklist(folder, state)
    tasks = []
    t0 = time.perf_counter()
    for row, args in _cases(wl, models):
        tasks.append(timed_draft(*args))
        wl.record_draft(row, tasks[-1])
    wall = time.perf_counter() - t0
    wl.close()
    return {"cases": sum("error" not in t for t in tasks), "wall": wall, "tasks": tasks}


def on_cluster(folder, state, spec, coarse, refine, device) -> dict:
    from napari_kidseg import batch
    from napari_kidseg.review.worklist import Worklist

    models = batch.checked_models(coarse, refine, device)
    t0 = time.perf_counter()
    with batch.DaskCluster(spec, models=models, dashboard_address=":0") as cluster:
        startup = time.perf_counter() - t0
        workers = cluster.n_workers
        t0 = time.perf_counter()
        cluster.client.gather([cluster.submit(int, retries=0) for _ in range(100)])
        noop = (time.perf_counter() - t0) / 100
        wl = Worklist(folder, state)
        cases = [batch.Case(row.case, timed_draft, args, outputs=(Path(args[2]),)) for row, args in _cases(wl, models)]
        tasks = []

        def record(case, info):
            tasks.append(info)
            wl.record_draft(wl.rows[wl.index_of(case.name)], info)

        t0, submitted = time.perf_counter(), time.time()
        progress = batch.run_cases(cluster, cases, on_result=record)
        wall, ended = time.perf_counter() - t0, time.time()
        wl.close()
    return {
        "cases": progress.done,
        "failed": progress.failed,
        "wall": wall,
        "startup": startup,
        "workers": workers,
        "tasks": [t for t in tasks if "error" not in t],
        "submitted": submitted,
        "ended": ended,
        "noop": noop,
    }


def waits(c: dict) -> tuple[float, float]:
    """(seconds the workers waited for a case while cases were left, seconds idle at the end),
    summed over workers, from each case's start and end stamps (a worker's own clock, and the
    client's for the submission and the end: one machine for a local cluster)."""
    by_worker: dict = {}
    for t in c["tasks"]:
        by_worker.setdefault(t["pid"], []).append(t)
    dispatch = tail = 0.0
    for tasks in by_worker.values():
        tasks.sort(key=lambda t: t["start"])
        dispatch += tasks[0]["start"] - c["submitted"]
        dispatch += sum(b["start"] - a["end"] for a, b in zip(tasks, tasks[1:], strict=False))
        tail += c["ended"] - tasks[-1]["end"]
    tail += (c["workers"] - len(by_worker)) * c["wall"]  # a worker that ran no case
    return dispatch, tail


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
    print()
    print("mean case split, s (coarse and refine: the networks; keep: fuse, measure, write the draft):")
    print("| setup | " + " | ".join(SPLIT) + " | case | CPU user | CPU system | page faults |")
    print("|---" * (len(SPLIT) + 5) + "|")
    for name, (r, _) in runs.items():
        ts = r["tasks"]
        mean = {k: sum(t["split"][k] for t in ts) / len(ts) for k in SPLIT}
        cpu = {k: sum(t["cpu"][k] for t in ts) / len(ts) for k in ("user", "sys", "faults")}
        case = sum(t["seconds"] for t in ts) / len(ts)
        cells = " | ".join(f"{mean[k]:.2f}" for k in SPLIT)
        print(f"| {name} | {cells} | {case:.2f} | {cpu['user']:.2f} | {cpu['sys']:.2f} | {cpu['faults']:,.0f} |")
    print("threads seen inside a case:")
    for name, (r, _) in runs.items():
        seen = sorted({json.dumps(t["threads"], sort_keys=True) for t in r["tasks"]})
        print(f"  {name}: " + "; ".join(", ".join(f"{k} {v}" for k, v in json.loads(x).items()) for x in seen))
    print()
    n = max(1, c["cases"])
    dispatch, tail = waits(c)
    outside = c["workers"] * c["wall"] - sum(t["seconds"] for t in c["tasks"])
    print(f"cluster start-up (workers started, models loaded): {c['startup']:.1f} s")
    print(
        f"scheduler overhead per case (a worker waiting for its next case while cases were left): {dispatch / n:.3f} s"
    )
    print(f"idle tail per case (workers with no case left while the last ones end): {tail / n:.3f} s")
    print(f"worker time outside a case per case (both of the above): {outside / n:.3f} s")
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
