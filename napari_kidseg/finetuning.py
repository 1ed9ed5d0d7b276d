"""The correction -> fine-tune loop: both stages on exported corrections, children that chain.

``finetune_models`` checks the corrections folder, picks the parents (given, or the newest
children in ``CORRECTIONS/models/``, or the bundled models), fine-tunes the coarse stage (which
picks the kidney regions, where most real-CT errors start) and the refine stage with
:func:`finetune_stage` (the training loop of :mod:`training`, on the corrected cases' reviewed
slices plus replayed phantoms), and writes both children into a new dated folder
``CORRECTIONS/models/finetune-YYYYmmdd-HHMMSS/`` with a ``report.json``: the chain of
parents, the held-out before/after scores of the whole cascade, and the time. A child that
scores worse than its parent on the held-out corrected cases is reported as worse
(``report["worse"]``), so the widget can keep the parent unless the user insists. How it learns
is one :class:`~napari_kidseg.training.FinetuneSettings` (the CLI and the widget build one).

How much to learn is decided by the corrected case (``schedule="heldout"``, the default): alternating
slabs of each corrected case's reviewed slices (two trained, one held out; whole cases too once
there are three scans or more) are held out, and training runs in steps of ``EVAL_EVERY`` until
the held-out Dice stops improving: the best step is kept, the learning rate starts at ``lr`` and
is quartered at each plateau (back from the best step), and the run ends after ``LR_DROPS`` drops,
at ``max_steps`` or once ``max_minutes`` of training steps are spent (scoring, loading and the
parents' runs do not count); ``report["stopped"]`` says where and why. Where nothing can be held
out (a correction of one reviewed slice), the trained slices themselves are scored (training data,
said so) and the guard phantoms still judge forgetting. Half of each batch is replayed phantoms
(and all earlier corrected cases train too), and a step whose Dice on two held-out phantoms falls
more than ``FORGET_TOLERANCE`` below the parent's never counts as the best. What the correction
changed (the parent's answer against the corrected labels, coarse stage alone and fused, widened
by ``lesson_mm``) weighs ``lesson_weight`` times more in the loss, and those slices are drawn as
often as tumor slices, so the coarse stage learns the deletions too. The false-kidney guard: a
step whose whole cascade calls more false kidney than its parent's (beyond
:func:`~napari_kidseg.heldout_rule.false_kidney_limit`) on real scans without kidneys
(:func:`kidney_free_scans`) and on the corrected cases' reviewed slices farther than
``FALSE_KIDNEY_MM`` from their kidneys is never the best, and children that do are "worse"
(``report["worse_on"]``): the held-out slabs alone passed a child that called 142 mL of another
real scan kidney. ``schedule="fixed"`` is the
earlier rule: ``epochs`` x ``steps_per_epoch`` steps at ``lr``, no lesson weights (the phantom site
study's 5 x 20 steps at 2e-5; the model card has both side by side). The time left that the CLI
and the widget show comes from the measured step times (:class:`StepClock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .errors import KidsegError
from .heldout_rule import FALSE_KIDNEY_MM, StepClock, false_kidney_limit, train_until_heldout_stops
from .io import files, readers, volumes
from .review.corrections_folder import check_corrections, reviewed_slices, split_by_scan
from .training import FinetuneSettings

STAGES = ("coarse", "refine")
MODELS_FOLDER = "models"
SLAB_MM = 15.0  # held-out slabs: two of this thickness trained, one held out
GUARD_PHANTOMS = 2  # held-out phantoms (never replayed) for the forgetting check
WORSE_MARGIN = {"corrected": 0.005, "phantoms": 0.01}  # the "worse" guard on the whole cascade
# real scans without kidneys for the false-kidney guard (os.pathsep-separated DICOM folders or
# volumes); unset: the shared 3-slice liver CT beside the checkout, when there
KIDNEY_FREE_ENV = "KIDSEG_KIDNEY_FREE_SCANS"


def _beside_the_checkout(*parts) -> Path:
    """``../shared/data/<parts>`` beside the checkout: found from the package's own folder (a
    checkout on the path, an editable install) or else from the working directory (a package
    installed into a virtual environment and run from its checkout, as ``make test`` does)."""
    tail = Path("shared", "data", *parts)
    candidates = [Path(__file__).resolve().parents[2] / tail, Path.cwd().parent / tail]
    return next((c for c in candidates if c.exists()), candidates[0])


SHARED_KIDNEY_FREE = _beside_the_checkout("realct", "dcmqi-liver-3slice")

_log = logging.getLogger(__name__)  # the default for ``log``: quiet unless the caller configures logging


def latest_children(corrections_dir) -> dict[str, Path]:
    """The newest fine-tuned checkpoint of each stage under ``CORRECTIONS/models/``: of finished
    runs only (those with their report.json, written last), never an interrupted one's."""
    found = {}
    folder = Path(corrections_dir) / MODELS_FOLDER
    for run in sorted(folder.glob("finetune-*")) if folder.is_dir() else []:
        if not (run / "report.json").is_file():
            continue
        for stage in STAGES:
            if (run / f"{stage}.safetensors").is_file():
                found[stage] = run / f"{stage}.safetensors"
    return found


