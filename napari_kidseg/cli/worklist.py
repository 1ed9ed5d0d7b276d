"""``kidseg review`` (napari on a worklist), ``kidseg draft`` (a whole worklist in batch, here or
on a Dask cluster) and ``kidseg pacs`` (ping, find, pull, push on a DICOMweb server)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import KidsegError
from ..models import import_network_libraries
from ._common import _add_cluster_argument, _cluster_progress, _open_cluster, _ProgressBar


def _pacs_filters(args) -> dict:
    return {"patient": args.patient, "date": args.date, "modality": args.modality, "description": args.description}


def cmd_draft(args) -> int:
    """Draft a whole worklist in batch (a GPU machine overnight, say) into its draft cache; on a
    PACS, the series are fetched in the background ahead of the drafting."""
    from ..cascade import Cascade
    from ..pacs import open_worklist
    from ..review.worklist import draft_all

    wl = open_worklist(args.folder, args.state, **_pacs_filters(args))
    try:
        for note in wl.notes:
            print(f"kidseg: note: {note}", file=sys.stderr)
        if wl.read_only:
            raise KidsegError("is open in another napari; drafts would not be kept", wl.state_dir)
        todo = [i for i, r in enumerate(wl.rows) if r.status not in ("reviewed", "failed")]
        wl.ready_for_draft(todo)  # a PACS worklist starts fetching them all, in this order
        if args.cluster is not None:
            from ..batch import checked_models, draft_worklist

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
    from ..pacs import Pacs, Query, is_pacs_url

    source = args.folder
    if is_pacs_url(source):  # the server answers and holds series, checked before napari opens
        source = Query(args.folder, **_pacs_filters(args))
        if not Pacs(source.url).find(source.patient, source.date, source.modality, source.description):
            raise KidsegError(f"no series match ({source.label()})", source.url)
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY") and sys.platform.startswith("linux"):
        raise KidsegError("no display here, so napari cannot open; run `xvfb-run -a kidseg review ...` or a desktop")
    from ..review.worklist import find_cases

    if not isinstance(source, Query):
        find_cases(args.folder)  # a folder with no CT is one line here, before napari opens
    import_network_libraries()  # before napari's window opens: not a frozen viewer later
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
    from ..pacs import Pacs

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


def add_review_parsers(sub):
    """review, draft."""
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


def _add_pacs_filters(p):
    g = p.add_argument_group("a PACS source (DICOMweb URL): which series")
    g.add_argument("--patient", help="PatientID")
    g.add_argument("--date", help="StudyDate, YYYYMMDD or YYYYMMDD-YYYYMMDD")
    g.add_argument("--modality", default="CT", help="default CT")
    g.add_argument("--description", help="a part of the series description (any case)")


def add_pacs_parser(sub):
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
