"""A radiologist's review of one cascade result: live fusion that keeps hand edits, correction
tools with undo/redo, measurements, navigation to doubtful slices, and export of corrections.

GUI-free: the napari widget holds one :class:`ReviewSession` and only moves data between it and
its layers.

Hand edits survive slider moves: every fusion first compares the editable labels with what the
last fusion produced there; voxels that differ were painted or erased by hand (or changed by a
tool), and are kept with the value given to them on top of every new fusion (an erased voxel
stays erased when a threshold makes the fusion agree for a while). An edited voxel whose label
later changes back to the fusion's (napari's undo, the session's undo, or painting it back) is
no longer an edit, so nothing stays frozen after an undo; the count shown and exported is
exactly the voxels whose label differs from the fusion.

Every correction tool is split in two: ``plan_*`` computes a :class:`Change` (which voxels, old
and new labels, and what it does in words and mL) without touching the labels, so the widget can
preview it, compute it in a worker and apply it through napari's own undo history; the
un-prefixed method applies it at once on the session's undo stack (the CLI, scripts and tests).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import anatomy, files, volumes
from .cascade import CascadeResult
from .errors import KidsegError
from .fusion import (
    BACKGROUND,
    CYST,
    DEFAULT_ALPHA,
    DEFAULT_KIDNEY_THRESHOLD,
    DEFAULT_TUMOR_THRESHOLD,
    KIDNEY,
    KITS23_LABEL_NAMES,
    TUMOR,
)
from .metrics import bounding_box

_STRUCT_3D = np.ones((3, 3, 3), bool)


@dataclasses.dataclass
class Change:
    """A planned correction: flat voxel indices with their old and new labels."""

    name: str
    idx: np.ndarray  # flat indices into the labels
    old: np.ndarray
    new: np.ndarray
    summary: str = ""

    @property
    def voxels(self) -> int:
        return int(self.idx.size)

    def mask(self, shape) -> np.ndarray:
        """The changed voxels as a boolean volume (for a preview outline)."""
        m = np.zeros(int(np.prod(shape)), bool)
        m[self.idx] = True
        return m.reshape(shape)

    def indices(self, shape) -> tuple[np.ndarray, ...]:
        """(z, y, x) index arrays, as napari's ``Labels.data_setitem`` takes them."""
        return np.unravel_index(self.idx, shape)


@dataclasses.dataclass
class FusionParams:
    alpha: float = DEFAULT_ALPHA
    kidney_threshold: float = DEFAULT_KIDNEY_THRESHOLD
    tumor_threshold: float = DEFAULT_TUMOR_THRESHOLD
    anatomy_check: bool = True


