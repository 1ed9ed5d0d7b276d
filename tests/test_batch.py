"""Batches on a real Dask LocalCluster (worker processes): the same drafts and labels as one process,
a worker killed mid-case, a case that fails on every try, an unreachable scheduler, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import dask
import numpy as np
import pytest

from napari_kidseg import batch
from napari_kidseg.batch import Case, DaskCluster, parse_cluster, run_cases
from napari_kidseg.cascade import Cascade
from napari_kidseg.cli import main
from napari_kidseg.errors import KidsegError
from napari_kidseg.io import readers, volumes
from napari_kidseg.phantoms.procedural import make_phantom
from napari_kidseg.review import worklist
from napari_kidseg.review.worklist import Worklist, draft_all

# the fault-injecting tasks below are shipped to the workers by value (tests/ is not on their path)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _models(ckpts) -> tuple:
    return (str(ckpts["coarse"]), str(ckpts["refine"]), "cpu")


def _tiny(ckpts) -> list[str]:
    return ["--coarse", str(ckpts["coarse"]), "--refine", str(ckpts["refine"]), "--device", "cpu"]


def _write_cases(root: Path, n: int, seed: int = 60, **kwargs) -> Path:
    for i in range(n):
        case = make_phantom(seed + i, **{"matrix": 64, "max_slices": 16, "n_tumors": 1, **kwargs})
        volumes.write_kits_case(root, f"case_{i:05d}", case.ct, case.labels)
    return root


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob(".*.tmp*") if p.is_file()]


@pytest.fixture(scope="module")
def cluster(tiny_checkpoints):
    """One local cluster of 2 worker processes for the module (a worker killed in one test is
    restarted by its nanny); a worker that dies is forgiven once, so a case is tried twice."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        c = DaskCluster("local:2", models=_models(tiny_checkpoints), dashboard_address=":0")
        yield c
        c.close()


def _drafts(wl: Worklist) -> dict:
    out = {}
    for row in wl.rows:
        with np.load(wl.draft_path(row), allow_pickle=False) as f:
            out[row.case] = {k: f[k] for k in f.files}
    return out


def _same_drafts(a: dict, b: dict):
    assert a.keys() == b.keys()
    for case in a:
        assert a[case].keys() == b[case].keys(), case
        for k in a[case]:
            assert np.array_equal(a[case][k], b[case][k]), (case, k)


# ----------------------------------------------------------------------------------------------


def test_parse_cluster():
    assert parse_cluster("local") == (None, None)
    assert parse_cluster("local:3") == (None, 3)
    assert parse_cluster("tcp://10.0.0.5:8786") == ("tcp://10.0.0.5:8786", None)
    for bad in ("local:0", "cluster", "10.0.0.5:8786"):
        with pytest.raises(KidsegError, match="--cluster"):
            parse_cluster(bad)


@pytest.mark.slow
def test_a_cluster_drafts_the_same_bytes_as_one_process_and_loads_models_once(tmp_path, tiny_checkpoints, cluster):
    folder = _write_cases(tmp_path / "cases", 4)
    here = Worklist(folder, tmp_path / "here")
    assert draft_all(here, Cascade(*_models(tiny_checkpoints)[:2], device="cpu")) == 4
    there = Worklist(folder, tmp_path / "there")
    lines = []
    progress = batch.draft_worklist(
        there, cluster, _models(tiny_checkpoints), on_progress=lambda p, c, i: lines.append(p.line())
    )
    assert progress.done == 4 and progress.failed == 0
    _same_drafts(_drafts(here), _drafts(there))
    assert [r.status for r in there.rows] == ["drafted"] * 4
    assert [(r.models, r.right_kidney_ml, r.largest_tumor_mm) for r in there.rows] == [
        (r.models, r.right_kidney_ml, r.largest_tumor_mm) for r in here.rows
    ]
    assert lines[-1].startswith("4/4 done, 0 failed, 0 running; ") and "cases/min" in lines[-1]
    assert "left" in lines[0]
    # each worker loaded the models once (its plugin), and every case used that one Cascade
    loaded = cluster.client.run(lambda: len(__import__("napari_kidseg.cascade").cascade._PROCESS_CASCADES))
    assert sorted(loaded.values()) == [1, 1]
    here.close()
    there.close()


