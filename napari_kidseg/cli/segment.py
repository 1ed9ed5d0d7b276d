"""``kidseg predict`` (a CT, a folder or a KiTS root, here or on a Dask cluster), ``report``,
``export-seg`` and ``bench``: the cascade on the files a user names, and what is written from it."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import KidsegError
from ..fusion import DEFAULT_ALPHA, DEFAULT_KIDNEY_THRESHOLD, DEFAULT_TUMOR_THRESHOLD
from ..models import PRESET_NOTES
from ._common import _WRITTEN, _add_cluster_argument, _cluster_progress, _count, _fraction, _open_cluster, _ProgressBar


def _prediction_jobs(src: Path, out: Path):
    """(input, output path) pairs: one volume, a KiTS case, a KiTS root, or a folder of volumes."""
    from ..io import files, volumes

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
    from ..batch import PredictSettings
    from ..io import files

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
        contrast_tumor=not args.no_contrast_tumor,
        mirror=args.mirror,
        smooth_noise=args.smooth_noise,
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
        from ..report import rows_to_csv

        with files.atomic_path(report_csv, overwrite=args.overwrite) as tmp:
            tmp.write_text(rows_to_csv(report_rows))
        print(f"kidseg: wrote {report_csv} ({len(report_rows)} case(s))", file=sys.stderr)
    return 1 if failed else 0


def _predict_here(args, jobs, settings) -> list:
    """One input after another in this process; the report rows."""
    from ..batch import predict_case
    from ..cascade import Cascade
    from ..io import volumes

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


def _predict_on_cluster(args, jobs, settings):
    """One task per input on the Dask cluster (``--cluster``); (report rows, failed count)."""
    import dataclasses

    from ..batch import Case, checked_models, predict_outputs, predict_task, run_cases

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
            _WRITTEN.append(Path(case.outputs[0]))  # named if Ctrl-C stops the batch
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


def cmd_report(args) -> int:
    from ..io import readers, volumes
    from ..labels import check_label_values
    from ..report import describe_case, report_text, write_report

    out = Path(args.output) if args.output else _default_report_dir(Path(args.labels))
    if out.exists() and not out.is_dir():
        raise KidsegError("is a file; the report is a folder (name a new or existing folder)", out)
    ct = volumes.read_ct(args.ct, series_uid=args.series)
    labels = readers.read_labels(args.labels, like=ct)
    check_label_values(labels.array, args.labels, cysts=True)
    report = describe_case(labels.array, ct.geometry.spacing, ct=ct.array, provenance={"labels": str(args.labels)})
    written = write_report(
        report, out, ct=ct.array, labels=labels.array, spacing=ct.geometry.spacing, overwrite=args.overwrite
    )
    print(report_text(report))
    print(f"kidseg: wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


def _default_report_dir(labels: Path) -> Path:
    from ..io import volumes

    name = labels.name
    for suffix in volumes.VOLUME_SUFFIXES + volumes.DICOM_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return labels.parent / f"{name}_report"


def cmd_export_seg(args) -> int:
    from ..io import readers, volumes
    from ..io.dicom_seg import write_dicom_seg
    from ..labels import check_label_values

    ct = volumes.read_ct(args.dicom_dir, series_uid=args.series, check_hu=False)
    labels = readers.read_labels(args.labels, like=ct)
    check_label_values(labels.array, args.labels, cysts=True)
    out = write_dicom_seg(args.dicom_dir, labels.array, args.output, series_uid=args.series, overwrite=args.overwrite)
    print(f"kidseg: wrote {out} (DICOM SEG referencing {args.dicom_dir})", file=sys.stderr)
    return 0


def add_parsers(sub):
    """predict, report, export-seg."""
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
        "--smooth-noise",
        action="store_true",
        help="smooth a CT noisier than the networks were trained on (18 HU) in-plane first; says so",
    )
    p.add_argument(
        "--no-anatomy-check",
        action="store_true",
        help="keep regions that cannot be a kidney or kidney tumor by their position (spine, side), "
        "size or attachment; by default they are removed and listed",
    )
    p.add_argument(
        "--no-contrast-tumor",
        action="store_true",
        help="leave kidney that enhances 40 HU less than the kidney as kidney; by default it becomes tumor "
        "on a contrast-enhanced CT (see weights/README.md)",
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


def cmd_bench(args) -> int:
    from ..bench import format_table, run_benchmark

    rows = run_benchmark(args.sizes, args.coarse, args.refine, args.device, args.preset, args.workdir)
    print(format_table(rows))
    return 0


def add_bench_parser(sub):
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
