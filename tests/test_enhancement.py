"""The tumor-by-contrast rule (napari_kidseg/enhancement.py) on drawn volumes."""

import numpy as np

from napari_kidseg import enhancement
from napari_kidseg.cascade import CascadeResult
from napari_kidseg.labels import KIDNEY, TUMOR

SPACING = (2.0, 1.0, 1.0)


def _kidney(kidney_hu, blob_hu, blob_radius_mm=10.0):
    """An 8-slice CT with a 60 x 40 mm kidney region (labels all kidney) and a round blob in it."""
    ct = np.full((8, 96, 96), -100, np.int16)
    labels = np.zeros(ct.shape, np.uint8)
    labels[:, 20:80, 28:68] = KIDNEY
    ct[labels > 0] = kidney_hu
    y, x = np.ogrid[:96, :96]
    blob = (y - 50) ** 2 + (x - 48) ** 2 <= blob_radius_mm**2
    ct[:, blob] = blob_hu
    return ct, labels, np.broadcast_to(blob, ct.shape)


def _marked(ct, labels):
    tissue = enhancement.tissue_levels(ct, (labels > 0).astype(np.uint8) * 255)
    ref = enhancement.kidney_reference_hu(labels, tissue)
    return enhancement.mark_hypodense_tumor(labels, tissue, SPACING, ref), ref


def test_a_hypoenhancing_mass_in_an_enhanced_kidney_becomes_tumor_and_nothing_else_changes():
    ct, labels, blob = _kidney(180, 90)
    out, ref = _marked(ct, labels)
    assert ref == 180
    inside = blob & (ct == 90)
    assert (out[inside] == TUMOR).mean() > 0.9  # the blob, less its smoothed rim
    assert (out[(labels > 0) & ~blob] == KIDNEY).all()  # the enhancing kidney stays kidney
    assert np.array_equal(out > 0, labels > 0)  # the rule never adds or removes kidney+tumor


def test_the_rule_leaves_unenhanced_kidneys_water_small_spots_and_faint_differences_alone():
    ct, labels, _ = _kidney(40, 5)
    r = CascadeResult(
        ct.shape, SPACING, (labels > 0).astype(np.uint8) * 250, np.zeros_like(labels), {}, [], np.zeros(0), 96
    )
    r.tissue = enhancement.tissue_levels(ct, r.coarse_meta)
    assert not (r.fuse(anatomy_check=False) == TUMOR).any()
    assert "not applied, the kidneys read 40 HU (not contrast-enhanced" in r.contrast_note
    for kidney_hu, blob_hu, radius in (
        (40, 5, 10.0),  # no contrast: a kidney at 40 HU is not enhanced
        (180, 10, 10.0),  # water: a cyst or urine, not an enhancing tumor
        (180, 90, 6.0),  # 113 mm2 on the slice: under the 300 mm2 a tumor must cover
        (180, 150, 10.0),  # 30 HU darker: within the kidney's own spread
    ):
        ct, labels, _ = _kidney(kidney_hu, blob_hu, radius)
        out, _ = _marked(ct, labels)
        assert (out == labels).all(), (kidney_hu, blob_hu, radius)


def test_a_mass_thinner_than_2_ml_in_3d_stays_kidney_in_the_volume():
    ct, labels, blob = _kidney(180, 90)
    ct[2:, blob[0]] = 180  # the blob on two slices only: 2 x 314 mm2 x 2 mm = 1.3 mL
    out, _ = _marked(ct, labels)
    assert not (out == TUMOR).any()
    one_slice = enhancement.mark_hypodense_tumor(
        labels[0], enhancement.tissue_levels(ct, labels * 255)[0], SPACING, 180.0
    )
    assert (one_slice == TUMOR).any()  # a slice alone cannot know the 3D size: it marks it


