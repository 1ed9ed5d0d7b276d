"""The ``kidseg`` command: phantom, predict, evaluate, report, export-seg, review, draft, train, finetune, bench, demo.

Every subcommand calls the GUI-free core. A user mistake prints one line, ``kidseg: error: ...``
naming the file and the problem, and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .errors import KidsegError, KidsegWarning
from .fusion import DEFAULT_ALPHA, DEFAULT_KIDNEY_THRESHOLD, DEFAULT_TUMOR_THRESHOLD
from .models import PRESET_NOTES


class _ProgressBar:
    """A tqdm bar driven by the core's ``progress(done, total, stage)`` callbacks."""

    def __init__(self, desc: str):
        from tqdm import tqdm

        self.desc = desc
        self.bar = tqdm(desc=desc, unit="step", dynamic_ncols=True, disable=None)

    def __call__(self, done, total, stage=None):
        if self.bar.total != total:
            self.bar.reset(total=total)
        if stage:
            self.bar.set_description(f"{self.desc}: {stage}")
        self.bar.n = done
        self.bar.refresh()

    def close(self):
        self.bar.close()


# --------------------------------------------------------------------------------------------- phantom
def cmd_phantom(args) -> int:
    from .phantom import write_phantom_cases

    out = Path(args.out_dir)
    existing = [out / f"case_{i:05d}" for i in range(args.cases) if (out / f"case_{i:05d}").exists()]
    if existing and not args.overwrite:
        raise KidsegError("case folder already exists; not overwriting it (use --overwrite)", existing[0])
    bar = _ProgressBar("phantoms")
    kwargs = {"matrix": args.matrix, "max_slices": args.max_slices}
    if args.labels != "kits19":
        kwargs["labels"] = args.labels
    if not 0.0 <= args.random_contrast <= 1.0:
        raise KidsegError(f"--random-contrast is a probability, got {args.random_contrast}")
    if args.random_contrast:
        kwargs["random_contrast"] = args.random_contrast
    if args.slice_thickness:
        kwargs["slice_thickness"] = args.slice_thickness
    if args.jobs < 1:
        raise KidsegError(f"--jobs must be 1 or more, got {args.jobs}")
    label_maps = None
    if args.anatomy:
        from .labelmap_phantom import find_label_maps, read_label_map, split_label_maps

        train_maps, held_maps = split_label_maps(find_label_maps(args.anatomy))
        label_maps = {"train": train_maps, "held-out": held_maps, "all": train_maps + held_maps}[args.maps]
        if not label_maps:
            raise KidsegError(
                f"no {args.maps} label maps: the folder holds too few maps for a held-out split", args.anatomy
            )
        for m in label_maps:  # every map checked before any case is drawn: one line for a bad one
            read_label_map(str(m))
    cases = write_phantom_cases(
        out,
        args.cases,
        args.seed,
        overwrite=args.overwrite,
        progress=bar,
        jobs=args.jobs,
        label_maps=label_maps,
        **kwargs,
    )
    bar.close()
    made = f" around {len(label_maps)} {args.maps} label map(s) from {args.anatomy}" if label_maps else ""
    print(
        f"wrote {len(cases)} phantom case(s){made} in KiTS layout under {out} "
        f"(seeds {args.seed}..{args.seed + args.cases - 1})"
    )
    return 0


# --------------------------------------------------------------------------------------------- predict
def _prediction_jobs(src: Path, out: Path):
    """(input, output path) pairs: one volume, a KiTS case, a KiTS root, or a folder of volumes."""
    from . import files, volumes

    def out_name(p: Path) -> str:
        fmt = volumes.volume_format(p)
        if fmt in (None, "dicom"):
            return f"{p.name}_labels.nii.gz"
        suffix = next(s for s in volumes.VOLUME_SUFFIXES if p.name.lower().endswith(s))
        return p.name[: -len(suffix)] + "_labels" + suffix

    if not src.exists():
        raise KidsegError("no such file or folder", src)
    names_a_file = volumes.volume_format(out) not in (None, "dicom") and not out.is_dir()
    if (src / volumes.KITS_IMAGE).exists():  # one KiTS case
        return [(src / volumes.KITS_IMAGE, out if names_a_file else out / src.name / volumes.KITS_LABELS)]
    if src.is_dir():
        cases = volumes.kits_cases(src)
        if cases:
            return [(c / volumes.KITS_IMAGE, out / c.name / volumes.KITS_LABELS) for c in cases]
        files = sorted(p for p in src.iterdir() if p.is_file() and volumes.volume_format(p) not in (None, "dicom"))
        if files:
            return [(f, out / out_name(f)) for f in files]
    return [(src, out if names_a_file else out / out_name(src))]  # one volume file, or a DICOM series


