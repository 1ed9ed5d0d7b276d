"""Review session: edits survive fusion, correction tools on constructed cases, undo/redo (the export:
tests/test_review_corrections_folder.py)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_kidseg.cascade import CascadeResult
from napari_kidseg.errors import KidsegError
from napari_kidseg.fusion import RefinedRegion
from napari_kidseg.review.session import FusionParams, ReviewSession

# these tests exercise fusion and editing on toy volumes far smaller than a kidney; the
# anatomy check (tests/test_anatomy.py) would rightly remove such regions
NO_CHECK = FusionParams(anatomy_check=False)


def make_result(meta, tumor=None, refined=None, spacing=(2.0, 1.0, 1.0)):
    tumor = np.zeros_like(meta) if tumor is None else tumor
    return CascadeResult(
        meta.shape,
        spacing,
        meta,
        tumor,
        refined or {},
        [],
        np.zeros(0, dtype=[("roi", "i2"), ("z", "i4"), ("y0", "i4"), ("x0", "i4")]),
        16,
    )


def test_hand_edits_survive_threshold_changes():
    meta = np.zeros((3, 20, 20), np.uint8)
    meta[:, 5:15, 5:15] = 160  # p = 0.63
    s = ReviewSession(make_result(meta), NO_CHECK)
    assert s.labels[1, 10, 10] == 1
    s.labels[1, 0:2, 0:2] = 2  # painted tumor
    s.labels[1, 10, 10] = 0  # erased
    s.set_params(kidney_threshold=0.7)  # would remove the whole kidney
    s.refuse_slice(1)
    assert (s.labels[1, 0:2, 0:2] == 2).all() and s.labels[1, 10, 10] == 0
    assert s.labels[1, 6, 6] == 0  # the rest follows the new threshold
    s.apply_fusion(s.result.fuse(0.4, 0.7, 0.5))
    assert s.labels[0, 6, 6] == 0 and (s.labels[1, 0:2, 0:2] == 2).all()
    # counted: the voxels the user set, the erased one too (though the fusion agrees with it at 0.7)
    assert s.hand_edited_voxels == 5
    s.set_params(kidney_threshold=0.5)
    s.apply_fusion(s.result.fuse(0.4, 0.5, 0.5, anatomy_check=False))
    assert s.labels[1, 10, 10] == 0, "an erased voxel must stay erased when the fusion disagrees again"
    assert s.hand_edited_voxels == 5


def test_tools_on_known_cases_with_undo_redo():
    meta = np.zeros((5, 30, 40), np.uint8)
    s = ReviewSession(make_result(meta, spacing=(1.0, 1.0, 1.0)), NO_CHECK)
    s.labels[1:4, 5:15, 3:13] = 1  # right kidney, 300 voxels = 0.3 mL
    s.labels[1:4, 5:15, 25:35] = 1  # left kidney
    s.labels[2, 20, 5] = 1  # a speck
    s.labels[2, 22:24, 30:32] = 1  # a second, smaller region on the left
    assert s.remove_islands(0.002) == 1  # the 1-voxel speck (0.001 mL), not the 4-voxel region
    assert s.labels[2, 20, 5] == 0 and s.labels[2, 22, 30] == 1
    s.labels[2, 8:12, 6:10] = 0  # a hole inside the right kidney
    s.labels[2, 9, 7] = 2
    assert s.fill_holes() == 15
    assert s.labels[2, 10, 8] == 1
    assert s.relabel_region(2, 10, 8) > 0  # the right kidney (connected) becomes tumor
    assert s.labels[1, 5, 3] == 2 and s.labels[2, 10, 30] == 1
    assert s.undo() == "kidney <-> tumor" and s.labels[1, 5, 3] == 1
    assert s.redo() == "kidney <-> tumor" and s.labels[1, 5, 3] == 2
    with pytest.raises(KidsegError):
        s.relabel_region(0, 0, 0)


def test_interpolation_between_two_edited_slices():
    meta = np.zeros((5, 30, 30), np.uint8)
    s = ReviewSession(make_result(meta), NO_CHECK)
    s.labels[0, 10:20, 10:20] = 1  # a 10x10 square
    s.labels[4, 12:18, 12:18] = 1  # a 6x6 square
    assert s.interpolate_slices(0, 4) > 0
    sizes = [int((s.labels[z] == 1).sum()) for z in range(5)]
    assert sizes[0] == 100 and sizes[4] == 36
    assert sizes[0] >= sizes[1] >= sizes[2] >= sizes[3] >= sizes[4]
    assert 36 < sizes[2] < 100  # half way between the two shapes
    s.labels[1:4] = 0
    s.labels[4] = s.labels[0]
    s.interpolate_slices(0, 4)  # between two equal shapes: the same shape
    assert all(np.array_equal(s.labels[z], s.labels[0]) for z in range(5))


def test_doubtful_slices_rank_disagreement():
    meta = np.zeros((4, 20, 20), np.uint8)
    cov = np.ones((10, 10), bool)
    refined = {
        1: RefinedRegion(0, 0, np.full((10, 10), 0, np.uint8), np.zeros((10, 10), np.uint8), cov),
        2: RefinedRegion(0, 0, np.full((10, 10), 200, np.uint8), np.zeros((10, 10), np.uint8), cov),
    }
    s = ReviewSession(make_result(meta, refined=refined), NO_CHECK)
    assert list(s.doubtful_slices("disagreement")) == [2]  # slice 1 agrees (both 0), slice 2 does not


def _anatomy_session(labels):
    """A session over a 3 mm synthetic abdomen whose spine the check finds (see test_anatomy)."""
    from test_anatomy import SPACING, synthetic_ct

    from napari_kidseg import anatomy

    zeros = np.zeros(labels.shape, np.uint8)
    r = make_result(zeros, spacing=SPACING)
    r.spine = anatomy.find_spine(synthetic_ct(), SPACING)
    s = ReviewSession(r)
    s.labels[:] = labels
    return s


def test_keep_kidneys_by_anatomy_keeps_the_kidney_not_the_larger_spleen():
    """The defect: 'Keep largest per kidney' kept a 119 mL spleen as the left kidney and deleted
    the real left kidney. Now the choice is the anatomy check's, and it is planned (previewable)."""
    from test_anatomy import SHAPE, _ellipsoid, kidney

    labels = np.zeros(SHAPE, np.uint8)
    right = kidney(labels, "right")
    left = kidney(labels, "left", radii=(10, 7, 6))  # partly found: 50 mL
    spleen = _ellipsoid(SHAPE, (45, 70, 64 + 40), (12, 14, 12))  # 120 mm left, in front: about 250 mL
    labels[spleen] = 1
    s = _anatomy_session(labels)
    change = s.plan_keep_kidneys()
    assert "not where a kidney lies" in change.summary or "second region" in change.summary
    assert change.mask(SHAPE)[spleen].mean() > 0.9 and not change.mask(SHAPE)[right | left].any()
    assert (s.labels == labels).all(), "planning must not touch the labels"
    s.apply_change(change)
    assert (s.labels[left] == 1).all() and not s.labels[spleen].any()


