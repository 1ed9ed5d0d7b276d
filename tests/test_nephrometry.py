"""Nephrometry (R.E.N.A.L., PADUA, C-index) from labels: every score boundary on both sides, and
constructed kidneys of known geometry through the case report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_kidseg import nephrometry as nm
from napari_kidseg.report import describe_case, report_rows, report_text, rows_to_csv

NA = nm.NOT_ASSESSABLE


@pytest.mark.parametrize(
    "diameter, r, padua",
    [(39.9, 1, 1), (40.0, 1, 1), (40.1, 2, 2), (69.9, 2, 2), (70.0, 3, 2), (70.1, 3, 3)],
)
def test_size_bands(diameter, r, padua):
    assert nm.renal_r(diameter) == r and nm.padua_size(diameter) == padua


@pytest.mark.parametrize("share, points", [(1.0, 1), (0.5, 1), (0.499, 2), (0.001, 2), (0.0, 3)])
def test_exophytic_bands(share, points):
    assert nm.exophytic_points(share) == points


@pytest.mark.parametrize("mm, points", [(12.0, 1), (7.0, 1), (6.99, 2), (4.01, 2), (4.0, 3), (0.0, 3)])
def test_nearness_bands(mm, points):
    assert nm.renal_n(mm) == points


@pytest.mark.parametrize(
    "share, midline, points", [(0.0, False, 1), (1e-6, False, 2), (0.5, False, 2), (0.5001, False, 3), (0.1, True, 3)]
)
def test_polar_line_rule(share, midline, points):
    assert nm.renal_l(share, midline) == points


def test_totals_and_their_bands():
    assert nm._renal_complexity(6, 6) == "low" and nm._renal_complexity(7, 7) == "moderate"
    assert nm._renal_complexity(9, 9) == "moderate" and nm._renal_complexity(10, 10) == "high"
    assert nm._renal_complexity(6, 8) == "low to moderate"
    assert nm._padua_risk(7, 7) == "low" and nm._padua_risk(8, 9) == "intermediate" and nm._padua_risk(10, 10) == "high"


# ------------------------------------------------------------------------------------------------
# A constructed right kidney: an ellipsoid of parenchyma (semi-axes 50 x 25 x 30 mm) around a sinus
# cavity (18 x 10 x 12 mm, 8 mm medial), opened to the medial side by a hilum 24 mm high.
SPACING = (2.0, 1.0, 1.0)
SHAPE = (80, 100, 160)
KIDNEY_MM = np.array([80.0, 50.0, 50.0])  # left of the image centre (x = 80 mm): a right kidney


def _grid():
    return np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, SPACING)], indexing="ij")


def kidney(*, sinus=True, hilum=True, sinus_labelled=False):
    z, y, x = _grid()
    dz, dy, dx = z - KIDNEY_MM[0], y - KIDNEY_MM[1], x - KIDNEY_MM[2]
    labels = np.zeros(SHAPE, np.uint8)
    outline = (dz / 50) ** 2 + (dy / 25) ** 2 + (dx / 30) ** 2 <= 1
    labels[outline] = 1
    if sinus and not sinus_labelled:  # labelled, the sinus is kidney like the rest of the outline
        cavity = (dz / 18) ** 2 + (dy / 10) ** 2 + ((dx - 8) / 12) ** 2 <= 1
        if hilum:
            cavity |= (np.abs(dz) <= 12) & (np.abs(dy) <= 6) & (dx >= 8)
        labels[cavity & outline] = 0
    return labels


def add_tumor(labels, centre_offset_mm, radius_mm):
    z, y, x = _grid()
    c = KIDNEY_MM + np.asarray(centre_offset_mm, float)
    ball = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= radius_mm**2
    out = labels.copy()
    out[ball] = 2
    return out


def only_tumor(labels):
    report = describe_case(labels, SPACING)
    assert len(report["tumors"]) == 1
    return report, report["tumors"][0]


def test_endophytic_upper_pole_tumor_away_from_the_sinus():
    report, t = only_tumor(add_tumor(kidney(), (32, 0, -4), 8))
    r, p = t["renal"], t["padua"]
    assert t["side"] == "right"
    assert r["R"]["points"] == 1 and r["R"]["value"] == pytest.approx(16, abs=2)
    assert r["E"]["points"] == 3  # entirely inside the kidney
    # the cavity reaches 18 mm up (8 mm medial), the tumor down to 24 mm (4 mm lateral)
    assert r["N"]["points"] == 1 and 7 <= r["N"]["value"] <= 12
    assert r["L"]["points"] == 1 and r["L"]["value"] == 0.0  # wholly above the upper polar line
    assert r["polar_lines_slices"] == [pytest.approx(34, abs=1), pytest.approx(46, abs=1)]  # z 68..92 mm
    assert r["A"]["letter"] == "x" and r["hilar"] is False
    assert r["score"] == "6x" and r["points"] == 6 and r["complexity"] == "low"
    assert p["polar_location"]["points"] == 1 and p["renal_rim"]["points"] == 1  # 4 mm lateral
    assert p["renal_sinus"]["points"] == 1 and p["collecting_system"]["points"] == 1
    assert p["score"] == "8" and p["risk"] == "intermediate"  # 1 + 3 + 1 + 1 + 1 + 1
    c = t["c_index"]
    assert c["distance_mm"] == pytest.approx(np.hypot(32, 4), abs=1.5)
    assert c["value"] == pytest.approx(c["distance_mm"] / c["radius_mm"], rel=1e-3)
    text = report_text(report)
    assert "R.E.N.A.L. 6x" in text and "PADUA 8" in text and "C-index" in text
    row = [r for r in report_rows(report) if r["kind"] == "tumor"][0]
    assert row["renal"] == "6x" and row["padua"] == "8" and row["c_index"] == c["value"]
    assert "renal,padua,c_index" in rows_to_csv(report_rows(report)).splitlines()[0]
    json.dumps(report)  # every figure is plain JSON


def test_lateral_tumor_at_the_midline_is_l3_and_a_tumor_on_the_sinus_is_n3():
    _, t = only_tumor(add_tumor(kidney(), (0, 0, -20), 8))
    assert t["renal"]["L"]["points"] == 3 and t["renal"]["L"]["crosses_axial_midline"] is True
    assert t["padua"]["renal_rim"]["points"] == 1 and t["padua"]["polar_location"]["points"] == 2
    # 20 mm lateral of the outline's centre; the region's centre moves towards the tumor a little
    assert 15 <= t["c_index"]["distance_mm"] <= 20 and t["c_index"]["radius_mm"] == pytest.approx(8, abs=1)
    _, t = only_tumor(add_tumor(kidney(), (0, 12, 0), 6))  # posterior, on the sinus cavity
    assert t["renal"]["N"]["points"] == 3 and t["renal"]["N"]["value"] == pytest.approx(0, abs=1)
    assert t["renal"]["A"]["letter"] == "p" and t["padua"]["renal_sinus"]["points"] == 2
    # the collecting system lies in the sinus and is not labelled: a range, not a guess
    assert (
        t["padua"]["collecting_system"]["points"] == NA
        and "collecting system" in t["padua"]["collecting_system"]["why"]
    )
    lo, hi = t["padua"]["points_range"]
    assert hi == lo + 1 and t["padua"]["score"] == f"{lo}-{hi}p" and t["padua"]["points"] is None


def test_tumor_crossing_the_lower_polar_line_is_l2_and_mostly_exophytic_is_e1():
    _, t = only_tumor(add_tumor(kidney(), (-20, 0, -28), 8))  # z -28..-12 mm: the line is at -12
    assert t["renal"]["L"]["points"] == 2 and 0 < t["renal"]["L"]["value"] <= 0.5
    assert t["renal"]["E"]["points"] == 1 and t["exophytic_share"] >= 0.5
    assert t["padua"]["exophytic_rate"]["points"] == 1


def test_no_sinus_or_hilum_is_not_assessable_and_the_total_a_range():
    _, t = only_tumor(add_tumor(kidney(sinus=False), (32, 0, 0), 8))
    r = t["renal"]
    assert r["N"]["points"] == NA and "no renal sinus" in r["N"]["why"]
    assert r["L"]["points"] == NA and "no renal hilum" in r["L"]["why"]
    assert r["points"] is None and r["points_range"] == [1 + 3 + 1 + 1, 1 + 3 + 3 + 3]
    assert r["score"] == "6-10x" and r["hilar"] == NA
    assert "not assessable" in nm.summary(t)


def test_sinus_drawn_as_kidney_is_found_from_the_ct():
    """KiTS's labels include the sinus in the kidney; its fat shows in the CT."""
    labels = add_tumor(kidney(sinus_labelled=True), (0, 12, 0), 6)
    _, t = only_tumor(labels)
    assert t["renal"]["N"]["points"] == NA
    ct = np.where(labels > 0, 150.0, -100.0)
    ct[(kidney() == 0) & (labels == 1)] = -100.0  # the sinus: fat density inside the kidney label
    report = describe_case(labels, SPACING, ct=ct)
    t = report["tumors"][0]
    assert t["renal"]["N"]["points"] == 3 and t["padua"]["renal_sinus"]["points"] == 2


def test_a_kidney_mostly_replaced_by_tumor_is_not_assessable():
    _, t = only_tumor(add_tumor(kidney(), (0, 0, 0), 36))
    r = t["renal"]
    assert r["R"]["points"] == 3  # 72 mm across
    for part in ("E", "N", "L"):
        assert r[part]["points"] == NA and "mostly replaced" in r[part]["why"]
    assert t["c_index"]["value"] == NA
