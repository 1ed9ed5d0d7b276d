"""Surface Dice and HD95 by the KiTS rules (napari_kidseg.evaluation) and kidseg evaluate on folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import surface_distance
from conftest import shared_path

from napari_kidseg import evaluation
from napari_kidseg.cli import main
from napari_kidseg.errors import KidsegError
from napari_kidseg.io import readers, volumes


def ball(shape, centre_mm, radius_mm, spacing):
    grids = np.meshgrid(*[(np.arange(n) * s) for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm)) <= radius_mm**2


def sphere_surface_dice(radius, shift, tol, n=200001):
    """Surface Dice of two spheres of one radius whose centres lie ``shift`` apart: the distance from
    the point at angle theta on one to the other is |R - sqrt(R^2 - 2 R d cos(theta) + d^2)|, and
    area is uniform in cos(theta) (Archimedes), the same for both spheres."""
    u = np.linspace(-1, 1, n)
    dist = np.abs(radius - np.sqrt(radius**2 - 2 * radius * shift * u + shift**2))
    return float(np.mean(dist <= tol)), float(np.quantile(dist, 0.95))


def library(pred, ref, spacing, tol):
    d = surface_distance.compute_surface_distances(ref, pred, list(spacing))
    return (
        surface_distance.compute_surface_dice_at_tolerance(d, tol),
        surface_distance.compute_robust_hausdorff(d, 95),
    )


def test_tolerances_by_name_or_in_mm_and_one_line_for_nonsense():
    assert evaluation.parse_tolerances("kits21") == pytest.approx((2.178, 1.393, 1.536), abs=1e-3)
    assert evaluation.parse_tolerances("KiTS23") == pytest.approx((1.033, 1.133, 1.150), abs=1e-3)
    assert evaluation.parse_tolerances("2,1.5, 1") == (2.0, 1.5, 1.0)
    for bad in ("kits19", "1,2", "1,a,3", "1,-1,2"):
        with pytest.raises(KidsegError, match="kits21, kits23 or three tolerances"):
            evaluation.parse_tolerances(bad)


def test_empty_rules():
    empty = np.zeros((8, 8, 8), bool)
    full = empty.copy()
    full[2:5, 2:5, 2:5] = True
    assert evaluation.surface_scores(empty, empty, (1, 1, 1), 1.0) == {"surface_dice": 1.0, "hd95_mm": 0.0}
    assert evaluation.surface_scores(full, empty, (1, 1, 1), 1.0) == {"surface_dice": 0.0, "hd95_mm": None}
    assert evaluation.surface_scores(empty, full, (1, 1, 1), 1.0) == {"surface_dice": 0.0, "hd95_mm": None}
    assert evaluation.surface_scores(full, full, (3, 1, 1), 0.0) == {"surface_dice": 1.0, "hd95_mm": 0.0}
    labels = np.zeros((8, 8, 8), np.uint8)
    s = evaluation.case_scores(labels, labels, (1, 1, 1))
    assert s["mean_surface_dice"] == 1.0 and s["kits21_mean_dice"] == 1.0 and s["hd95_tumor"] == 0.0


@pytest.mark.parametrize("spacing", [(0.5, 0.5, 0.5), (2.5, 0.7, 0.7)])
def test_shifted_sphere_has_the_surface_dice_of_its_geometry(spacing):
    """A sphere of 12 mm shifted by 4 mm: below the shift, the share of both surfaces within a
    tolerance has a closed form; at the shift or above, all of it is within.

    The library (so KiTS) measures between the voxel corners of two staircase surfaces, which
    brings them a little closer than the smooth spheres: on a 0.5 mm grid its figures run 0.06-0.08
    above the closed form at every tolerance. On the anisotropic grid only the library's own
    figures and the limits are checked (its staircase is coarser across slices)."""
    shape = tuple(int(44 / s) for s in spacing)
    centre = np.array(shape) * spacing / 2
    ref = ball(shape, centre, 12.0, spacing)
    k = int(round(4.0 / spacing[1]))
    shift = k * spacing[1]  # about 4 mm in-plane, whole voxels: the staircase moves with it
    pred = np.roll(ref, k, axis=1)
    previous = 0.0
    for tol in (1.0, 2.0, 3.0):
        expected, _ = sphere_surface_dice(12.0, shift, tol)
        got = evaluation.surface_scores(pred, ref, spacing, tol)
        if spacing == (0.5, 0.5, 0.5):
            assert expected <= got["surface_dice"] <= expected + 0.1, tol
        assert got["surface_dice"] == pytest.approx(library(pred, ref, spacing, tol)[0], abs=1e-9)
        assert got["surface_dice"] > previous
        previous = got["surface_dice"]
    assert evaluation.surface_scores(pred, ref, spacing, shift + 1e-6)["surface_dice"] == pytest.approx(1.0)
    got = evaluation.surface_scores(pred, ref, spacing, 1.0)["hd95_mm"]
    if spacing == (0.5, 0.5, 0.5):
        assert got == pytest.approx(sphere_surface_dice(12.0, shift, 0.0)[1], abs=0.5)  # within a voxel
    assert got == pytest.approx(library(pred, ref, spacing, 1.0)[1], abs=1e-9)


def test_anisotropic_spacing_a_slice_is_not_a_pixel():
    """The same one-voxel shift is 3 mm across slices and 0.8 mm in-plane: at a 2 mm tolerance the
    in-plane shift is wholly tolerated and the one across slices is not."""
    spacing = (3.0, 0.8, 0.8)
    shape = (20, 80, 80)
    ref = ball(shape, np.array(shape) * spacing / 2, 15.0, spacing)
    in_plane = evaluation.surface_scores(np.roll(ref, 1, axis=2), ref, spacing, 2.0)
    across = evaluation.surface_scores(np.roll(ref, 1, axis=0), ref, spacing, 2.0)
    assert in_plane["surface_dice"] == pytest.approx(1.0)
    assert across["surface_dice"] < 0.9
    assert in_plane["hd95_mm"] == pytest.approx(0.8) and across["hd95_mm"] == pytest.approx(3.0)
    for pred in (np.roll(ref, 1, axis=2), np.roll(ref, 1, axis=0)):
        sd, hd = library(pred, ref, spacing, 2.0)
        got = evaluation.surface_scores(pred, ref, spacing, 2.0)
        assert got["surface_dice"] == pytest.approx(sd, abs=1e-9) and got["hd95_mm"] == pytest.approx(hd, abs=1e-9)


def test_matches_the_library_on_random_blobs_2d_and_3d_and_ignores_the_margin():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for ndim, spacing in ((3, (2.0, 0.7, 0.9)), (2, (0.6, 1.3))):
        for _ in range(3):
            a = ndimage.gaussian_filter(rng.random((24,) * ndim), 2) > 0.5
            b = ndimage.gaussian_filter(rng.random((24,) * ndim), 2) > 0.5
            for tol in (0.5, 1.5, 4.0):
                got = evaluation.surface_scores(a, b, spacing, tol)
                sd, hd = library(a, b, spacing, tol)
                assert got["surface_dice"] == pytest.approx(sd, abs=1e-9)
                assert got["hd95_mm"] == pytest.approx(hd, abs=1e-9)
            big_a, big_b = (np.pad(m, 5) for m in (a, b))  # background around changes nothing
            assert evaluation.surface_scores(big_a, big_b, spacing, 1.5) == pytest.approx(
                evaluation.surface_scores(a, b, spacing, 1.5)
            )


def test_case_scores_nested_regions_follow_the_labels():
    spacing = (1.0, 1.0, 1.0)
    shape = (30, 30, 30)
    c = np.array(shape) / 2
    ref = np.zeros(shape, np.uint8)
    ref[ball(shape, c, 12, spacing)] = 1
    ref[ball(shape, c + [0, 0, 6], 4, spacing)] = 2
    ref[ball(shape, c - [0, 0, 6], 3, spacing)] = 3  # a cyst: a mass, not tumor
    pred = ref.copy()
    pred[pred == 3] = 1  # the cyst called kidney
    s = evaluation.case_scores(pred, ref, spacing, evaluation.TOLERANCES_MM["kits23"])
    assert s["surface_dice_kidney_masses"] == 1.0 and s["surface_dice_tumor"] == 1.0
    assert s["masses_dice"] < 1.0 and s["surface_dice_masses"] < 1.0
    assert s["hd95_kidney_masses"] == 0.0 and s["hd95_tumor"] == 0.0
    assert s["mean_surface_dice"] == pytest.approx((2 + s["surface_dice_masses"]) / 3)


def _write(path, labels, spacing=(2.0, 0.8, 0.8)):
    vol = volumes.volume_in_memory(labels, spacing)
    volumes.write_labels(path, labels, vol)


def test_evaluate_a_folder_pairs_by_case_name_and_goes_on_past_bad_cases(tmp_path, capsys):
    shape = (16, 40, 40)
    spacing = (2.0, 0.8, 0.8)
    ref = np.zeros(shape, np.uint8)
    ref[ball(shape, np.array(shape) * spacing / 2, 10, spacing)] = 1
    ref[ball(shape, np.array(shape) * spacing / 2, 4, spacing)] = 2
    refs, preds = tmp_path / "ref", tmp_path / "pred"
    for case in ("case_00000", "case_00001", "case_00002", "case_00003"):
        (refs / case).mkdir(parents=True)
        _write(refs / case / "segmentation.nii.gz", ref, spacing)
    preds.mkdir()
    _write(preds / "case_00000.nii.gz", ref, spacing)  # perfect
    _write(preds / "case_00001.nii.gz", np.roll(ref, 1, axis=2), spacing)  # in-plane shift of 0.8 mm
    _write(preds / "case_00002.nii.gz", ref[:, :, :-1], spacing)  # another grid: refused, one line
    _write(preds / "case_00077.nii.gz", ref, spacing)  # no reference: refused, one line
    assert (
        main(["evaluate", str(preds), str(refs), "--json", "--tolerances", "kits23", "--csv", str(tmp_path / "s.csv")])
        == 1
    )
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    err = captured.err.strip().splitlines()
    assert [c["case"] for c in out["cases"]] == ["case_00000", "case_00001"]
    assert any("case_00077" in line and "no reference" in line for line in err)
    assert any("case_00002" in line and "differs" in line for line in err)
    assert any("case_00003" in line and "without a prediction" in line for line in err)
    perfect, shifted = out["cases"]
    assert perfect["surface_dice_kidney_masses"] == 1.0 and perfect["hd95_tumor"] == 0.0
    assert shifted["surface_dice_tumor"] == 1.0  # 0.8 mm is within KiTS23's 1.150 mm
    assert shifted["hd95_kidney_masses"] == pytest.approx(0.8)
    assert shifted["tolerances_mm"] == pytest.approx(list(evaluation.TOLERANCES_MM["kits23"]))
    for key in ("surface_dice_kidney_masses", "surface_dice_masses", "surface_dice_tumor", "hd95_masses"):
        assert key in perfect
    assert out["mean"]["kidney_tumor_dice"] == pytest.approx((1 + shifted["kidney_tumor_dice"]) / 2)
    assert out["median"]["hd95_kidney_masses"] == pytest.approx(0.4)
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows[0].startswith("case,") and [r.split(",")[0] for r in rows[1:]] == [
        "case_00000", "case_00001", "mean", "median"
    ]  # fmt: skip
    # the table: the KiTS columns, the mean and the median; an existing CSV is not overwritten
    assert main(["evaluate", str(preds), str(refs), "--csv", str(tmp_path / "s.csv")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["evaluate", str(preds), str(refs), "--tolerances", "1,1,1"]) == 1
    table = capsys.readouterr().out
    assert (
        "sd_kid+masses" in table and "hd95_tum_mm" in table and "median" in table and "1.000, 1.000, 1.000 mm" in table
    )


def test_evaluate_one_pair_with_one_side_empty_says_n_a(tmp_path, capsys):
    shape = (10, 20, 20)
    ref = np.zeros(shape, np.uint8)
    ref[3:7, 5:15, 5:15] = 1
    ref[4:6, 8:12, 8:12] = 2
    pred = np.where(ref == 2, 1, ref).astype(np.uint8)  # the tumor missed
    _write(tmp_path / "ref.nii.gz", ref)
    _write(tmp_path / "pred.nii.gz", pred)
    assert main(["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["cases"][0]
    assert row["surface_dice_tumor"] == 0.0 and row["hd95_tumor"] is None and row["surface_dice_kidney_masses"] == 1.0
    assert main(["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz")]) == 0
    assert "n/a" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz"), "--tolerances", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tolerances" in err[0]


@pytest.mark.slow
@pytest.mark.shared_data
def test_agrees_with_the_library_on_real_kits19_labels():
    """Two small real KiTS19 label volumes, each against perturbed copies of itself: the same
    Surface Dice and HD95 as DeepMind's library to 1e-6 in every region."""
    root = shared_path("kits19-masks")
    for case in ("case_00129", "case_00122"):
        ref = readers.read_labels(root / case / volumes.KITS_LABELS)
        sp = ref.geometry.spacing
        for pred in (np.roll(ref.array, (1, 2), axis=(0, 1)), np.where(ref.array == 2, 1, ref.array)):
            ours = evaluation.case_scores(pred, ref.array, sp, evaluation.TOLERANCES_MM["kits21"])
            pm, rm = evaluation.region_masks(pred), evaluation.region_masks(ref.array)
            for region, tol in zip(evaluation.REGIONS, evaluation.TOLERANCES_MM["kits21"]):
                if not pm[region].any() or not rm[region].any():
                    continue
                sd, hd = library(pm[region], rm[region], sp, tol)
                assert ours[f"surface_dice_{region}"] == pytest.approx(sd, abs=1e-6)
                assert ours[f"hd95_{region}"] == pytest.approx(hd, abs=1e-6)
