"""What every ``kidseg`` command shares: the one-line error handling (exit 2), Ctrl-C naming the
outputs kept, the progress bar, the checked argument types, and the ``--cluster`` argument."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import KidsegError, KidsegWarning


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


def _open_cluster(args, models, what: str):
    """The Dask cluster of ``--cluster``, its address and dashboard printed."""
    from ..batch import DaskCluster

    cluster = DaskCluster(args.cluster, models=models)
    print(f"kidseg: {what} on {cluster.describe()}", file=sys.stderr)
    return cluster


def _cluster_progress(progress, case, info):
    what = f"failed: {info['error']}" if "error" in info else "done"
    print(f"kidseg: [{progress.line()}] {case.name}: {what}", file=sys.stderr)


def _format_warning(message, category, filename, lineno, line=None):
    return (
        f"kidseg: note: {message}\n"
        if issubclass(category, KidsegWarning)
        else warnings.formatwarning(message, category, filename, lineno, line)
    )


_WRITTEN: list = []  # outputs finished in this run, named when it is cancelled part-way


def run_command(args) -> int:
    """The parsed command run: a user mistake is one line and status 2, never a traceback."""
    try:
        return int(args.func(args) or 0)
    except KidsegError as exc:
        print(f"kidseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = f"; kept the {len(_WRITTEN)} output(s) finished before it: {', '.join(map(str, _WRITTEN))}"
        print("kidseg: cancelled; the output in progress was not written" + (kept if _WRITTEN else ""), file=sys.stderr)
        return 130