def cmd_predict(args) -> int:
    from . import files, volumes
    from .cascade import Cascade

    jobs = _prediction_jobs(Path(args.input), Path(args.output))
    report_csv = _batch_report_path(Path(args.output), jobs) if args.report else None
    for target in [t for _, t in jobs] + ([report_csv] if report_csv else []):
        if target.exists() and not args.overwrite:
            raise KidsegError("already exists; not overwriting it (use --overwrite)", target)
    report_rows = []
    cascade = None
    for src, target in jobs:
        ct = volumes.read_ct(src, series_uid=args.series)
        if cascade is None:  # after the first read, so a bad input is the only line printed
            cascade = Cascade(args.coarse, args.refine, device=args.device, batch_size=args.batch_size)
            print(
                f"kidseg: {len(jobs)} volume(s) on {cascade.device}; coarse {cascade.coarse_path.name}, "
                f"refine {cascade.refine_path.name}",
                file=sys.stderr,
            )
        bar = _ProgressBar(src.name)
        result = cascade.run(ct.array, ct.geometry.spacing, progress=bar, mirror=args.mirror)
        bar.close()
        labels = result.fuse(
            args.alpha, args.kidney_threshold, args.tumor_threshold, anatomy_check=not args.no_anatomy_check
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        volumes.write_labels(target, labels, ct, overwrite=args.overwrite)
        if args.save_probabilities:
            result.save_probabilities(
                target.parent / (target.name.split(".")[0] + "_probabilities.npz"), overwrite=args.overwrite
            )
        notes = list(result.messages)
        if result.verdict is not None and not args.no_anatomy_check:
            notes += result.verdict.summary()
        for msg in notes:
            print(f"kidseg: note: {src}: {msg}", file=sys.stderr)
        from .metrics import measurements

        m = measurements(labels, ct.geometry.spacing)
        print(
            f"{target}: kidney {m['total']['kidney_ml']:.1f} mL, tumor {m['total']['tumor_ml']:.1f} mL "
            f"(largest tumor {m['total']['tumor_diameter_mm']:.0f} mm); "
            f"{len(result.rois)} kidney ROI(s), {len(result.patches)} refine patches"
        )
        if report_csv:
            from .report import describe_case, summary_row

            provenance = {
                "coarse": cascade.coarse_path.name,
                "refine": cascade.refine_path.name,
                "alpha": args.alpha,
                "kidney_threshold": args.kidney_threshold,
                "tumor_threshold": args.tumor_threshold,
            }
            report = describe_case(labels, ct.geometry.spacing, ct=ct.array, provenance=provenance)
            report_rows.append(summary_row(report, str(src)))
    if report_csv:
        from .report import rows_to_csv

        with files.atomic_path(report_csv, overwrite=args.overwrite) as tmp:
            tmp.write_text(rows_to_csv(report_rows))
        print(f"kidseg: wrote {report_csv} ({len(report_rows)} case(s))", file=sys.stderr)
    return 0


def _batch_report_path(output: Path, jobs) -> Path:
    if len(jobs) == 1 and jobs[0][1] == output:  # one output file named by the user
        return _default_report_dir(output).with_suffix(".csv")
    return output / "report.csv"


# --------------------------------------------------------------------------------------------- evaluate
def _paired_volumes(pred: Path, ref: Path):
    from . import volumes

    if pred.is_file() or volumes.volume_format(pred) not in (None, "dicom"):
        return [(pred.name, pred, ref)]
    if not pred.is_dir():
        raise KidsegError("no such file or folder", pred)
    if not ref.is_dir():
        raise KidsegError("is a file, but the predictions are a folder; give a folder of references", ref)
    pairs = []
    for case in sorted(p for p in pred.iterdir() if p.is_dir() and (p / volumes.KITS_LABELS).exists()):
        pairs.append((case.name, case / volumes.KITS_LABELS, ref / case.name / volumes.KITS_LABELS))
    if not pairs:
        for f in sorted(p for p in pred.iterdir() if volumes.volume_format(p) not in (None, "dicom")):
            pairs.append((f.name, f, ref / f.name))
    if not pairs:
        raise KidsegError("no predictions found (KiTS case folders or label files)", pred)
    return pairs


def cmd_evaluate(args) -> int:
    import json

    import numpy as np

    from . import volumes
    from .fusion import CYST
    from .metrics import (
        check_label_values,
        detection_by_size,
        false_ml,
        kits21_scores,
        kits_scores,
        measurements,
        tumor_detection,
    )

    rows = []
    cysts = False  # KiTS21/23 labels (3 = cyst) anywhere: the hierarchical Dice is reported too
    for name, p, r in _paired_volumes(Path(args.prediction), Path(args.reference)):
        ref = volumes.read_labels(r)
        pred = volumes.read_labels(p, like=ref)
        for vol, path in ((pred, p), (ref, r)):
            check_label_values(vol.array, path, cysts=True)
        case_cysts = bool((ref.array == CYST).any() or (pred.array == CYST).any())
        cysts |= case_cysts
        scores = kits_scores(pred.array, ref.array)
        scores.update(kits21_scores(pred.array, ref.array))
        vols = measurements(pred.array, pred.geometry.spacing)["total"]
        found = tumor_detection(pred.array, ref.array, ref.geometry.spacing)
        rows.append(
            {
                "case": name,
                **scores,
                "kidney_ml": vols["kidney_ml"],
                "tumor_ml": vols["tumor_ml"],
                **false_ml(pred.array, ref.array, ref.geometry.spacing),
                "tumors": found["tumors"],
                "false_tumors_ml": found["false_tumors_ml"],
            }
        )
    keys = ["kidney_tumor_dice", "kidney_tumor_jaccard", "tumor_dice", "tumor_jaccard", "kits_composite"]
    if cysts:
        keys += ["kidney_masses_dice", "masses_dice", "kits21_mean_dice"]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys + ["false_kidney_ml", "false_tumor_ml"]}
    by_size = detection_by_size(rows)  # each row carries its case's "tumors"
    if args.json:
        print(json.dumps({"cases": rows, "mean": mean, "tumor_detection_by_size": by_size}, indent=1))
        return 0
    print(
        f"{'case':<28}"
        + "".join(f"{k.replace('kidney_tumor', 'kid+tum').replace('kidney_masses', 'kid+masses'):>22}" for k in keys)
        + f"{'false kidney mL':>17}{'false tumor mL':>16}{'tumors found':>14}{'false tumors':>14}"
    )
    for r in rows:
        found = f"{sum(t['found'] for t in r['tumors'])}/{len(r['tumors'])}"
        false = f"{len(r['false_tumors_ml'])} ({sum(r['false_tumors_ml']):.1f} mL)"
        print(
            f"{r['case']:<28}"
            + "".join(f"{r[k]:>22.4f}" for k in keys)
            + f"{r['false_kidney_ml']:>17.1f}{r['false_tumor_ml']:>16.1f}{found:>14}{false:>14}"
        )
    if len(rows) > 1:
        print(
            f"{'mean':<28}"
            + "".join(f"{mean[k]:>22.4f}" for k in keys)
            + f"{mean['false_kidney_ml']:>17.1f}{mean['false_tumor_ml']:>16.1f}"
        )
    if any(row["tumors"] for row in by_size):
        print("\ntumors by reference volume (found: at least 10% of it predicted as tumor)")
        for row in by_size:
            span = (
                f"{row['from_ml']:g}-{row['to_ml']:g} mL" if row["to_ml"] is not None else f">= {row['from_ml']:g} mL"
            )
            share = f", mean share predicted {row['mean_recall']:.2f}" if row["tumors"] else ""
            print(f"  {span:<12}{row['found']} of {row['tumors']} found{share}")
    return 0


