"""Batches of cases on a Dask distributed cluster: ``kidseg draft --cluster``, ``kidseg predict --cluster``.

GUI-free: the command and the Case worklist widget call it. Dask does the distributing (a local
cluster of worker processes on one machine; an existing scheduler with workers on others, which
dask-jobqueue or dask-kubernetes start on SLURM, PBS or Kubernetes); this module only says what
one case is and what happens around it.

- :func:`parse_cluster` reads ``local``, ``local:N`` or a scheduler address (``tcp://HOST:PORT``).
- :class:`DaskCluster` starts the local cluster (N worker processes x 1 thread) or connects to the
  scheduler, and registers a worker plugin on every worker (also one that joins or is restarted
  later): a GPU of its own where the machine has several (the worker's index picks it), the torch
  threads, glibc's malloc as one process has it (:func:`undo_dask_malloc_trim`), and the models
  loaded once, so that each case reuses them (:func:`cascade.cached_cascade`).
- :func:`run_cases` sends one task per case and calls back with each case's outcome and the
  progress (done, failed, running, cases per minute, time left).
- One case is the same function in this process and on a worker, so both write the same bytes:
  :func:`worklist.draft_case` for a draft, :func:`predict_case` for ``kidseg predict``.

Faults. Every output is written atomically (:func:`files.atomic_path`): a worker killed mid-case
leaves at most a hidden temporary file beside the output, and the scheduler runs the case again on
another worker (``distributed.scheduler.allowed-failures``, 3 by default). A case that raises is
tried ``retries`` more times; a case that fails on every try is an outcome ``{"error": reason}``
and the other cases go on. Closing the cluster (at the end, on an error or on Ctrl-C) cancels
what is left, ends a local cluster's workers and then removes the temporary files beside the
batch's outputs: nothing half-written stays. A scheduler that cannot be reached is one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

from .errors import KidsegError
from .fusion import DEFAULT_ALPHA, DEFAULT_CONTRAST_TUMOR, DEFAULT_KIDNEY_THRESHOLD, DEFAULT_TUMOR_THRESHOLD
from .io import files, volumes

_log = logging.getLogger(__name__)

DEFAULT_DASHBOARD = ":8787"  # dask's own default; another free port is taken when it is busy


# ----------------------------------------------------------------------------------------------
# The cluster
# ----------------------------------------------------------------------------------------------


def parse_cluster(text: str) -> tuple[str | None, int | None]:
    """``(scheduler address, None)`` or ``(None, local workers or None for the default)``."""
    text = (text or "local").strip()
    m = re.fullmatch(r"local(?::(\d+))?", text)
    if m:
        n = int(m.group(1)) if m.group(1) else None
        if n is not None and n < 1:
            raise KidsegError(f"--cluster {text}: a local cluster needs 1 or more workers")
        return None, n
    if re.fullmatch(r"(tcp|tls|ws|wss|ucx|inproc)://\S+", text):
        return text, None
    raise KidsegError(f"--cluster {text!r}: expected local, local:N or a scheduler address such as tcp://HOST:8786")


def default_local_workers() -> int:
    """One worker per GPU where there are GPUs, else one per CPU core."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else max(1, os.cpu_count() or 1)


def _worker_index(name) -> int:
    """A local cluster names its workers 0, 1, ...; ``dask worker --nworkers`` names end in -0, -1."""
    m = re.search(r"(\d+)$", str(name))
    return int(m.group(1)) if m else 0


# glibc's ceiling for its sliding mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX) and the trim
# threshold the sliding rule pairs with it (twice the mmap threshold)
_MMAP_THRESHOLD = 32 * 2**20
_TRIM_THRESHOLD = 2 * _MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def undo_dask_malloc_trim() -> bool:
    """Give a Dask worker glibc's malloc thresholds as a plain process has them; True when done.

    Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536`` (its config
    ``distributed.nanny.pre-spawn-environ``) so that freed memory goes back to the system at once.
    Setting any malloc threshold also pins glibc's mmap threshold at 128 KiB (it no longer slides
    up to the sizes a program frees), so every array of 128 KiB or more that a case allocates is a
    fresh mapping whose pages the kernel faults in and zeroes again, slice after slice. Measured on
    the 512 x 512 phantoms: 5-8x the page faults and 5x the system time per case, a worker's case
    2-2.5x as slow as the same case in one process. The thresholds are put where glibc's sliding
    rule takes them (32 MiB, trim at 64 MiB); larger arrays are still mapped and unmapped.
    Nothing to do without the variable (a worker without a nanny) or on another C library."""
    if not os.environ.get("MALLOC_TRIM_THRESHOLD_") or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


