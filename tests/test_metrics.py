"""Dice, Jaccard, KiTS composite and lesion-wise tumor detection, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from napari_kidseg import metrics
from napari_kidseg.errors import KidsegError


def test_metrics_by_hand():
    ref = np.zeros((2, 10, 10), np.uint8)
    ref[0, :4, :5] = 1  # 20 kidney voxels
    ref[0, :2, :5] = 2  # 10 of them tumor
    pred = np.zeros_like(ref)
    pred[0, :4, :4] = 1  # 16 kidney+tumor voxels inside ref's 20
    s = metrics.kits_scores(pred, ref)
    assert s["kidney_tumor_dice"] == pytest.approx(2 * 16 / 36)
    assert s["kidney_tumor_jaccard"] == pytest.approx(16 / 20)
    assert s["tumor_dice"] == 0.0
    assert s["kits_composite"] == pytest.approx((2 * 16 / 36) / 2)
    empty = metrics.kits_scores(np.zeros_like(ref), np.zeros_like(ref))
    assert empty["tumor_dice"] == 1.0 and empty["kidney_tumor_jaccard"] == 1.0  # empty vs empty is a match
    assert metrics.volume_ml(ref > 0, (2.0, 1.0, 0.5)) == pytest.approx(20 * 1.0 / 1000)
    line = np.zeros((1, 1, 30), bool)
    line[0, 0, 5:25] = True
    assert metrics.largest_diameter_mm(line, (1.0, 1.0, 0.7)) == pytest.approx(19 * 0.7)


def test_tumor_detection_counts_each_tumor_and_each_false_one():
    spacing = (2.0, 1.0, 1.0)  # 2 mm^3 per voxel: 500 voxels per mL
    ref = np.zeros((10, 40, 40), np.uint8)
    ref[1:9, 2:38, 2:38] = 1
    ref[2:4, 5:10, 5:10] = 2  # tumor A: 50 voxels, 0.1 mL
    ref[5:9, 20:35, 20:35] = 2  # tumor B: 900 voxels, 1.8 mL
    pred = ref.copy()
    pred[2:4, 5:10, 5:10] = 1  # A missed entirely
    pred[5:9, 20:35, 20:26] = 1  # B: 6 of 15 columns missed, so 60% of it found
    pred[2, 30:32, 30:32] = 2  # a false tumor of 4 voxels, diagonal-touching nothing in ref's tumors
    d = metrics.tumor_detection(pred, ref, spacing)
    a, b = sorted(d["tumors"], key=lambda t: t["volume_ml"])
    assert a == {"volume_ml": pytest.approx(0.1), "recall": 0.0, "found": False}
    assert b["volume_ml"] == pytest.approx(1.8) and b["recall"] == pytest.approx(0.6) and b["found"]
    assert d["false_tumors_ml"] == [pytest.approx(4 * 2 / 1000)]
    rows = metrics.detection_by_size([d, d], bins_ml=(1.0,))
    assert [(r["tumors"], r["found"]) for r in rows] == [(2, 0), (2, 2)]
    assert rows[1]["mean_recall"] == pytest.approx(0.6)
    none = metrics.tumor_detection(np.zeros_like(ref), np.zeros_like(ref), spacing)
    assert none == {"tumors": [], "false_tumors_ml": []}
    for score in (metrics.kits_scores, lambda p, r: metrics.tumor_detection(p, r, spacing)):
        with pytest.raises(KidsegError, match="differs from the reference grid"):
            score(pred[:5], ref)
