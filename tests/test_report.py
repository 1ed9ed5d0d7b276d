"""The case report: descriptors checked on constructed cases whose tumor geometry is known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_kidseg.errors import KidsegError
from napari_kidseg.report import (
    describe_case,
    exophytic_share,
    report_text,
    rows_to_csv,
    summary_row,
    write_report,
)

SPACING = (2.0, 0.8, 0.8)
SHAPE = (70, 180, 300)  # 140 x 144 x 240 mm: x below 120 mm is the patient's right


def _grid(shape=SHAPE, spacing=SPACING):
    return np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij", sparse=True)


def _ellipsoid(centre, radii, shape=SHAPE, spacing=SPACING):
    z, y, x = _grid(shape, spacing)
    return sum(((a - c) / r) ** 2 for a, c, r in zip((z, y, x), centre, radii)) <= 1


def _sphere(centre, r, shape=SHAPE, spacing=SPACING):
    return _ellipsoid(centre, (r, r, r), shape, spacing)


KIDNEY_R = (50.0, 24.0, 28.0)  # craniocaudal, AP, LR semi-axes (mm)
RIGHT_C, LEFT_C = (70.0, 72.0, 60.0), (74.0, 76.0, 180.0)
# (kidney centre, tumor centre, radius, expected side, AP position, polar position)
TUMORS = [
    ((70.0, 72.0, 60.0), (105.0, 72.0, 60.0 - 26.0), 14.0, "right", "central", "upper pole"),  # lateral, upper
    ((70.0, 72.0, 60.0), (40.0, 72.0 - 22.0, 62.0), 9.0, "right", "anterior", "lower pole"),  # anterior, lower
    ((74.0, 76.0, 180.0), (74.0, 76.0 + 20.0, 180.0 + 8.0), 11.0, "left", "posterior", "interpolar"),
]


@pytest.fixture(scope="module")
def constructed():
    kidneys = _ellipsoid(RIGHT_C, KIDNEY_R) | _ellipsoid(LEFT_C, KIDNEY_R)
    labels = kidneys.astype(np.uint8)
    truths = []
    for _, centre, r, side, ap, pole in TUMORS:
        tumor = _sphere(centre, r)
        labels[tumor] = 2
        truths.append(
            {
                "volume_ml": 4 / 3 * np.pi * r**3 / 1000,
                "diameter_mm": 2 * r,
                "exophytic": float((tumor & ~kidneys).sum() / tumor.sum()),
                "side": side,
                "ap": ap,
                "pole": pole,
            }
        )
    return labels, truths


def test_descriptors_match_the_known_tumor_geometry(constructed):
    labels, truths = constructed
    report = describe_case(labels, SPACING)
    assert len(report["tumors"]) == len(truths)
    by_volume = sorted(truths, key=lambda t: -t["volume_ml"])
    voxel = max(SPACING)
    for got, truth in zip(report["tumors"], by_volume):
        assert got["volume_ml"] == pytest.approx(truth["volume_ml"], rel=0.02)
        assert abs(got["diameter_mm"] - truth["diameter_mm"]) <= voxel
        assert abs(got["axial_diameter_mm"] - truth["diameter_mm"]) <= voxel
        assert abs(got["exophytic_share"] - truth["exophytic"]) <= 0.05, (got, truth)
        assert got["side"] == truth["side"]
        assert got["ap_position"] == truth["ap"]
        assert got["polar_position"] == truth["pole"]
        assert got["sinus_fat_distance_mm"] is None  # no CT given
    right, left = report["kidneys"]
    assert right["side"] == "right" and left["side"] == "left"
    # the right kidney's length reaches the upper tumor's top (kidney 20-120 mm, tumor to 119 mm)
    assert right["length_mm"] == pytest.approx(2 * KIDNEY_R[0], abs=2 * SPACING[0])
    assert right["tumor_ml"] == pytest.approx(sum(t["volume_ml"] for t in truths if t["side"] == "right"), rel=0.02)


def test_exophytic_share_spans_endophytic_to_exophytic():
    kidney = _ellipsoid(RIGHT_C, KIDNEY_R)
    inside = _sphere(RIGHT_C, 8.0)
    assert exophytic_share(inside, kidney & ~inside, SPACING) == 0.0
    # a tumor on the surface, centred 2 mm inside, 6 mm out: the share from the voxels themselves
    for shift in (-10.0, 0.0, 8.0):
        tumor = _sphere((70.0, 72.0, 60.0 - 28.0 + shift), 12.0)
        truth = float((tumor & ~kidney).sum() / tumor.sum())
        got = exophytic_share(tumor, kidney & ~tumor, SPACING)
        assert abs(got - truth) <= 0.05, (shift, got, truth)
    # a tumor beyond the kidney's pole, with no parenchyma in its slices, lies wholly outside
    beyond = _sphere((70.0 + 50.0 + 14.0, 72.0, 60.0), 10.0)
    assert exophytic_share(beyond, kidney, SPACING) == 1.0


def test_sinus_fat_distance_is_measured_from_the_ct():
    kidney = _ellipsoid(RIGHT_C, KIDNEY_R)
    sinus = _ellipsoid((70.0, 72.0, 72.0), (25.0, 8.0, 8.0))  # fat inside the kidney's medial half
    tumor = _sphere((70.0, 72.0, 60.0 - 24.0), 10.0)
    labels = np.zeros(SHAPE, np.uint8)
    labels[kidney & ~sinus] = 1
    labels[tumor] = 2
    ct = np.full(SHAPE, -100, np.int16)  # fat around: outside the kidney's outline it does not count
    ct[kidney] = 150
    ct[sinus] = -100
    report = describe_case(labels, SPACING, ct=ct)
    got = report["tumors"][0]["sinus_fat_distance_mm"]
    # from the tumor's medial edge (x = 46 mm) to the sinus's lateral edge (x = 64 mm)
    assert got == pytest.approx(18.0, abs=2 * SPACING[1])


def test_no_kidney_gives_a_report_that_says_so(tmp_path):
    report = describe_case(np.zeros((5, 20, 20), np.uint8), (1.0, 1.0, 1.0))
    assert report["tumors"] == [] and not any(k["present"] for k in report["kidneys"])
    assert "no kidney or tumor" in " ".join(report["notes"])
    assert "No tumor segmented" in report_text(report)


def test_bad_labels_and_grids_are_refused():
    labels = np.zeros((5, 20, 20), np.uint8)
    labels[2, 5, 5] = 4  # 3 is KiTS23's cyst; 4 is nothing
    with pytest.raises(KidsegError, match=r"label\(s\) 4"):
        describe_case(labels, (1.0, 1.0, 1.0))
    with pytest.raises(KidsegError, match="do not match the CT"):
        describe_case(np.zeros((5, 20, 20), np.uint8), (1.0, 1.0, 1.0), ct=np.zeros((5, 20, 21), np.int16))


def test_report_files_are_written_once_and_read_back(tmp_path, constructed):
    labels, _ = constructed
    ct = np.where(labels > 0, 150, 40).astype(np.int16)
    report = describe_case(labels, SPACING, ct=ct, provenance={"alpha": 0.4, "corrected_voxels": 12})
    written = write_report(report, tmp_path / "r", ct=ct, labels=labels, spacing=SPACING)
    assert [p.name for p in written] == ["report.json", "report.csv", "report.png", "report.pdf"]
    back = json.loads((tmp_path / "r" / "report.json").read_text())
    assert back["provenance"]["corrected_voxels"] == 12 and len(back["tumors"]) == 3
    csv_lines = (tmp_path / "r" / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 2 + 3 and csv_lines[0].startswith("kind,side,tumor")
    assert (tmp_path / "r" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "r" / "report.pdf").read_bytes()[:4] == b"%PDF"
    with pytest.raises(KidsegError, match="already exists"):
        write_report(report, tmp_path / "r", ct=ct, labels=labels, spacing=SPACING)
    row = summary_row(report, "case")
    assert row["tumors"] == 3 and row["largest_tumor_side"] == "right"
    assert rows_to_csv([row]).splitlines()[1].startswith("case,")


def test_the_page_has_no_internal_counters_and_no_blank_gap(constructed):
    """What the referring physician reads: the software and how the labels were made, not the
    hand-edited voxel count or checkpoint stamps (those stay in report.json); the images follow the
    text and each other without an empty band between them."""
    from napari_kidseg.report import report_figure

    labels, _ = constructed
    ct = np.where(labels > 0, 150, 40).astype(np.int16)
    provenance = {
        "coarse": "coarse.safetensors (bundled-2026-11-30T14:02)",
        "refine": "refine.safetensors (bundled-2026-11-30T14:02)",
        "alpha": 0.4,
        "hand_edited_voxels": 12345,
    }
    report = describe_case(labels, SPACING, ct=ct, provenance=provenance)
    text = report_text(report)
    assert "12345" not in text and "hand_edited" not in text and "2026-11-30" not in text and "alpha" not in text
    assert text.splitlines()[-1].startswith("Made by napari-kidseg") and "corrected by hand" in text
    assert report["provenance"]["hand_edited_voxels"] == 12345  # kept for the record
    fig = report_figure(report, ct, labels, SPACING)
    fig.canvas.draw()
    h_in = fig.get_size_inches()[1]
    boxes = sorted((ax.get_position() for ax in fig.axes), key=lambda b: -b.y1)  # top to bottom
    assert len(boxes) == 1 + 3
    coronal, first_row = boxes[0], boxes[1]
    assert (coronal.y0 - first_row.y1) * h_in < 0.5  # inches between the overview and the tumors: a title
    text_bottom = fig.texts[0].get_window_extent(fig.canvas.get_renderer()).y0 / fig.bbox.height
    assert (text_bottom - coronal.y1) * h_in < 0.5
    assert min(b.y0 for b in boxes) >= 0.0  # and it all fits on the page
