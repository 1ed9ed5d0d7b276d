"""A radiologist's review of one cascade result: live fusion that keeps hand edits, correction
tools with undo/redo, measurements and navigation to doubtful slices (the export of corrections is
:mod:`napari_kidseg.review.corrections_folder`'s).

GUI-free: the napari widget holds one :class:`ReviewSession` and only moves data between it and
its layers.

Hand edits are stored as what the user set: a mask of user-set voxels and the label given to
each (painted, erased, or set by a tool). The labels shown are always the fusion of the current
sliders with those voxels laid over it, so a slider move never touches an edit and never turns an
old fusion's voxel into one. Undo and redo restore the edit state (which voxels are set, to
what), not old label values: an undone edit leaves the labels exactly as if it had never been
made, whatever the sliders did in between. Painting done outside the session (napari's brush
writes into ``labels``) is found as the voxels that differ from what the session showed, and
recorded as one undoable hand edit. The edit count is the voxels the user set.

Reviewed slices (marked, or in view when an edit was made) are frozen against the sliders: a fusion
changes them only when asked (``keep_reviewed = False``); ``case_reviewed`` freezes them all. Each
reason a slice is frozen for (the mark, each edit made in view of it, the whole case) keeps the
fusion of its own moment, and the slice lies over the earliest reason still in effect: undoing the
edit that first froze a slice leaves it as a later mark froze it, as if the edit had never been.

Every correction tool is split in two: ``plan_*`` computes a :class:`Change` (which voxels, old
and new labels, and what it does in words and mL) without touching the labels, so the widget can
preview it, compute it in a worker and apply it through napari's own undo history; the
un-prefixed method applies it at once on the session's undo stack (the CLI, scripts and tests).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy import ndimage

from .. import anatomy
from ..cascade import CascadeResult
from ..errors import KidsegError
from ..fusion import DEFAULT_ALPHA, DEFAULT_CONTRAST_TUMOR, DEFAULT_KIDNEY_THRESHOLD, DEFAULT_TUMOR_THRESHOLD
from ..labels import BACKGROUND, CYST, KIDNEY, KITS23_LABEL_NAMES, TUMOR
from ..metrics import bounding_box

_STRUCT_3D = np.ones((3, 3, 3), bool)
SPLIT_SEED_MM = 4.0  # Split off: how far around each click the watershed is seeded


@dataclasses.dataclass
class Change:
    """A planned correction: flat voxel indices with their old and new labels.

    Applied, every voxel in it becomes user-set to its new label; ``seen``: the slice in view when
    the user applied it (it counts as reviewed; undo takes that back too)."""

    name: str
    idx: np.ndarray  # flat indices into the labels
    old: np.ndarray
    new: np.ndarray
    summary: str = ""
    seen: int | None = None
    # the edit state it replaced (user-set or not, and the value), so that undo gives back exactly that
    _was: tuple | None = dataclasses.field(default=None, init=False, repr=False)
    # which application this is (a redo is a new one): the key of the freeze its ``seen`` holds
    _applied: int | None = dataclasses.field(default=None, init=False, repr=False)

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
    contrast_tumor: bool = DEFAULT_CONTRAST_TUMOR


class ReviewSession:
    def __init__(self, result: CascadeResult, params: FusionParams | None = None):
        self.result = result
        self.params = params or FusionParams()
        # what fusion alone gives (always of the current sliders), and what the anatomy check took out of it
        self.fused, self.removed = result.fuse_and_removed(**dataclasses.asdict(self.params))
        self.labels = self.fused.copy()  # what is shown and edited (the napari layer's data)
        self.edited = np.zeros(result.shape, bool)  # voxels the user set ...
        self.edit_values = np.zeros(result.shape, np.uint8)  # ... and the label each was given
        self.reviewed: set[int] = set()  # slices the user marked reviewed (the widget adds to it)
        self.keep_reviewed = True  # reviewed slices keep the fusion they were reviewed on
        self.case_reviewed = False  # the whole case is reviewed: every slice is kept
        self._frozen: dict[int, np.ndarray] = {}  # slice -> the fusion it lies over (its earliest reason's)
        self._freezes: dict[int, dict[tuple, tuple[int, np.ndarray]]] = {}  # slice -> reason -> (order, fusion)
        self._order = itertools.count()  # when each freeze (and each application of a change) began
        self._undo: list[Change] = []
        self._redo: list[Change] = []
        self.revision = 0  # counts every change of the edit state (an edit, an undo, a redo): "edited since?"

    # ------------------------------------------------------------------ the edit state
    def _slab(self, z) -> tuple[int, int]:
        n = self.labels.shape[0]
        if z is None:
            return 0, n
        if isinstance(z, tuple):
            return max(0, int(z[0])), min(n, int(z[1]))
        return int(z), int(z) + 1

    def _base(self, z0: int, z1: int) -> np.ndarray:
        """What the edits lie over on slices z0..z1-1: the fusion, or a frozen slice's own."""
        base = self.fused[z0:z1]
        frozen = [z for z in self._frozen if z0 <= z < z1]
        if frozen:
            base = base.copy()
            for z in frozen:
                base[z - z0] = self._frozen[z]
        return base

    def _base_at(self, idx: np.ndarray) -> np.ndarray:
        base = self.fused.ravel()[idx]
        if self._frozen:
            plane = self.labels[0].size
            zs = idx // plane
            for z in np.intersect1d(np.unique(zs), list(self._frozen)):
                m = zs == z
                base[m] = self._frozen[int(z)].ravel()[idx[m] - int(z) * plane]
        return base

    def shown(self, z=None) -> np.ndarray:
        """What the labels must be (the fusion with the user-set voxels over it), whole volume or
        slice(s) ``z`` (an int or a (first, stop) pair)."""
        z0, z1 = self._slab(z)
        return np.where(self.edited[z0:z1], self.edit_values[z0:z1], self._base(z0, z1))

    def frozen_slices(self) -> list[int]:
        """The slices a fusion leaves as they are (reviewed, while ``keep_reviewed``)."""
        return sorted(self._frozen)

    def _freeze_reasons(self) -> dict[int, set[tuple]]:
        """Why each slice is frozen now: ``("case",)``, ``("marked",)``, ``("edit", k)`` (the k-th
        application of a change made in view of it); none while reviewed slices follow the sliders."""
        n = self.labels.shape[0]
        reasons: dict[int, set[tuple]] = {}
        if not self.keep_reviewed:
            return reasons
        if self.case_reviewed:
            for z in range(n):
                reasons[z] = {("case",)}
        for z in self.reviewed:
            if 0 <= int(z) < n:
                reasons.setdefault(int(z), set()).add(("marked",))
        for c in self._undo:
            if c.seen is not None and 0 <= c.seen < n:
                reasons.setdefault(c.seen, set()).add(("edit", c._applied))
        return reasons

    def _update_frozen(self) -> None:
        """Freeze a slice for each new reason on the fusion of this moment, drop the reasons gone,
        and lay each slice over its earliest reason's fusion (the current fusion once none is left),
        under its edits."""
        reasons = self._freeze_reasons()
        for z in set(self._freezes) | set(reasons):
            had, why = self._freezes.get(z, {}), reasons.get(z, set())
            if why == had.keys():
                continue
            kept = {r: had[r] for r in why & had.keys()}
            if why - had.keys():
                now = self.fused[z].copy()
                # an equal fusion is shared, so reasons that agree keep one copy
                now = next((f for _, f in kept.values() if np.array_equal(f, now)), now)
                for r in sorted(why - had.keys()):
                    kept[r] = (next(self._order), now)
            if kept:
                self._freezes[z] = kept
            else:
                del self._freezes[z]
            base = min(kept.values(), key=lambda of: of[0])[1] if kept else None
            if base is self._frozen.get(z):
                continue
            if base is None:
                del self._frozen[z]
                base = self.fused[z]
            elif z not in self._frozen:  # newly frozen: it shows this fusion already
                self._frozen[z] = base
                continue
            else:
                self._frozen[z] = base
            self.labels[z] = np.where(self.edited[z], self.edit_values[z], base)

    def reviewed_slices(self) -> set[int]:
        """Slices the user looked at or edited: marked reviewed, or in view when an edit (still
        in effect) was made; not every slice a tool happened to touch."""
        return {int(z) for z in self.reviewed} | {c.seen for c in self._undo if c.seen is not None}

    def _push(self, change: Change) -> None:
        """Make the change's voxels user-set to its new labels (remembering the state it replaces)
        and put it on the undo stack."""
        idx = change.idx
        change._was = (self.edited.ravel()[idx].copy(), self.edit_values.ravel()[idx].copy())
        self.edited.flat[idx] = True
        self.edit_values.flat[idx] = change.new
        self.labels.flat[idx] = change.new
        change._applied = next(self._order)
        self._undo.append(change)
        self.revision += 1
        self._update_frozen()

    def _revert(self, change: Change) -> None:
        """Give the change's voxels back the edit state they had; it is off the undo stack already."""
        was_edited, was_value = change._was
        idx = change.idx
        self.edited.flat[idx] = was_edited
        self.edit_values.flat[idx] = was_value
        self.revision += 1
        self._update_frozen()
        self.labels.flat[idx] = np.where(was_edited, was_value, self._base_at(idx))

    def sync_edits(self, z=None, seen: int | None = None) -> int:
        """Record what was painted into ``labels`` outside the session (napari's brush, eraser, fill)
        as one undoable hand edit: the voxels that differ from what the session showed. ``z``: only
        those slice(s) (an int or a (first, stop) pair); ``seen``: the slice in view (reviewed).
        Returns the voxels recorded."""
        z0, z1 = self._slab(z)
        shown = self.shown((z0, z1))
        diff = self.labels[z0:z1] != shown
        n = int(np.count_nonzero(diff))
        if n:
            idx = np.flatnonzero(diff) + z0 * self.labels[0].size
            self._push(Change("paint by hand", idx, shown[diff], self.labels[z0:z1][diff], seen=seen))
            self._redo.clear()
        self._update_frozen()
        return n

    def load_labels(self, labels: np.ndarray) -> int:
        """Labels corrected earlier (a worklist's autosave, which keeps labels only): the voxels that
        differ from this fusion become the user-set ones, not undoable. Returns their count."""
        self.labels[...] = labels
        n = self.sync_edits()
        self._undo.clear()
        self._redo.clear()
        self._update_frozen()  # edits made in view before are gone, and so are their freezes
        return n

    @property
    def hand_edited_voxels(self) -> int:
        """Voxels the user set (painted, erased, or by a tool), whatever the fusion says there
        (what the Review box and the export report)."""
        self.sync_edits()
        return int(np.count_nonzero(self.edited))

    # ------------------------------------------------------------------ live fusion
    def set_params(
        self, alpha=None, kidney_threshold=None, tumor_threshold=None, anatomy_check=None, contrast_tumor=None
    ):
        p = self.params
        self.params = FusionParams(
            p.alpha if alpha is None else float(alpha),
            p.kidney_threshold if kidney_threshold is None else float(kidney_threshold),
            p.tumor_threshold if tumor_threshold is None else float(tumor_threshold),
            p.anatomy_check if anatomy_check is None else bool(anatomy_check),
            p.contrast_tumor if contrast_tumor is None else bool(contrast_tumor),
        )

    def refuse_slice(self, z: int) -> np.ndarray:
        """Re-fuse one slice with the current parameters, keeping its hand edits (and a reviewed
        slice as it was reviewed); returns the slice."""
        z = int(z)
        self.sync_edits(z)  # the slice only: a slider move stays fast on a 600-slice scan
        self.fused[z] = self.result.fuse(**dataclasses.asdict(self.params), z=z)
        if z not in self._frozen:
            self.labels[z] = np.where(self.edited[z], self.edit_values[z], self.fused[z])
        return self.labels[z]

    def apply_fusion(self, fused: np.ndarray, removed: np.ndarray | None = None) -> None:
        """Swap in a whole-volume fusion (computed elsewhere, e.g. in a worker thread), keeping edits
        and reviewed slices; ``removed``: what the anatomy check took out of it
        (:meth:`CascadeResult.fuse_and_removed`).

        Painting done while that fusion was computed is recorded here, against what was shown.
        """
        self.sync_edits()
        self.fused = fused
        self.removed = removed
        follow = ~self.edited
        if self._frozen:
            follow[list(self._frozen)] = False
        np.copyto(self.labels, fused, where=follow)

    def set_keep_reviewed(self, keep: bool, case_reviewed: bool | None = None) -> None:
        """Whether reviewed slices (``case_reviewed``: all slices) are kept against the sliders;
        slices no longer kept take the current fusion under their edits at once."""
        self.sync_edits()
        self.keep_reviewed = bool(keep)
        if case_reviewed is not None:
            self.case_reviewed = bool(case_reviewed)
        self._update_frozen()

    # ------------------------------------------------------------------ correction tools (undoable)
    def _change(self, name: str, new: np.ndarray, summary: str = "") -> Change:
        idx = np.flatnonzero(new != self.labels)
        return Change(name, idx, self.labels.ravel()[idx].copy(), new.ravel()[idx].copy(), summary)

    def plan_set(self, idx, values, name: str = "set voxels") -> Change:
        """Set voxels (flat indices) to labels as the user's, also where they hold that label now
        (edits carried over to another result, an edit replayed)."""
        idx = np.asarray(idx, np.int64)
        new = np.broadcast_to(np.asarray(values, np.uint8), idx.shape).copy()
        return Change(name, idx, self.labels.ravel()[idx].copy(), new, f"{self._ml(idx.size):.1f} mL")

    def apply_change(self, change: Change, seen: int | None = None) -> int:
        """Apply a planned change on the session's own undo stack; returns the voxels changed.
        ``seen``: the slice in view (it counts as reviewed). A change planned on labels that have
        changed since is refused (plan it again)."""
        if not change.voxels:
            return 0
        self.sync_edits()
        if not np.array_equal(self.labels.ravel()[change.idx], change.old):
            raise KidsegError(f"{change.name}: the labels changed since it was computed; run it again")
        if seen is not None:
            change.seen = int(seen)
        self._push(change)
        self._redo.clear()
        return change.voxels

    def undo(self) -> str | None:
        """Take back the last edit: its voxels get back the state they had (user-set to the same
        label, or the current fusion's)."""
        self.sync_edits()
        if not self._undo:
            return None
        change = self._undo.pop()
        self._revert(change)
        self._redo.append(change)
        return change.name

    def redo(self) -> str | None:
        self.sync_edits()
        if not self._redo:
            return None
        change = self._redo.pop()
        self._push(change)
        return change.name

    def _ml(self, n_voxels) -> float:
        return float(n_voxels) * float(np.prod(self.result.spacing)) / 1000.0

    def _slices_text(self, z0: int, z1: int) -> str:
        """A slice range as a radiologist reads it: slice numbers (napari's), then mm along the scan."""
        dz = float(self.result.spacing[0])
        return anatomy.slices_text(z0, z1, dz)

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
        """Keep one kidney per side, chosen by anatomy: first what the anatomy check rejects on the
        current labels goes (side of the spine, position behind its front edge, the kidney atlas,
        size), then of what is left on each side of the midline only the largest connected
        kidney+tumor region stays (a second region near a kidney, which the check lets pass as a
        fragment, goes too); what it removes is listed in the summary."""
        self.sync_edits()
        sp = self.result.spacing
        verdict = anatomy.check_anatomy(self.labels, sp, self.result.spine)
        new = verdict.apply(self.labels)
        lines = verdict.summary()
        crop = bounding_box(new > 0, pad=1)
        if crop is not None:
            lab, n = ndimage.label(new[crop] > 0, structure=_STRUCT_3D)
            if n > 1:
                zz, _, xx = np.nonzero(lab)
                r = lab[lab > 0]  # the same (C) order as np.nonzero
                counts = np.bincount(r, minlength=n + 1)
                safe = np.maximum(counts, 1)
                cz = np.round(np.bincount(r, weights=zz + crop[0].start, minlength=n + 1) / safe).astype(int)
                cx = np.bincount(r, weights=(xx + crop[2].start) * sp[2], minlength=n + 1) / safe
                mid = anatomy.midline_mm(self.result.spine, self.labels.shape, sp)
                left = cx > mid[np.clip(cz, 0, len(mid) - 1)]  # LPS: +x is the patient's left
                boxes = ndimage.find_objects(lab)
                gone = np.zeros(n + 1, bool)
                for side, on in (("right", ~left), ("left", left)):
                    members = [m for m in range(1, n + 1) if on[m]]
                    main = max(members, key=lambda m: counts[m], default=None)
                    for m in members:
                        if m != main:
                            gone[m] = True
                            box = boxes[m - 1]
                            lines.append(
                                f"a second region on the {side} side: {self._ml(counts[m]):.1f} mL, "
                                f"{self._slices_text(box[0].start + crop[0].start, box[0].stop - 1 + crop[0].start)}"
                            )
                if gone.any():
                    new[crop][gone[lab]] = BACKGROUND
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
        """The 26-connected region of ``mask`` holding the voxel (labelled on the mask's box: a
        fraction of the volume, the same region; the whole volume took 0.23 s of a click)."""
        box = bounding_box(mask, pad=1)
        lab, _ = ndimage.label(mask[box], structure=_STRUCT_3D)
        region = np.zeros(mask.shape, bool)
        region[box] = lab == lab[z - box[0].start, y - box[1].start, x - box[2].start]
        return region

    def plan_region_edit(self, z: int, y: int, x: int, action: str) -> Change:
        """Edit the region under a clicked voxel.

        ``delete``: the connected region of the clicked voxel's own label (a click on a false
        tumor leaves its kidney); ``delete component``: the whole connected kidney+tumor region;
        ``tumor`` / ``kidney`` / ``cyst``: the connected region of the clicked voxel's own label
        becomes tumor / kidney / a KiTS23 cyst (a tumor inside a kidney is its own region, so a
        click on it never turns the whole kidney into tumor); ``swap``: kidney <-> tumor for that
        region. A region joined to another of the same label is separated first with
        :meth:`plan_cut`.
        """
        self.sync_edits()
        z, y, x = (int(v) for v in (z, y, x))
        if not all(0 <= v < n for v, n in zip((z, y, x), self.labels.shape)):
            raise KidsegError("the click is outside the volume")
        value = int(self.labels[z, y, x])
        if value == BACKGROUND:
            raise KidsegError(f"no kidney or tumor at slice {z}, row {y}, column {x}: click inside a region")
        new = self.labels.copy()
        if action == "delete component":
            region = self._connected(self.labels > 0, z, y, x)
            new[region] = BACKGROUND
            what = "kidney+tumor region"
        elif action == "delete":
            region = self._connected(self.labels == value, z, y, x)
            new[region] = BACKGROUND
            what = f"{KITS23_LABEL_NAMES[value]} region"
        else:
            swap = TUMOR if value == KIDNEY else KIDNEY
            target = {"tumor": TUMOR, "kidney": KIDNEY, "cyst": CYST, "swap": swap}[action]
            region = self._connected(self.labels == value, z, y, x)
            new[region] = target
            what = f"{KITS23_LABEL_NAMES[value]} region -> {KITS23_LABEL_NAMES[target]}"
        n = int(region.sum())
        names = {"delete": "delete region", "delete component": "delete kidney+tumor region", "tumor": "make tumor",
                 "kidney": "make kidney", "cyst": "make cyst", "swap": "kidney <-> tumor"}  # fmt: skip
        return self._change(names[action], new, f"{what}, {self._ml(n):.1f} mL")

    def plan_cut(self, z: int, start, end, slab_mm: float = 10.0) -> Change:
        """Separate a region where it joins another: the straight line from ``start`` to ``end``
        ((row, column) on slice ``z``) is cleared through a slab of ``slab_mm`` centred on that
        slice, so the false part becomes its own region, to be clicked away with *delete*.

        A line, not a split by tissue HU: the organs a draft joins to a kidney (liver, spleen,
        bowel) overlap the enhancing kidney's HU in the portal-venous phase, and a line works the
        same in every phase, on any label, and without the CT. The line is 4-connected, so no
        26-connected path crosses it inside the slab; the summary says whether the region fell apart.
        """
        self.sync_edits()
        shape = self.labels.shape
        z = int(z)
        pts = [(int(round(p[0])), int(round(p[1]))) for p in (start, end)]
        if not 0 <= z < shape[0] or not all(0 <= p[0] < shape[1] and 0 <= p[1] < shape[2] for p in pts):
            raise KidsegError("the cut line must lie inside the volume")
        ys, xs = _line_4connected(*pts)
        dz = float(self.result.spacing[0])
        half = int(np.floor(max(float(slab_mm), 0.0) / 2.0 / dz + 1e-9))
        z0, z1 = max(0, z - half), min(shape[0] - 1, z + half)
        wall = np.zeros(shape, bool)
        wall[z0 : z1 + 1, ys, xs] = True
        wall &= self.labels > 0
        new = self.labels.copy()
        new[wall] = BACKGROUND
        sp = self.result.spacing
        length = float(np.hypot((pts[1][0] - pts[0][0]) * sp[1], (pts[1][1] - pts[0][1]) * sp[2]))
        name = f"cut on {self._slices_text(z0, z1)}"
        if not wall.any():
            return self._change(name, new, "the line crosses no region")
        crop = bounding_box(self.labels > 0, pad=1)
        before, _ = ndimage.label(self.labels[crop] > 0, structure=_STRUCT_3D)
        hit = np.unique(before[wall[crop]])
        _, parts = ndimage.label(np.isin(before, hit) & (new[crop] > 0), structure=_STRUCT_3D)
        if parts > len(hit):
            outcome = f"the region falls into {parts} parts: click the false one with delete"
        else:
            outcome = "still joined (beyond the line's ends or the slab): draw a longer line or cut a thicker slab"
        ch = self._change(name, new)
        ch.summary = f"clears {self._ml(ch.voxels):.2f} mL along a {length:.0f} mm line; {outcome}"
        return ch

    def plan_split_off(self, false_voxel, keep_voxel, ct: np.ndarray | None = None) -> Change:
        """Split a false part off the region it joins and delete it: two clicks, one on the false
        part (``false_voxel``, (z, y, x)) and one on the kidney to keep (``keep_voxel``).

        The joined kidney+tumor region is divided by a marker-controlled watershed from the two
        clicks over the CT's edges (``ct``, HU, smoothed over about 1 mm: a cyst, the spleen or
        the liver meet a kidney at an edge of the image), so the division runs along the join in
        3D, however it is tilted to the slices, which a straight cut through a slab does not
        follow. Without a CT, the depth inside the region decides (a join is a neck, thinner than
        the parts it joins); it is not mixed in with a CT, because depth made a click off a part's
        deepest point lose to the other click's basin (a phantom's whole kidney went, with point
        seeds). Where the two clicks' seed balls overlap (clicks under 8 mm apart), the kidney's wins.
        Everything on the false click's side becomes background.
        """
        from skimage.segmentation import watershed

        self.sync_edits()
        shape = self.labels.shape
        a, b = (tuple(int(v) for v in p) for p in (false_voxel, keep_voxel))
        if not all(0 <= v < n for p in (a, b) for v, n in zip(p, shape)):
            raise KidsegError("the click is outside the volume")
        if self.labels[a] == BACKGROUND or self.labels[b] == BACKGROUND:
            raise KidsegError("click inside the false part first, then inside the kidney to keep")
        region = self._connected(self.labels > 0, *a)
        if not region[b]:
            raise KidsegError("the two clicks lie in separate regions: nothing joins them (delete the false one)")
        box = bounding_box(region, pad=2)
        inside = region[box]
        sp = tuple(float(v) for v in self.result.spacing)
        if ct is not None:
            sigma = [1.0 / v for v in sp]  # about 1 mm
            hu = np.clip(np.asarray(ct[box], np.float32), -200.0, 400.0)
            elevation = ndimage.gaussian_gradient_magnitude(ndimage.gaussian_filter(hu, sigma), sigma)
        else:
            elevation = -ndimage.distance_transform_edt(inside, sampling=sp)
        # each click seeds the voxels of the region within 4 mm of it, not the one voxel: a point
        # seed on a slope loses its basin to the other click's flood (5 of 5 click pairs on each
        # of two phantom joins gave the same division with balls; points gave the whole kidney)
        markers = np.zeros(inside.shape, np.int32)
        for value, click in ((1, a), (2, b)):
            centre = [v - s.start for v, s in zip(click, box)]
            reach = [int(SPLIT_SEED_MM // d) for d in sp]
            win = tuple(slice(max(0, c - r), min(n, c + r + 1)) for c, r, n in zip(centre, reach, inside.shape))
            grid = np.ogrid[win]
            ball = sum(((g - c) * d) ** 2 for g, c, d in zip(grid, centre, sp)) <= SPLIT_SEED_MM**2
            markers[win][ball & inside[win]] = value
        basins = watershed(elevation, markers, mask=inside)
        new = self.labels.copy()
        new[box][basins == 1] = BACKGROUND
        ch = self._change("split off", new)
        kept = int(np.count_nonzero(basins == 2))
        ch.summary = f"splits off and deletes {self._ml(ch.voxels):.1f} mL; keeps {self._ml(kept):.1f} mL"
        return ch

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
                    new[z] = np.where(inside, KIDNEY, BACKGROUND)
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


def _line_4connected(p0, p1) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of a 4-connected digital line from p0 to p1 (both included): no
    8-connected path crosses it without touching it."""
    n = 2 * max(abs(p1[0] - p0[0]), abs(p1[1] - p0[1])) + 1
    t = np.linspace(0.0, 1.0, n)
    ys = np.rint(p0[0] + t * (p1[0] - p0[0])).astype(int)
    xs = np.rint(p0[1] + t * (p1[1] - p0[1])).astype(int)
    out = [(ys[0], xs[0])]
    for y, x in zip(ys[1:], xs[1:]):
        py, px = out[-1]
        if (y, x) == (py, px):
            continue
        if y != py and x != px:  # a diagonal step: fill its corner
            out.append((y, px))
        out.append((y, x))
    yy, xx = np.array(out).T
    return yy, xx


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return np.full(mask.shape, 1e6)
    # measured from the boundary between voxels (half a voxel out from the centres), so a shape
    # interpolated with itself stays the same shape
    return np.where(mask, 0.5 - ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask) - 0.5)
