"""The corrections folder: the one module that knows its format.

A corrections folder holds the cases a radiologist corrected, in KiTS layout, and a manifest::

    CORRECTIONS/
      manifest.json            {"cases": [entry, ...]}, written last and atomically
      case_00000/
        imaging.nii.gz         the CT (copied once per scan)
        segmentation.nii.gz    the corrected labels
        segmentation.seg.dcm   the labels as a DICOM SEG, for a CT read from a DICOM series
      models/                  fine-tuned children (napari_kidseg.finetuning's)

An entry says where the case came from (``source``, ``source_sha256``, ``scan_sha256``: one case
per scan), the checkpoints and fusion settings it was drafted with, the hand-edited voxels, the
slices reviewed (``reviewed_slices``, ``whole_case_reviewed``), when it was exported (and how
often updated), and whether a DICOM SEG came with it (``dicom_seg``, ``dicom_seg_note``).

:func:`export_correction` writes a case and returns its entry; :func:`manifest_cases` reads the
entries (one line naming the file for a manifest that is not one); :func:`check_corrections`,
:func:`reviewed_slices` and :func:`split_by_scan` are what fine-tuning asks of the folder.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import KidsegError
from ..io import files, readers, volumes
from ..labels import check_label_values
from .session import FusionParams

MANIFEST = "manifest.json"


class ScanAlreadyExported(KidsegError):
    """The scan is in the corrections folder already: update that case (or export a copy on purpose)."""

    def __init__(self, case_id: str, root):
        self.case_id = case_id
        super().__init__(
            f"this scan is already exported as {case_id}; update that case instead of copying the CT again", root
        )


def scan_sha256(ct: volumes.Volume) -> str:
    """A scan's identity: its voxels and spacing, whatever file (or layer) it came from."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ct.array).tobytes())
    h.update(np.asarray(ct.geometry.spacing, np.float64).tobytes())
    return h.hexdigest()


