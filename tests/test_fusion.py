"""Fusion of coarse and refined probabilities: a hand-computed case, alpha at its ends."""

from __future__ import annotations

import numpy as np

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