def test_undo_leaves_no_frozen_voxels():
    """The defect: after Keep largest + Undo, 152,818 voxels stayed 'hand-edited' and kept a
    tumor the fusion no longer had. Undo now gives the voxels back to the fusion."""
    meta = np.zeros((3, 20, 20), np.uint8)
    tumor = np.zeros_like(meta)
    meta[:, 5:15, 5:15] = 200
    tumor[:, 8:12, 8:12] = 200
    s = ReviewSession(make_result(meta, tumor), NO_CHECK)
    assert s.remove_islands(1e6) > 0 and s.hand_edited_voxels == 300
    s.undo()
    assert s.hand_edited_voxels == 0
    s.set_params(tumor_threshold=1.0)
    s.apply_fusion(s.result.fuse(0.4, 0.5, 1.0, anatomy_check=False))
    assert not (s.labels == 2).any(), "tumor kept by a stale edit mask"
    # painting recorded from outside the session (napari's brush) is undone the same way
    s.labels[1, 5, 5] = 0
    s.sync_edits()
    assert s.hand_edited_voxels == 1
    s.undo()
    assert s.hand_edited_voxels == 0 and s.labels[1, 5, 5] == 1


def test_undo_after_a_slider_move_freezes_nothing():
    """The defect (issue 25, 1): edit, move a slider (the volume is re-fused), undo: the undo wrote
    back the old fusion's labels, which then differed from the new fusion and were frozen as hand
    edits over every later fusion. Undo now restores the edit state, so the labels are today's
    fusion, and the edit count is 0."""
    meta = np.zeros((3, 20, 20), np.uint8)
    meta[:, 5:15, 5:15] = 160  # p = 0.63: kidney at 0.5, nothing at 0.7
    s = ReviewSession(make_result(meta), NO_CHECK)
    for edit in (lambda: s.remove_islands(1e6), lambda: s.relabel_region(1, 6, 6)):
        s.set_params(kidney_threshold=0.5)
        s.apply_fusion(s.result.fuse(0.4, 0.5, 0.5, anatomy_check=False))
        assert edit() == 300
        s.set_params(kidney_threshold=0.7)
        s.apply_fusion(s.result.fuse(0.4, 0.7, 0.5, anatomy_check=False))
        assert s.undo()
        fresh = s.result.fuse(0.4, 0.7, 0.5, anatomy_check=False)
        assert np.array_equal(s.labels, fresh) and s.hand_edited_voxels == 0
        s.set_params(kidney_threshold=0.5)  # and nothing old comes back on the next fusion either
        s.apply_fusion(s.result.fuse(0.4, 0.5, 0.5, anatomy_check=False))
        assert np.array_equal(s.labels, s.result.fuse(0.4, 0.5, 0.5, anatomy_check=False))
    # redo puts the edit back over today's fusion; a slice moved alone (refuse_slice) too
    s.redo()
    assert (s.labels[:, 5:15, 5:15] == 2).all() and s.hand_edited_voxels == 300
    s.undo()
    s.set_params(kidney_threshold=0.7)
    s.refuse_slice(1)
    assert not s.labels[1].any() and s.hand_edited_voxels == 0