def export_correction(
    root,
    ct: volumes.Volume,
    labels: np.ndarray,
    *,
    case_id: str | None = None,
    checkpoints: dict | None = None,
    params: FusionParams | None = None,
    hand_edited_voxels: int = 0,
    reviewed_slices=None,
    whole_case_reviewed: bool = False,
    update: bool | None = None,
    organs: np.ndarray | None = None,
) -> dict:
    """Write one corrected case in KiTS layout under ``root`` and add it to ``root/manifest.json``.

    One case per scan: when the manifest already holds this scan (same voxels and spacing),
    ``update=None`` raises :class:`ScanAlreadyExported`; ``update=True`` rewrites that case's labels
    (the CT is not copied again) and its manifest entry; ``update=False`` exports a second copy on
    purpose. Never overwrites another case. Files are written atomically and the manifest last,
    so a failed export leaves no half-registered case. ``reviewed_slices``: the slice indices the
    radiologist touched or confirmed (fine-tuning trains on those alone unless
    ``whole_case_reviewed``). Returns the case's manifest entry as written (a copy): ``"case"`` is
    its folder's name under ``root``, ``"dicom_seg"`` / ``"dicom_seg_note"`` say whether a DICOM SEG
    came with it (a CT read from a DICOM series) and why not.

    ``organs``: the draft's organ map (:attr:`CascadeResult.organs`, organ codes of
    :data:`labels.ORGANS`), written beside the labels as ``organs.nii.gz``. An organ-aware network
    fine-tuned on the correction then keeps learning the spleen and liver where the radiologist
    left background, instead of "no organ" on every background voxel. (It is not what made the
    real proxy's fine-tune call the DICOM series' spleen and liver kidney again: 155 mL without
    it, 142 mL with it; see the model card's site study.)
    """
    from ..io.files import file_sha256

    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KidsegError(f"cannot create the corrections folder ({exc.strerror})", root) from None
    if organs is not None and np.shape(organs) != np.shape(labels):
        raise KidsegError(f"the organ map's shape {np.shape(organs)} is not the labels' {np.shape(labels)}", root)
    manifest_path = root / MANIFEST
    manifest = _read_manifest(root)
    scan = scan_sha256(ct)
    same = [c for c in manifest["cases"] if c.get("scan_sha256") == scan]
    if same and update is None:
        raise ScanAlreadyExported(same[-1]["case"], root)
    source = ct.path
    entry = {
        "source": source,
        "source_sha256": file_sha256(source) if source and Path(source).is_file() else None,
        "scan_sha256": scan,
        "checkpoints": {
            k: {"path": str(v), "sha256": file_sha256(v), "version": _ckpt_version(v)}
            for k, v in (checkpoints or {}).items()
        },
        "fusion": dataclasses.asdict(params or FusionParams()),
        "hand_edited_voxels": int(hand_edited_voxels),
        "reviewed_slices": None if reviewed_slices is None else sorted(int(z) for z in reviewed_slices),
        "whole_case_reviewed": bool(whole_case_reviewed),
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "organs": volumes.KITS_ORGANS if organs is not None else None,  # the draft's organ context
    }
    if same and update:
        old = same[-1]
        case_dir = root / old["case"]
        volumes.write_labels(case_dir / volumes.KITS_LABELS, labels, ct, overwrite=True)
        old.update(entry, updates=int(old.get("updates", 0)) + 1)
    else:
        taken = {c["case"] for c in manifest["cases"]} | {p.name for p in root.glob("case_*")}
        if case_id is None or case_id in taken:
            n = 0
            while f"case_{n:05d}" in taken:
                n += 1
            case_id = f"case_{n:05d}"
        case_dir = volumes.write_kits_case(root, case_id, ct, labels)
        manifest["cases"].append({"case": case_id, **entry})
        old = manifest["cases"][-1]
    if ct.source is not None and ct.source.format == "dicom" and Path(ct.source.path).is_dir():
        old.update(_export_dicom_seg(case_dir, ct, labels, entry["checkpoints"]))
    organ_file = case_dir / volumes.KITS_ORGANS
    if organs is not None:
        volumes.write_labels(organ_file, np.asarray(organs, np.uint8), ct, overwrite=True)
    elif organ_file.exists():  # an update without a draft's organs: the old map no longer fits the labels
        organ_file.unlink()
    with files.atomic_path(manifest_path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return copy.deepcopy(old)


def export_provenance(session, cascade) -> dict:
    """What :func:`export_correction` records of where a reviewed draft came from, for the dock's
    export and the worklist's Mark reviewed alike: the models, the sliders, the voxels the user
    set, and the draft's organ map."""
    return {
        "checkpoints": {"coarse": cascade.coarse_path, "refine": cascade.refine_path},
        "params": session.params,
        "hand_edited_voxels": session.hand_edited_voxels,
        "organs": session.result.organs,
    }


DICOM_SEG_NAME = "segmentation.seg.dcm"


def _export_dicom_seg(case_dir: Path, ct: volumes.Volume, labels: np.ndarray, checkpoints: dict) -> dict:
    """A CT read from a DICOM series gets its labels as a DICOM SEG too (for PACS); a series that
    cannot carry one (anonymised without UIDs, a missing slice) gets the reason in the manifest."""
    from ..io.dicom_seg import write_dicom_seg

    models = {k: f"{Path(v['path']).name} ({v['version']})" for k, v in checkpoints.items()}
    try:
        write_dicom_seg(
            ct.source.path, labels, case_dir / DICOM_SEG_NAME, series_uid=ct.source.dicom_series_uid,
            models=models, overwrite=True, ct=ct,
        )  # fmt: skip
    except KidsegError as exc:
        return {"dicom_seg": None, "dicom_seg_note": str(exc)}
    return {"dicom_seg": DICOM_SEG_NAME, "dicom_seg_note": None}


def _ckpt_version(path) -> str:
    from ..models import read_config

    try:
        return read_config(path).version
    except KidsegError:
        return "unknown"


def manifest_cases(corrections_dir) -> list[dict]:
    """The case entries of a corrections folder's manifest.json ([] without one); one line naming
    the file when it is not a manifest."""
    return _read_manifest(corrections_dir)["cases"]


def _read_manifest(corrections_dir) -> dict:
    """The whole manifest (``{"cases": []}`` without one), checked: what the export rewrites."""
    manifest = Path(corrections_dir) / MANIFEST
    if not manifest.exists():
        return {"cases": []}
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise KidsegError(f"is not readable JSON ({type(exc).__name__}); fix or remove it", manifest) from None
    cases = data.get("cases", []) if isinstance(data, dict) else None
    if not isinstance(cases, list) or not all(isinstance(c, dict) and isinstance(c.get("case"), str) for c in cases):
        raise KidsegError("is not a corrections manifest (an object with a list of cases)", manifest)
    return {**data, "cases": cases}


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
        labels = readers.read_labels(case / volumes.KITS_LABELS)
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
                    Path(corrections_dir) / MANIFEST,
                ) from None
    return out


def split_by_scan(corrections_dir: Path, cases: list[Path], holdout_fraction: float) -> tuple[list, list]:
    """Train and held-out cases, split by scan: copies of one scan (same ``scan_sha256`` in the
    manifest) never land on both sides, or the held-out score would be measured on training data.
    Whole scans are held out from three scans on: with one or two, each one's own held-out slabs
    (:func:`napari_kidseg.finetuning.heldout_slabs`) judge the fine-tune, and every corrected scan teaches."""
    from ..training import split_cases

    scan_of = {}
    for entry in manifest_cases(corrections_dir):
        scan_of[entry["case"]] = str(entry.get("scan_sha256") or entry["case"])
    groups: dict[str, list[Path]] = {}
    for c in cases:
        groups.setdefault(scan_of.get(c.name, c.name), []).append(c)
    keys = sorted(groups)
    if len(keys) < 3:
        return list(cases), []
    train_keys, held_keys = split_cases(keys, holdout_fraction, seed=0)
    return ([c for k in train_keys for c in groups[k]], [c for k in held_keys for c in groups[k]])
