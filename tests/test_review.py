"""Review session: edits survive fusion, correction tools on constructed cases, undo/redo, export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_kidseg import io
from napari_kidseg.cascade import CascadeResult
from napari_kidseg.errors import KidsegError
from napari_kidseg.fusion import RefinedRegion
from napari_kidseg.review import FusionParams, ReviewSession, export_correction


# these tests exercise fusion and editing on toy volumes far smaller than a kidney; the
# anatomy check (tests/test_anatomy.py) would rightly remove such regions
NO_CHECK = FusionParams(anatomy_check=False)


def make_result(meta, tumor=None, refined=None, spacing=(2.0, 1.0, 1.0)):
    tumor = np.zeros_like(meta) if tumor is None else tumor
    return CascadeResult(meta.shape, spacing, meta, tumor, refined or {}, [], np.zeros(0, dtype=[("roi", "i2"),
                         ("z", "i4"), ("y0", "i4"), ("x0", "i4")]), 16)


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
    assert s.keep_largest_per_kidney() == 4
    assert s.labels[2, 22:24, 30:32].sum() == 0 and s.labels[2, 10, 30] == 1
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
    refined = {1: RefinedRegion(0, 0, np.full((10, 10), 0, np.uint8), np.zeros((10, 10), np.uint8), cov),
               2: RefinedRegion(0, 0, np.full((10, 10), 200, np.uint8), np.zeros((10, 10), np.uint8), cov)}
    s = ReviewSession(make_result(meta, refined=refined), NO_CHECK)
    assert list(s.doubtful_slices("disagreement")) == [2]  # slice 1 agrees (both 0), slice 2 does not


def test_export_writes_kits_layout_and_manifest_without_overwriting(tmp_path, small_case):
    src = tmp_path / "ct.nii.gz"
    io.write_volume(src, small_case.ct.array, small_case.ct)
    ct = io.read_ct(src)
    root = tmp_path / "corr"
    a = export_correction(root, ct, small_case.labels, params=FusionParams(0.3, 0.5, 0.6), hand_edited_voxels=7)
    b = export_correction(root, ct, small_case.labels, case_id=a.name)
    assert a.name == "case_00000" and b.name == "case_00001"
    man = json.loads((root / "manifest.json").read_text())
    assert [c["case"] for c in man["cases"]] == ["case_00000", "case_00001"]
    assert man["cases"][0]["hand_edited_voxels"] == 7 and man["cases"][0]["source_sha256"]
    assert man["cases"][0]["fusion"]["alpha"] == 0.3
    back = io.read_labels(a / io.KITS_LABELS, like=io.read_ct(a / io.KITS_IMAGE))
    assert np.array_equal(back.array, small_case.labels)


def test_export_to_an_unwritable_place_is_a_clear_error(tmp_path, small_case):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KidsegError, match="cannot create the corrections folder"):
        export_correction(blocker / "sub", small_case.ct, small_case.labels)
