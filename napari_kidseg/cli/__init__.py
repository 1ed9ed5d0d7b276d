"""The ``kidseg`` command: phantom, predict, evaluate, report, export-seg, review, draft, train, finetune, bench, demo.

Every subcommand calls the GUI-free core. A user mistake prints one line, ``kidseg: error: ...``
naming the file and the problem, and exits with status 2; no traceback.

Each command group has its module here (evaluation: phantom, evaluate; segment: predict, report,
export-seg, bench; training: train, finetune; worklist: review, draft, pacs); ``_common`` holds what
they share.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..models import import_network_libraries
from . import evaluation, segment, training, worklist
from ._common import _WRITTEN, _format_warning, _OneLineParser, run_command


def cmd_demo(args) -> int:
    """napari with the sample CT and the widget; with no display, the same cascade headless."""
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY") and sys.platform.startswith("linux"):
        import tempfile

        from .._napari_io import sample_case_dir

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
    import_network_libraries()  # before napari's window opens: not a frozen viewer later
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
    evaluation.add_phantom_parser(sub)
    segment.add_parsers(sub)
    evaluation.add_evaluate_parser(sub)
    worklist.add_review_parsers(sub)
    training.add_parsers(sub)
    worklist.add_pacs_parser(sub)
    segment.add_bench_parser(sub)

    p = sub.add_parser("demo", help="open napari with the sample CT and the Kidney cascade widget")
    p.add_argument("--no-block", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    _WRITTEN.clear()
    warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(_format_warning(m, c, f, n, line))
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(args)
