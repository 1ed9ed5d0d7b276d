"""Kidney ROIs and refine patches: sides, small regions, tiling, coverage of real KiTS19 kidneys."""

from __future__ import annotations

import numpy as np
import pytest

from napari_kidseg import roi


def test_wide_kidney_is_tiled_not_cut():
    """A 300 x 400 px kidney footprint (a big tumor at fine spacing) gets several patches covering it."""
    ids = np.zeros((3, 512, 512), np.int8)
    ids[:, 50:350, 60:460] = 1
    patches = roi.refine_patches(ids, (2.0, 0.5, 0.5), patch_px=256, margin_mm=4)
    assert len(patches) > 3
    cov = roi.patch_coverage(patches, ids.shape)
    assert cov[ids > 0].all()


def test_rois_drop_small_regions_and_keep_sides():
    meta = np.zeros((20, 128, 128), bool)
    meta[5:15, 60:90, 10:40] = True  # right kidney (low x)
    meta[5:15, 60:90, 80:110] = True  # left kidney
    meta[2, 5:7, 5:7] = True  # a speck
    rois, roi_map = roi.kidney_rois(meta, (5.0, 1.0, 1.0), min_volume_ml=5)
    ids = roi_map.full()
    assert [r.side for r in rois] == ["right", "left"]
    assert ids[2, 5, 5] == 0 and ids[10, 70, 20] == 1 and ids[10, 70, 90] == 2
    assert rois[0].volume_ml == pytest.approx(10 * 30 * 30 * 5 / 1000, rel=0.15)