def default_output_dir(corrections_dir) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(corrections_dir) / MODELS_FOLDER / f"finetune-{stamp}"


def _chain(path: Path) -> list[str]:
    """The names of a checkpoint's ancestors, oldest first, read from its provenance."""
    from .models import read_config

    cfg = read_config(path)
    prov = cfg.provenance or {}
    return list(prov.get("chain", [])) + [f"{path.parent.name}/{path.name} ({cfg.version})"]


def finetune_models(
    corrections_dir,
    out_dir=None,
    settings: FinetuneSettings | None = None,
    *,
    stages=STAGES,
    coarse=None,
    refine=None,
    progress=None,
    cancel=None,
    log=None,
) -> dict:
    """Fine-tune ``stages`` on the corrections as ``settings`` say (None: the defaults); writes
    ``out_dir/<stage>.safetensors`` and ``report.json``."""
    log = log or _log.info
    settings = (settings or FinetuneSettings()).check()
    corrections_dir = Path(corrections_dir)
    stages = tuple(stages)
    if not stages or any(s not in STAGES for s in stages):
        raise KidsegError(f"stages must be among {STAGES}, got {stages}")
    cases = check_corrections(corrections_dir)
    parents = _parents(corrections_dir, coarse, refine)
    out_dir = Path(out_dir) if out_dir else default_output_dir(corrections_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise KidsegError("is a file; the new models go into a folder", out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise KidsegError("already exists and is not empty; not overwriting it", out_dir)
    made_here = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    with _cleared_when_interrupted(out_dir, made_here):
        return _finetune_into(out_dir, corrections_dir, cases, parents, stages, settings, progress, cancel, log)


def _parents(corrections_dir: Path, coarse, refine) -> dict[str, Path]:
    """The parent of each stage: given, else the newest child in the folder, else the bundled one."""
    from .models import read_config, resolve_checkpoint

    children = latest_children(corrections_dir)
    parents = {
        "coarse": resolve_checkpoint(coarse or children.get("coarse"), "coarse"),
        "refine": resolve_checkpoint(refine or children.get("refine"), "refine"),
    }
    for stage, path in parents.items():
        got = read_config(path).stage
        if got != stage:
            raise KidsegError(f"is a {got} checkpoint, not a {stage} one", path)
    return parents


@contextlib.contextmanager
def _cleared_when_interrupted(out_dir: Path, made_here: bool):
    """A fine-tune that fails or is cancelled leaves no half folder behind (a killed one leaves
    no report.json, so :func:`latest_children` passes it over)."""
    try:
        yield
    except BaseException:
        if made_here:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:
            for f in out_dir.iterdir():
                shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
        raise


def _finetune_into(out_dir, corrections_dir, cases, parents, stages, settings, progress, cancel, log) -> dict:
    """The work of :func:`finetune_models` once its inputs are checked: what the corrections
    teach, each stage in turn, the "worse" guard on the children, the report."""
    need = sum(parents[s].stat().st_size for s in stages) * 4 + 50 * 2**20  # children, .last, state
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise KidsegError(
            f"needs about {need / 2**20:.0f} MB free for the new models, has {free / 2**20:.0f} MB", out_dir
        )
    t_start = time.time()
    taught = _what_corrections_teach(corrections_dir, cases, parents, settings, cancel, log)
    seconds = {"parents": time.time() - t_start}
    new, stopped = dict(parents), {}
    for k, stage in enumerate(stages):
        t0 = time.time()
        out = out_dir / f"{stage}.safetensors"

        def stage_progress(done, total, what=None, k=k, stage=stage):
            if progress:
                text = f"fine-tune {stage}" + (f": {what}" if what else "")
                progress(k * 1000 + int(1000 * done / max(total, 1)), 1000 * len(stages), text)

        log(f"fine-tuning the {stage} model from {parents[stage].name}")
        ft = finetune_stage(
            corrections_dir,
            parents[stage],
            out,
            settings,
            stage=stage,
            cases=cases,
            coarse_checkpoint=new["coarse"],
            refine_checkpoint=new["refine"],
            guard_scans=taught["scans"],
            lessons=taught["lessons"],
            slabs=taught["slabs"],
            progress=stage_progress,
            cancel=cancel,
            log=log,
            score=False,
            chain=_chain(parents[stage]),
        )
        new[stage] = out
        seconds[stage], seconds[f"{stage}_training"] = time.time() - t0, ft["training_seconds"]
        if ft.get("stopped"):
            stopped[stage] = ft["stopped"]
            log(f"{stage}: {ft['stopped']['why']}")
        for leftover in (out.with_suffix(".last.safetensors"), out.with_suffix(".state.pt")):
            leftover.unlink(missing_ok=True)  # resume files of a finished run: 3x the model's size
    t0 = time.time()
    after = guard_scores(
        taught["held"],
        taught["guard"],
        new,
        None,
        taught["slabs"],
        settings.device,
        train_dirs=taught["train_dirs"],
        scans=taught["scans"],
    )
    seconds["children"] = time.time() - t0
    seconds["total"] = time.time() - t_start
    report = _report(taught, after, stopped, stages, parents, new, out_dir, seconds, settings)
    with files.atomic_path(out_dir / "report.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    return report


def _what_corrections_teach(corrections_dir, cases, parents, settings, cancel, log) -> dict:
    """Both stages' shared inputs, made once: the split by scan, each case's held-out slabs and
    lesson (from the parents' runs on it), the guard phantoms and the parents' guard scores."""
    s = settings
    train_dirs, held = split_by_scan(corrections_dir, cases, s.holdout_fraction)
    reviewed = reviewed_slices(corrections_dir) if s.reviewed_only else {}
    log(f"running the parents on {len(train_dirs)} corrected case(s): what each correction changed")
    drafts = parent_drafts(train_dirs, parents["coarse"], parents["refine"], device=s.device, cancel=cancel)
    slabs = {
        c.name: heldout_slabs(reviewed.get(c.name) or range(len(drafts[c.name]["draft"])), drafts[c.name]["spacing"][0])
        for c in train_dirs
    }
    lessons = {}
    if s.schedule == "heldout" and s.lesson_weight > 0:
        lessons = {c.name: lesson_file(c, drafts[c.name], parents, s.lesson_mm) for c in train_dirs}
    guard = guard_phantoms() if s.n_replay else []
    scans, scans_line = false_kidney_scans(train_dirs, reviewed)
    log(scans_line)
    log(f"scoring the parents on {len(held)} held-out case(s), held-out slabs and {len(guard)} held-out phantom(s)")
    before = guard_scores(held, guard, parents, drafts, slabs, s.device, scans=scans)
    return {
        "scans": scans,
        "scans_line": scans_line,
        "train_dirs": train_dirs,
        "held": held,
        "slabs": slabs,
        "lessons": lessons,
        "guard": guard,
        "before": before,
    }


def _report(taught, after, stopped, stages, parents, new, out_dir, seconds, settings) -> dict:
    """``report.json``: the before/after scores, the "worse" guard's verdict, where each stage stopped."""
    before, held, slabs = taught["before"], taught["held"], taught["slabs"]
    worse_on = [
        what
        for what, margin in WORSE_MARGIN.items()
        if before.get(what)
        and after.get(what)
        and after[what]["kidney_tumor_dice"] < before[what]["kidney_tumor_dice"] - margin
    ]
    fk_before, fk_after = before.get("false_kidney"), after.get("false_kidney")
    if fk_before and fk_after and fk_after["ml"] > false_kidney_limit(fk_before["ml"]):
        worse_on.append("false_kidney")
    return {
        "before": before.get("corrected", {}),
        "after": after.get("corrected", {}),
        "phantoms_before": before.get("phantoms", {}),
        "phantoms_after": after.get("phantoms", {}),
        "worse": bool(worse_on),
        "worse_on": worse_on,
        "false_kidney_before": fk_before,
        "false_kidney_after": fk_after,
        "false_kidney_guard": taught["scans_line"],
        "stopped": stopped,
        "held_out": [c.name for c in held],
        "held_out_slabs": {k: len(v[1]) for k, v in slabs.items()} if not held else {},
        "scored_on": [c.name for c in held or taught["train_dirs"]],
        "trained_on": [c.name for c in taught["train_dirs"]],
        "stages": list(stages),
        "parents": {k: str(v) for k, v in parents.items()},
        "models": {k: str(v) for k, v in new.items()},
        "folder": str(out_dir),
        "seconds": seconds,
        "settings": dataclasses.asdict(settings),
    }


def model_versions(corrections_dir) -> list[dict]:
    """The bundled models and every fine-tuned pair in ``CORRECTIONS/models/``, oldest first, with
    their held-out before/after scores: the widget's list of versions to switch back to."""
    from .models import bundled_checkpoint

    rows = [
        {
            "name": "bundled",
            "coarse": str(bundled_checkpoint("coarse")),
            "refine": str(bundled_checkpoint("refine")),
            "after": None,
            "worse": False,
        }
    ]
    folder = Path(corrections_dir) / MODELS_FOLDER
    for run in sorted(folder.glob("finetune-*")) if folder.is_dir() else []:
        report = run / "report.json"
        if not report.exists():
            continue
        r = json.loads(report.read_text())
        rows.append(
            {
                "name": run.name,
                **{s: r["models"][s] for s in STAGES},
                "after": r.get("after"),
                "before": r.get("before"),
                "worse": r.get("worse", False),
                "held_out": bool(r.get("held_out")),  # scored on held-out cases, or on its training ones
            }
        )
    return rows


# ------------------------------------------------------------------------------ one stage
def parent_drafts(case_dirs, coarse, refine, device="auto", cancel=None) -> dict[str, dict]:
    """What the parents answer on each corrected case: the fused draft (what the radiologist
    corrected) and the coarse stage alone (anatomy check off: what the coarse network itself
    says, a spleen the check removed included), with the case's spacing. Both without tumor by
    contrast and with the tumor specks kept: a tumor the networks called kidney, or a speck of
    tumor they drew on a kidney, is their lesson even where a rule after fusion mended it."""
    from .cascade import Cascade
    from .labels import map_kits_labels

    cascade = Cascade(coarse, refine, device=device)
    out = {}
    for case in case_dirs:
        ct, ref = readers.read_kits_case(case)
        result = cascade.run(ct.array, ct.geometry.spacing, cancel=cancel)
        out[case.name] = {
            "draft": result.fuse(contrast_tumor=False, keep_specks=True),
            "coarse": result.fuse(alpha=1.0, anatomy_check=False, contrast_tumor=False),
            "labels": map_kits_labels(ref.array, case / volumes.KITS_LABELS),
            "spacing": tuple(ct.geometry.spacing),
        }
    return out


def lesson_mask(draft: dict, mm: float) -> np.ndarray:
    """The voxels a correction teaches: where the parents' draft or their coarse stage alone differ
    from the corrected labels (false regions deleted, missed kidney added), widened in-plane by
    ``mm`` (a deletion's rim is as much the lesson as its core)."""
    from scipy import ndimage

    ref = draft["labels"]
    changed = (draft["draft"] != ref) | (draft["coarse"] != ref)
    steps = int(round(mm / min(draft["spacing"][1:])))
    if steps and changed.any():
        plane = np.zeros((3, 3, 3), bool)
        plane[1] = ndimage.generate_binary_structure(2, 1)
        changed = ndimage.binary_dilation(changed, plane, iterations=steps)
    return changed.astype(np.uint8)


def lesson_file(case: Path, draft: dict, parents: dict, mm: float) -> Path:
    """:func:`lesson_mask` of a corrected case written beside its training cache (one per parents)."""
    import hashlib

    from .io.files import file_sha256
    from .training import cache_case

    cached = cache_case(case)
    key = hashlib.sha1(f"{file_sha256(parents['coarse'])}|{file_sha256(parents['refine'])}|{mm}".encode())
    path = cached.ct_path.parent / f"lesson-{key.hexdigest()[:12]}.npy"
    with files.atomic_path(path, overwrite=True) as tmp:
        np.save(tmp, lesson_mask(draft, mm))
    return path


def heldout_slabs(zs, z_mm: float, slab_mm: float = SLAB_MM) -> tuple[tuple, tuple]:
    """(trained, held-out) slices of one corrected case: its reviewed slices ``zs`` cut into slabs
    of ``slab_mm``, two trained and one held out in turn; fewer than three slabs: slice by slice.
    A single slice is only trained on."""
    zs = sorted({int(z) for z in zs})
    if len(zs) < 2:
        return tuple(zs), ()
    per = max(1, int(round(slab_mm / z_mm)))
    slab = [(z - zs[0]) // per for z in zs]
    if len(set(slab)) < 3:
        slab = list(range(len(zs)))
    rank = {k: i for i, k in enumerate(sorted(set(slab)))}
    held = [z for z, k in zip(zs, slab) if rank[k] % 3 == 1]
    return tuple(z for z in zs if z not in set(held)), tuple(held)


def guard_phantoms() -> list[Path]:
    """Phantoms never replayed: the forgetting check's held-out cases (generated once, cached)."""
    return replay_cases(GUARD_PHANTOMS, seed=60_000)


@dataclasses.dataclass
class FalseKidneyScan:
    """A real scan of the false-kidney guard: kidney the cascade calls where ``where`` is True
    (everywhere when None) is false."""

    name: str
    ct: np.ndarray
    spacing: tuple
    where: np.ndarray | None = None


def kidney_free_scans() -> list[Path]:
    """Real scans without kidneys for the false-kidney guard: those ``KIDSEG_KIDNEY_FREE_SCANS``
    names, else the shared 3-slice liver CT beside the checkout when it is there, else none."""
    named = os.environ.get(KIDNEY_FREE_ENV)
    if named is None:
        return [SHARED_KIDNEY_FREE] if SHARED_KIDNEY_FREE.is_dir() else []
    paths = [Path(p) for p in named.split(os.pathsep) if p]
    for p in paths:
        if not p.exists():
            raise KidsegError(f"not found ({KIDNEY_FREE_ENV} names it as a scan without kidneys)", p)
    return paths


def _far_from(foreground: np.ndarray, spacing, mm: float) -> np.ndarray:
    """Voxels farther than ``mm`` from ``foreground`` (the distance taken in its bounding box
    widened by ``mm``: everything outside is farther anyway)."""
    from scipy import ndimage

    far = np.ones(foreground.shape, bool)
    zs, ys, xs = (np.flatnonzero(foreground.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    if not len(zs):
        return far
    box = tuple(
        slice(max(int(v[0]) - pad, 0), int(v[-1]) + pad + 1)
        for v, pad in zip((zs, ys, xs), (int(np.ceil(mm / sp)) + 1 for sp in spacing))
    )
    far[box] = ndimage.distance_transform_edt(~foreground[box], sampling=spacing) > mm
    return far


def false_kidney_scans(train_dirs, reviewed: dict) -> tuple[list[FalseKidneyScan], str]:
    """The false-kidney guard's scans and a line saying which: each corrected case's reviewed
    slices (``reviewed``: case name -> slices; absent: all) farther than ``FALSE_KIDNEY_MM`` from
    its corrected kidney, tumor and cyst, and the real scans without kidneys."""
    from .labels import kits_foreground, map_kits_labels

    scans = []
    for case in train_dirs:
        ct, ref = readers.read_kits_case(case)
        spacing = tuple(ct.geometry.spacing)
        labels = map_kits_labels(ref.array, case / volumes.KITS_LABELS)
        where = _far_from(kits_foreground(labels), spacing, FALSE_KIDNEY_MM)
        if reviewed.get(case.name):
            where[np.setdiff1d(np.arange(len(where)), reviewed[case.name])] = False
        scans.append(FalseKidneyScan(case.name, ct.array, spacing, where))
    free = kidney_free_scans()
    for path in free:
        ct = volumes.read_ct(path)
        scans.append(FalseKidneyScan(f"kidney-free:{path.name}", ct.array, tuple(ct.geometry.spacing)))
    line = (
        f"false-kidney guard: {len(train_dirs)} corrected case(s) farther than {FALSE_KIDNEY_MM:g} mm from "
        "their kidneys, and "
        + (
            f"{len(free)} real scan(s) without kidneys ({', '.join(p.name for p in free)})"
            if free
            else f"no real scan without kidneys ({KIDNEY_FREE_ENV} unset and the shared one absent): "
            "the corrected cases only"
        )
    )
    return scans, line


def false_kidney_ml(fused: np.ndarray, scan: FalseKidneyScan) -> float:
    """mL of the labels ``fused`` that lie where ``scan`` holds no kidney."""
    from .metrics import volume_ml

    hit = fused > 0
    return volume_ml(hit if scan.where is None else hit & scan.where, scan.spacing)


def false_kidney_meter(scans, coarse, refine, stage, device):
    """A function of the ``stage`` model in training: mL of false kidney the cascade with it (and
    the other stage's ``coarse`` or ``refine``) calls on ``scans``, all together; None without scans."""
    from .cascade import Cascade

    if not scans:
        return None
    cascade = Cascade(coarse, refine, device=device)
    # while the refine stage trains the coarse one stays the parent's: its answer on each scan is
    # made at the first measure and kept (it was half of every measure)
    coarse_out = {}

    def coarse_of(i, scan):
        if stage != "refine":
            return None
        if i not in coarse_out:
            coarse_out[i] = cascade.run_coarse(scan.ct, scan.spacing)
        return coarse_out[i]

    def measure(model) -> float:
        setattr(cascade, stage, model)
        model.eval()
        try:
            runs = (cascade.run(s.ct, s.spacing, coarse=coarse_of(i, s)) for i, s in enumerate(scans))
            return float(sum(false_kidney_ml(r.fuse(), s) for r, s in zip(runs, scans)))
        finally:
            model.train()

    return measure


def guard_scores(held, guard, models: dict, drafts, slabs, device, train_dirs=(), scans=()) -> dict:
    """The "worse" guard's scores of the whole cascade: on the held-out corrected cases (or, with
    none, on the corrected cases' held-out slabs), on the held-out phantoms and, with ``scans``,
    the false kidney on them (:func:`false_kidney_scans`). ``drafts``: the parents' runs on the
    corrected cases, already made; None runs ``models`` on them."""
    from .metrics import kits_scores

    out = {}
    if drafts is None and not held:
        cases = [c for c in train_dirs if slabs[c.name][1] or scans]
        drafts = parent_drafts(cases, models["coarse"], models["refine"], device=device) if cases else {}
    if scans:
        cascade, per = None, {}
        for scan in scans:
            if drafts and scan.name in drafts:
                fused = drafts[scan.name]["draft"]
            else:
                from .cascade import Cascade

                cascade = cascade or Cascade(models["coarse"], models["refine"], device=device)
                fused = cascade.run(scan.ct, scan.spacing).fuse()
            per[scan.name] = false_kidney_ml(fused, scan)
        out["false_kidney"] = {"ml": float(sum(per.values())), "scans": per}
    if held:
        out["corrected"] = evaluate_cascade(held, models["coarse"], models["refine"], device=device)
    else:
        rows = []
        for name, draft in drafts.items():
            zs = list(slabs[name][1])
            if zs:
                rows.append(kits_scores(draft["draft"][zs], draft["labels"][zs]))
        if rows:
            out["corrected"] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    if guard:
        out["phantoms"] = evaluate_cascade(guard, models["coarse"], models["refine"], device=device)
    return out


def evaluate_cascade(case_dirs, coarse_checkpoint, refine_checkpoint, device="auto", **fuse_kwargs) -> dict:
    """Mean KiTS scores of the whole cascade on KiTS-layout cases with reference labels."""
    from .cascade import Cascade
    from .labels import map_kits_labels
    from .metrics import kits_scores

    cascade = Cascade(coarse_checkpoint, refine_checkpoint, device=device)
    rows = []
    for case in case_dirs:
        ct, ref = readers.read_kits_case(case)
        result = cascade.run(ct.array, ct.geometry.spacing)
        rows.append(kits_scores(result.fuse(**fuse_kwargs), map_kits_labels(ref.array, case)))
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def replay_cases(n: int, seed: int) -> list[Path]:
    """Phantom cases mixed into a fine-tune so the model does not forget (generated once, cached)."""
    from .phantoms.procedural import GENERATOR_REVISION
    from .phantoms.writer import write_phantom_cases
    from .training import cache_root

    root = cache_root().parent / "replay" / f"seed{seed}-n{n}-rev{GENERATOR_REVISION}"
    if len(volumes.kits_cases(root) if root.exists() else []) < n:
        write_phantom_cases(root, n, seed, overwrite=True, matrix=256, max_slices=80)
    return volumes.kits_cases(root)[:n]


def finetune_stage(
    corrections_dir,
    parent,
    out,
    settings: FinetuneSettings | None = None,
    *,
    stage="refine",
    cases=None,
    coarse_checkpoint=None,
    refine_checkpoint=None,
    guard_scans=None,
    replay_seed=50_000,
    lessons=None,
    slabs=None,
    progress=None,
    cancel=None,
    log=None,
    score=True,
    chain=None,
) -> dict:
    """Fine-tune one stage's ``parent`` on exported corrections as ``settings`` say; writes a child
    checkpoint ``out``.

    ``cases``: the corrected cases, already checked (:func:`check_corrections` runs otherwise).
    ``settings.schedule``: "heldout" (the module's rule: the held-out slabs decide the steps and
    the learning rate, ``report["stopped"]`` says why it stopped) or "fixed" (``epochs`` x
    ``steps_per_epoch`` at ``lr``). ``lessons`` (case name -> :func:`lesson_file`) and ``slabs``
    (case name -> :func:`heldout_slabs`): made by :func:`finetune_models` for both stages at
    once; None makes them here (the lessons by running the parents). ``guard_scans``
    (:func:`false_kidney_scans`, None: made here) are where the held-out rule's false-kidney guard
    runs the cascade: the stage in training with ``coarse_checkpoint`` or ``refine_checkpoint``
    (None: the bundled refine model) as the other stage.

    With ``score``, the whole cascade's Dice on held-out cases (or, with fewer than three scans, on
    the corrected cases) is measured before and after. The parent file is never written.
    ``bn_momentum`` 0 keeps the parent's BatchNorm statistics: they come from thousands of
    batches, and a few cases' batches would otherwise pull them away from everything else.
    """
    log = log or _log.info
    from .models import read_config
    from .training import cache_case

    s = (settings or FinetuneSettings()).check()
    corrections_dir, parent, out = Path(corrections_dir), Path(parent), Path(out)
    if out.resolve() == parent.resolve():
        raise KidsegError("the fine-tuned checkpoint must not replace its parent; choose another -o", out)
    if out.exists():
        raise KidsegError("already exists; not overwriting it", out)
    cases = check_corrections(corrections_dir) if cases is None else cases
    parent_cfg = read_config(parent)
    if parent_cfg.stage != stage:
        raise KidsegError(f"is a {parent_cfg.stage} checkpoint; --stage {stage} needs a {stage} one", parent)
    train_dirs, held = split_by_scan(corrections_dir, cases, s.holdout_fraction)
    eval_dirs = held or train_dirs
    if not held and score:
        log(
            "fewer than three corrected scans: they are all trained on and also scored (no held-out "
            "scan, so the before/after figures are on training data)"
        )
    coarse = coarse_checkpoint if stage == "refine" else parent
    refine_before = parent if stage == "refine" else refine_checkpoint
    before = {}
    if score:
        log(f"scoring the parent on {len(eval_dirs)} case(s)...")
        before = evaluate_cascade(eval_dirs, coarse, refine_before, device=s.device)
    replay = replay_cases(s.n_replay, replay_seed) if s.n_replay else []
    reviewed = reviewed_slices(corrections_dir) if s.reviewed_only else {}
    cached = [dataclasses.replace(cache_case(c), slices=reviewed.get(c.name)) for c in train_dirs]
    cfg = _child_config(parent, parent_cfg, corrections_dir, train_dirs, held, replay_seed, len(replay), s, chain)
    cfg.provenance["reviewed_slices_only"] = {c.name: list(reviewed[c.name]) for c in train_dirs if c.name in reviewed}
    if s.schedule == "heldout":
        trained, held_cached, slabs = _heldout_cases(cached, train_dirs, held, slabs, lessons, coarse, refine_before, s)
        cfg.provenance["held_out_slices"] = {k: list(v[1]) for k, v in slabs.items() if v[1]}
        guard = [cache_case(c) for c in guard_phantoms()] if s.n_replay else []
        replayed = [cache_case(c) for c in replay]
        if guard_scans is None:
            guard_scans, line = false_kidney_scans(train_dirs, reviewed)
            log(line)
        from .models import resolve_checkpoint

        pair = resolve_checkpoint(coarse, "coarse"), resolve_checkpoint(refine_before, "refine")
        try:
            meter = false_kidney_meter(guard_scans, *pair, stage, s.device)
        except KidsegError as e:  # a coarse stage alone, the bundled refine model no match for it
            meter = log(f"false-kidney guard off for this stage: {e}")
        summary = train_until_heldout_stops(
            cfg, parent, trained, held_cached, replayed, guard, out, s, progress=progress, cancel=cancel, log=log,
            false_kidney=meter,
        )  # fmt: skip
    else:
        summary = _train_fixed(cfg, parent, cached + [cache_case(c) for c in replay], out, s, progress, cancel, log)
    after = {}
    if score:
        after = evaluate_cascade(
            eval_dirs, coarse if stage == "refine" else out, out if stage == "refine" else None, device=s.device
        )
    return {
        "before": before,
        "after": after,
        "held_out": [c.name for c in held],
        "scored_on": [c.name for c in eval_dirs],
        "checkpoint": str(out),
        "seconds": summary["seconds"],
        "training_seconds": summary["training_seconds"],
        "stopped": summary.get("stopped"),
    }


def _child_config(parent, parent_cfg, corrections_dir, train_dirs, held, replay_seed, n_replay, s, chain):
    """The child's config: the parent's, a new version, and a provenance that names its lineage."""
    from .io.files import file_sha256

    cfg = dataclasses.replace(parent_cfg)
    cfg.version = f"{parent_cfg.version}+ft{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}"
    cfg.provenance = {
        "parent": str(parent),
        "parent_sha256": file_sha256(parent),
        "parent_version": parent_cfg.version,
        "corrections": str(corrections_dir),
        "trained_on": [{"case": c.name, "labels_sha256": file_sha256(c / volumes.KITS_LABELS)} for c in train_dirs],
        "held_out": [c.name for c in held],
        "replay_phantom_seeds": [replay_seed + i for i in range(n_replay)],
        "schedule": s.schedule,
        "lr": s.lr,
        "bn_momentum": s.bn_momentum,
        "freeze_encoder": s.freeze_encoder,
        "chain": list(chain) if chain else [f"{parent.parent.name}/{parent.name} ({parent_cfg.version})"],
    }
    if s.schedule == "heldout":
        cfg.provenance.update(max_steps=s.max_steps, lesson_weight=s.lesson_weight, lesson_mm=s.lesson_mm)
    else:
        cfg.provenance.update(epochs=s.epochs, steps_per_epoch=s.steps_per_epoch)
    return cfg


def _heldout_cases(cached, train_dirs, held, slabs, lessons, coarse, refine_before, s):
    """The held-out rule's cases: the trained slabs (each with its lesson), the held-out slabs and
    cases, and the slabs (made here, and the lessons from the parents' runs, when not given)."""
    from .training import cache_case

    if slabs is None:
        slabs = {c.name: heldout_slabs(k.slices or range(k.shape[0]), k.spacing[0]) for c, k in zip(train_dirs, cached)}
    if lessons is None and s.lesson_weight > 0:
        from .models import resolve_checkpoint

        pair = {"coarse": resolve_checkpoint(coarse, "coarse"), "refine": resolve_checkpoint(refine_before, "refine")}
        drafts = parent_drafts(train_dirs, pair["coarse"], pair["refine"], device=s.device)
        lessons = {c.name: lesson_file(c, drafts[c.name], pair, s.lesson_mm) for c in train_dirs}
    lessons = lessons or {}
    held_cached = [dataclasses.replace(k, slices=slabs[k.name][1]) for k in cached if slabs[k.name][1]]
    held_cached += [cache_case(c) for c in held]
    trained = [
        dataclasses.replace(k, slices=slabs[k.name][0], lesson_path=lessons.get(k.name))
        for k in cached
        if slabs[k.name][0]
    ]
    return trained, held_cached, slabs


def _train_fixed(cfg, parent, cached, out, s, progress, cancel, log) -> dict:
    """The fixed rule: :func:`training.train` for ``epochs`` x ``steps_per_epoch`` at ``lr``."""
    from .training import TrainSettings, train

    settings = TrainSettings(
        epochs=s.epochs,
        steps_per_epoch=s.steps_per_epoch,
        batch_size=s.batch_size,
        lr=s.lr,
        patience=s.epochs + 1,
        workers=0,
        device=s.device,
        max_minutes=s.max_minutes,  # train() counts its epochs' time: steps (and a checkpoint write each)
        val_samples=0,
        bn_momentum=s.bn_momentum,
        freeze_encoder=s.freeze_encoder,
    )
    clock = StepClock(s.max_minutes)

    def ticked(done, total, what=None):
        clock.step()
        if progress:
            progress(done, total, f"{what}, {clock.says(done, total)}" if what else clock.says(done, total))

    summary = train(cfg, cached, [], out, settings, init_checkpoint=parent, progress=ticked, cancel=cancel, log=log)
    return {**summary, "training_seconds": clock.trained_s}
