"""``kidseg train`` (a network on KiTS-layout data) and ``kidseg finetune`` (both models on a
corrections folder)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import KidsegError
from ..models import PRESET_NOTES
from ._common import _checked, _count, _fraction, _holdout, _positive, _ProgressBar


def cmd_train(args) -> int:
    import datetime

    from .. import __version__
    from ..models import model_config
    from ..training import TrainSettings, cache_cases, find_cases, split_cases, train

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
    if args.organs:
        from ..labels import ORGANS

        overrides["organs"] = ORGANS  # learnt from the cases' organs.nii.gz (labels.py)
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
        "ct_noise_hu": args.ct_noise_hu,
        "ct_blur_px": args.ct_blur_px,
        "bn_momentum": args.bn_momentum,
        "val_samples": args.val_samples,
        "command": " ".join(sys.argv),
    }
    if args.init:
        from ..io.files import file_sha256

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
        ct_noise_hu=args.ct_noise_hu,
        ct_blur_px=args.ct_blur_px,
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


def _finetune_settings(args):
    """``kidseg finetune``'s arguments as the core's settings (the widget uses their defaults)."""
    from ..training import FinetuneSettings

    return FinetuneSettings(
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
        device=args.device,
    )


def cmd_finetune(args) -> int:
    from ..finetuning import STAGES, finetune_models

    stages = STAGES if args.stage == "both" else (args.stage,)
    bar = _ProgressBar("fine-tune")
    report = finetune_models(
        args.corrections,
        args.output,
        _finetune_settings(args),
        stages=stages,
        coarse=args.coarse,
        refine=args.refine,
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
    fb, fa = report.get("false_kidney_before"), report.get("false_kidney_after")
    if fb and fa:
        print(f"{report['false_kidney_guard']}: false kidney before {fb['ml']:.1f} mL  after {fa['ml']:.1f} mL")
    if report["worse"]:
        words = {"corrected": "corrected cases", "phantoms": "held-out phantoms", "false_kidney": "false kidney"}
        print(
            "kidseg: note: the new models score worse than their parents on the "
            f"{' and '.join(words.get(w, w) for w in report['worse_on'])}; keep the parents unless you have a reason",
            file=sys.stderr,
        )
    return 0


def add_parsers(sub):
    """train, finetune."""
    _add_train_parser(sub)
    _add_finetune_parser(sub)


def _add_train_parser(sub):
    p = sub.add_parser("train", help="train the coarse or refine network on KiTS-layout data")
    p.add_argument("data", nargs="+", help="dataset folder(s) in KiTS layout")
    p.add_argument("--stage", choices=["coarse", "refine"], required=True)
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--val", nargs="+", help="validation folder(s); default: hold out --val-fraction of the cases")
    p.add_argument("--val-fraction", type=_holdout, default=0.15)
    p.add_argument(
        "--val-samples",
        type=_checked(int, lambda v: v >= 0, "must be 0 or more"),
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
    p.add_argument(
        "--organs",
        action="store_true",
        help="also learn the neighbour organs (liver, spleen, bowel, pancreas, gallbladder, adrenal, vessel) "
        "from each case's organs.nii.gz, as classes of their own; with --init, a network without them gains them",
    )
    p.add_argument("--input-size", type=int, default=None, help="coarse slice size / refine patch size (px)")
    p.add_argument("--epochs", type=_count, default=30)
    p.add_argument("--steps-per-epoch", type=_count, default=200)
    p.add_argument("--batch-size", type=_count, default=16)
    p.add_argument("--lr", type=_positive, default=1e-4)
    p.add_argument("--patience", type=_count, default=6, help="early stopping: epochs without a better val Dice")
    p.add_argument("--workers", type=_checked(int, lambda v: v >= 0, "must be 0 or more"), default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-minutes", type=_positive, default=None, help="stop after this much training time")
    p.add_argument("--encoder-weights", default="none", help="none, or imagenet (needs the model hub)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT.last.safetensors and OUTPUT.state.pt")
    p.add_argument("--init", help="start from this checkpoint's weights and architecture (e.g. the bundled one)")
    p.add_argument(
        "--clahe", type=_fraction, default=0.0, help="probability of CLAHE augmentation per sample (default 0)"
    )
    p.add_argument(
        "--ct-noise-hu",
        type=_checked(float, lambda v: 0 <= v <= 200, "must be 0-200 HU"),
        default=0.0,
        help="augmentation: image noise of up to this SD in HU on the CT's own grid, half the samples (default 0: off)",
    )
    p.add_argument(
        "--ct-blur-px",
        type=_checked(float, lambda v: 0 <= v <= 5, "must be 0-5 pixels"),
        default=0.0,
        help="augmentation: a Gaussian blur of up to this sigma in pixels, half the samples (default 0: off)",
    )
    p.add_argument(
        "--bn-momentum",
        type=_fraction,
        default=None,
        help="BatchNorm running-statistics momentum (default PyTorch's 0.1; lower smooths them)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_train)


def _add_finetune_parser(sub):
    from ..training import FinetuneSettings

    defaults = FinetuneSettings()

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
        type=_holdout,
        default=defaults.holdout_fraction,
        help="fraction of corrected scans held out for the before/after score",
    )
    p.add_argument(
        "--replay-cases",
        type=_checked(int, lambda v: v >= 0, "must be 0 or more"),
        default=defaults.n_replay,
        help="phantom cases mixed in against forgetting",
    )
    p.add_argument(
        "--schedule",
        choices=["heldout", "fixed"],
        default=defaults.schedule,
        help="heldout (default): train until the corrected cases' held-out slabs stop improving, keep the best "
        "step; fixed: --epochs x --steps-per-epoch at --lr",
    )
    p.add_argument("--max-steps", type=_count, default=defaults.max_steps, help="per stage (heldout schedule)")
    p.add_argument("--epochs", type=_count, default=defaults.epochs, help="fixed schedule only")
    p.add_argument("--steps-per-epoch", type=_count, default=defaults.steps_per_epoch, help="fixed schedule only")
    p.add_argument("--batch-size", type=_count, default=defaults.batch_size)
    p.add_argument(
        "--lr", type=_positive, default=defaults.lr, help="heldout: the first learning rate (quartered at plateaus)"
    )
    p.add_argument(
        "--lesson-weight",
        type=float,
        default=defaults.lesson_weight,
        help="extra loss weight of the voxels the correction changed (heldout schedule; 0: none)",
    )
    p.add_argument(
        "--lesson-mm", type=float, default=defaults.lesson_mm, help="how far around a changed voxel it weighs"
    )
    p.add_argument(
        "--max-minutes", type=_positive, default=defaults.max_minutes, help="per stage, of training steps (not scoring)"
    )
    p.add_argument(
        "--bn-momentum",
        type=_fraction,
        default=defaults.bn_momentum,
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
        default=defaults.freeze_encoder,
        help="train the decoders only; the encoders keep the parents' features",
    )
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_finetune)
