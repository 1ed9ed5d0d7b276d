"""``kidseg phantom`` (synthetic CTs with known labels) and ``kidseg evaluate`` (KiTS scores of
predictions against references): the data and the scores a model is judged by."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import KidsegError
from ._common import _checked, _count, _fraction, _positive, _ProgressBar


def cmd_phantom(args) -> int:
    from ..phantoms.writer import write_phantom_cases

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
        from ..phantoms.tumor_shapes import build_library, evaluation_cases

        print(f"kidseg: tumor shapes from {args.tumor_shapes} (read once, then cached)", file=sys.stderr)
        exclude = evaluation_cases(args.not_from) if args.not_from else set()
        kwargs["tumor_library"] = str(build_library(args.tumor_shapes, exclude, jobs=args.jobs))
    label_maps = None
    if args.anatomy:
        from ..phantoms.labelmap import find_label_maps, read_label_map, split_label_maps

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


def add_phantom_parser(sub):
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


def _paired_volumes(pred: Path, ref: Path):
    """(case, prediction, reference) pairs, and one line per case left without a partner."""
    from ..evaluation import pair_cases
    from ..io import volumes

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

    from ..evaluation import TOLERANCES_MM, case_scores
    from ..io import readers
    from ..labels import CYST, check_label_values
    from ..metrics import bounding_box, false_ml, kits_scores, measurements, tumor_detection

    ref = readers.read_labels(r)
    pred = readers.read_labels(p, like=ref)
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

    from ..evaluation import SCORE_KEYS, aggregate, parse_tolerances
    from ..io import files
    from ..metrics import detection_by_size
    from ..report import rows_to_csv

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


def add_evaluate_parser(sub):
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