class KidsegWorker(WorkerPlugin):
    """Set up on every worker: priority, torch threads, malloc, its own GPU, the models loaded once."""

    name = "napari-kidseg"

    def __init__(self, models=None, torch_threads: int | None = None, nice: int = 0, local: bool = False):
        self.models = models  # (coarse, refine, device[, batch size]), as cascade.cached_cascade takes them
        self.torch_threads = torch_threads
        self.nice = nice
        self.local = local

    def setup(self, worker):
        import signal
        import threading

        import torch

        if self.local and threading.current_thread() is threading.main_thread():
            # a terminal's Ctrl-C reaches the local workers too: the command that started them
            # shuts them down (a traceback from each one would say nothing)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.nice:
            with contextlib.suppress(OSError, AttributeError):
                os.nice(self.nice)
        if self.torch_threads:
            # torch's count is process-wide: the worker's task threads see it too
            torch.set_num_threads(self.torch_threads)
        undo_dask_malloc_trim()
        device = (self.models[2] if self.models else "auto") or "auto"
        if device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
            # one GPU per worker: a worker then means "cuda" as its own device
            torch.cuda.set_device(_worker_index(worker.name) % torch.cuda.device_count())
        if self.models:
            from .cascade import cached_cascade

            try:
                cached_cascade(*self.models)
            except Exception as exc:  # noqa: BLE001 - the first case says why, as an outcome of its own
                _log.warning("napari-kidseg: the models could not be loaded on %s: %s", worker.address, exc)


class DaskCluster:
    """A Dask client on a local cluster it starts, or on an existing scheduler; a context manager.

    ``models``: what every worker loads once (see :class:`KidsegWorker`); ``nice``: lower the
    workers' priority (the widget's local cluster, beside the radiologist's napari)."""

    def __init__(
        self,
        spec: str = "local",
        *,
        models: tuple | None = None,
        nice: int = 0,
        dashboard_address: str = DEFAULT_DASHBOARD,
        timeout=None,
    ):
        from distributed import Client, LocalCluster

        address, n = parse_cluster(spec)
        self.local = None
        self.outputs: list[Path] = []  # written by this cluster's tasks: their temporaries go on close
        self._closed = False
        if address is not None:
            try:
                kwargs = {} if timeout is None else {"timeout": timeout}  # else dask's connect timeout
                self.client = Client(address, set_as_default=False, **kwargs)
            except (OSError, TimeoutError) as exc:
                reason = " ".join(str(exc).split()) or type(exc).__name__
                raise KidsegError(f"cannot reach the Dask scheduler ({reason[:200]})", address) from None
            torch_threads = None  # the worker's own (dask sets OMP_NUM_THREADS=1 for each worker)
        else:
            n = n or default_local_workers()
            torch_threads = max(1, (os.cpu_count() or 1) // n)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Pp]ort .* is already in use.*")
                self.local = LocalCluster(
                    n_workers=n,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=dashboard_address,
                    silence_logs=logging.CRITICAL,
                )
            self.client = Client(self.local, set_as_default=False)
        try:
            self.client.register_plugin(KidsegWorker(models, torch_threads, nice, local=self.local is not None))
        except BaseException:
            self.close()
            raise

    @property
    def dashboard_link(self) -> str | None:
        try:
            return self.client.dashboard_link
        except Exception:  # noqa: BLE001 - no dashboard (bokeh missing on the scheduler)
            return None

    @property
    def n_workers(self) -> int:
        return len(self.client.nthreads())  # every worker (scheduler_info lists only a few)

    def describe(self) -> str:
        n = self.n_workers
        where = "a local cluster" if self.local is not None else f"the scheduler {self.client.scheduler.address}"
        text = f"{where} with {n} worker(s)" + (" x 1 thread" if self.local is not None else "")
        if n == 0:
            text += " (none yet: the cases wait for workers to join)"
        link = self.dashboard_link
        return text + (f"; dashboard {link}" if link else "")

    def submit(self, fn, *args, retries: int = 1, **kwargs):
        """One task (never deduplicated with an earlier one: ``pure=False``); a Dask future."""
        return self.client.submit(fn, *args, pure=False, retries=retries, key=f"kidseg-{uuid.uuid4().hex}", **kwargs)

    def shutdown(self, wait: bool = True, cancel_futures: bool = True):
        """The concurrent.futures spelling of :meth:`close` (the worklist widget's pools use it)."""
        self.close()

    def close(self):
        """Cancel what is left, end a local cluster's workers, then remove the temporary files a
        killed worker left beside the outputs (an existing scheduler and its workers go on)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.client.close(timeout=10)
        if self.local is not None:
            with contextlib.suppress(Exception):
                self.local.close(timeout=20)
        self.remove_temporaries()

    def remove_temporaries(self) -> int:
        """The temporary files killed workers left beside this cluster's outputs (call it when no
        task of the batch runs any more); how many were removed."""
        return sum(files.remove_temporaries(p) for p in self.outputs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------
# Running cases
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One task: ``fn(*args)`` returns a dict (``{"error": reason}`` when the case failed)."""

    name: str
    fn: Callable
    args: tuple
    outputs: tuple = ()  # the files it writes (atomically)