class ReviewSession:
    def __init__(self, result: CascadeResult, params: FusionParams | None = None):
        self.result = result
        self.params = params or FusionParams()
        # what fusion alone gives, and what the anatomy check took out of it
        self.fused, self.removed = result.fuse_and_removed(**dataclasses.asdict(self.params))
        self.labels = self.fused.copy()  # the editable labels (the napari layer's data)
        self.edited = np.zeros(result.shape, bool)  # voxels given a value by hand ...
        self.edit_values = np.zeros(result.shape, np.uint8)  # ... and that value
        self._undo: list[Change] = []
        self._redo: list[Change] = []

    # ------------------------------------------------------------------ live fusion
    def sync_edits(self, z: int | None = None) -> int:
        """Bring the edit memory up to date with ``labels``; returns the voxels differing from the fusion."""
        sl = np.s_[:] if z is None else np.s_[z]
        labels, edited, values = self.labels[sl], self.edited[sl], self.edit_values[sl]
        diff = labels != self.fused[sl]
        # an edited voxel that no longer holds its value was undone or repainted: it stays an edit
        # only if it still differs from the fusion
        edited &= labels == values
        edited |= diff
        np.copyto(values, labels, where=diff)
        return int(diff.sum())

    def set_params(self, alpha=None, kidney_threshold=None, tumor_threshold=None, anatomy_check=None):
        p = self.params
        self.params = FusionParams(
            p.alpha if alpha is None else float(alpha),
            p.kidney_threshold if kidney_threshold is None else float(kidney_threshold),
            p.tumor_threshold if tumor_threshold is None else float(tumor_threshold),
            p.anatomy_check if anatomy_check is None else bool(anatomy_check),
        )

    def refuse_slice(self, z: int) -> np.ndarray:
        """Re-fuse one slice with the current parameters, keeping its hand edits; returns the slice."""
        self.sync_edits(z)
        new = self.result.fuse(**dataclasses.asdict(self.params), z=z)
        self.fused[z] = new
        keep = self.edited[z]
        self.labels[z] = np.where(keep, self.labels[z], new)
        return self.labels[z]

    def apply_fusion(self, fused: np.ndarray, removed: np.ndarray | None = None) -> None:
        """Swap in a whole-volume fusion (computed elsewhere, e.g. in a worker thread), keeping edits;
        ``removed``: what the anatomy check took out of it (:meth:`CascadeResult.fuse_and_removed`).

        Edits made while that fusion was computed are found here, against the previous fusion.
        """
        self.sync_edits()
        self.fused = fused
        self.removed = removed
        np.copyto(self.labels, fused, where=~self.edited)

    @property
    def hand_edited_voxels(self) -> int:
        """Voxels whose label differs from the fusion (what the Review box and the export report)."""
        return self.sync_edits()

    # ------------------------------------------------------------------ correction tools (undoable)
    def _change(self, name: str, new: np.ndarray, summary: str = "") -> Change:
        idx = np.flatnonzero(new != self.labels)
        return Change(name, idx, self.labels.ravel()[idx].copy(), new.ravel()[idx].copy(), summary)

    def apply_change(self, change: Change) -> int:
        """Apply a planned change on the session's own undo stack; returns the voxels changed."""
        if not change.voxels:
            return 0
        self._undo.append(change)
        self._redo.clear()
        self.labels.ravel()[change.idx] = change.new
        return change.voxels

    def undo(self) -> str | None:
        if not self._undo:
            return None
        change = self._undo.pop()
        self.labels.ravel()[change.idx] = change.old
        self._redo.append(change)
        return change.name

    def redo(self) -> str | None:
        if not self._redo:
            return None
        change = self._redo.pop()
        self.labels.ravel()[change.idx] = change.new
        self._undo.append(change)
        return change.name

    def _ml(self, n_voxels) -> float:
        return float(n_voxels) * float(np.prod(self.result.spacing)) / 1000.0

    def plan_remove_islands(self, min_ml: float) -> Change:
        """Drop connected kidney+tumor regions (26-connected) smaller than ``min_ml``."""
        self.sync_edits()
        lab, n = ndimage.label(self.labels > 0, structure=_STRUCT_3D)
        new = self.labels.copy()
        if n:
            ml = np.bincount(lab.ravel())[1:] * np.prod(self.result.spacing) / 1000.0
            small = np.flatnonzero(ml < min_ml) + 1
            lut = np.zeros(n + 1, bool)
            lut[small] = True
            new[lut[lab]] = BACKGROUND
            summary = f"removes {len(small)} region(s) under {min_ml:g} mL, {ml[small - 1].sum():.1f} mL in all"
        else:
            summary = "no region to remove"
        return self._change(f"remove islands < {min_ml:g} mL", new, summary)

    def remove_islands(self, min_ml: float) -> int:
        return self.apply_change(self.plan_remove_islands(min_ml))

    def plan_keep_kidneys(self) -> Change:
        """Keep one kidney per side, chosen by anatomy: the anatomy check's verdict on the current
        labels (side of the spine, position behind its front edge, the kidney atlas, size), not the
        largest region; what it removes is listed in the summary."""
        self.sync_edits()
        verdict = anatomy.check_anatomy(self.labels, self.result.spacing, self.result.spine)
        new = verdict.apply(self.labels)
        lines = verdict.summary()
        return self._change("keep kidneys by anatomy", new, "; ".join(lines) if lines else "nothing to remove")

    def plan_fill_holes(self) -> Change:
        """Fill enclosed holes in each slice: inside tumor with tumor, elsewhere with kidney."""
        self.sync_edits()
        new = self.labels.copy()
        for z in np.flatnonzero(self.labels.reshape(self.labels.shape[0], -1).any(1)):
            for value in (KIDNEY, TUMOR):
                region = self.labels[z] >= value
                holes = ndimage.binary_fill_holes(region) & ~region
                new[z][holes & (new[z] < value)] = value
        ch = self._change("fill holes", new)
        ch.summary = f"fills {self._ml(ch.voxels):.1f} mL of holes"
        return ch

    def fill_holes(self) -> int:
        return self.apply_change(self.plan_fill_holes())

    def _connected(self, mask: np.ndarray, z: int, y: int, x: int) -> np.ndarray:
        """The 26-connected region of ``mask`` holding the voxel."""
        lab, _ = ndimage.label(mask, structure=_STRUCT_3D)
        return lab == lab[z, y, x]

    def plan_region_edit(self, z: int, y: int, x: int, action: str) -> Change:
        """Edit the region under a clicked voxel.

        ``delete``: the connected kidney+tumor region; ``tumor`` / ``kidney`` / ``cyst``: the
        connected region of the clicked voxel's own label becomes tumor / kidney / a KiTS23 cyst (a
        tumor inside a kidney is its own region, so a click on it never turns the whole kidney into
        tumor); ``swap``: kidney <-> tumor for that region.
        """
        self.sync_edits()
        z, y, x = (int(v) for v in (z, y, x))
        if not all(0 <= v < n for v, n in zip((z, y, x), self.labels.shape)):
            raise KidsegError("the click is outside the volume")
        value = int(self.labels[z, y, x])
        if value == BACKGROUND:
            raise KidsegError(f"no kidney or tumor at slice {z}, row {y}, column {x}: click inside a region")
        new = self.labels.copy()
        if action == "delete":
            region = self._connected(self.labels > 0, z, y, x)
            new[region] = BACKGROUND
            what = "kidney+tumor region"
        else:
            swap = TUMOR if value == KIDNEY else KIDNEY
            target = {"tumor": TUMOR, "kidney": KIDNEY, "cyst": CYST, "swap": swap}[action]
            region = self._connected(self.labels == value, z, y, x)
            new[region] = target
            what = f"{KITS23_LABEL_NAMES[value]} region -> {KITS23_LABEL_NAMES[target]}"
        n = int(region.sum())
        names = {"delete": "delete region", "tumor": "make tumor", "kidney": "make kidney", "cyst": "make cyst",
                 "swap": "kidney <-> tumor"}  # fmt: skip
        return self._change(names[action], new, f"{what}, {self._ml(n):.1f} mL")

    def relabel_region(self, z: int, y: int, x: int) -> int:
        """Swap kidney <-> tumor for the connected region of the voxel's label (3D)."""
        return self.apply_change(self.plan_region_edit(z, y, x, "swap"))

    def region_table(self) -> list[dict]:
        """The connected kidney+tumor regions of the labels: what the widget's table lists.

        One row per 26-connected region, largest first: label(s) it holds, side of the patient
        (from the spine when one was found, else the image centre), mL, slice range, a voxel to jump
        to, and whether the anatomy check flagged it.
        """
        crop = bounding_box(self.labels > 0, pad=1)  # all below on the labelled voxels' box
        if crop is None:
            return []
        lab, n = ndimage.label(self.labels[crop] > 0, structure=_STRUCT_3D)
        oz, oy, ox = (c.start for c in crop)
        sp = self.result.spacing
        counts = np.bincount(lab.ravel())[1:]
        tumor = np.bincount(lab.ravel(), weights=(self.labels[crop] == TUMOR).ravel())[1:]
        boxes = ndimage.find_objects(lab)
        midline = anatomy.midline_mm(self.result.spine, self.labels.shape, sp)
        verdict = self.result.verdict
        flagged = np.zeros(n + 1, bool)
        if verdict is not None and self.params.anatomy_check:
            removed = self.removed_by_anatomy()[crop] > 0  # of the last whole-volume fusion: no fusion here
            near = ndimage.binary_dilation(removed, structure=_STRUCT_3D) & (lab > 0)
            flagged[np.unique(lab[near])] = True
        rows = []
        for i in np.argsort(-counts):
            box = boxes[i]
            sub = lab[box] == i + 1
            zz, yy, xx = np.nonzero(sub)
            zz, yy, xx = zz + box[0].start + oz, yy + box[1].start + oy, xx + box[2].start + ox  # whole volume
            k = len(zz) // 2
            z, y, x = int(zz[k]), int(yy[k]), int(xx[k])
            cx = xx.mean() * sp[2]
            mid = midline[int(round(zz.mean()))]
            side = "left" if cx > mid else "right"  # LPS: +x is the patient's left
            kind = "tumor" if tumor[i] == counts[i] else ("kidney+tumor" if tumor[i] else "kidney")
            rows.append(
                {
                    "region": int(i + 1),
                    "label": kind,
                    "side": side,
                    "ml": self._ml(counts[i]),
                    "tumor_ml": self._ml(tumor[i]),
                    "slices": (int(box[0].start + oz), int(box[0].stop - 1 + oz)),
                    "voxel": (z, y, x),
                    "flagged": bool(flagged[i + 1]),
                }
            )
        return rows

    def removed_by_anatomy(self) -> np.ndarray:
        """Labels the anatomy check removed from the last whole-volume fusion (0 elsewhere): the
        *removed by anatomy check* layer."""
        if not self.params.anatomy_check or self.removed is None:
            return np.zeros(self.result.shape, np.uint8)
        return self.removed

    def restore_removed_region(self, z: int, y: int, x: int) -> int:
        """Give back the region the anatomy check removed at this voxel, as a hand edit (so it stays
        through later fusions; Undo takes it back)."""
        return self.apply_change(self.plan_restore_removed_region(z, y, x))

    def plan_restore_removed_region(self, z: int, y: int, x: int) -> Change:
        self.sync_edits()
        verdict = self.result.verdict
        region = verdict.region_at((z, y, x)) if verdict is not None and self.params.anatomy_check else None
        if region is None:
            raise KidsegError("click on a region outlined in 'removed by anatomy check' to restore it")
        removed = self.removed_by_anatomy()
        mask = (verdict.removal_map() == region.id) & (removed > 0)
        new = self.labels.copy()
        new[mask] = removed[mask]
        return self._change(
            f"restore {region.volume_ml:.1f} mL removed by the anatomy check", new, f"restores {region.describe()}"
        )

    def interpolate_slices(self, z0: int, z1: int) -> int:
        return self.apply_change(self.plan_interpolate_slices(z0, z1))

    def plan_interpolate_slices(self, z0: int, z1: int) -> Change:
        """Replace the slices strictly between z0 and z1 by shape-based interpolation of each label
        (the widget shows the change as an outline before it is applied)."""
        self.sync_edits()
        z0, z1 = sorted((int(z0), int(z1)))
        new = self.labels.copy()
        if z1 - z0 < 2:
            return self._change(f"interpolate slices {z0}-{z1}", new, "nothing between those slices")
        a, b = self.labels[z0], self.labels[z1]
        for value in (KIDNEY, TUMOR):  # tumor last, so it lies on top of kidney
            da, db = _signed_distance(a >= value), _signed_distance(b >= value)
            for z in range(z0 + 1, z1):
                w = (z - z0) / (z1 - z0)
                inside = (1 - w) * da + w * db < 0
                if value == KIDNEY:
                    new[z] = np.where(inside, KIDNEY, 0)
                else:
                    new[z][inside] = TUMOR
        ch = self._change(f"interpolate slices {z0}-{z1}", new)
        ch.summary = f"changes {self._ml(ch.voxels):.1f} mL on slices {z0 + 1}-{z1 - 1}"
        return ch

    # ------------------------------------------------------------------ navigation
    def doubtful_slices(self, by: str = "disagreement") -> np.ndarray:
        """Slice indices, most doubtful first: where coarse and refined disagree most, or where the
        fused kidney+tumor probability is least certain (closest to 0.5)."""
        r = self.result
        score = np.zeros(r.shape[0])
        if by == "disagreement":
            for z, region in r.refined.items():
                c = r.coarse_meta[z][region.window][region.covered].astype(np.int16)
                f = region.meta[region.covered].astype(np.int16)
                score[z] = np.abs(c - f).sum() / 255.0 * np.prod(r.spacing[1:]) / 100.0  # cm^2 of disagreement
        elif by == "uncertainty":
            m = r.coarse_meta.reshape(r.shape[0], -1)
            unsure = (m > 50) & (m < 205)  # p between 0.2 and 0.8
            score = unsure.sum(1) * np.prod(r.spacing[1:]) / 100.0
        else:
            raise ValueError(by)
        order = np.argsort(-score, kind="stable")
        return order[score[order] > 0]

    def disagreement_map(self) -> np.ndarray:
        """Voxels where the coarse and refined labels differ (inside the refine patches)."""
        p = self.params
        coarse = self.result.coarse_labels(p.kidney_threshold, p.tumor_threshold)
        refined = self.result.refined_labels(p.kidney_threshold, p.tumor_threshold)
        return ((coarse != refined) & self.result.patch_coverage()).astype(np.uint8)


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return np.full(mask.shape, 1e6)
    # measured from the boundary between voxels (half a voxel out from the centres), so a shape
    # interpolated with itself stays the same shape
    return np.where(mask, 0.5 - ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask) - 0.5)


