"""The review's display arithmetic (napari_kidseg.review.display) without Qt, napari or a display."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from napari_kidseg.cascade import CascadeResult
from napari_kidseg.metrics import kits_scores, measurements
from napari_kidseg.review.display import (
    MEASURE_COLUMNS,
    carried_edits,
    changed_voxels,
    comparison_maps,
    kidney_focus,
    review_of,
    score_text,
)
from napari_kidseg.review.session import FusionParams, ReviewSession

PATCH = np.dtype([("roi", "i2"), ("z", "i4"), ("y0", "i4"), ("x0", "i4")])
NO_CHECK = (0.4, 0.5, 0.5, False)  # toy volumes: the anatomy check would rightly remove them


def _result(patches=(), spacing=(2.0, 1.0, 1.0)):
    """Kidney (p = 0.63) in a 10 x 10 square on 3 slices, tumor in its corner; refine patches as given."""
    meta = np.zeros((3, 20, 20), np.uint8)
    meta[:, 5:15, 5:15] = 160
    tumor = np.zeros_like(meta)
    tumor[:, 5:8, 5:8] = 200
    return CascadeResult(meta.shape, spacing, meta, tumor, {}, [], np.array(list(patches), PATCH), 8)


def test_comparison_maps_outline_each_patch_with_its_roi_and_score_the_refine_stage():
    r = _result(patches=[(1, 0, 0, 0), (2, 1, 12, 12), (1, 2, -4, -4)])
    s = ReviewSession(r, FusionParams(*NO_CHECK))
    maps = comparison_maps(s)
    rois = maps["rois"]
    assert rois.dtype == np.int8 and rois.shape == r.shape
    assert (rois[0, :8, :8] == 1).all() and rois[0, 8:, :].sum() == 0
    assert (rois[1, 12:, 12:] == 2).all() and rois[1, :12].sum() == 0
    assert (rois[2, :4, :4] == 1).all() and rois[2, 4:].sum() == 0  # a patch hanging off the edge is clipped
    assert np.array_equal(rois > 0, r.patch_coverage())
    # no refined regions: refined labels are background, the refine stage is coarse outside the patches
    assert maps["refined"].sum() == 0 and (maps["coarse"][0, 10, 10]) == 1
    assert maps["refine_stage"][0, 3, 3] == 0 and maps["refine_stage"][0, 10, 10] == 1
    assert maps["focus"] is None and maps["disagreement"].shape == r.shape


def test_review_of_loads_the_corrected_labels_and_focuses_on_a_kidney():
    r = _result()
    corrected = ReviewSession(r, FusionParams(*NO_CHECK)).labels.copy()
    corrected[1, 10, 10] = 0
    s, maps = review_of(r, NO_CHECK, corrected)
    assert s.labels[1, 10, 10] == 0 and s.params.anatomy_check is False
    z, y, x = maps["focus"]
    assert s.labels[z, y, x] > 0
    s2, _ = review_of(r, NO_CHECK, np.zeros((1, 2, 2), np.uint8))  # another grid: not loaded
    assert s2.labels[1, 10, 10] == 1


def test_kidney_focus_prefers_an_unflagged_kidney_over_a_larger_false_region():
    regions = [
        {"label": "kidney", "flagged": True, "ml": 500.0, "voxel": (80, 1, 1)},
        {"label": "kidney+tumor", "flagged": True, "ml": 300.0, "tumor_ml": 250.0, "voxel": (70, 2, 2)},
        {"label": "kidney", "flagged": False, "ml": 120.0, "voxel": (40, 3, 3)},
    ]
    assert kidney_focus(regions) == (40, 3, 3)
    assert kidney_focus(regions[:2]) == (80, 1, 1)  # all flagged: the largest kidney (tumor mL left out)
    assert kidney_focus([{"label": "tumor", "flagged": False, "ml": 9.0, "voxel": (1, 1, 1)}]) == (1, 1, 1)
    assert kidney_focus([]) is None


def test_score_text_is_narrow_and_scores_against_a_reference():
    s = ReviewSession(_result(), FusionParams(*NO_CHECK))
    labels = s.labels.copy()
    text, m, regions = score_text(s, labels, None, None, comparison_maps(s))
    assert text.startswith("<pre>") and "tumor mL" in text and "Dice" not in text
    assert m["total"]["kidney_ml"] > 0 and regions
    ref = labels.copy()
    ref[:, 12:15, 12:15] = 0  # the reference has a smaller kidney: false kidney mL, Dice below 1
    text, _, _ = score_text(s, labels, ref, "a reference with a very long name indeed", comparison_maps(s))
    body = text[len("<pre>") : -len("</pre>")].splitlines()
    assert all(len(line) <= MEASURE_COLUMNS for line in body), "the Review box must not need a horizontal scroll"
    corrected = next(line for line in body if line.startswith("corrected") and "." in line)
    assert "1.000" not in corrected.split()[1]
    full = kits_scores(labels, ref)  # scored on the labels' box: the figures of the whole volume
    assert corrected.split()[1:3] == [f"{full['kidney_tumor_dice']:.3f}", f"{full['tumor_dice']:.3f}"]
    false_kidney = [line for line in body if line.startswith("corrected")][-1]
    assert false_kidney.split()[1:] == ["0.1", "0.0"]  # 27 voxels of 2 mm^3 called kidney, none tumor
    assert "hand-edited voxels: 0" in text


def test_score_text_measures_on_the_labels_box_what_the_whole_volume_gives():
    s = ReviewSession(_result(), FusionParams(*NO_CHECK))
    labels = np.zeros((6, 30, 40), np.uint8)  # a kidney and a tumor on each side, off the centre
    labels[1:3, 4:9, 3:12] = 1
    labels[2, 5:7, 9:11] = 2
    labels[2:5, 20:27, 25:38] = 1
    labels[3:5, 22:25, 30:36] = 2
    _, m, _ = score_text(s, labels, None, None, comparison_maps(s))
    assert m == measurements(labels, s.result.spacing)
    assert m["right"]["kidney_ml"] > 0 and m["left"]["tumor_diameter_mm"] > 0


def test_score_text_says_n_a_when_nothing_is_there_to_score():
    s = ReviewSession(_result(), FusionParams(*NO_CHECK))
    empty = np.zeros_like(s.labels)
    text, _, _ = score_text(s, empty, empty, "ref", comparison_maps(s))
    corrected = next(line for line in text.splitlines() if line.startswith("corrected"))
    assert corrected.split()[1:] == ["n/a", "n/a", "n/a"]


def test_carried_edits_are_every_voxel_the_user_set():
    s = ReviewSession(_result(), FusionParams(*NO_CHECK))
    assert carried_edits(s) is None
    s.labels[0, 0, 0] = 2  # painted tumor where there was nothing
    s.labels[1, 10, 10] = 1  # painted kidney over kidney: no change, not an edit
    s.labels[2, 10, 10] = 0  # erased
    idx, values = carried_edits(s)
    assert sorted(zip(idx.tolist(), values.tolist())) == [(0, 2), (2 * 400 + 10 * 20 + 10, 0)]


def test_changed_voxels_counts_voxels_and_ml_on_the_same_grid_only():
    before = np.zeros((2, 3, 4), np.uint8)
    after = before.copy()
    after[0, 0, :3] = 1
    assert changed_voxels(before, after, (2.0, 1.0, 0.5)) == (3, 3 * 1.0 / 1000.0)
    assert changed_voxels(None, after, (1, 1, 1)) is None
    assert changed_voxels(before[:1], after, (1, 1, 1)) is None


def test_the_display_arithmetic_needs_neither_qt_nor_napari():
    code = (
        "import sys, napari_kidseg.review.display\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('qtpy', 'PyQt5', 'PyQt6', 'napari', 'vispy')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_score_text_names_a_kidney_called_tumor_almost_whole_until_it_is_corrected():
    s = ReviewSession(_result(), FusionParams(*NO_CHECK))
    labels = np.zeros((12, 60, 60), np.uint8)
    labels[2:10, 5:55, 0:30] = 2  # 24 mL at 2 mm^3 voxels, 15.5 mm right of the image centre (LPS)
    labels[2, 5:55, 0:30] = 1  # 3 mL of kidney left: less than any tumor-bearing KiTS19 kidney
    text, _, _ = score_text(s, labels, None, None, comparison_maps(s))
    body = " ".join(line.strip() for line in text[len("<pre>") : -len("</pre>")].splitlines())
    assert "right kidney: 21 mL called tumor with 3 mL of kidney left" in body, text
    labels[2:6, 5:55, 0:30] = 1  # the radiologist gives half back to the kidney: 12 mL, still short of KiTS
    text, _, _ = score_text(s, labels, None, None, comparison_maps(s))
    assert "right kidney: 12 mL called tumor with 12 mL of kidney left" in " ".join(text.split())
    labels[labels == 2] = 1  # no tumor left: nothing to say
    text, _, _ = score_text(s, labels, None, None, comparison_maps(s))
    assert "called tumor" not in text