@dataclasses.dataclass
class Progress:
    total: int
    done: int = 0
    failed: int = 0
    running: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def cases_per_minute(self) -> float:
        elapsed = time.perf_counter() - self.started
        return 60.0 * self.finished / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.cases_per_minute
        left = self.total - self.finished
        text = f"{self.done}/{self.total} done, {self.failed} failed, {self.running} running"
        if rate > 0 and self.finished:
            text += f"; {rate:.1f} cases/min"
            if left:
                text += f", about {_duration(60.0 * left / rate)} left"
        return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def outcome(future, source: str = "") -> dict:
    """What a finished task gave, or ``{"error": "SOURCE: reason"}`` (it raised on every try, or
    its worker died on every try)."""
    from distributed.scheduler import KilledWorker

    prefix = f"{source}: " if source else ""
    try:
        info = future.result()
    except KilledWorker:
        tries = 1 + int(_dask_config("distributed.scheduler.allowed-failures", 3))
        return {"error": f"{prefix}its worker died in each of {tries} tries (out of memory, or killed)"}
    except Exception as exc:  # noqa: BLE001 - any failure of the case's own code becomes its row's reason
        return {"error": f"{prefix}{type(exc).__name__} ({' '.join(str(exc).split())[:200]})"}
    if not isinstance(info, dict):
        return {"error": f"{prefix}the task returned {type(info).__name__}, not a result"}
    return info


def _dask_config(key, default):
    import dask

    return dask.config.get(key, default)


def run_cases(
    cluster: DaskCluster,
    cases: list[Case],
    *,
    on_result: Callable[[Case, dict], None] | None = None,
    on_progress: Callable[[Progress, Case, dict], None] | None = None,
    retries: int = 1,
) -> Progress:
    """Run one task per case on the cluster; ``on_result(case, info)`` as each one ends (in this
    thread), then ``on_progress``. On Ctrl-C the cases already finished are still passed to
    ``on_result`` before the interrupt goes on (close the cluster after it)."""
    from distributed import as_completed

    for c in cases:
        cluster.outputs.extend(Path(p) for p in c.outputs)
    futures = {cluster.submit(c.fn, *c.args, retries=retries): c for c in cases}
    progress = Progress(len(cases))
    handled = set()

    def take(fut):
        c = futures[fut]
        info = outcome(fut, c.name)
        handled.add(fut.key)
        if "error" in info:
            progress.failed += 1
        else:
            progress.done += 1
        progress.running = _running(cluster, futures, handled)
        if on_result:
            on_result(c, info)
        if on_progress:
            on_progress(progress, c, info)

    try:
        for fut in as_completed(list(futures), loop=cluster.client.loop):
            take(fut)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            cluster.client.cancel([f for f in futures if f.key not in handled and not f.done()])
        for fut in futures:
            if fut.key not in handled and fut.status == "finished":
                with contextlib.suppress(Exception):
                    take(fut)
        raise
    return progress


def _running(cluster, futures, handled) -> int:
    """How many of the batch's cases a worker is processing now (asked of the scheduler)."""
    keys = {f.key for f in futures if f.key not in handled}
    try:
        processing = cluster.client.processing()
        threads = cluster.client.nthreads()
    except Exception:  # noqa: BLE001 - a scheduler going away mid-count: none counted as running
        return 0
    # a worker is sent a little more than it has threads for: count at most its threads
    return sum(min(sum(k in keys for k in ks), int(threads.get(w, len(ks)))) for w, ks in processing.items())


# ----------------------------------------------------------------------------------------------
# One case of kidseg predict
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PredictSettings:
    alpha: float = DEFAULT_ALPHA
    kidney_threshold: float = DEFAULT_KIDNEY_THRESHOLD
    tumor_threshold: float = DEFAULT_TUMOR_THRESHOLD
    anatomy_check: bool = True
    contrast_tumor: bool = DEFAULT_CONTRAST_TUMOR  # see enhancement.py
    mirror: bool = False
    smooth_noise: bool = False  # see Cascade.run
    series: str | None = None
    save_probabilities: bool = False
    report: bool = False
    overwrite: bool = False