# ------------------------------------------------------------------ export of corrections
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
    import hashlib

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
) -> Path:
    """Write one corrected case in KiTS layout under ``root`` and add it to ``root/manifest.json``.

    One case per scan: when the manifest already holds this scan (same voxels and spacing),
    ``update=None`` raises :class:`ScanAlreadyExported`; ``update=True`` rewrites that case's labels
    (the CT is not copied again) and its manifest entry; ``update=False`` exports a second copy on
    purpose. Never overwrites another case. Files are written atomically and the manifest last,
    so a failed export leaves no half-registered case. ``reviewed_slices``: the slice indices the
    radiologist touched or confirmed (fine-tuning trains on those alone unless
    ``whole_case_reviewed``).
    """
    from .models import file_sha256

    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KidsegError(f"cannot create the corrections folder ({exc.strerror})", root) from None
    manifest_path = root / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"cases": []}
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
    with files.atomic_path(manifest_path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return case_dir


DICOM_SEG_NAME = "segmentation.seg.dcm"


def _export_dicom_seg(case_dir: Path, ct: volumes.Volume, labels: np.ndarray, checkpoints: dict) -> dict:
    """A CT read from a DICOM series gets its labels as a DICOM SEG too (for PACS); a series that
    cannot carry one (anonymised without UIDs, a missing slice) gets the reason in the manifest."""
    from .dicom_seg import write_dicom_seg

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
    from .models import read_config

    try:
        return read_config(path).version
    except KidsegError:
        return "unknown"