def test_region_click_edits_only_the_clicked_region():
    meta = np.zeros((4, 30, 40), np.uint8)
    s = ReviewSession(make_result(meta, spacing=(1.0, 1.0, 1.0)), NO_CHECK)
    s.labels[0:4, 5:25, 3:15] = 1  # a kidney
    s.labels[1:3, 10:14, 6:10] = 2  # a tumor inside it
    s.labels[0:2, 5:10, 25:30] = 1  # another region
    ch = s.plan_region_edit(1, 6, 4, "tumor")  # a click on the kidney part
    assert "kidney region -> tumor" in ch.summary
    ch = s.plan_region_edit(2, 11, 7, "kidney")  # a click on the tumor: only the tumor changes
    assert ch.voxels == 32 and (ch.new == 1).all()
    s.apply_change(s.plan_region_edit(0, 6, 26, "delete"))
    assert not s.labels[0:2, 5:10, 25:30].any() and s.labels[1, 6, 4] == 1
    with pytest.raises(KidsegError, match="click inside a region"):
        s.plan_region_edit(0, 0, 0, "delete")
    rows = s.region_table()
    assert len(rows) == 1 and rows[0]["label"] == "kidney+tumor" and rows[0]["tumor_ml"] == pytest.approx(0.032)
    assert rows[0]["side"] == "right"  # low x is the patient's right (no spine: the image centre)
    ch = s.plan_region_edit(2, 11, 7, "cyst")  # KiTS23: the tumor was a cyst after all
    assert "tumor region -> cyst" in ch.summary and ch.voxels == 32 and (ch.new == 3).all()


def test_interpolation_is_planned_before_it_is_applied():
    meta = np.zeros((5, 30, 30), np.uint8)
    s = ReviewSession(make_result(meta), NO_CHECK)
    s.labels[0, 10:20, 10:20] = 1
    s.labels[4, 12:18, 12:18] = 1
    before = s.labels.copy()
    ch = s.plan_interpolate_slices(4, 0)
    assert (s.labels == before).all() and ch.voxels > 0 and "slices 1-3" in ch.summary
    assert set(np.unique(np.nonzero(ch.mask(s.labels.shape))[0])) == {1, 2, 3}