def test_cascade_fusion_applies_the_rule_on_demand_and_a_saved_result_keeps_it(tmp_path):
    ct, labels, blob = _kidney(180, 90)
    meta = (labels > 0).astype(np.uint8) * 250
    r = CascadeResult(ct.shape, SPACING, meta, np.zeros_like(meta), {}, [], np.zeros(0), 96)
    r.tissue = enhancement.tissue_levels(ct, meta)
    without = r.fuse(anatomy_check=False, contrast_tumor=False)
    assert r.contrast_note is None
    with_rule = r.fuse(anatomy_check=False, contrast_tumor=True)
    made_ml = (with_rule == TUMOR).sum() * np.prod(SPACING) / 1000
    assert (
        r.contrast_note == f"tumor by contrast: {made_ml:.1f} mL of kidney made tumor "
        "(at least 40 HU darker than the kidneys' 180 HU)"
    )
    assert (without == TUMOR).sum() == 0 and (with_rule[blob & (ct == 90)] == TUMOR).mean() > 0.9
    assert np.array_equal(r.fuse(z=4, anatomy_check=False, contrast_tumor=True), with_rule[4])
    r.save_probabilities(tmp_path / "draft.npz")
    back, _ = CascadeResult.load_probabilities(tmp_path / "draft.npz")
    assert np.array_equal(back.fuse(anatomy_check=False, contrast_tumor=True), with_rule)


def test_the_review_sessions_switch_refuses_the_slice_and_keeps_hand_edits():
    from napari_kidseg.review.session import FusionParams, ReviewSession

    ct, labels, blob = _kidney(180, 90)
    meta = (labels > 0).astype(np.uint8) * 250
    r = CascadeResult(ct.shape, SPACING, meta, np.zeros_like(meta), {}, [], np.zeros(0), 96)
    r.tissue = enhancement.tissue_levels(ct, meta)
    s = ReviewSession(r, FusionParams(anatomy_check=False))
    assert (s.labels[4][blob[4] & (ct[4] == 90)] == TUMOR).mean() > 0.9  # on by default
    s.labels[4, 50, 48] = KIDNEY  # the radiologist says this voxel is kidney
    s.set_params(contrast_tumor=False)
    s.refuse_slice(3)
    assert not (s.labels[3] == TUMOR).any()
    s.set_params(contrast_tumor=True)
    s.refuse_slice(4)
    assert s.labels[4, 50, 48] == KIDNEY and (s.labels[4] == TUMOR).sum() > 200


def test_tissue_levels_match_the_whole_ct_smoothed_at_once_where_boxes_overlap():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    ct = rng.normal(120, 60, (6, 80, 90)).astype(np.int16)
    meta = np.zeros(ct.shape, np.uint8)
    meta[:, 10:40, 10:40] = 200  # two coarse regions apart, and a refine window over both
    meta[:, 30:70, 50:85] = 200
    meta[:, 45:48, 20:23] = 0
    windows = [(2, 20, 30, 40, 40)]
    tissue = enhancement.tissue_levels(ct, meta, windows)
    whole = np.clip(ndimage.gaussian_filter(ct.astype(np.float32), (0, 1, 1)) + 0.5, 0, 255).astype(np.uint8)
    covered = tissue > 0
    covered[2, 20:60, 30:70] = True
    covered[:, 10:40, 10:40] = covered[:, 30:70, 50:85] = True
    assert np.abs(tissue[covered].astype(int) - whole[covered]).max() <= 1


def test_the_anatomy_check_judges_the_networks_labels_before_the_rule():
    """A false kidney region on the liver, 80 HU darker than the kidneys: the check removes it as
    the kidney the networks called it (listed and restorable as kidney), and the rule then finds
    nothing to turn into tumor; turned tumor first, it would have reached the check as tumor."""
    from test_anatomy import FRONT_Y, MID_X, SHAPE, _ellipsoid, kidney, synthetic_ct

    from napari_kidseg import anatomy

    sp = (3.0, 3.0, 3.0)
    ct = synthetic_ct()
    labels = np.zeros(SHAPE, np.uint8)
    right, left = kidney(labels, "right"), kidney(labels, "left")
    liver = _ellipsoid(SHAPE, (30, FRONT_Y - 22, MID_X - 25), (10, 8, 10))
    labels[liver] = KIDNEY
    ct[right | left] = 190
    ct[liver] = 110
    meta = (labels > 0).astype(np.uint8) * 250
    r = CascadeResult(SHAPE, sp, meta, np.zeros_like(meta), {}, [], np.zeros(0), 96)
    r.spine = anatomy.find_spine(ct, sp)
    r.tissue = enhancement.tissue_levels(ct, meta)
    labels_on, removed = r.fuse_and_removed(contrast_tumor=True)
    assert not labels_on[liver].any() and (removed[liver] == KIDNEY).all()
    assert (labels_on[right | left] == KIDNEY).mean() > 0.95 and not (labels_on == TUMOR).any()
    assert r.contrast_note.startswith("tumor by contrast: 0.0 mL of kidney made tumor")
