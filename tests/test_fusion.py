"""Fusion of coarse and refined probabilities (a hand-computed case, alpha at its ends) and the tumor specks."""

from __future__ import annotations

import numpy as np
import pytest

from napari_kidseg import fusion


def test_fusion_against_a_hand_computed_case():
    coarse_meta = np.array([[[200, 100, 40]]], np.uint8)  # p(kid+tum) 0.78, 0.39, 0.16
    coarse_tum = np.array([[[150, 20, 0]]], np.uint8)
    region = fusion.RefinedRegion(
        0,
        0,
        np.array([[100, 250, 200]], np.uint8),
        np.array([[20, 200, 10]], np.uint8),
        np.array([[True, True, False]]),
    )
    labels = fusion.fuse_volume(
        coarse_meta, coarse_tum, {0: region}, alpha=0.4, kidney_threshold=0.5, tumor_threshold=0.5
    )
    # voxel 0: meta 0.4*200+0.6*100=140 > 127.5 -> kidney; tumor 0.4*150+0.6*20=72 < 127.5 -> kidney (1)
    # voxel 1: meta 0.4*100+0.6*250=190 -> kidney; tumor 0.4*20+0.6*200=128 > 127.5 -> tumor (2)
    # voxel 2: not covered -> coarse only: meta 40 -> background
    assert labels.tolist() == [[[1, 2, 0]]]


def test_alpha_one_is_coarse_and_alpha_zero_is_refined_inside_the_rois():
    rng = np.random.default_rng(0)
    shape = (4, 40, 50)
    cm, ct = rng.integers(0, 256, shape).astype(np.uint8), rng.integers(0, 256, shape).astype(np.uint8)
    refined = {}
    for z in (1, 2):
        cov = np.zeros((20, 30), bool)
        cov[2:18, 3:25] = True
        refined[z] = fusion.RefinedRegion(
            5, 10, rng.integers(0, 256, (20, 30)).astype(np.uint8), rng.integers(0, 256, (20, 30)).astype(np.uint8), cov
        )
    for kt, tt in ((0.5, 0.5), (0.3, 0.7), (0.4, 0.4)):  # 0.4 * 255 = 102 exactly: the edge case
        coarse = fusion.labels_from_levels(cm, ct, kt, tt)
        assert np.array_equal(fusion.fuse_volume(cm, ct, refined, 1.0, kt, tt), coarse)
        alone = fusion.refined_only_labels(shape, refined, kt, tt)
        fused0 = fusion.fuse_volume(cm, ct, refined, 0.0, kt, tt)
        for z, r in refined.items():
            win = fused0[z][r.window]
            assert np.array_equal(win[r.covered], alone[z][r.window][r.covered])
            assert np.array_equal(fused0[z][r.window][~r.covered], coarse[z][r.window][~r.covered])
        # one slice at a time gives the same as the whole volume
        for z in range(shape[0]):
            assert np.array_equal(
                fusion.fuse_slice(cm[z], ct[z], refined.get(z), 0.4, kt, tt),
                fusion.fuse_volume(cm, ct, refined, 0.4, kt, tt)[z],
            )


def _kidney_with_tumors():
    """Levels of a 32 x 60 x 40 mm kidney (2 x 1 x 1 mm voxels, 77 mL) holding a 4.8 mL tumor and a
    0.2 mL one, and a 0.2 mL tumor whose two halves touch only at a corner across slices."""
    meta = np.zeros((16, 80, 80), np.uint8)
    tumor = np.zeros_like(meta)
    meta[:, 10:70, 20:60] = 250
    tumor[4:10, 20:40, 25:45] = 250  # 6 x 20 x 20 voxels: 4.8 mL
    tumor[12:14, 50:57, 25:32] = 250  # 2 x 7 x 7: 0.196 mL
    tumor[2, 60:65, 45:50] = 250  # 25 voxels ...
    tumor[3, 65:70, 50:55] = 250  # ... and 25 more, joined at one corner (26-connected): 0.1 mL
    return meta, tumor