def probabilities_path(target: Path) -> Path:
    return target.parent / (target.name.split(".")[0] + "_probabilities.npz")


def predict_case(src, target, settings: PredictSettings, cascade, *, ct=None, progress=None) -> dict:
    """Read, segment, fuse and write one case's labels (atomically), in this process or on a
    worker; returns the line to print, the notes and (with ``settings.report``) its report row."""
    from .anatomy import tumor_without_kidney
    from .metrics import measurements

    src, target = Path(src), Path(target)
    ct = ct if ct is not None else volumes.read_ct(src, series_uid=settings.series)
    result = cascade.run(
        ct.array, ct.geometry.spacing, progress=progress, mirror=settings.mirror, smooth_noise=settings.smooth_noise
    )
    labels = result.fuse(
        settings.alpha,
        settings.kidney_threshold,
        settings.tumor_threshold,
        anatomy_check=settings.anatomy_check,
        contrast_tumor=settings.contrast_tumor,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    volumes.write_labels(target, labels, ct, overwrite=settings.overwrite)
    if settings.save_probabilities:
        result.save_probabilities(probabilities_path(target), overwrite=settings.overwrite)
    notes = list(result.messages)
    notes += [result.contrast_note] if result.contrast_note else []
    notes += [result.speck_note] if result.speck_note else []
    notes += [r.describe() for r in tumor_without_kidney(labels, ct.geometry.spacing, result.spine)]
    if result.verdict is not None and settings.anatomy_check:
        notes += result.verdict.summary()
    m = measurements(labels, ct.geometry.spacing)
    line = (
        f"{target}: kidney {m['total']['kidney_ml']:.1f} mL, tumor {m['total']['tumor_ml']:.1f} mL "
        f"(largest tumor {m['total']['tumor_diameter_mm']:.0f} mm); "
        f"{len(result.rois)} kidney ROI(s), {len(result.patches)} refine patches"
    )
    row = None
    if settings.report:
        from .report import describe_case, summary_row

        provenance = {
            "coarse": cascade.coarse_path.name,
            "refine": cascade.refine_path.name,
            "alpha": settings.alpha,
            "kidney_threshold": settings.kidney_threshold,
            "tumor_threshold": settings.tumor_threshold,
        }
        row = summary_row(describe_case(labels, ct.geometry.spacing, ct=ct.array, provenance=provenance), str(src))
    return {"line": line, "notes": notes, "report_row": row}


def predict_task(src, target, settings: PredictSettings, models: tuple) -> dict:
    """:func:`predict_case` on a worker, with the worker's models (loaded once); a user-facing
    problem is the outcome ``{"error": ...}``, not a retry."""
    from .cascade import cached_cascade

    try:
        return predict_case(src, target, settings, cached_cascade(*models))
    except KidsegError as exc:
        return {"error": str(exc)}


def predict_outputs(target: Path, settings: PredictSettings) -> tuple:
    return (target, probabilities_path(target)) if settings.save_probabilities else (target,)


# ----------------------------------------------------------------------------------------------
# A worklist drafted on a cluster
# ----------------------------------------------------------------------------------------------


def draft_worklist(worklist, cluster: DaskCluster, models: tuple, *, redraft=False, on_progress=None) -> Progress:
    """Draft every case :meth:`Worklist.to_draft` names on the cluster, one task per case, into
    the same draft cache and state as :func:`worklist.draft_all`; each row is recorded as its
    case ends (drafted, or failed: reason)."""
    from .review.worklist import draft_case

    coarse, refine, device = models
    cases = []
    for i in worklist.to_draft(redraft=redraft):
        row = worklist.rows[i]
        path = worklist.draft_path(row)
        args = (str(row.ct_path), row.series_uid, str(path), coarse, refine, device)
        cases.append(Case(row.case, draft_case, args, outputs=(path,)))

    def record(case, info):
        worklist.record_draft(worklist.rows[worklist.index_of(case.name)], info)

    return run_cases(cluster, cases, on_result=record, on_progress=on_progress)


def checked_models(coarse, refine, device="auto") -> tuple:
    """The models as every worker should load them: a checkpoint named here checked here (a bad
    one is one line before any cluster starts) and given as an absolute path (the workers share
    the file system); the bundled ones left to each worker's own installation."""
    from .models import read_config, resolve_checkpoint

    out = []
    for path, stage in ((coarse, "coarse"), (refine, "refine")):
        if path is None:
            resolve_checkpoint(None, stage)
            out.append(None)
        else:
            p = resolve_checkpoint(path, stage)
            read_config(p)
            out.append(str(Path(p).resolve()))
    return (out[0], out[1], device or "auto")
