"""A radiologist's review of one cascade result: live fusion that keeps hand edits, correction
tools with undo/redo, measurements, navigation to doubtful slices, and export of corrections.

GUI-free: the napari widget holds one :class:`ReviewSession` and only moves data between it and
its layers.

Hand edits survive slider moves: every fusion first compares the editable labels with what the
last fusion produced there; voxels that differ were painted or erased by hand, and are kept in
an edit mask with their values and re-applied on top of every new fusion.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import io
from .cascade import DEFAULT_ALPHA, DEFAULT_KIDNEY_THRESHOLD, DEFAULT_TUMOR_THRESHOLD, CascadeResult
from .errors import KidsegError
from .fusion import KIDNEY, TUMOR


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
        self.fused = result.fuse(**dataclasses.asdict(self.params))  # what fusion alone gives
        self.labels = self.fused.copy()  # the editable labels (the napari layer's data)
        self.edited = np.zeros(result.shape, bool)
        self._undo: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        self._redo: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []

    # ------------------------------------------------------------------ live fusion
    def sync_edits(self, z: int | None = None) -> int:
        """Record voxels of ``labels`` that differ from the last fusion as hand edits; returns how many."""
        sl = np.s_[:] if z is None else np.s_[z]
        diff = self.labels[sl] != self.fused[sl]
        self.edited[sl] |= diff
        return int(diff.sum())

    def set_params(self, alpha=None, kidney_threshold=None, tumor_threshold=None, anatomy_check=None):
        p = self.params
        self.params = FusionParams(p.alpha if alpha is None else float(alpha),
                                   p.kidney_threshold if kidney_threshold is None else float(kidney_threshold),
                                   p.tumor_threshold if tumor_threshold is None else float(tumor_threshold),
                                   p.anatomy_check if anatomy_check is None else bool(anatomy_check))

    def refuse_slice(self, z: int) -> np.ndarray:
        """Re-fuse one slice with the current parameters, keeping its hand edits; returns the slice."""
        self.sync_edits(z)
        new = self.result.fuse(**dataclasses.asdict(self.params), z=z)
        self.fused[z] = new
        keep = self.edited[z]
        self.labels[z] = np.where(keep, self.labels[z], new)
        return self.labels[z]

    def apply_fusion(self, fused: np.ndarray) -> None:
        """Swap in a whole-volume fusion (computed elsewhere, e.g. in a worker thread), keeping edits.

        Edits made while that fusion was computed are found here, against the previous fusion.
        """
        self.sync_edits()
        self.fused = fused
        np.copyto(self.labels, fused, where=~self.edited)

    @property
    def hand_edited_voxels(self) -> int:
        return int(self.edited.sum())

    # ------------------------------------------------------------------ correction tools (undoable)
    def _apply(self, name: str, new: np.ndarray):
        changed = new != self.labels
        if not changed.any():
            return 0
        idx = np.flatnonzero(changed)
        self._undo.append((name, idx, self.labels.ravel()[idx].copy(), new.ravel()[idx].copy()))
        self._redo.clear()
        self.labels.ravel()[idx] = new.ravel()[idx]
        self.edited.ravel()[idx] = True  # a tool's change is a hand correction, kept across fusions
        return int(idx.size)

    def undo(self) -> str | None:
        if not self._undo:
            return None
        name, idx, old, new = self._undo.pop()
        self.labels.ravel()[idx] = old
        self._redo.append((name, idx, old, new))
        return name

    def redo(self) -> str | None:
        if not self._redo:
            return None
        name, idx, old, new = self._redo.pop()
        self.labels.ravel()[idx] = new
        self._undo.append((name, idx, old, new))
        return name

    def remove_islands(self, min_ml: float) -> int:
        """Drop connected kidney+tumor regions smaller than ``min_ml``."""
        self.sync_edits()
        lab, n = ndimage.label(self.labels > 0)
        if n == 0:
            return 0
        ml = np.bincount(lab.ravel())[1:] * np.prod(self.result.spacing) / 1000.0
        small = np.flatnonzero(ml < min_ml) + 1
        new = self.labels.copy()
        new[np.isin(lab, small)] = 0
        return self._apply(f"remove islands < {min_ml:g} mL", new)

    def keep_largest_per_kidney(self) -> int:
        """Keep the largest kidney+tumor region on each side of the patient."""
        self.sync_edits()
        lab, n = ndimage.label(self.labels > 0)
        if n == 0:
            return 0
        sizes = np.bincount(lab.ravel())[1:]
        cx = np.array([c[2] for c in ndimage.center_of_mass(self.labels > 0, lab, range(1, n + 1))])
        mid = self.labels.shape[2] / 2
        keep = []
        for side in (cx < mid, cx >= mid):
            if side.any():
                keep.append(int(np.flatnonzero(side)[np.argmax(sizes[side])]) + 1)
        new = np.where(np.isin(lab, keep), self.labels, 0).astype(np.uint8)
        return self._apply("keep largest per kidney", new)

    def fill_holes(self) -> int:
        """Fill enclosed holes in each slice: inside tumor with tumor, elsewhere with kidney."""
        self.sync_edits()
        new = self.labels.copy()
        for z in np.flatnonzero(self.labels.reshape(self.labels.shape[0], -1).any(1)):
            for value in (KIDNEY, TUMOR):
                region = self.labels[z] >= value
                holes = ndimage.binary_fill_holes(region) & ~region
                new[z][holes & (new[z] < value)] = value
        return self._apply("fill holes", new)

    def relabel_region(self, z: int, y: int, x: int) -> int:
        """Swap kidney <-> tumor for the connected region of the voxel's label (3D)."""
        self.sync_edits()
        value = int(self.labels[z, y, x])
        if value not in (KIDNEY, TUMOR):
            raise KidsegError("click on a kidney or tumor voxel to relabel its region")
        lab, _ = ndimage.label(self.labels == value)
        new = self.labels.copy()
        new[lab == lab[z, y, x]] = TUMOR if value == KIDNEY else KIDNEY
        return self._apply("kidney <-> tumor", new)

    def removed_by_anatomy(self) -> np.ndarray:
        """Labels the anatomy check removes at the current parameters (0 elsewhere): the
        *removed by anatomy check* layer."""
        p = self.params
        if not p.anatomy_check:
            return np.zeros(self.result.shape, np.uint8)
        raw = self.result.fuse(p.alpha, p.kidney_threshold, p.tumor_threshold, anatomy_check=False)
        kept = self.result.verdict.apply(raw) if self.result.verdict is not None else raw
        return np.where(kept != raw, raw, 0).astype(np.uint8)

    def restore_removed_region(self, z: int, y: int, x: int) -> int:
        """Give back the region the anatomy check removed at this voxel, as a hand edit (so it stays
        through later fusions; Undo takes it back)."""
        self.sync_edits()
        verdict = self.result.verdict
        region = verdict.region_at((z, y, x)) if verdict is not None and self.params.anatomy_check else None
        if region is None:
            raise KidsegError("click on a region outlined in 'removed by anatomy check' to restore it")
        removed = self.removed_by_anatomy()
        mask = (verdict.removal_map() == region.id) & (removed > 0)
        new = self.labels.copy()
        new[mask] = removed[mask]
        return self._apply(f"restore {region.volume_ml:.1f} mL removed by the anatomy check", new)

    def interpolate_slices(self, z0: int, z1: int) -> int:
        """Fill the slices strictly between z0 and z1 by shape-based interpolation of each label."""
        self.sync_edits()
        z0, z1 = sorted((int(z0), int(z1)))
        if z1 - z0 < 2:
            return 0
        new = self.labels.copy()
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
        return self._apply(f"interpolate slices {z0}-{z1}", new)

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