def _inside_a_task() -> dict:
    """What a case's task sees: its torch threads, the malloc setting from the nanny, and the page
    faults of allocating and freeing a 512 KiB array 100 times (as the cascade does slice after slice)."""
    import resource

    import torch

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        a = np.ones(2**16)
        del a
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {"threads": torch.get_num_threads(), "trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"), "faults": faults}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_worker_reuses_freed_memory_and_runs_its_share_of_the_cores(cluster):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_ on every worker, which pinned glibc's mmap
    threshold at 128 KiB: each array was a fresh mapping faulted in page by page (128 faults per
    512 KiB array, 12800 here; a worker's case 2-2.5x as slow as in one process). The plugin undoes it."""
    seen = cluster.client.submit(_inside_a_task, pure=False).result()
    assert seen["trim"] == "65536"  # the nanny's setting is there: this is the situation measured
    assert seen["faults"] < 1000, seen
    assert seen["threads"] == max(1, (os.cpu_count() or 1) // 2)


def _die_on_first_rename(marker, *args):
    """A draft whose worker is killed the first time, just as its complete file is about to be
    renamed into place (the worst moment: a full temporary file on disk, the draft not yet there)."""
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    info = worklist.draft_case(*args)
    return {**info, "pid": os.getpid()}


@pytest.mark.slow
def test_a_worker_killed_mid_case_is_retried_elsewhere_and_leaves_no_partial_file(tmp_path, tiny_checkpoints, cluster):
    folder = _write_cases(tmp_path / "cases", 1, seed=70)
    wl = Worklist(folder, tmp_path / "state")
    row = wl.rows[0]
    marker = tmp_path / "killed-pid"
    args = (str(marker), str(row.ct_path), None, str(wl.draft_path(row)), *_models(tiny_checkpoints))
    results = {}
    run_cases(
        cluster,
        [Case(row.case, _die_on_first_rename, args, outputs=(wl.draft_path(row),))],
        on_result=lambda c, info: results.update(info),
    )
    assert "error" not in results, results
    assert marker.exists() and int(marker.read_text()) != results["pid"]  # another worker process did it
    assert _temporaries(wl.state_dir) and wl.has_draft(row)  # the killed worker's full temporary file is there
    assert cluster.remove_temporaries() >= 1
    assert not _temporaries(wl.state_dir)  # and gone once the batch is over
    here = Worklist(folder, tmp_path / "here")
    draft_all(here, Cascade(*_models(tiny_checkpoints)[:2], device="cpu"))
    _same_drafts({"x": _drafts(here)[row.case]}, {"x": _drafts(wl)[row.case]})
    wl.close()
    here.close()


def _always_dies(*args):
    os.kill(os.getpid(), signal.SIGKILL)


def _always_raises(*args):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.slow
def test_a_case_failing_every_try_says_why_and_the_others_go_on(tmp_path, tiny_checkpoints, cluster):
    folder = _write_cases(tmp_path / "cases", 3, seed=80)
    broken = folder / "case_00001" / volumes.KITS_IMAGE
    broken.write_bytes(broken.read_bytes()[:2000])  # a copy that broke off
    wl = Worklist(folder, tmp_path / "state")
    progress = batch.draft_worklist(wl, cluster, _models(tiny_checkpoints))
    assert (progress.done, progress.failed) == (2, 1)
    assert [r.status for r in wl.rows] == ["drafted", "failed", "drafted"]
    assert "truncated" in wl.rows[1].reason and not wl.has_draft(wl.rows[1])
    wl.close()
    # a case that raises on every try, then one whose worker dies on every try (apart: a dying
    # worker also counts against the tasks queued on it)
    outcomes = {}
    out = tmp_path / "out" / "labels.nii.gz"
    fine = (
        str(folder / "case_00000" / volumes.KITS_IMAGE),
        str(out),
        batch.PredictSettings(),
        _models(tiny_checkpoints),
    )
    p = run_cases(
        cluster,
        [Case("raises", _always_raises, ()), Case("fine", batch.predict_task, fine)],
        on_result=lambda c, info: outcomes.update({c.name: info}),
    )
    assert (p.done, p.failed) == (1, 1)
    assert outcomes["raises"]["error"].startswith("raises: RuntimeError (CUDA error: an illegal memory access")
    p = run_cases(cluster, [Case("dies", _always_dies, ())], on_result=lambda c, info: outcomes.update({c.name: info}))
    assert (p.done, p.failed) == (0, 1)
    assert outcomes["dies"]["error"] == "dies: its worker died in each of 2 tries (out of memory, or killed)"
    assert out.exists() and "kidney" in outcomes["fine"]["line"]


def test_an_unreachable_scheduler_or_a_bad_cluster_is_one_line(tmp_path, tiny_checkpoints, capsys):
    folder = _write_cases(tmp_path / "cases", 1, seed=90)
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        assert main(["draft", str(folder), *_tiny(tiny_checkpoints), "--cluster", "tcp://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kidseg: error: tcp://127.0.0.1:9: cannot reach the Dask scheduler")
    assert main(["predict", str(folder), "-o", str(tmp_path / "o"), "--cluster", "lokal:2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected local, local:N or a scheduler address" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_predict_on_a_cluster_writes_the_same_labels_and_report(tmp_path, tiny_checkpoints, capsys):
    folder = _write_cases(tmp_path / "cases", 3, seed=100)
    common = ["predict", str(folder), *_tiny(tiny_checkpoints), "--report", "--save-probabilities"]
    assert main([*common, "-o", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    assert main([*common, "-o", str(tmp_path / "two"), "--cluster", "local:2"]) == 0
    err = capsys.readouterr().err
    assert "3 case(s) on a local cluster with 2 worker(s) x 1 thread; dashboard http" in err
    assert "3/3 done, 0 failed, 0 running" in err
    for case in sorted(p.name for p in folder.iterdir()):
        a = readers.read_labels(tmp_path / "one" / case / volumes.KITS_LABELS)
        b = readers.read_labels(tmp_path / "two" / case / volumes.KITS_LABELS)
        assert np.array_equal(a.array, b.array) and a.geometry == b.geometry
        with np.load(tmp_path / "one" / case / "segmentation_probabilities.npz") as f1:
            with np.load(tmp_path / "two" / case / "segmentation_probabilities.npz") as f2:
                assert all(np.array_equal(f1[k], f2[k]) for k in f1.files)
    one = sorted((tmp_path / "one" / "report.csv").read_text().splitlines())
    assert one == sorted((tmp_path / "two" / "report.csv").read_text().splitlines())
    assert not _temporaries(tmp_path / "two")


def _interrupt_after_the_first_case(cmd: list[str], cwd: Path):
    """Run a kidseg command in a terminal's way, press Ctrl-C once its first case is done; its
    stderr lines up to then, the rest, and the processes it had started."""
    import psutil

    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=cwd,
        # a shell's background jobs (CI's, say) inherit SIGINT ignored: give the command a terminal's
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    deadline = time.monotonic() + 900  # a local cluster took 405 s to start on this machine under load 25
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "kidseg: [" in line and line.rstrip().endswith(": done"):
            break
        if not line and proc.poll() is not None:
            break
    assert lines[-1].rstrip().endswith(": done"), "".join(lines)  # a first case done, the others to come
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 2, lines  # the workers (and their nannies)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, "".join(lines) + rest
    assert "cancelled" in rest and "Traceback" not in rest
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive
    return lines, rest


@pytest.mark.slow
def test_ctrl_c_shuts_the_local_cluster_down_and_leaves_nothing_half_written(tmp_path, tiny_checkpoints):
    folder = _write_cases(tmp_path / "cases", 10, seed=110, matrix=128, max_slices=40)
    cmd = [sys.executable, "-m", "napari_kidseg.cli", "draft", str(folder), *_tiny(tiny_checkpoints)]
    _interrupt_after_the_first_case([*cmd, "--cluster", "local:2"], tmp_path)
    wl = Worklist(folder)
    drafted = [r for r in wl.rows if wl.has_draft(r)]
    assert 1 <= len(drafted) < len(wl.rows)  # stopped part-way
    assert not _temporaries(folder)
    assert all(wl.load_draft(r) is not None for r in drafted)  # each one complete
    assert any(r.status == "drafted" for r in drafted)
    wl.close()


@pytest.mark.slow
def test_ctrl_c_during_predict_on_a_cluster_names_the_labels_kept(tmp_path, tiny_checkpoints):
    folder = _write_cases(tmp_path / "cases", 10, seed=110, matrix=128, max_slices=40)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "napari_kidseg.cli", "predict", str(folder), "-o", str(out), *_tiny(tiny_checkpoints)]
    _, rest = _interrupt_after_the_first_case([*cmd, "--cluster", "local:2"], tmp_path)
    assert "cancelled; the output in progress was not written; kept the" in rest, rest
    kept = rest.split("kept the ", 1)[1].split(": ", 1)[1].strip().split(", ")
    written = sorted(out.glob(f"*/{volumes.KITS_LABELS}"))
    assert 1 <= len(written) < 10, written  # stopped part-way
    assert set(kept) <= {str(p) for p in written} and kept, (kept, written)
    assert not _temporaries(out)
    for p in written:  # each one complete
        ct = volumes.read_ct(folder / p.parent.name / volumes.KITS_IMAGE)
        assert readers.read_labels(p).array.shape == ct.array.shape