# --------------------------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    import datetime

    from . import __version__
    from .models import model_config
    from .training import TrainSettings, cache_cases, find_cases, split_cases, train

    out = Path(args.output)
    if out.exists() and not (args.overwrite or args.resume):
        raise KidsegError("already exists; not overwriting it (use --overwrite, or --resume to continue)", out)
    if args.init and not Path(args.init).is_file():  # before any case is cached
        raise KidsegError("no such checkpoint to start from (--init)", args.init)
    cases = find_cases(args.data)
    val_cases = find_cases(args.val) if args.val else None
    if val_cases is None:
        cases, val_cases = split_cases(cases, args.val_fraction, args.seed)
    print(f"kidseg: caching {len(cases) + len(val_cases)} case(s) as memory-mapped arrays", file=sys.stderr)
    train_cached = cache_cases(cases, jobs=args.workers)
    val_cached = cache_cases(val_cases, jobs=args.workers)
    overrides = {}
    if args.context_slices is not None:
        overrides["context_slices"] = args.context_slices
    if args.input_size is not None:
        overrides["input_size"] = args.input_size
    if args.labels == "kits23":
        overrides["classes"] = 4  # background, kidney, tumor, cyst
    cfg = model_config(args.stage, args.preset, **overrides)
    cfg.version = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    cfg.provenance = {
        "data": [str(d) for d in args.data],
        "val": [str(d) for d in (args.val or [])],
        # folder/case: case names repeat across dataset folders
        "train_cases": [f"{c.parent.name}/{c.name}" for c in cases],
        "val_cases": [f"{c.parent.name}/{c.name}" for c in val_cases],
        "seed": args.seed,
        "preset": args.preset,
        "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "napari_kidseg": __version__,
        "encoder_weights": args.encoder_weights,
        "clahe": args.clahe,
        "bn_momentum": args.bn_momentum,
        "val_samples": args.val_samples,
        "command": " ".join(sys.argv),
    }
    if args.init:
        from .models import file_sha256

        cfg.provenance["init"] = {"path": str(args.init), "sha256": file_sha256(args.init)}
    settings = TrainSettings(
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        workers=args.workers,
        seed=args.seed,
        device=args.device,
        max_minutes=args.max_minutes,
        clahe=args.clahe,
        bn_momentum=args.bn_momentum,
        val_samples=args.val_samples,
    )
    bar = _ProgressBar(f"train {args.stage}")
    weights = None if args.encoder_weights in (None, "none") else args.encoder_weights
    summary = train(
        cfg,
        train_cached,
        val_cached,
        out,
        settings,
        resume=args.resume,
        encoder_weights=weights,
        init_checkpoint=args.init,
        progress=bar,
        log=lambda s: print(s, file=sys.stderr),
    )
    bar.close()
    print(
        f"{out}: best validation score {summary['best_score']:.4f} after {summary['epochs']} epoch(s), "
        f"{summary['seconds'] / 60:.1f} min"
    )
    return 0