def export_correction(root, ct: io.Volume, labels: np.ndarray, *, case_id: str | None = None,
                      checkpoints: dict | None = None, params: FusionParams | None = None,
                      hand_edited_voxels: int = 0) -> Path:
    """Write one corrected case in KiTS layout under ``root`` and add it to ``root/manifest.json``.

    Never overwrites an existing case: a new id is taken. Files are written atomically and the
    manifest last, so a failed export leaves no half-registered case.
    """
    from .models import file_sha256

    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KidsegError(f"cannot create the corrections folder ({exc.strerror})", root) from None
    manifest_path = root / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"cases": []}
    taken = {c["case"] for c in manifest["cases"]} | {p.name for p in root.glob("case_*")}
    if case_id is None or case_id in taken:
        n = 0
        while f"case_{n:05d}" in taken:
            n += 1
        case_id = f"case_{n:05d}"
    case_dir = io.write_kits_case(root, case_id, ct, labels)
    source = ct.path
    entry = {
        "case": case_id,
        "source": source,
        "source_sha256": file_sha256(source) if source and Path(source).is_file() else None,
        "checkpoints": {k: {"path": str(v), "sha256": file_sha256(v), "version": _ckpt_version(v)}
                        for k, v in (checkpoints or {}).items()},
        "fusion": dataclasses.asdict(params or FusionParams()),
        "hand_edited_voxels": int(hand_edited_voxels),
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest["cases"].append(entry)
    with io.atomic_path(manifest_path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return case_dir


def _ckpt_version(path) -> str:
    from .models import read_config

    try:
        return read_config(path).version
    except KidsegError:
        return "unknown"
