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


# --------------------------------------------------------------------------------------------- arguments
class _OneLineParser(argparse.ArgumentParser):
    """A mistake in the arguments is one line (and a pointer to -h), like every other mistake."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def _checked(kind, test, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


_count = _checked(int, lambda v: v >= 1, "must be a whole number of 1 or more")
_fraction = _checked(float, lambda v: 0.0 <= v <= 1.0, "must be a number from 0 to 1")
_holdout = _checked(float, lambda v: 0.0 <= v < 1.0, "must be a fraction from 0 to below 1")
_positive = _checked(float, lambda v: 0.0 < v < float("inf"), "must be a number above 0")


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
    if args.random_contrast:
        kwargs["random_contrast"] = args.random_contrast
    if args.slice_thickness:
        kwargs["slice_thickness"] = args.slice_thickness
    if args.tumor_shapes:
        from .tumor_shapes import build_library, evaluation_cases

        print(f"kidseg: tumor shapes from {args.tumor_shapes} (read once, then cached)", file=sys.stderr)
        exclude = evaluation_cases(args.not_from) if args.not_from else set()
        kwargs["tumor_library"] = str(build_library(args.tumor_shapes, exclude, jobs=args.jobs))
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
    out_format = None if out.is_dir() else volumes.volume_format(out)
    if out_format == "dicom" or (out_format is None and (out.is_file() or out.suffix)):
        raise KidsegError(
            "cannot write labels there (name a .nii.gz, .nii, .nrrd, .mha or .mhd file, or a folder; "
            "a DICOM SEG is written by kidseg export-seg)",
            out,
        )
    names_a_file = out_format is not None
    if (src / volumes.KITS_IMAGE).exists():  # one KiTS case
        return [(src / volumes.KITS_IMAGE, out if names_a_file else out / src.name / volumes.KITS_LABELS)]
    if src.is_dir():
        cases = volumes.kits_cases(src)
        if cases:
            return [(c / volumes.KITS_IMAGE, out / c.name / volumes.KITS_LABELS) for c in cases]
        inside = [p for p in sorted(src.iterdir()) if p.is_file()]
        # label files beside the CTs (a reference, a mask) are not inputs, as in the worklist
        files = [p for p in inside if volumes.volume_format(p) not in (None, "dicom") and not volumes.is_label_file(p)]
        series = [(src, out / out_name(src))] if any(volumes.volume_format(p) == "dicom" for p in inside) else []
        if files:
            return [(f, out / out_name(f)) for f in files] + series
    return [(src, out if names_a_file else out / out_name(src))]  # one volume file, or a DICOM series


def cmd_predict(args) -> int:
    from . import files
    from .batch import PredictSettings

    jobs = _prediction_jobs(Path(args.input), Path(args.output))
    report_csv = _batch_report_path(Path(args.output), jobs) if args.report else None
    inputs = {s.resolve() for s, _ in jobs}
    for target in [t for _, t in jobs] + ([report_csv] if report_csv else []):
        if target.resolve() in inputs:
            raise KidsegError("is an input CT; the labels must go elsewhere (even with --overwrite)", target)
        if target.exists() and not args.overwrite:
            raise KidsegError("already exists; not overwriting it (use --overwrite)", target)
    settings = PredictSettings(
        args.alpha,
        args.kidney_threshold,
        args.tumor_threshold,
        anatomy_check=not args.no_anatomy_check,
        mirror=args.mirror,
        series=args.series,
        save_probabilities=args.save_probabilities,
        report=bool(report_csv),
        overwrite=args.overwrite,
    )
    if args.cluster is not None:
        report_rows, failed = _predict_on_cluster(args, jobs, settings)
    else:
        report_rows, failed = _predict_here(args, jobs, settings), 0
    if report_csv:
        from .report import rows_to_csv

        with files.atomic_path(report_csv, overwrite=args.overwrite) as tmp:
            tmp.write_text(rows_to_csv(report_rows))
        print(f"kidseg: wrote {report_csv} ({len(report_rows)} case(s))", file=sys.stderr)
    return 1 if failed else 0


def _predict_here(args, jobs, settings) -> list:
    """One input after another in this process; the report rows."""
    from . import volumes
    from .batch import predict_case
    from .cascade import Cascade

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
        out = predict_case(src, target, settings, cascade, ct=ct, progress=bar)
        bar.close()
        _WRITTEN.append(target)
        _print_predicted(src, out)
        report_rows.append(out["report_row"])
    return report_rows


def _print_predicted(src, out: dict):
    for msg in out["notes"]:
        print(f"kidseg: note: {src}: {msg}", file=sys.stderr)
    print(out["line"])


def _open_cluster(args, models, what: str):
    """The Dask cluster of ``--cluster``, its address and dashboard printed."""
    from .batch import DaskCluster

    cluster = DaskCluster(args.cluster, models=models)
    print(f"kidseg: {what} on {cluster.describe()}", file=sys.stderr)
    return cluster


def _cluster_progress(progress, case, info):
    what = f"failed: {info['error']}" if "error" in info else "done"
    print(f"kidseg: [{progress.line()}] {case.name}: {what}", file=sys.stderr)


def _predict_on_cluster(args, jobs, settings):
    """One task per input on the Dask cluster (``--cluster``); (report rows, failed count)."""
    import dataclasses

    from .batch import Case, checked_models, predict_outputs, predict_task, run_cases

    models = (*checked_models(args.coarse, args.refine, args.device), args.batch_size)
    # every target was checked just above; a case retried after its worker died mid-case
    # replaces what that worker may have renamed into place before dying
    task_settings = dataclasses.replace(settings, overwrite=True)
    cases = [
        Case(str(src), predict_task, (str(src), str(t), task_settings, models), predict_outputs(t, settings))
        for src, t in jobs
    ]
    rows, failed = [], []

    def on_result(case, info):
        if "error" in info:
            failed.append(info["error"])
        else:
            _print_predicted(case.name, info)
            rows.append(info["report_row"])

    with _open_cluster(args, models, f"{len(cases)} case(s)") as cluster:
        progress = run_cases(cluster, cases, on_result=on_result, on_progress=_cluster_progress)
    print(f"kidseg: {progress.done} case(s) segmented, {progress.failed} failed", file=sys.stderr)
    for reason in failed:
        print(f"kidseg: failed: {reason}", file=sys.stderr)
    return [r for r in rows if r is not None], len(failed)


def _batch_report_path(output: Path, jobs) -> Path:
    if len(jobs) == 1 and jobs[0][1] == output:  # one output file named by the user
        return _default_report_dir(output).with_suffix(".csv")
    return output / "report.csv"


# --------------------------------------------------------------------------------------------- evaluate
def _paired_volumes(pred: Path, ref: Path):
    """(case, prediction, reference) pairs, and one line per case left without a partner."""
    from . import volumes
    from .evaluation import pair_cases

    if pred.is_file() or volumes.volume_format(pred) not in (None, "dicom"):
        return [(pred.name, pred, ref)], []
    if not pred.is_dir():
        raise KidsegError("no such file or folder", pred)
    if not ref.is_dir():
        raise KidsegError("is a file, but the predictions are a folder; give a folder of references", ref)
    return pair_cases(pred, ref)


_EVAL_HEADERS = {
    "kidney_tumor_dice": "kid+tum_dice",
    "tumor_dice": "tumor_dice",
    "kits_composite": "kits19",
    "kidney_masses_dice": "kid+masses_dice",
    "masses_dice": "masses_dice",
    "kits21_mean_dice": "mean_dice",
    "surface_dice_kidney_masses": "sd_kid+masses",
    "surface_dice_masses": "sd_masses",
    "surface_dice_tumor": "sd_tumor",
    "mean_surface_dice": "mean_sd",
    "hd95_kidney_masses": "hd95_kid+m_mm",
    "hd95_masses": "hd95_mass_mm",
    "hd95_tumor": "hd95_tum_mm",
    "false_kidney_ml": "false_kid_mL",
    "false_tumor_ml": "false_tum_mL",
}


def _score_case(name, p, r, tolerances):

    from . import volumes
    from .evaluation import TOLERANCES_MM, case_scores
    from .fusion import CYST
    from .metrics import bounding_box, check_label_values, false_ml, kits_scores, measurements, tumor_detection

    ref = volumes.read_labels(r)
    pred = volumes.read_labels(p, like=ref)
    for vol, path in ((pred, p), (ref, r)):
        check_label_values(vol.array, path, cysts=True)
    cysts = bool((ref.array == CYST).any() or (pred.array == CYST).any())
    tol_name = tolerances or ("kits23" if cysts else "kits21")
    tol = TOLERANCES_MM.get(tol_name) or tuple(float(v) for v in tol_name.split(","))
    sp = ref.geometry.spacing
    box = bounding_box((pred.array > 0) | (ref.array > 0))  # the scores below ignore the background
    pa, ra = (pred.array[box], ref.array[box]) if box else (pred.array, ref.array)
    vols = measurements(pred.array, pred.geometry.spacing)["total"]  # sides need the whole grid
    found = tumor_detection(pa, ra, sp)
    return cysts, {
        "case": name,
        **kits_scores(pa, ra),
        **case_scores(pa, ra, sp, tol),
        "tolerances_mm": [float(t) for t in tol],
        "kidney_ml": vols["kidney_ml"],
        "tumor_ml": vols["tumor_ml"],
        **false_ml(pa, ra, sp),
        "tumors": found["tumors"],
        "false_tumors_ml": found["false_tumors_ml"],
    }


def cmd_evaluate(args) -> int:
    import json

    from . import files
    from .evaluation import SCORE_KEYS, aggregate, parse_tolerances
    from .metrics import detection_by_size
    from .report import rows_to_csv

    tolerances = None
    if args.tolerances:  # checked before any case is read
        parse_tolerances(args.tolerances)
        tolerances = args.tolerances.strip().lower()
        if tolerances not in ("kits21", "kits23"):
            tolerances = ",".join(str(v) for v in parse_tolerances(tolerances))
    if args.csv and Path(args.csv).exists() and not args.overwrite:
        raise KidsegError("already exists; not overwriting it (use --overwrite)", args.csv)
    pairs, problems = _paired_volumes(Path(args.prediction), Path(args.reference))
    single = len(pairs) == 1 and not Path(args.prediction).is_dir()
    for line in problems:
        print(f"kidseg: {line}", file=sys.stderr)
    rows, cysts = [], False
    for name, p, r in pairs:
        try:
            case_cysts, row = _score_case(name, p, r, tolerances)
        except KidsegError as exc:
            if single:
                raise
            problems.append(str(exc))
            print(f"kidseg: {exc}; {name} not scored", file=sys.stderr)
            continue
        cysts |= case_cysts
        rows.append(row)
    if not rows:
        raise KidsegError("no case could be scored", args.prediction)
    keys = list(dict.fromkeys(["kidney_tumor_dice", "tumor_dice", "kits_composite", *SCORE_KEYS]))
    if not cysts:  # KiTS19 labels: kidney and masses is kidney+tumor, masses is tumor; no column twice
        keys = [k for k in keys if k not in ("kidney_masses_dice", "masses_dice", "surface_dice_masses", "hd95_masses")]
    flat = ["kidney_tumor_jaccard", "tumor_jaccard", "false_kidney_ml", "false_tumor_ml", "kidney_ml", "tumor_ml"]
    stats = aggregate(rows, list(dict.fromkeys(keys + flat + list(SCORE_KEYS))))
    mean = {k: v["mean"] for k, v in stats.items()}
    median = {k: v["median"] for k, v in stats.items()}
    by_size = detection_by_size(rows)  # each row carries its case's "tumors"
    tol_used = sorted({tuple(r["tolerances_mm"]) for r in rows})
    if args.csv:
        table = [{k: v for k, v in r.items() if k not in ("tumors", "false_tumors_ml", "tolerances_mm")} for r in rows]
        for r, row in zip(rows, table):
            row["tumors_found"] = sum(t["found"] for t in r["tumors"])
            row["tumors"] = len(r["tumors"])
            row["false_tumors"] = len(r["false_tumors_ml"])
            row["tolerances_mm"] = " ".join(f"{t:.4f}" for t in r["tolerances_mm"])
        for label, values in (("mean", mean), ("median", median)):
            table.append({"case": label, **{k: values.get(k, "") for k in table[0] if k != "case"}})
        with files.atomic_path(Path(args.csv), overwrite=args.overwrite) as tmp:
            tmp.write_text(rows_to_csv([{k: ("" if v is None else v) for k, v in t.items()} for t in table]))
        print(f"kidseg: wrote {args.csv} ({len(rows)} case(s))", file=sys.stderr)
    if args.json:
        out = {"cases": rows, "mean": mean, "median": median, "cases_scored": {k: v["n"] for k, v in stats.items()}}
        out.update(tumor_detection_by_size=by_size, not_scored=problems)
        print(json.dumps(out, indent=1))
        return 1 if problems else 0
    width = max(28, *(len(r["case"]) + 2 for r in rows))
    print(
        f"{'case':<{width}}"
        + "".join(f"{_EVAL_HEADERS[k]:>16}" for k in keys)
        + f"{'tumors found':>14}{'false tumors':>14}"
    )

    def cell(v):
        return f"{'n/a':>16}" if v is None else f"{v:>16.4f}"

    for r in rows:
        found = f"{sum(t['found'] for t in r['tumors'])}/{len(r['tumors'])}"
        false = f"{len(r['false_tumors_ml'])} ({sum(r['false_tumors_ml']):.1f} mL)"
        print(f"{r['case']:<{width}}" + "".join(cell(r[k]) for k in keys) + f"{found:>14}{false:>14}")
    if len(rows) > 1:
        for label, values in (("mean", mean), ("median", median)):
            print(f"{label:<{width}}" + "".join(cell(values[k]) for k in keys))
    print(
        "\nSurface Dice at tolerances (kidney and masses, masses, tumor) "
        + "; ".join(", ".join(f"{t:.3f}" for t in tol) + " mm" for tol in tol_used)
        + ("" if tolerances else " (KiTS23's where cysts are labelled, else KiTS21's; --tolerances to choose)")
        + "; HD95 n/a where one side is empty"
    )
    undefined = {k: len(rows) - stats[k]["n"] for k in keys if k.startswith("hd95") and stats[k]["n"] < len(rows)}
    for k, n in undefined.items():
        print(f"  {_EVAL_HEADERS[k]}: mean and median over {len(rows) - n} of {len(rows)} cases")
    if any(row["tumors"] for row in by_size):
        print("\ntumors by reference volume (found: at least 10% of it predicted as tumor)")
        for row in by_size:
            span = (
                f"{row['from_ml']:g}-{row['to_ml']:g} mL" if row["to_ml"] is not None else f">= {row['from_ml']:g} mL"
            )
            share = f", mean share predicted {row['mean_recall']:.2f}" if row["tumors"] else ""
            print(f"  {span:<12}{row['found']} of {row['tumors']} found{share}")
    if problems:
        print(f"\n{len(problems)} problem(s) (see above); the table holds the {len(rows)} case(s) scored")
    return 1 if problems else 0


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
    if args.organs:
        from .labels import ORGANS

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


def _finetune_settings(args):
    """``kidseg finetune``'s arguments as the core's settings (the widget uses their defaults)."""
    from .training import FinetuneSettings

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
    from .finetuning import STAGES, finetune_models

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
    if report["worse"]:
        print(
            f"kidseg: note: the new models score worse than their parents on the {' and '.join(report['worse_on'])} "
            "cases; keep the parents unless you have a reason",
            file=sys.stderr,
        )
    return 0


def _add_cluster_argument(p):
    """``--cluster``, as kidseg predict and kidseg draft take it."""
    p.add_argument(
        "--cluster",
        nargs="?",
        const="local",
        metavar="local[:N]|tcp://HOST:PORT",
        help="one task per case on Dask distributed: a local cluster of N worker processes (default: one "
        "per GPU, else per core) or an existing scheduler; the workers must see the same files",
    )


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
        "--bn-momentum",
        type=_fraction,
        default=None,
        help="BatchNorm running-statistics momentum (default PyTorch's 0.1; lower smooths them)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_train)

    from .training import FinetuneSettings

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


# --------------------------------------------------------------------------------------------- report
def cmd_report(args) -> int:
    from . import volumes
    from .metrics import check_label_values
    from .report import describe_case, report_text, write_report

    out = Path(args.output) if args.output else _default_report_dir(Path(args.labels))
    if out.exists() and not out.is_dir():
        raise KidsegError("is a file; the report is a folder (name a new or existing folder)", out)
    ct = volumes.read_ct(args.ct, series_uid=args.series)
    labels = volumes.read_labels(args.labels, like=ct)
    check_label_values(labels.array, args.labels, cysts=True)
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
    from .metrics import check_label_values

    ct = volumes.read_ct(args.dicom_dir, series_uid=args.series, check_hu=False)
    labels = volumes.read_labels(args.labels, like=ct)
    check_label_values(labels.array, args.labels, cysts=True)
    out = write_dicom_seg(args.dicom_dir, labels.array, args.output, series_uid=args.series, overwrite=args.overwrite)
    print(f"kidseg: wrote {out} (DICOM SEG referencing {args.dicom_dir})", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------- worklist
def _pacs_filters(args) -> dict:
    return {"patient": args.patient, "date": args.date, "modality": args.modality, "description": args.description}


def cmd_draft(args) -> int:
    """Draft a whole worklist in batch (a GPU machine overnight, say) into its draft cache; on a
    PACS, the series are fetched in the background ahead of the drafting."""
    from .cascade import Cascade
    from .pacs import open_worklist
    from .worklist import draft_all

    wl = open_worklist(args.folder, args.state, **_pacs_filters(args))
    try:
        for note in wl.notes:
            print(f"kidseg: note: {note}", file=sys.stderr)
        if wl.read_only:
            raise KidsegError("is open in another napari; drafts would not be kept", wl.state_dir)
        todo = [i for i, r in enumerate(wl.rows) if r.status not in ("reviewed", "failed")]
        wl.ready_for_draft(todo)  # a PACS worklist starts fetching them all, in this order
        if args.cluster is not None:
            from .batch import checked_models, draft_worklist

            models = checked_models(args.coarse, args.refine, args.device)
            with _open_cluster(args, models, "drafting") as cluster:
                n = draft_worklist(wl, cluster, models, redraft=args.redraft, on_progress=_cluster_progress).done
        else:
            cascade = Cascade(args.coarse, args.refine, device=args.device)
            bar = _ProgressBar("drafts")
            n = draft_all(wl, cascade, progress=lambda d, t, case: bar(d, t, case), redraft=args.redraft)
            bar.close()
        failed = [r for r in wl.rows if r.status == "failed"]
        print(f"kidseg: {n} case(s) drafted into {wl.state_dir / 'drafts'}; {len(failed)} failed")
        if getattr(wl, "fetch_seconds", 0):
            mb = wl.fetched_bytes / 1e6
            print(f"kidseg: fetched {mb:.0f} MB from the PACS in {wl.fetch_seconds:.1f} s", file=sys.stderr)
        for r in failed:
            print(f"kidseg: failed: {r.case}: {r.reason}", file=sys.stderr)
    finally:
        wl.close()
    return 0


def cmd_review(args) -> int:
    """napari with the Case worklist and the Kidney cascade widgets on a folder or a PACS."""
    from .pacs import Pacs, Query, is_pacs_url

    source = args.folder
    if is_pacs_url(source):  # the server answers and holds series, checked before napari opens
        source = Query(args.folder, **_pacs_filters(args))
        if not Pacs(source.url).find(source.patient, source.date, source.modality, source.description):
            raise KidsegError(f"no series match ({source.label()})", source.url)
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY") and sys.platform.startswith("linux"):
        raise KidsegError("no display here, so napari cannot open; run `xvfb-run -a kidseg review ...` or a desktop")
    from .worklist import find_cases

    if not isinstance(source, Query):
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
    worklist_widget.open_folder(source)
    if not args.no_block:
        napari.run()
    return 0


# --------------------------------------------------------------------------------------------- pacs
def cmd_pacs(args) -> int:
    """ping, find, pull and push on a DICOMweb server."""
    from .pacs import Pacs

    server = Pacs(args.url)
    if args.pacs_command == "ping":
        for line in server.ping():
            print(line)
        return 0
    if args.pacs_command == "find":
        found = server.find(**_pacs_filters(args))
        print("patient\tdate\tdescription\tslices\tseries UID")
        for s in found:
            print(s.row)
        print(f"kidseg: {len(found)} series", file=sys.stderr)
        return 0
    if args.pacs_command == "pull":
        out = Path(args.output)
        for uid in args.series:
            if (out / server.series_folder_name(uid)).exists():
                raise KidsegError("already exists; not overwriting it", out / server.series_folder_name(uid))
        for uid in args.series:
            info = server.lookup(uid)
            bar = _ProgressBar(uid[-12:])
            dest = server.fetch(
                info.study_uid, uid, out / server.series_folder_name(uid), expected=info.slices,
                progress=lambda d, t, _b, bar=bar: bar(d, t),
            )  # fmt: skip
            bar.close()
            f = server.last_fetch
            mb = f["bytes"] / 1e6
            print(f"{dest}: {f['instances']} instance(s), {mb:.1f} MB in {f['seconds']:.1f} s")
        return 0
    paths = []
    for f in args.files:
        p = Path(f)
        if p.is_dir():
            paths += sorted(p.rglob("*.dcm"))
        elif p.is_file():
            paths.append(p)
        else:
            raise KidsegError("no such file or folder", p)
    if not paths:
        raise KidsegError("holds no .dcm file to send", args.files[0])
    stored = server.store(paths)
    how = "C-STORE" if server.settings.dimse else "STOW-RS"
    print(f"kidseg: stored {len(stored)} object(s) on {server.url} ({how}); a push adds instances, it replaces none")
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
    parser = _OneLineParser(prog="kidseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('napari_kidseg').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    p = sub.add_parser("phantom", help="write synthetic abdominal CTs with labels in KiTS layout")
    p.add_argument("out_dir")
    p.add_argument("--cases", type=_count, default=1)
    p.add_argument("--seed", type=int, default=0, help="seed of the first case; case i uses seed+i")
    p.add_argument(
        "--matrix",
        type=_checked(int, lambda v: v >= 32, "must be 32 voxels or more"),
        default=512,
        help="in-plane size in voxels (default 512)",
    )
    p.add_argument("--max-slices", type=_count, default=600)
    p.add_argument("--slice-thickness", type=_positive, default=None, help="mm; random per case when omitted")
    p.add_argument(
        "--random-contrast",
        type=_fraction,
        default=0.0,
        help="probability of random tissue HU per case (domain randomisation for training)",
    )
    p.add_argument("--jobs", type=_count, default=1, help="cases made in parallel processes (same cases either way)")
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
    p.add_argument(
        "--tumor-shapes",
        metavar="DIR",
        help="most tumors take the shape and kidney-relative place of a real tumor from the KiTS19 label "
        "volumes in DIR (case_XXXXX/segmentation.nii.gz), mirrored, scaled and turned",
    )
    p.add_argument(
        "--not-from",
        metavar="DIR",
        help="with --tumor-shapes: leave out the KiTS cases named in DIR (case_XXXXX_...), e.g. evaluation slices",
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
        type=_fraction,
        default=DEFAULT_ALPHA,
        help=f"fusion weight of the coarse stage (default {DEFAULT_ALPHA})",
    )
    p.add_argument("--kidney-threshold", type=_fraction, default=DEFAULT_KIDNEY_THRESHOLD)
    p.add_argument("--tumor-threshold", type=_fraction, default=DEFAULT_TUMOR_THRESHOLD)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--batch-size", type=_count, default=None)
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
    _add_cluster_argument(p)
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

    p = sub.add_parser(
        "evaluate", help="KiTS scores of predictions against references: Dice, Surface Dice, HD95 (a case or a folder)"
    )
    p.add_argument("prediction", help="label file, or folder of KiTS case folders or label files (case_XXXXX.nii.gz)")
    p.add_argument("reference", help="label file or folder (paired by KiTS case name, else by file name)")
    p.add_argument(
        "--tolerances",
        help="Surface Dice tolerances: kits21, kits23 or MM,MM,MM for kidney and masses, masses, tumor "
        "(default: kits23 where cysts are labelled, else kits21)",
    )
    p.add_argument("--csv", help="write one row per case, and the mean and median, to this CSV file")
    p.add_argument("--json", action="store_true", help="print JSON: every case, the mean and the median")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("review", help="open napari with the Case worklist on a folder of cases or a PACS")
    p.add_argument(
        "folder",
        help="KiTS case folders, CT files or DICOM series (searched recursively), or a DICOMweb URL "
        "(http(s)://host:port/dicom-web)",
    )
    p.add_argument("--state", help="where the worklist's state goes (default: beside the cases; a PACS: your cache)")
    p.add_argument("--coarse")
    p.add_argument("--refine")
    _add_pacs_filters(p)
    p.add_argument("--no-block", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("draft", help="draft every case of a worklist folder or PACS query into its draft cache (batch)")
    p.add_argument("folder", help="a folder of cases, or a DICOMweb URL")
    p.add_argument("--state", help="the worklist's state folder (default: beside the cases; a PACS: your cache)")
    _add_pacs_filters(p)
    p.add_argument("--coarse")
    p.add_argument("--refine")
    p.add_argument("--device", default="auto")
    p.add_argument("--redraft", action="store_true", help="draft again the cases drafted already")
    _add_cluster_argument(p)
    p.set_defaults(func=cmd_draft)

    _add_train_parser(sub)
    _add_pacs_parser(sub)

    p = sub.add_parser("bench", help="speed and memory of the cascade on 512x512xN phantoms (prints a table)")
    p.add_argument("--sizes", type=_count, nargs="+", default=[100, 300, 600])
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


def _add_pacs_filters(p):
    g = p.add_argument_group("a PACS source (DICOMweb URL): which series")
    g.add_argument("--patient", help="PatientID")
    g.add_argument("--date", help="StudyDate, YYYYMMDD or YYYYMMDD-YYYYMMDD")
    g.add_argument("--modality", default="CT", help="default CT")
    g.add_argument("--description", help="a part of the series description (any case)")


def _add_pacs_parser(sub):
    auth = (
        "Credentials come from KIDSEG_PACS_USER / KIDSEG_PACS_PASSWORD or the settings file "
        "(KIDSEG_PACS_CONFIG, default ~/.config/napari-kidseg/pacs.json, mode 600), never the command line."
    )
    pacs = sub.add_parser("pacs", help="a DICOMweb PACS: ping, find, pull, push", description=auth)
    psub = pacs.add_subparsers(dest="pacs_command", required=True)
    p = psub.add_parser("ping", help="whether the server answers, and what it supports", description=auth)
    p.add_argument("url", help="the server's DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    p = psub.add_parser("find", help="the series that match: patient, date, description, slices, series UID")
    p.add_argument("url")
    _add_pacs_filters(p)
    p = psub.add_parser("pull", help="fetch series as DICOM folders (one per series, named by its UID)")
    p.add_argument("url")
    p.add_argument("--series", nargs="+", required=True, metavar="UID")
    p.add_argument("-o", "--output", required=True, metavar="FOLDER")
    p = psub.add_parser("push", help="store DICOM files (a SEG, an Encapsulated PDF report) on the server")
    p.add_argument("url")
    p.add_argument("files", nargs="+", metavar="FILE", help="DICOM files, or folders of .dcm files")
    for p in psub.choices.values():
        p.set_defaults(func=cmd_pacs)


def _format_warning(message, category, filename, lineno, line=None):
    return (
        f"kidseg: note: {message}\n"
        if issubclass(category, KidsegWarning)
        else warnings.formatwarning(message, category, filename, lineno, line)
    )


_WRITTEN: list = []  # outputs finished in this run, named when it is cancelled part-way


def main(argv=None) -> int:
    _WRITTEN.clear()
    warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(_format_warning(m, c, f, n, line))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KidsegError as exc:
        print(f"kidseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = f"; kept the {len(_WRITTEN)} output(s) finished before it: {', '.join(map(str, _WRITTEN))}"
        print("kidseg: cancelled; the output in progress was not written" + (kept if _WRITTEN else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