def test_tumor_regions_under_half_a_millilitre_are_the_specks_and_become_kidney():
    meta, tumor = _kidney_with_tumors()
    labels = fusion.labels_from_levels(meta, tumor, 0.5, 0.5)
    specks, n = fusion.tumor_specks(labels, (2.0, 1.0, 1.0))
    assert n == 2  # the corner-joined pair is one region
    assert len(specks) == 2 * 7 * 7 + 50 and np.all(np.diff(specks) > 0)
    out = fusion.specks_to_kidney(labels, specks)
    assert (out == 2).sum() == 6 * 20 * 20  # the 4.8 mL tumor stays
    assert np.array_equal(out > 0, labels > 0)  # kidney+tumor unchanged: only tumor becomes kidney
    for z in range(labels.shape[0]):  # a slice alone, with the volume's specks, agrees
        assert np.array_equal(fusion.specks_to_kidney(labels[z], specks, z=z), out[z])
    assert fusion.tumor_specks(labels, (2.0, 1.0, 1.0), min_ml=0.0)[1] == 0
    assert fusion.tumor_specks(np.zeros_like(labels), (2.0, 1.0, 1.0))[1] == 0


def test_a_small_solid_part_of_a_large_cystic_mass_is_not_a_speck():
    labels = np.zeros((8, 60, 60), np.uint8)
    labels[:, 5:55, 5:55] = 1
    labels[1:7, 15:40, 15:40] = 3  # a 7.5 mL cyst (2 x 1 x 1 mm voxels) ...
    labels[3:5, 20:25, 40:45] = 2  # ... with a 0.1 mL solid nodule on its wall
    labels[5, 50:53, 10:13] = 3  # and a lone small cyst: not a tumor speck
    assert fusion.tumor_specks(labels, (2.0, 1.0, 1.0))[1] == 0
    labels[1:7, 15:40, 15:40] = 1  # without the cyst the nodule is a speck
    specks, n = fusion.tumor_specks(labels, (2.0, 1.0, 1.0))
    assert n == 1 and len(specks) == 2 * 5 * 5


def test_the_cascades_fusion_leaves_specks_as_kidney_with_the_anatomy_check_and_says_so():
    from napari_kidseg.cascade import CascadeResult

    meta, tumor = _kidney_with_tumors()
    r = CascadeResult(meta.shape, (2.0, 1.0, 1.0), meta, tumor, {}, [], np.zeros(0), 96)
    checked = r.fuse(contrast_tumor=False)
    assert (checked == 2).sum() == 6 * 20 * 20
    assert r.speck_note == "2 tumor speck(s) under 0.5 mL (0.30 mL in all) left as kidney: too small to call a tumor"
    assert all(np.array_equal(r.fuse(z=z, contrast_tumor=False), checked[z]) for z in range(meta.shape[0]))
    # a slice fused with other settings does not borrow specks the volume's settings made
    assert (r.fuse(z=12, tumor_threshold=0.4, contrast_tumor=False) == 2).sum() == 7 * 7  # its speck, on one slice
    assert (r.fuse(keep_specks=True, contrast_tumor=False) == 2).sum() == 6 * 20 * 20 + 2 * 7 * 7 + 50
    unchecked = r.fuse(anatomy_check=False, contrast_tumor=False)
    assert (unchecked == 2).sum() == 6 * 20 * 20 + 2 * 7 * 7 + 50 and r.speck_note is None
    assert np.array_equal(r.fuse(z=13, anatomy_check=False, contrast_tumor=False), unchecked[13])


def test_the_review_box_names_the_specks_only_while_the_anatomy_check_is_on():
    from napari_kidseg.cascade import CascadeResult
    from napari_kidseg.review.display import comparison_maps, score_text
    from napari_kidseg.review.session import FusionParams, ReviewSession

    meta, tumor = _kidney_with_tumors()
    r = CascadeResult(meta.shape, (2.0, 1.0, 1.0), meta, tumor, {}, [], np.zeros(0), 96)
    s = ReviewSession(r, FusionParams(contrast_tumor=False))
    text, m, _ = score_text(s, s.labels.copy(), None, None, comparison_maps(s))
    assert "2 tumor speck(s) under 0.5 mL (0.30 mL in all) left as kidney" in text.replace("\n  ", " ")
    assert m["total"]["tumor_ml"] == pytest.approx(4.8)
    s.set_params(anatomy_check=False)
    s.apply_fusion(*r.fuse_and_removed(**vars(s.params)))
    text, m, _ = score_text(s, s.labels.copy(), None, None, comparison_maps(s))
    assert "speck" not in text and m["total"]["tumor_ml"] == pytest.approx(5.096)
