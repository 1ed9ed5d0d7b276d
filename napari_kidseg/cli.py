"""The ``kidseg`` command: phantom, predict, evaluate, train, finetune, bench, demo.

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


def _progress_bar(desc: str):
    """A tqdm bar driven by the core's ``progress(done, total)`` callbacks."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="step", dynamic_ncols=True, disable=None)

    def update(done, total, stage=None):
        if bar.total != total:
            bar.reset(total=total)
        if stage:
            bar.set_description(f"{desc}: {stage}")
        bar.n = done
        bar.refresh()

    update.close = bar.close  # type: ignore[attr-defined]
    return update


# --------------------------------------------------------------------------------------------- phantom
def cmd_phantom(args) -> int:
    from .phantom import write_phantom_cases

    out = Path(args.out_dir)
    existing = [out / f"case_{i:05d}" for i in range(args.cases) if (out / f"case_{i:05d}").exists()]
    if existing and not args.overwrite:
        raise KidsegError("case folder already exists; not overwriting it (use --overwrite)", existing[0])
    bar = _progress_bar("phantoms")
    kwargs = {"matrix": args.matrix, "max_slices": args.max_slices}
    if args.slice_thickness:
        kwargs["slice_thickness"] = args.slice_thickness
    cases = write_phantom_cases(out, args.cases, args.seed, overwrite=args.overwrite, progress=bar, **kwargs)
    bar.close()
    print(f"wrote {len(cases)} phantom case(s) in KiTS layout under {out} (seeds {args.seed}..{args.seed + args.cases - 1})")
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
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_phantom)
    return parser


def _format_warning(message, category, filename, lineno, line=None):
    return f"kidseg: note: {message}\n" if issubclass(category, KidsegWarning) else \
        warnings.formatwarning(message, category, filename, lineno, line)


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