def test_delete_takes_the_clicked_labels_region_and_the_component_only_when_asked():
    """The defect (issue 26): a click on a false tumor deleted the kidney joined to it."""
    meta = np.zeros((4, 30, 40), np.uint8)
    s = ReviewSession(make_result(meta, spacing=(1.0, 1.0, 1.0)), NO_CHECK)
    s.labels[0:4, 5:25, 3:15] = 1  # a kidney
    s.labels[0:4, 5:25, 15:25] = 2  # a false "tumor" joined to it
    ch = s.plan_region_edit(1, 10, 20, "delete")
    assert ch.voxels == 4 * 20 * 10 and "tumor region" in ch.summary
    s.apply_change(ch)
    assert (s.labels[0:4, 5:25, 3:15] == 1).all() and not (s.labels == 2).any()
    s.undo()
    ch = s.plan_region_edit(1, 10, 20, "delete component")  # the modifier: kidney and tumor together
    assert ch.voxels == 4 * 20 * 22 and "kidney+tumor region" in ch.summary


def test_cut_separates_a_joined_region_so_the_false_part_can_be_deleted():
    """The defect (issue 26): a false region touching a kidney (a liver cyst joined through a
    rim) took 35 eraser strokes. A line cut through a slab, then one delete click."""
    meta = np.zeros((9, 40, 40), np.uint8)
    s = ReviewSession(make_result(meta, spacing=(2.0, 1.0, 1.0)), NO_CHECK)
    s.labels[1:8, 5:20, 5:20] = 1  # a kidney
    s.labels[1:8, 22:35, 5:20] = 1  # a false region of the same label ...
    s.labels[3:6, 19:23, 10:13] = 1  # ... joined to it by a bridge on slices 3-5
    before = s.labels.copy()
    short = s.plan_cut(4, (21, 11), (21, 12), slab_mm=6.0)  # too short: the bridge holds
    assert "still joined" in short.summary
    ch = s.plan_cut(4, (21, 2), (20, 30), slab_mm=6.0)  # slices 3-5 (6 mm centred on slice 4)
    assert "falls into 2 parts" in ch.summary and "slices 3-5, 6-10 mm" in ch.name
    assert set(np.unique(np.nonzero(ch.mask(s.labels.shape))[0])) == {3, 4, 5}
    assert (s.labels == before).all(), "planning must not touch the labels"
    s.apply_change(ch, seen=4)
    s.apply_change(s.plan_region_edit(4, 30, 10, "delete"))
    assert not s.labels[:, 22:35].any() and (s.labels[1:8, 5:20, 5:20] == 1).all()
    assert s.reviewed_slices() == {4}, "the slice in view is reviewed, not every slice a tool touched"
    # a diagonal 4-connected line leaves no 26-connected gap
    from napari_kidseg.review.session import _line_4connected

    ys, xs = _line_4connected((0, 0), (5, 9))
    steps = np.abs(np.diff(ys)) + np.abs(np.diff(xs))
    assert (steps == 1).all() and (ys[0], xs[0], ys[-1], xs[-1]) == (0, 0, 5, 9)


def test_keep_kidneys_keeps_one_region_per_side():
    """The defect (issue 26): a 97 mL second region on the right stayed (it lay within the
    anatomy check's fragment distance of the kidney); its message said "slices 78-152 mm"."""
    meta = np.zeros((10, 60, 80), np.uint8)
    s = ReviewSession(make_result(meta, spacing=(3.0, 2.0, 2.0)), NO_CHECK)
    s.labels[1:9, 10:40, 5:25] = 1  # right kidney (low x is the patient's right), 58 mL
    s.labels[2:6, 42:50, 5:25] = 1  # a second region on the right, 4 mm away
    s.labels[1:9, 10:40, 50:70] = 1  # left kidney
    ch = s.plan_keep_kidneys()
    assert "second region on the right side" in ch.summary and "slices 2-5, 6-15 mm" in ch.summary
    s.apply_change(ch)
    assert not s.labels[:, 42:50].any() and (s.labels[1:9, 10:40, 5:25] == 1).all()
    assert (s.labels[1:9, 10:40, 50:70] == 1).all()


