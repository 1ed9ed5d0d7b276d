"""A stateful property test of the review model (issue 25): hypothesis drives a ReviewSession on a
tiny cascade result through painting, erasing, every region tool, the batch tools, undo, redo,
slider moves, the anatomy check on and off, whole-volume re-fusion and reviewed slices, in random
order, and checks after every step:

- every label is in the label set;
- the labels are the fusion with the user-set voxels over it, and once the volume is re-fused
  with the current sliders, that fusion equals a fresh one;
- hand edits (and reviewed slices) survive every slider move and re-fusion;
- the edit state is exactly what the user set: the surviving edits applied in order, and the
  edit count is their voxels;
- an undone edit leaves no trace: labels, edits and count equal a twin that never got it;
- a replay of every operation from scratch gives the same state.

Profiles: ``review-ci`` (the default: 2,000 examples of up to 10 steps, derandomized, so CI is
repeatable and bounded in time) and ``review-fuzz`` (``make fuzz``: random, 20,000 examples of up
to 40 steps). Choose with ``KIDSEG_HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from napari_kidseg import anatomy
from napari_kidseg.cascade import CascadeResult
from napari_kidseg.errors import KidsegError
from napari_kidseg.fusion import RefinedRegion
from napari_kidseg.review.session import FusionParams, ReviewSession

settings.register_profile(
    "review-ci",
    max_examples=2000,
    stateful_step_count=10,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "review-fuzz",
    max_examples=20000,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
PROFILE = os.environ.get("KIDSEG_HYPOTHESIS_PROFILE", "review-ci")

SHAPE = (4, 12, 16)
SPACING = (10.0, 8.0, 8.0)  # 0.64 mL voxels: a 60-voxel blob is kidney-sized for the anatomy check
ACTIONS = ("delete", "delete component", "tumor", "kidney", "cyst", "swap")


def tiny_result(seed: int, spine: bool, cyst: bool) -> CascadeResult:
    """Two kidney-like blobs (one with a tumor), a false blob, noise, and refine patches on some
    slices, all as uint8 probability levels drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = SHAPE
    meta = rng.integers(0, 90, SHAPE).astype(np.uint8)
    tumor = rng.integers(0, 60, SHAPE).astype(np.uint8)
    for x0 in (rng.integers(1, 4), rng.integers(9, 12)):  # right and left kidney
        y0, z0 = rng.integers(2, 6), rng.integers(0, 2)
        meta[z0 : z0 + 3, y0 : y0 + 5, x0 : x0 + 4] = rng.integers(110, 256, (3, 5, 4))
    z, y, x = rng.integers(0, nz), rng.integers(0, ny - 3), rng.integers(0, nx - 3)
    meta[z, y : y + 3, x : x + 3] = rng.integers(100, 256, (3, 3))  # a false region
    tz, ty, tx = rng.integers(0, nz), rng.integers(0, ny - 2), rng.integers(0, nx - 2)
    tumor[tz, ty : ty + 2, tx : tx + 2] = rng.integers(100, 256, (2, 2))
    meta = np.maximum(meta, tumor)  # p(kidney)+p(tumor) >= p(tumor)
    coarse_cyst = None
    if cyst:
        coarse_cyst = np.minimum(rng.integers(0, 200, SHAPE), meta).astype(np.uint8)
    refined = {}
    for z in rng.choice(nz, size=rng.integers(0, 3), replace=False):
        h, w = int(rng.integers(3, 8)), int(rng.integers(3, 8))
        y0, x0 = int(rng.integers(0, ny - h)), int(rng.integers(0, nx - w))
        rm = rng.integers(0, 256, (h, w)).astype(np.uint8)
        rt = np.minimum(rng.integers(0, 256, (h, w)), rm).astype(np.uint8)
        rc = np.minimum(rng.integers(0, 256, (h, w)), rm).astype(np.uint8) if cyst else None
        refined[int(z)] = RefinedRegion(y0, x0, rm, rt, rng.random((h, w)) < 0.8, rc)
    frame = None
    if spine:
        frame = anatomy.SpineFrame(np.full(nz, nx * SPACING[2] / 2), np.full(nz, ny * SPACING[1] * 0.7), 1.0)
    patches = np.zeros(0, dtype=[("roi", "i2"), ("z", "i4"), ("y0", "i4"), ("x0", "i4")])
    return CascadeResult(
        SHAPE, SPACING, meta, tumor, refined, [], patches, 8, spine=frame, coarse_cyst=coarse_cyst
    )  # fmt: skip