def cmd_finetune(args) -> int:
    from .finetuning import STAGES, finetune_models

    stages = STAGES if args.stage == "both" else (args.stage,)
    bar = _ProgressBar("fine-tune")
    report = finetune_models(
        args.corrections,
        args.output,
        stages=stages,
        coarse=args.coarse,
        refine=args.refine,
        device=args.device,
        schedule=args.schedule,
        max_steps=args.max_steps,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        lr=args.lr,
        n_replay=args.replay_cases,
        max_minutes=args.max_minutes,
        holdout_fraction=args.holdout,
        bn_momentum=args.bn_momentum,
        freeze_encoder=args.freeze_encoder,
        lesson_weight=args.lesson_weight,
        lesson_mm=args.lesson_mm,
        reviewed_only=not args.all_slices,
        progress=bar,
        log=lambda s: print(s, file=sys.stderr),
    )
    bar.close()
    b, a = report["before"], report["after"]
    print(f"{report['folder']}: fine-tuned {' and '.join(stages)} in {report['seconds']['total'] / 60:.1f} min")
    for stage, stop in report["stopped"].items():
        print(f"{stage}: stopped at step {stop['steps']}: {stop['why']}")
    if b:
        where = "held-out cases " if report["held_out"] else "held-out slabs of "
        print(f"scored on {where}{', '.join(report['scored_on'])}")
        for k in ("kidney_tumor_dice", "tumor_dice", "kits_composite"):
            print(f"  {k:<20} before {b[k]:.4f}  after {a[k]:.4f}")
    pb, pa = report["phantoms_before"], report["phantoms_after"]
    if pb:
        print(
            f"held-out phantoms: kidney+tumor Dice before {pb['kidney_tumor_dice']:.4f}  "
            f"after {pa['kidney_tumor_dice']:.4f}"
        )
    if report["worse"]:
        print(
            f"kidseg: note: the new models score worse than their parents on the {' and '.join(report['worse_on'])} "
            "cases; keep the parents unless you have a reason",
            file=sys.stderr,
        )
    return 0