def test_anatomy_messages_name_slices_and_mm_apart():
    from napari_kidseg.anatomy import RemovedRegion

    r = RemovedRegion(1, "kidney", "left", 12.0, (78.0, 152.0), "too small to be a kidney", (26, 50))
    assert "slices 26-50, 78-152 mm" in r.describe() and "slices 78" not in r.describe()


def test_reviewed_slices_stay_as_reviewed_against_the_sliders():
    """The defect (issue 26): alpha and thresholds re-fused a corrected case's untouched voxels.
    A reviewed slice keeps the fusion it was reviewed on unless asked; undoing the edit that
    made it reviewed takes that back as well."""
    meta = np.zeros((4, 20, 20), np.uint8)
    meta[:, 5:15, 5:15] = 160
    s = ReviewSession(make_result(meta), NO_CHECK)
    s.labels[1, 0, 0] = 2
    s.sync_edits(seen=1)  # a stroke on slice 1, in view
    s.reviewed.add(2)  # Slice reviewed (the widget adds to the same set)
    assert s.hand_edited_voxels == 1
    s.set_params(kidney_threshold=0.7)
    s.apply_fusion(s.result.fuse(0.4, 0.7, 0.5, anatomy_check=False))
    assert (s.labels[1:3, 5:15, 5:15] == 1).all() and not s.labels[3].any()
    assert s.refuse_slice(2)[6, 6] == 1
    s.undo()  # the stroke: slice 1 is no longer reviewed and follows the sliders again
    assert s.reviewed_slices() == {2} and not s.labels[1].any()
    s.set_keep_reviewed(False)  # asked: reviewed slices follow the sliders too
    assert not s.labels.any()
    s.set_keep_reviewed(True, case_reviewed=True)  # the whole case reviewed: every slice stays
    s.set_params(kidney_threshold=0.5)
    s.apply_fusion(s.result.fuse(0.4, 0.5, 0.5, anatomy_check=False))
    assert not s.labels.any() and s.hand_edited_voxels == 0


def test_an_undone_edit_leaves_a_later_marks_freeze_not_its_own():
    """The defect (issue 25, ``make fuzz`` seed 315): an edit made in view froze its slice on that
    fusion; a slider moved; the slice was marked reviewed (already frozen: nothing new); the edit
    was undone. The slice kept the edit's older freeze, where a twin that never got the edit froze
    it on the fusion of the mark. Each reason a slice is frozen for keeps its own fusion, and the
    slice lies over the earliest reason still in effect."""
    meta = np.zeros((3, 20, 20), np.uint8)
    meta[:, 5:15, 5:15] = 160  # p = 0.63: kidney at 0.5, nothing at 0.7
    s = ReviewSession(make_result(meta), NO_CHECK)
    s.labels[1, 0, 0] = 2
    s.sync_edits(seen=1)  # a stroke on slice 1, in view: frozen on the 0.5 fusion (the square)
    s.set_params(kidney_threshold=0.7)
    s.apply_fusion(s.result.fuse(0.4, 0.7, 0.5, anatomy_check=False))
    assert (s.labels[1, 5:15, 5:15] == 1).all()
    s.reviewed.add(1)  # Slice reviewed, on the 0.7 fusion (empty)
    s.undo()  # the stroke goes: slice 1 stays frozen, but on the fusion it was marked on
    twin = ReviewSession(make_result(meta), NO_CHECK)
    twin.set_params(kidney_threshold=0.7)
    twin.apply_fusion(twin.result.fuse(0.4, 0.7, 0.5, anatomy_check=False))
    twin.reviewed.add(1)
    twin.sync_edits()
    assert np.array_equal(s.labels, twin.labels) and not s.labels.any()
    s.set_params(kidney_threshold=0.5)  # the mark keeps slice 1 as it was marked
    s.apply_fusion(s.result.fuse(0.4, 0.5, 0.5, anatomy_check=False))
    assert not s.labels[1].any() and (s.labels[[0, 2], 5:15, 5:15] == 1).all()
    s.redo()  # the stroke again, on the 0.5 fusion: slice 1 still lies over the mark's (earlier)
    assert s.labels[1, 0, 0] == 2 and not s.labels[1, 5:15, 5:15].any()