def fresh(result: CascadeResult) -> CascadeResult:
    """The same probabilities without the last anatomy verdict (each session fuses its own)."""
    return dataclasses.replace(result, verdict=None)


def do(s: ReviewSession, op: tuple):
    """One user operation, the same for the session under test, its twin and a replay."""
    kind, *a = op
    try:
        if kind == "paint":  # napari's brush or eraser writes into the labels; its paint event syncs
            z, y, x, h, w, value, seen = a
            s.labels[z, y : y + h, x : x + w] = value
            s.sync_edits(z, seen=z if seen else None)
        elif kind == "paint unseen":  # a write nobody reported: found at the next operation
            z, y, x, h, w, value = a
            s.labels[z, y : y + h, x : x + w] = value
        elif kind == "click":
            z, y, x, action = a
            s.apply_change(s.plan_region_edit(z, y, x, action), seen=z)
        elif kind == "cut":
            z, p0, p1, slab = a
            s.apply_change(s.plan_cut(z, p0, p1, slab), seen=z)
        elif kind == "restore":
            s.apply_change(s.plan_restore_removed_region(*a), seen=a[0])
        elif kind == "islands":
            s.apply_change(s.plan_remove_islands(a[0]))
        elif kind == "keep kidneys":
            s.apply_change(s.plan_keep_kidneys())
        elif kind == "fill holes":
            s.apply_change(s.plan_fill_holes())
        elif kind == "interpolate":
            s.apply_change(s.plan_interpolate_slices(*a))
        elif kind == "sync":
            s.sync_edits()
        elif kind == "undo":
            s.undo()
        elif kind == "redo":
            s.redo()
        elif kind == "slider":  # a slider or the anatomy check: the slice in view at once
            name, value, z = a
            s.set_params(**{name: value})
            s.refuse_slice(z)
        elif kind == "whole":  # ... and the volume once the slider rests
            p = s.params
            s.apply_fusion(*s.result.fuse_and_removed(p.alpha, p.kidney_threshold, p.tumor_threshold, p.anatomy_check))
        elif kind == "reviewed":  # Slice reviewed: the widget adds to the session's set
            s.reviewed.add(a[0])
        elif kind == "keep reviewed":
            s.set_keep_reviewed(*a)
        elif kind == "change":  # an edit replayed exactly as it was applied (the twin)
            idx, new, seen = a
            s.apply_change(s.plan_set(idx, new, "replayed"), seen=seen)
        else:
            raise AssertionError(kind)
    except KidsegError as exc:
        return str(exc)
    return None


def state(s: ReviewSession) -> tuple:
    s.sync_edits()
    return s.labels.copy(), s.edited.copy(), np.where(s.edited, s.edit_values, 0), s.reviewed_slices()


def assert_same(a: tuple, b: tuple, what: str):
    for name, x, y in zip(("labels", "user-set voxels", "their labels", "reviewed slices"), a, b):
        same = x == y if isinstance(x, set) else np.array_equal(x, y)
        assert same, f"{what}: {name} differ"