def _add_train_parser(sub):
    p = sub.add_parser("train", help="train the coarse or refine network on KiTS-layout data")
    p.add_argument("data", nargs="+", help="dataset folder(s) in KiTS layout")
    p.add_argument("--stage", choices=["coarse", "refine"], required=True)
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--val", nargs="+", help="validation folder(s); default: hold out --val-fraction of the cases")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument(
        "--val-samples",
        type=int,
        default=1024,
        help="validation scores every slice (coarse) or patch (refine) of the validation cases, "
        "or this many spread evenly over them (default 1024)",
    )
    p.add_argument(
        "--preset",
        choices=list(PRESET_NOTES),
        default="paper",
        help="; ".join(f"{k}: {v}" for k, v in PRESET_NOTES.items()),
    )
    p.add_argument("--context-slices", type=int, default=None, help="2.5D: neighbouring slices per side as channels")
    p.add_argument(
        "--labels",
        choices=["kits19", "kits23"],
        default="kits19",
        help="kits19: 3 classes (a KiTS21/23 cyst is learnt as kidney); kits23: 4 classes, the cyst its own",
    )
    p.add_argument("--input-size", type=int, default=None, help="coarse slice size / refine patch size (px)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--steps-per-epoch", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--patience", type=int, default=6, help="early stopping: epochs without a better val Dice")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much training time")
    p.add_argument("--encoder-weights", default="none", help="none, or imagenet (needs the model hub)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT.last.safetensors and OUTPUT.state.pt")
    p.add_argument("--init", help="start from this checkpoint's weights and architecture (e.g. the bundled one)")
    p.add_argument("--clahe", type=float, default=0.0, help="probability of CLAHE augmentation per sample (default 0)")
    p.add_argument(
        "--bn-momentum",
        type=float,
        default=None,
        help="BatchNorm running-statistics momentum (default PyTorch's 0.1; lower smooths them)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_train)

    from .finetuning import DEFAULTS

    p = sub.add_parser("finetune", help="fine-tune both models (or one) on exported corrections")
    p.add_argument("corrections", help="corrections folder (KiTS layout + manifest.json, as the widget exports)")
    p.add_argument("-o", "--output", help="folder for the new models (default: CORRECTIONS/models/finetune-<time>)")
    p.add_argument(
        "--stage",
        choices=["both", "coarse", "refine"],
        default="both",
        help="both (default): the coarse stage picks the kidney regions, where most errors start",
    )
    p.add_argument(
        "--coarse",
        help="coarse parent (default: the newest fine-tuned one in CORRECTIONS/models, else the bundled one)",
    )
    p.add_argument("--refine", help="refine parent (default: likewise)")
    p.add_argument(
        "--holdout",
        type=float,
        default=DEFAULTS["holdout_fraction"],
        help="fraction of corrected scans held out for the before/after score",
    )
    p.add_argument(
        "--replay-cases", type=int, default=DEFAULTS["n_replay"], help="phantom cases mixed in against forgetting"
    )
    p.add_argument(
        "--schedule",
        choices=["heldout", "fixed"],
        default=DEFAULTS["schedule"],
        help="heldout (default): train until the corrected cases' held-out slabs stop improving, keep the best "
        "step; fixed: --epochs x --steps-per-epoch at --lr",
    )
    p.add_argument("--max-steps", type=int, default=DEFAULTS["max_steps"], help="per stage (heldout schedule)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="fixed schedule only")
    p.add_argument("--steps-per-epoch", type=int, default=DEFAULTS["steps_per_epoch"], help="fixed schedule only")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument(
        "--lr", type=float, default=DEFAULTS["lr"], help="heldout: the first learning rate (quartered at plateaus)"
    )
    p.add_argument(
        "--lesson-weight",
        type=float,
        default=DEFAULTS["lesson_weight"],
        help="extra loss weight of the voxels the correction changed (heldout schedule; 0: none)",
    )
    p.add_argument(
        "--lesson-mm", type=float, default=DEFAULTS["lesson_mm"], help="how far around a changed voxel it weighs"
    )
    p.add_argument("--max-minutes", type=float, default=DEFAULTS["max_minutes"], help="per stage")
    p.add_argument(
        "--bn-momentum",
        type=float,
        default=DEFAULTS["bn_momentum"],
        help="BatchNorm statistics momentum (default 0: keep the parent's statistics)",
    )
    p.add_argument(
        "--all-slices",
        action="store_true",
        help="train on every slice of each case, not only the slices its export marked reviewed",
    )
    p.add_argument(
        "--freeze-encoder",
        action="store_true",
        default=DEFAULTS["freeze_encoder"],
        help="train the decoders only; the encoders keep the parents' features",
    )
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_finetune)


# --------------------------------------------------------------------------------------------- report
def cmd_report(args) -> int:
    from . import volumes
    from .report import describe_case, report_text, write_report

    ct = volumes.read_ct(args.ct, series_uid=args.series)
    labels = volumes.read_labels(args.labels, like=ct)
    out = Path(args.output) if args.output else _default_report_dir(Path(args.labels))
    report = describe_case(labels.array, ct.geometry.spacing, ct=ct.array, provenance={"labels": str(args.labels)})
    written = write_report(
        report, out, ct=ct.array, labels=labels.array, spacing=ct.geometry.spacing, overwrite=args.overwrite
    )
    print(report_text(report))
    print(f"kidseg: wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


def _default_report_dir(labels: Path) -> Path:
    from . import volumes

    name = labels.name
    for suffix in volumes.VOLUME_SUFFIXES + volumes.DICOM_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return labels.parent / f"{name}_report"


def cmd_export_seg(args) -> int:
    from . import volumes
    from .dicom_seg import write_dicom_seg

    ct = volumes.read_ct(args.dicom_dir, series_uid=args.series, check_hu=False)
    labels = volumes.read_labels(args.labels, like=ct)
    out = write_dicom_seg(args.dicom_dir, labels.array, args.output, series_uid=args.series, overwrite=args.overwrite)
    print(f"kidseg: wrote {out} (DICOM SEG referencing {args.dicom_dir})", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------- worklist
def cmd_draft(args) -> int:
    """Draft a whole worklist in batch (a GPU machine overnight, say) into its draft cache."""
    from .cascade import Cascade
    from .worklist import Worklist, draft_all

    wl = Worklist(args.folder, args.state)
    try:
        for note in wl.notes:
            print(f"kidseg: note: {note}", file=sys.stderr)
        if wl.read_only:
            raise KidsegError("is open in another napari; drafts would not be kept", wl.state_dir)
        cascade = Cascade(args.coarse, args.refine, device=args.device)
        bar = _ProgressBar("drafts")
        n = draft_all(wl, cascade, progress=lambda d, t, case: bar(d, t, case), redraft=args.redraft)
        bar.close()
        failed = [r for r in wl.rows if r.status == "failed"]
        print(f"kidseg: {n} case(s) drafted into {wl.state_dir / 'drafts'}; {len(failed)} failed")
        for r in failed:
            print(f"kidseg: failed: {r.case}: {r.reason}", file=sys.stderr)
    finally:
        wl.close()
    return 0


def cmd_review(args) -> int:
    """napari with the Case worklist and the Kidney cascade widgets on a folder."""
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY") and sys.platform.startswith("linux"):
        raise KidsegError("no display here, so napari cannot open; run `xvfb-run -a kidseg review ...` or a desktop")
    from .worklist import find_cases

    find_cases(args.folder)  # a folder with no CT is one line here, before napari opens
    import napari

    viewer = napari.Viewer(title="napari-kidseg worklist")
    _, cascade_widget = viewer.window.add_plugin_dock_widget("napari-kidseg", "Kidney cascade")
    _, worklist_widget = viewer.window.add_plugin_dock_widget("napari-kidseg", "Case worklist", tabify=True)
    if args.coarse:
        cascade_widget.coarse_edit.setText(args.coarse)
    if args.refine:
        cascade_widget.refine_edit.setText(args.refine)
    if args.state:
        worklist_widget.state_edit.setText(args.state)
    worklist_widget.open_folder(args.folder)
    if not args.no_block:
        napari.run()
    return 0


# --------------------------------------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    from .bench import format_table, run_benchmark

    rows = run_benchmark(args.sizes, args.coarse, args.refine, args.device, args.preset, args.workdir)
    print(format_table(rows))
    return 0


# --------------------------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    """napari with the sample CT and the widget; with no display, the same cascade headless."""
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY") and sys.platform.startswith("linux"):
        import tempfile

        from ._napari_io import sample_case_dir

        case = sample_case_dir()
        print(
            "kidseg: no display here, so napari cannot open. Run it on a desktop, or under a virtual "
            "display with `xvfb-run -a kidseg demo`. Running the same cascade headless instead:\n"
            f"  kidseg predict {case} -o OUT && kidseg evaluate OUT/{case.name}/segmentation.nii.gz "
            f"{case}/segmentation.nii.gz",
            file=sys.stderr,
        )
        with tempfile.TemporaryDirectory() as tmp:
            rc = main(["predict", str(case), "-o", tmp])
            if rc == 0:
                rc = main(["evaluate", f"{tmp}/{case.name}/segmentation.nii.gz", str(case / "segmentation.nii.gz")])
        return rc
    import napari

    viewer = napari.Viewer(title="napari-kidseg demo")
    viewer.open_sample("napari-kidseg", "phantom")
    viewer.window.add_plugin_dock_widget("napari-kidseg", "Kidney cascade")
    if args.no_block:
        return 0
    napari.run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kidseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('napari_kidseg').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write synthetic abdominal CTs with labels in KiTS layout")
    p.add_argument("out_dir")
    p.add_argument("--cases", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seed of the first case; case i uses seed+i")
    p.add_argument("--matrix", type=int, default=512, help="in-plane size in voxels (default 512)")
    p.add_argument("--max-slices", type=int, default=600)
    p.add_argument("--slice-thickness", type=float, default=None, help="mm; random per case when omitted")
    p.add_argument(
        "--random-contrast",
        type=float,
        default=0.0,
        help="probability of random tissue HU per case (domain randomisation for training)",
    )
    p.add_argument("--jobs", type=int, default=1, help="cases made in parallel processes (same cases either way)")
    p.add_argument(
        "--labels",
        choices=["kits19", "kits23"],
        default="kits19",
        help="kits19: 0 background, 1 kidney, 2 tumor (cysts are kidney); kits23: cysts get label 3",
    )
    p.add_argument(
        "--anatomy",
        metavar="DIR",
        help="build each case around a real organ label map from DIR (FLARE 2022 labels 0-13)",
    )
    p.add_argument(
        "--maps",
        choices=["train", "held-out", "all"],
        default="train",
        help="with --anatomy: the training maps (all but the last 10 of the sorted folder), "
        "the 10 held-out ones, or all",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("predict", help="segment a CT (file, DICOM folder, KiTS case or folder of cases)")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True, help="label file, or a folder for many inputs")
    p.add_argument("--coarse", help="coarse checkpoint (default: the bundled one)")
    p.add_argument("--refine", help="refine checkpoint (default: the bundled one)")
    p.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help=f"fusion weight of the coarse stage (default {DEFAULT_ALPHA})",
    )
    p.add_argument("--kidney-threshold", type=float, default=DEFAULT_KIDNEY_THRESHOLD)
    p.add_argument("--tumor-threshold", type=float, default=DEFAULT_TUMOR_THRESHOLD)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument(
        "--mirror",
        action="store_true",
        help="average each slice with its left-right mirror image (twice the network time)",
    )
    p.add_argument(
        "--no-anatomy-check",
        action="store_true",
        help="keep regions that cannot be a kidney or kidney tumor by their position (spine, side), "
        "size or attachment; by default they are removed and listed",
    )
    p.add_argument("--series", help="DICOM SeriesInstanceUID when a folder holds several series")
    p.add_argument("--save-probabilities", action="store_true", help="also write the probabilities (.npz)")
    p.add_argument(
        "--report",
        action="store_true",
        help="also measure each case (volumes, tumor descriptors) into one CSV row per case: "
        "report.csv in the output folder, or LABELS_report.csv beside a single output file",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="kidney and tumor descriptors of a case: report.json, .csv, .png, .pdf")
    p.add_argument("ct", help="the CT (file, DICOM folder or KiTS imaging.nii.gz)")
    p.add_argument("labels", help="its labels (0 background, 1 kidney, 2 tumor), a label file or a DICOM SEG")
    p.add_argument("-o", "--output", help="folder for the report (default: LABELS_report beside the labels)")
    p.add_argument("--series", help="DICOM SeriesInstanceUID when a folder holds several series")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export-seg", help="write labels as a DICOM SEG referencing the CT's DICOM series")
    p.add_argument("dicom_dir", help="the CT's DICOM series (a folder)")
    p.add_argument("labels", help="labels on that CT's grid")
    p.add_argument("-o", "--output", required=True, help="the SEG file to write (.dcm)")
    p.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export_seg)

    p = sub.add_parser("evaluate", help="Dice, Jaccard and KiTS composite of predictions against references")
    p.add_argument("prediction", help="label file or folder")
    p.add_argument("reference", help="label file or folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("review", help="open napari with the Case worklist on a folder of cases")
    p.add_argument("folder", help="KiTS case folders, CT files or DICOM series (searched recursively)")
    p.add_argument("--state", help="where the worklist's state goes (default: beside the cases)")
    p.add_argument("--coarse")
    p.add_argument("--refine")
    p.add_argument("--no-block", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("draft", help="draft every case of a worklist folder into its draft cache (batch)")
    p.add_argument("folder")
    p.add_argument("--state", help="the worklist's state folder (default: beside the cases)")
    p.add_argument("--coarse")
    p.add_argument("--refine")
    p.add_argument("--device", default="auto")
    p.add_argument("--redraft", action="store_true", help="draft again the cases drafted already")
    p.set_defaults(func=cmd_draft)

    _add_train_parser(sub)

    p = sub.add_parser("bench", help="speed and memory of the cascade on 512x512xN phantoms (prints a table)")
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 600])
    p.add_argument("--coarse")
    p.add_argument("--refine")
    p.add_argument(
        "--preset",
        choices=[k for k in PRESET_NOTES if "tiny" not in k],
        help="time this architecture with random weights",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", help="keep the phantoms here between runs")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="open napari with the sample CT and the Kidney cascade widget")
    p.add_argument("--no-block", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)
    return parser


def _format_warning(message, category, filename, lineno, line=None):
    return (
        f"kidseg: note: {message}\n"
        if issubclass(category, KidsegWarning)
        else warnings.formatwarning(message, category, filename, lineno, line)
    )


def main(argv=None) -> int:
    warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(_format_warning(m, c, f, n, line))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KidsegError as exc:
        print(f"kidseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kidseg: cancelled; no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
