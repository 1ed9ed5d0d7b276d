"""The correction -> fine-tune loop: both stages on exported corrections, children that chain.

``finetune_models`` checks the corrections folder, picks the parents (given, or the newest
children in ``CORRECTIONS/models/``, or the bundled models), fine-tunes the coarse stage (which
picks the kidney regions, where most real-CT errors start) and the refine stage with
:func:`finetune_stage` (the training loop of :mod:`training`, on the corrected cases' reviewed
slices plus replayed phantoms), and writes both children into a new dated folder
``CORRECTIONS/models/finetune-YYYYmmdd-HHMMSS/`` with a ``report.json``: the chain of
parents, the held-out before/after scores of the whole cascade, and the time. A child that
scores worse than its parent on the held-out corrected cases is reported as worse
(``report["worse"]``), so the widget can keep the parent unless the user insists.

Defaults: 5 epochs of 20 steps per stage at lr 2e-5, 8 replayed phantoms (about 35 s per stage on
2 CPU cores at batch 8): in the phantom site study (``scripts/site_study.py``, the model card) the
one setting of five that neither cost the same site's other cases nor other sites more than 0.01
Dice; longer or stronger fine-tunes on one case (10 x 50 steps, lr 5e-5, the earlier default)
lost 0.03-0.07 there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from . import files, volumes
from .errors import KidsegError
from .metrics import check_label_values

STAGES = ("coarse", "refine")
MODELS_FOLDER = "models"
DEFAULTS = {  # chosen by the site study (model card, "Fine-tuning defaults")
    "epochs": 5,
    "steps_per_epoch": 20,
    "batch_size": 8,
    "lr": 2e-5,
    "n_replay": 8,
    "max_minutes": 2.5,
    "holdout_fraction": 0.25,
    "bn_momentum": 0.0,
    "freeze_encoder": False,
}

_log = logging.getLogger(__name__)  # the default for ``log``: quiet unless the caller configures logging


def check_corrections(corrections_dir) -> list[Path]:
    """The corrected cases of a folder, each checked; one line naming the file for a bad one."""
    root = Path(corrections_dir)
    if not root.is_dir():
        raise KidsegError("no such corrections folder", root)
    cases = [c for c in volumes.kits_cases(root) if (c / volumes.KITS_LABELS).exists()]
    if not cases:
        raise KidsegError(
            "holds no corrected case (case_XXXXX/imaging.nii.gz + segmentation.nii.gz): export "
            "corrections from the widget first",
            root,
        )
    for case in cases:
        ct = volumes.read_ct(case / volumes.KITS_IMAGE)
        labels = volumes.read_labels(case / volumes.KITS_LABELS)
        if labels.array.shape != ct.array.shape:
            raise KidsegError(
                f"labels of shape {labels.array.shape} do not match the CT's {ct.array.shape}",
                case / volumes.KITS_LABELS,
            )
        check_label_values(labels.array, case / volumes.KITS_LABELS, cysts=True)
        if not labels.array.any():
            raise KidsegError(
                "holds no kidney or tumor voxel: nothing to learn from (remove the case)", case / volumes.KITS_LABELS
            )
    return cases


def manifest_cases(corrections_dir) -> list[dict]:
    """The case entries of a corrections folder's manifest.json ([] without one); one line naming
    the file when it is not a manifest."""
    manifest = Path(corrections_dir) / "manifest.json"
    if not manifest.exists():
        return []
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise KidsegError(f"is not readable JSON ({type(exc).__name__}); fix or remove it", manifest) from None
    cases = data.get("cases", []) if isinstance(data, dict) else None
    if not isinstance(cases, list) or not all(isinstance(c, dict) and isinstance(c.get("case"), str) for c in cases):
        raise KidsegError("is not a corrections manifest (an object with a list of cases)", manifest)
    return cases


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
    *,
    stages=STAGES,
    coarse=None,
    refine=None,
    device="auto",
    epochs=DEFAULTS["epochs"],
    steps_per_epoch=DEFAULTS["steps_per_epoch"],
    batch_size=DEFAULTS["batch_size"],
    lr=DEFAULTS["lr"],
    n_replay=DEFAULTS["n_replay"],
    max_minutes=DEFAULTS["max_minutes"],
    holdout_fraction=DEFAULTS["holdout_fraction"],
    bn_momentum=DEFAULTS["bn_momentum"],
    freeze_encoder=DEFAULTS["freeze_encoder"],
    reviewed_only=True,
    progress=None,
    cancel=None,
    log=None,
) -> dict:
    """Fine-tune ``stages`` on the corrections; writes ``out_dir/<stage>.safetensors`` and ``report.json``."""
    log = log or _log.info
    from .models import read_config, resolve_checkpoint

    corrections_dir = Path(corrections_dir)
    stages = tuple(stages)
    if not stages or any(s not in STAGES for s in stages):
        raise KidsegError(f"stages must be among {STAGES}, got {stages}")
    cases = check_corrections(corrections_dir)
    children = latest_children(corrections_dir)
    parents = {
        "coarse": resolve_checkpoint(coarse or children.get("coarse"), "coarse"),
        "refine": resolve_checkpoint(refine or children.get("refine"), "refine"),
    }
    for stage, path in parents.items():
        got = read_config(path).stage
        if got != stage:
            raise KidsegError(f"is a {got} checkpoint, not a {stage} one", path)
    for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise KidsegError(f"{name} must be a whole number of 1 or more, got {value}")
    if not 0 < lr < float("inf"):
        raise KidsegError(f"the learning rate must be above 0, got {lr}")
    if not 0 <= holdout_fraction < 1:
        raise KidsegError(f"the held-out fraction must be from 0 to below 1, got {holdout_fraction}")
    out_dir = Path(out_dir) if out_dir else default_output_dir(corrections_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise KidsegError("is a file; the new models go into a folder", out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise KidsegError("already exists and is not empty; not overwriting it", out_dir)
    made_here = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    with _cleared_when_interrupted(out_dir, made_here):
        return _finetune_into(out_dir, corrections_dir, cases, parents, stages, device, progress, cancel, log, **{
            "epochs": epochs, "steps_per_epoch": steps_per_epoch, "batch_size": batch_size, "lr": lr,
            "n_replay": n_replay, "max_minutes": max_minutes, "holdout_fraction": holdout_fraction,
            "bn_momentum": bn_momentum, "freeze_encoder": freeze_encoder, "reviewed_only": reviewed_only,
        })  # fmt: skip


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


def _finetune_into(out_dir, corrections_dir, cases, parents, stages, device, progress, cancel, log, **kw) -> dict:
    """The work of :func:`finetune_models` once its inputs are checked; ``kw``: its settings."""
    import time

    epochs, steps_per_epoch, batch_size, lr = kw["epochs"], kw["steps_per_epoch"], kw["batch_size"], kw["lr"]
    n_replay, max_minutes, holdout_fraction = kw["n_replay"], kw["max_minutes"], kw["holdout_fraction"]
    bn_momentum, freeze_encoder, reviewed_only = kw["bn_momentum"], kw["freeze_encoder"], kw["reviewed_only"]

    need = sum(parents[s].stat().st_size for s in stages) * 4 + 50 * 2**20  # children, .last, state
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise KidsegError(
            f"needs about {need / 2**20:.0f} MB free for the new models, has {free / 2**20:.0f} MB", out_dir
        )
    train_dirs, held = split_by_scan(corrections_dir, cases, holdout_fraction)
    eval_dirs = held or train_dirs
    t_start = time.time()
    log(f"scoring the parents on {len(eval_dirs)} {'held-out' if held else 'corrected (not held out)'} case(s)")
    before = evaluate_cascade(eval_dirs, parents["coarse"], parents["refine"], device=device)
    new = dict(parents)
    seconds = {}
    for k, stage in enumerate(stages):
        t0 = time.time()
        out = out_dir / f"{stage}.safetensors"

        def stage_progress(done, total, what=None, k=k, stage=stage):
            if progress:
                progress(k * 1000 + int(1000 * done / max(total, 1)), 1000 * len(stages), f"fine-tune {stage}")

        log(f"fine-tuning the {stage} model from {parents[stage].name}")
        finetune_stage(
            corrections_dir,
            parents[stage],
            out,
            stage=stage,
            cases=cases,
            coarse_checkpoint=new["coarse"],
            holdout_fraction=holdout_fraction,
            n_replay=n_replay,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            batch_size=batch_size,
            lr=lr,
            max_minutes=max_minutes,
            bn_momentum=bn_momentum,
            freeze_encoder=freeze_encoder,
            device=device,
            reviewed_only=reviewed_only,
            progress=stage_progress,
            cancel=cancel,
            log=log,
            score=False,
            chain=_chain(parents[stage]),
        )
        new[stage] = out
        seconds[stage] = time.time() - t0
        for leftover in (out.with_suffix(".last.safetensors"), out.with_suffix(".state.pt")):
            leftover.unlink(missing_ok=True)  # resume files of a finished run: 3x the model's size
    after = evaluate_cascade(eval_dirs, new["coarse"], new["refine"], device=device)
    worse = bool(after and before and after["kidney_tumor_dice"] < before["kidney_tumor_dice"] - 0.005)
    report = {
        "before": before,
        "after": after,
        "worse": worse,
        "held_out": [c.name for c in held],
        "scored_on": [c.name for c in eval_dirs],
        "trained_on": [c.name for c in train_dirs],
        "stages": list(stages),
        "parents": {k: str(v) for k, v in parents.items()},
        "models": {k: str(v) for k, v in new.items()},
        "folder": str(out_dir),
        "seconds": {**seconds, "total": time.time() - t_start},
        "settings": {
            "epochs": epochs,
            "steps_per_epoch": steps_per_epoch,
            "batch_size": batch_size,
            "lr": lr,
            "n_replay": n_replay,
            "bn_momentum": bn_momentum,
            "freeze_encoder": freeze_encoder,
            "reviewed_only": reviewed_only,
        },
    }
    with files.atomic_path(out_dir / "report.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    return report


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
def evaluate_cascade(case_dirs, coarse_checkpoint, refine_checkpoint, device="auto", **fuse_kwargs) -> dict:
    """Mean KiTS scores of the whole cascade on KiTS-layout cases with reference labels."""
    from .cascade import Cascade
    from .metrics import kits_scores
    from .training import map_kits_labels

    cascade = Cascade(coarse_checkpoint, refine_checkpoint, device=device)
    rows = []
    for case in case_dirs:
        ct, ref = volumes.read_kits_case(case)
        result = cascade.run(ct.array, ct.geometry.spacing)
        rows.append(kits_scores(result.fuse(**fuse_kwargs), map_kits_labels(ref.array, case)))
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def replay_cases(n: int, seed: int) -> list[Path]:
    """Phantom cases mixed into a fine-tune so the model does not forget (generated once, cached)."""
    from .phantom import GENERATOR_REVISION, write_phantom_cases
    from .training import cache_root

    root = cache_root().parent / "replay" / f"seed{seed}-n{n}-rev{GENERATOR_REVISION}"
    if len(volumes.kits_cases(root) if root.exists() else []) < n:
        write_phantom_cases(root, n, seed, overwrite=True, matrix=256, max_slices=80)
    return volumes.kits_cases(root)[:n]


def reviewed_slices(corrections_dir) -> dict[str, tuple]:
    """Per corrected case, the slices its export marked reviewed (touched or confirmed); a case
    exported without that list (or with ``"whole_case_reviewed": true``) is absent: all slices."""
    out = {}
    for entry in manifest_cases(corrections_dir):
        zs = entry.get("reviewed_slices")
        if zs and not entry.get("whole_case_reviewed"):
            try:
                out[entry["case"]] = tuple(int(z) for z in zs)
            except (TypeError, ValueError):
                raise KidsegError(
                    f"lists reviewed slices of {entry['case']} that are not slice numbers",
                    Path(corrections_dir) / "manifest.json",
                ) from None
    return out


def split_by_scan(corrections_dir: Path, cases: list[Path], holdout_fraction: float) -> tuple[list, list]:
    """Train and held-out cases, split by scan: copies of one scan (same ``scan_sha256`` in the
    manifest) never land on both sides, or the held-out score would be measured on training data."""
    from .training import split_cases

    scan_of = {}
    for entry in manifest_cases(corrections_dir):
        scan_of[entry["case"]] = str(entry.get("scan_sha256") or entry["case"])
    groups: dict[str, list[Path]] = {}
    for c in cases:
        groups.setdefault(scan_of.get(c.name, c.name), []).append(c)
    keys = sorted(groups)
    if len(keys) < 2:
        return list(cases), []
    train_keys, held_keys = split_cases(keys, holdout_fraction, seed=0)
    return ([c for k in train_keys for c in groups[k]], [c for k in held_keys for c in groups[k]])


def finetune_stage(
    corrections_dir,
    parent,
    out,
    *,
    stage="refine",
    cases=None,
    coarse_checkpoint=None,
    holdout_fraction=DEFAULTS["holdout_fraction"],
    n_replay=DEFAULTS["n_replay"],
    replay_seed=50_000,
    epochs=DEFAULTS["epochs"],
    steps_per_epoch=DEFAULTS["steps_per_epoch"],
    batch_size=DEFAULTS["batch_size"],
    lr=DEFAULTS["lr"],
    max_minutes=DEFAULTS["max_minutes"],
    bn_momentum=DEFAULTS["bn_momentum"],
    freeze_encoder=DEFAULTS["freeze_encoder"],
    device="auto",
    reviewed_only=True,
    progress=None,
    cancel=None,
    log=None,
    score=True,
    chain=None,
) -> dict:
    """Fine-tune one stage's ``parent`` on exported corrections; writes a child checkpoint ``out``.

    ``cases``: the corrected cases, already checked (:func:`check_corrections` runs otherwise).

    Part of the corrected cases is held out (at least one when there are two or more) and the
    whole cascade's Dice on them is measured before and after. The parent file is never written.
    ``bn_momentum`` 0 keeps the parent's BatchNorm statistics: they come from thousands of
    batches, and a few cases' batches would otherwise pull them away from everything else.
    """
    log = log or _log.info
    from .models import file_sha256, read_config
    from .training import TrainSettings, cache_case, train

    corrections_dir, parent, out = Path(corrections_dir), Path(parent), Path(out)
    if out.resolve() == parent.resolve():
        raise KidsegError("the fine-tuned checkpoint must not replace its parent; choose another -o", out)
    if out.exists():
        raise KidsegError("already exists; not overwriting it", out)
    cases = check_corrections(corrections_dir) if cases is None else cases
    parent_cfg = read_config(parent)
    if parent_cfg.stage != stage:
        raise KidsegError(f"is a {parent_cfg.stage} checkpoint; --stage {stage} needs a {stage} one", parent)
    train_dirs, held = split_by_scan(corrections_dir, cases, holdout_fraction)
    eval_dirs = held or train_dirs
    if not held:
        log(
            "only one corrected case: it is trained on and also scored (no held-out case, so the "
            "before/after figures are on training data)"
        )
    coarse = coarse_checkpoint if stage == "refine" else parent
    refine_before = parent if stage == "refine" else None
    before = {}
    if score:
        log(f"scoring the parent on {len(eval_dirs)} case(s)...")
        before = evaluate_cascade(eval_dirs, coarse, refine_before, device=device)
    replay = replay_cases(n_replay, replay_seed) if n_replay else []
    reviewed = reviewed_slices(corrections_dir) if reviewed_only else {}
    cached = [dataclasses.replace(cache_case(c), slices=reviewed.get(c.name)) for c in train_dirs]
    cached += [cache_case(c) for c in replay]
    cfg = dataclasses.replace(parent_cfg)
    cfg.version = f"{parent_cfg.version}+ft{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}"
    cfg.provenance = {
        "parent": str(parent),
        "parent_sha256": file_sha256(parent),
        "parent_version": parent_cfg.version,
        "corrections": str(corrections_dir),
        "trained_on": [{"case": c.name, "labels_sha256": file_sha256(c / volumes.KITS_LABELS)} for c in train_dirs],
        "held_out": [c.name for c in held],
        "replay_phantom_seeds": [replay_seed + i for i in range(len(replay))],
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "lr": lr,
        "bn_momentum": bn_momentum,
        "freeze_encoder": freeze_encoder,
        "chain": list(chain) if chain else [f"{parent.parent.name}/{parent.name} ({parent_cfg.version})"],
        "reviewed_slices_only": {c.name: list(reviewed[c.name]) for c in train_dirs if c.name in reviewed},
    }
    settings = TrainSettings(
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        lr=lr,
        patience=epochs + 1,
        workers=0,
        device=device,
        max_minutes=max_minutes,
        val_samples=0,
        bn_momentum=bn_momentum,
        freeze_encoder=freeze_encoder,
    )
    summary = train(cfg, cached, [], out, settings, init_checkpoint=parent, progress=progress, cancel=cancel, log=log)
    after = {}
    if score:
        after = evaluate_cascade(
            eval_dirs, coarse if stage == "refine" else out, out if stage == "refine" else None, device=device
        )
    return {
        "before": before,
        "after": after,
        "held_out": [c.name for c in held],
        "scored_on": [c.name for c in eval_dirs],
        "checkpoint": str(out),
        "seconds": summary["seconds"],
    }