def _ball(shape, centre, radius_mm, spacing):
    grid = np.indices(shape, sparse=True)
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)) <= radius_mm**2


def test_split_off_follows_a_tilted_join_that_a_slab_cut_does_not():
    """Issue 26's count: a false ball (a liver cyst) lying on a kidney's pole joins it over a
    surface tilted to the slices; two clicks (the false part, the kidney) split it off along
    the CT's edge in 3D and delete it, where a straight cut through a slab leaves it joined."""
    sp = (2.0, 1.0, 1.0)
    shape = (24, 60, 60)
    kidney = _ball(shape, (12, 34, 30), 18.0, sp)
    cyst = _ball(shape, (6, 14, 30), 14.0, sp) & ~kidney  # above the pole and up: a tilted contact
    assert _joined(kidney, cyst), "the phantom must join the two"
    ct = np.full(shape, -100, np.int16)
    ct[kidney] = 160
    ct[cyst] = 5  # water-like: an edge where it meets the kidney
    s = ReviewSession(make_result(np.zeros(shape, np.uint8), spacing=sp), NO_CHECK)
    s.labels[kidney] = 1
    s.labels[cyst] = 2  # drafted as tumor
    s.labels[cyst & ~_ball(shape, (6, 14, 30), 9.0, sp)] = 1  # with a kidney rim
    before = s.labels.copy()
    cut = s.plan_cut(6, (24, 5), (24, 55), slab_mm=10.0)
    assert "still joined" in cut.summary  # the straight line through a slab: the join holds
    ch = s.plan_split_off((6, 14, 30), (12, 34, 30), ct)
    assert (s.labels == before).all(), "planning must not touch the labels"
    s.apply_change(ch, seen=6)
    gone = s.labels == 0
    assert gone[cyst].mean() > 0.95 and gone[kidney].mean() < 0.01, ch.summary
    assert "splits off and deletes" in ch.summary and "keeps" in ch.summary
    s.undo()
    assert (s.labels == before).all()
    # without a CT the depth decides: the join is a neck, and the split runs through it
    s.apply_change(s.plan_split_off((6, 14, 30), (12, 34, 30)))
    assert (s.labels == 0)[cyst].mean() > 0.8 and (s.labels > 0)[kidney].mean() > 0.95


def _joined(a, b) -> bool:
    from scipy import ndimage

    lab, _ = ndimage.label(a | b, structure=np.ones((3, 3, 3), bool))
    return bool(set(np.unique(lab[a])) & set(np.unique(lab[b])) - {0})


def test_split_off_refuses_clicks_that_it_cannot_use():
    s = ReviewSession(make_result(np.zeros((6, 20, 20), np.uint8)), NO_CHECK)
    s.labels[1:5, 2:8, 2:8] = 1
    s.labels[1:5, 12:18, 12:18] = 1
    with pytest.raises(KidsegError, match="separate regions"):
        s.plan_split_off((2, 14, 14), (2, 4, 4))
    with pytest.raises(KidsegError, match="click inside the false part"):
        s.plan_split_off((2, 10, 10), (2, 4, 4))
    with pytest.raises(KidsegError, match="outside the volume"):
        s.plan_split_off((9, 4, 4), (2, 4, 4))


def test_split_off_clicks_at_the_regions_edge():
    """A click on the region's outermost voxel: the seed ball is cut at the region's box."""
    s = ReviewSession(make_result(np.zeros((8, 30, 30), np.uint8), spacing=(1.0, 0.5, 0.5)), NO_CHECK)
    s.labels[0:8, 0:14, 0:30] = 1
    s.labels[0:8, 14:30, 10:14] = 1  # a false part hanging off the kidney by a neck
    s.labels[0:8, 18:30, 0:30] = 1
    ch = s.plan_split_off((7, 29, 29), (0, 0, 0))
    s.apply_change(ch)
    assert s.labels[7, 29, 29] == 0 and s.labels[0, 0, 0] == 1