class ReviewMachine(RuleBasedStateMachine):
    @initialize(
        seed=st.integers(0, 2**32 - 1),
        spine=st.booleans(),
        cyst=st.booleans(),
        alpha=st.sampled_from([0.0, 0.4, 1.0]),
        check=st.booleans(),
    )
    def start(self, seed, spine, cyst, alpha, check):
        self.result = tiny_result(seed, spine, cyst)
        self.params = FusionParams(alpha, 0.5, 0.5, check)
        self.labelset = {0, 1, 2, 3} if cyst else {0, 1, 2}
        self.s = ReviewSession(fresh(self.result), self.params)
        self.ops = []  # everything done, for the replay from scratch
        self.log = []  # what the state must come from: ops with undone edits taken out
        self.undo_mirror = []  # the log entries of the session's undo stack, in order
        self.redo_mirror = []
        self.settled = True  # the whole volume is fused with the current sliders
        self.fusions = {}  # fresh fusions by sliders

    def new_session(self) -> ReviewSession:
        return ReviewSession(fresh(self.result), self.params)

    def run(self, op):
        s = self.s
        n_undo = len(s._undo)
        edits_before = (s.edited.copy(), s.edit_values.copy(), s.labels.copy(), s.frozen_slices())
        refused = do(s, op)
        self.ops.append(op)
        kind = op[0]
        if kind == "undo":
            if self.undo_mirror:
                entry = self.undo_mirror.pop()
                del self.log[next(i for i, e in enumerate(self.log) if e is entry)]
                self.redo_mirror.append(entry)
                self.check_twin()
        elif kind == "redo":
            if self.redo_mirror:
                entry = self.redo_mirror.pop()
                self.log.append(entry)
                self.undo_mirror.append(entry)
        else:
            self.absorb(n_undo)
            if kind not in ("paint", "paint unseen", "click", "cut", "restore", "change") and kind not in (
                "islands", "keep kidneys", "fill holes", "interpolate"
            ):  # fmt: skip
                self.log.append(op)
        if kind in ("slider", "whole", "keep reviewed"):
            self.check_edits_survive(edits_before, kind)
        if kind == "slider":  # one slice re-fused: the rest waits for the whole-volume fusion
            self.settled = False
        if kind == "whole":
            self.settled = True
        return refused

    def absorb(self, n_undo: int):
        """Edits the operation put on the session's undo stack (a paint found late included), as
        the exact changes they were: what a twin replays."""
        new = self.s._undo[n_undo:]
        for ch in new:
            entry = ("change", ch.idx.copy(), ch.new.copy(), ch.seen)
            self.log.append(entry)
            self.undo_mirror.append(entry)
        if new:
            self.redo_mirror.clear()

    # ------------------------------------------------------------------ rules
    def _voxel(self, k: int, where: np.ndarray):
        zz, yy, xx = np.nonzero(where)
        if not len(zz):
            return 0, 0, 0
        i = k % len(zz)
        return int(zz[i]), int(yy[i]), int(xx[i])

    @rule(
        z=st.integers(0, SHAPE[0] - 1),
        y=st.integers(0, SHAPE[1] - 1),
        x=st.integers(0, SHAPE[2] - 1),
        h=st.integers(1, 4),
        w=st.integers(1, 4),
        value=st.integers(0, 3),
        seen=st.booleans(),
        late=st.booleans(),
    )
    def paint(self, z, y, x, h, w, value, seen, late):
        value = value if value in self.labelset else 0  # 0: the eraser
        if late:
            self.run(("paint unseen", z, y, x, h, w, value))
        else:
            self.run(("paint", z, y, x, h, w, value, seen))

    @rule(k=st.integers(0, 10**6), action=st.sampled_from(ACTIONS), on_region=st.sampled_from([True] * 3 + [False]))
    def click(self, k, action, on_region):
        if action == "cyst" and 3 not in self.labelset:
            action = "tumor"
        where = self.s.labels > 0 if on_region else np.ones(SHAPE, bool)
        self.run(("click", *self._voxel(k, where), action))

    @rule(
        z=st.integers(0, SHAPE[0] - 1),
        p0=st.tuples(st.integers(0, SHAPE[1] - 1), st.integers(0, SHAPE[2] - 1)),
        p1=st.tuples(st.integers(0, SHAPE[1] - 1), st.integers(0, SHAPE[2] - 1)),
        slab=st.sampled_from([0.0, 10.0, 25.0]),
    )
    def cut(self, z, p0, p1, slab):
        self.run(("cut", z, p0, p1, slab))

    @rule(k=st.integers(0, 10**6))
    def restore(self, k):
        self.run(("restore", *self._voxel(k, self.s.removed_by_anatomy() > 0)))

    @rule(
        tool=st.sampled_from(["islands", "keep kidneys", "fill holes", "interpolate"]),
        ml=st.sampled_from([0.7, 5.0, 40.0]),
        z0=st.integers(0, SHAPE[0] - 1),
        z1=st.integers(0, SHAPE[0] - 1),
    )
    def batch(self, tool, ml, z0, z1):
        op = {"islands": ("islands", ml), "interpolate": ("interpolate", z0, z1)}.get(tool, (tool,))
        self.run(op)

    @precondition(lambda self: self.s._undo)
    @rule()
    def undo(self):
        self.run(("undo",))

    @precondition(lambda self: self.s._redo)
    @rule()
    def redo(self):
        self.run(("redo",))

    @rule(
        name=st.sampled_from(["alpha", "kidney_threshold", "tumor_threshold"]),
        value=st.sampled_from([0.0, 0.2, 0.4, 0.5, 0.7, 1.0]),
        z=st.integers(0, SHAPE[0] - 1),
        whole=st.booleans(),
    )
    def slider(self, name, value, z, whole):
        self.run(("slider", name, value, z))
        if whole:
            self.run(("whole",))

    @rule(on=st.booleans(), z=st.integers(0, SHAPE[0] - 1), whole=st.booleans())
    def anatomy_check(self, on, z, whole):
        self.run(("slider", "anatomy_check", on, z))
        if whole:
            self.run(("whole",))

    @rule()
    def whole_volume(self):
        self.run(("whole",))

    @rule(z=st.integers(0, SHAPE[0] - 1))
    def mark_reviewed(self, z):
        self.run(("reviewed", z))

    @rule(keep=st.booleans(), case=st.booleans())
    def keep_reviewed(self, keep, case):
        self.run(("keep reviewed", keep, case))

    # ------------------------------------------------------------------ invariants
    @invariant()
    def after_every_step(self):
        s = self.s
        n_undo = len(s._undo)
        if s.sync_edits():  # a late paint becomes an edit here, as at the next operation
            self.ops.append(("sync",))
        self.absorb(n_undo)
        assert len(s._undo) == len(self.undo_mirror) and len(s._redo) == len(self.redo_mirror)
        # every label is in the label set
        assert set(np.unique(s.labels).tolist()) <= self.labelset
        # the labels are the fusion under the edits; re-fused with the current sliders, a fresh fusion's
        assert np.array_equal(s.labels, s.shown())
        if self.settled:
            p = s.params
            key = dataclasses.astuple(p)
            if key not in self.fusions:
                self.fusions[key] = fresh(self.result).fuse_and_removed(*key)[0]
            want = self.fusions[key]
            assert np.array_equal(s.fused, want), "the fusion is not the current sliders' fusion"
            follow = ~s.edited
            follow[s.frozen_slices()] = False
            assert np.array_equal(s.labels[follow], want[follow])
        # the edits are exactly what the user set (the surviving edits, in order), and counted so
        mask, values = np.zeros(SHAPE, bool), np.zeros(SHAPE, np.uint8)
        for entry in self.log:
            if entry[0] == "change":
                mask.flat[entry[1]] = True
                values.flat[entry[1]] = entry[2]
        assert np.array_equal(s.edited, mask), "the user-set voxels are not the edits made"
        assert np.array_equal(s.edit_values[mask], values[mask])
        assert s.hand_edited_voxels == int(mask.sum())

    def check_edits_survive(self, before, kind):
        edited, values, labels, frozen = before
        s = self.s
        if kind == "keep reviewed":  # only slices no longer kept may change, and never an edit
            assert np.array_equal(s.labels[edited], labels[edited])
            return
        assert np.array_equal(s.edited, edited) and np.array_equal(s.edit_values[edited], values[edited])
        assert np.array_equal(s.labels[edited], labels[edited]), f"a {kind} changed a hand edit"
        assert np.array_equal(s.labels[frozen], labels[frozen]), f"a {kind} changed a reviewed slice"

    def check_twin(self):
        twin = self.new_session()
        for op in self.log:
            assert do(twin, op) is None or op[0] != "change", "a replayed edit was refused"
        assert_same(state(self.s), state(twin), "after undo, against a twin that never got the edit")

    def teardown(self):
        if not hasattr(self, "s"):
            return
        again = self.new_session()
        for op in self.ops:
            do(again, op)
        assert_same(state(self.s), state(again), "a replay from scratch")


ReviewMachine.TestCase.settings = settings.get_profile(PROFILE)
test_review_model_state_machine = ReviewMachine.TestCase
