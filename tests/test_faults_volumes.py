"""Faulty inputs found by the fault campaign (issue 25): faulty DICOM series derived from the real
shared series, odd NIfTI/MHD files, and the one check of what a readable CT is."""

from __future__ import annotations

import math
import shutil
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import shared_path

from napari_kidseg._napari_io import read_layers
from napari_kidseg.errors import KidsegError, KidsegWarning
from napari_kidseg.io import readers, volumes


@pytest.fixture(scope="module")
def series():
    """The real series' files in slice order (20 slices, 2 mm apart, 512 x 512)."""
    folder = shared_path("realct", "totalseg-abdomen-3mm", "dicom-series")
    files = sorted(folder.glob("*.dcm"))
    return sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def clean(series):
    return volumes.read_ct(series[0].parent)


def _copy(series, folder, skip=()):
    folder.mkdir()
    for k, f in enumerate(series):
        if k not in skip:
            shutil.copy(f, folder / f.name)
    return folder


def _edit(folder, series, k, change):
    path = folder / series[k].name
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def _one_line_error(folder, *needles):
    with pytest.raises(KidsegError) as err:
        volumes.read_ct(folder)
    msg = str(err.value)
    assert "\n" not in msg and str(folder) in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_faulty_series_that_cannot_be_read_right_are_refused_in_one_line(tmp_path, series):
    # a missing slice: the gap is named
    _one_line_error(_copy(series, tmp_path / "missing", skip=(10,)), "misses slices: 4.0 mm between")
    # an unreadable (truncated) slice file: GDCM would leave it out without a word
    trunc = _copy(series, tmp_path / "truncated")
    blob = (trunc / series[7].name).read_bytes()
    (trunc / series[7].name).write_bytes(blob[: len(blob) // 2])
    _one_line_error(trunc, series[7].name, "unreadable")
    # uneven pixel spacing in one slice
    odd = _copy(series, tmp_path / "pixel-spacing")
    _edit(odd, series, 7, lambda ds: setattr(ds, "PixelSpacing", [1.171875, 1.171875]))
    _one_line_error(odd, "uneven pixel spacing", series[7].name, "1.1719 x 1.1719 mm")
    # two different slices at one position
    clash = _copy(series, tmp_path / "clash")
    _edit(clash, series, 8, lambda ds: setattr(ds, "ImagePositionPatient", series_position(series, 7)))
    _one_line_error(clash, "two different slices at the same position")


def series_position(series, k):
    return [float(v) for v in pydicom.dcmread(series[k], stop_before_pixels=True).ImagePositionPatient]


def test_a_duplicated_slice_is_read_once_with_a_note(tmp_path, series, clean):
    dup = _copy(series, tmp_path / "dup")
    shutil.copy(series[10], dup / f"copy_{series[10].name}")
    with pytest.warns(KidsegWarning, match=f"copy_{series[10].name} is a copy of .*read once"):
        vol = volumes.read_ct(dup)
    assert vol.array.shape == clean.array.shape and np.array_equal(vol.array, clean.array)
    assert vol.geometry == clean.geometry


def _world_value(vol, world_lps):
    """The voxel value of ``vol`` nearest to an LPS world point."""
    g = vol.geometry
    rel = np.asarray(world_lps, float) - np.asarray(g.origin_zyx, float)[::-1]
    idx_xyz = np.linalg.solve(np.asarray(g.direction, float), rel) / np.asarray(g.spacing, float)[::-1]
    k, j, i = np.round(idx_xyz[::-1]).astype(int)
    return vol.array[k, j, i]


def _pixels_at_world(series_files, folder, k, every=16):
    """(LPS world points, HU) of a slice's pixels on a coarse grid, from the DICOM header itself."""
    ds = pydicom.dcmread(folder / series_files[k].name)
    row, col = np.asarray(ds.ImageOrientationPatient, float).reshape(2, 3)
    dj, di = (float(v) for v in ds.PixelSpacing)
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    pts, vals = [], []
    for j in range(40, ds.Rows - 40, every):
        for i in range(40, ds.Columns - 40, every):
            pts.append(np.asarray(ds.ImagePositionPatient, float) + i * di * row + j * dj * col)
            vals.append(max(hu[j, i], volumes.AIR_HU))
    return pts, np.asarray(vals)


def test_a_gantry_tilt_is_resampled_onto_a_proper_grid_with_a_note(tmp_path, series, clean):
    tilt = _copy(series, tmp_path / "tilt")
    t = math.radians(15)
    for k in range(len(series)):  # the table moves along z, the slices lean 15 degrees
        _edit(
            tilt, series, k, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, math.cos(t), -math.sin(t)])
        )
    with pytest.warns(KidsegWarning, match="gantry tilt of 15.0 degrees: resampled"):
        vol = volumes.read_ct(tilt)
    # slices 2 mm apart along the table are 2 cos(15) mm apart along their normal: the voxel
    # volume (every mL) was 3.5% too large before
    assert vol.array.shape[0] == 20
    assert vol.geometry.spacing[0] == pytest.approx(2 * math.cos(t), abs=1e-3)
    # every pixel lies where its header says: the value at its world position is its own
    for k in (3, 10, 16):
        pts, hu = _pixels_at_world(series, tilt, k)
        got = np.array([_world_value(vol, p) for p in pts], float)
        assert np.median(np.abs(got - hu)) < 15, k


def test_uneven_slice_distances_are_resampled_with_a_note(tmp_path, series):
    uneven = _copy(series, tmp_path / "uneven")
    z0 = series_position(series, 0)[2]
    for k in range(1, len(series) - 1):  # slices at 0, 2.6, 4.4, 6.6, ..., 36.4, 38 mm: gaps of 2.6, 1.8 and 1.6
        shift = 0.6 if k % 2 else 0.4
        pos = series_position(series, k)
        _edit(
            uneven,
            series,
            k,
            lambda ds, pos=pos, shift=shift: setattr(ds, "ImagePositionPatient", [*pos[:2], pos[2] + shift]),
        )
    with pytest.warns(KidsegWarning, match=r"uneven slice distances \(1.60..2.60 mm\): resampled .* 2.00 mm"):
        vol = volumes.read_ct(uneven)
    assert vol.array.shape[0] == 20 and vol.geometry.spacing[0] == pytest.approx(2.0, abs=1e-6)
    assert vol.geometry.origin_zyx[0] == pytest.approx(z0)
    for k in (5, 10):  # the slices themselves land at their true height
        pts, hu = _pixels_at_world(series, uneven, k)
        got = np.array([_world_value(vol, p) for p in pts], float)
        # nearest voxel is up to 0.6 mm off in z: soft tissue changes little over that
        assert np.median(np.abs(got - hu)) < 25, k


def test_a_resampled_series_gets_no_dicom_seg(tmp_path, series, clean):
    from napari_kidseg.io.dicom_seg import series_datasets

    tilt = _copy(series, tmp_path / "tilt")
    for k in range(len(series)):
        _edit(tilt, series, k, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0.9659, -0.2588]))
    with pytest.raises(KidsegError, match="gantry tilt .* a DICOM SEG cannot reference its slices"):
        series_datasets(tilt)


def test_a_series_without_uid_is_named_so(tmp_path, series):
    two = tmp_path / "two"
    two.mkdir()
    for f in series:
        shutil.copy(f, two / f.name)
    for f in shared_path("realct", "dcmqi-liver-3slice").glob("*.dcm"):
        shutil.copy(f, two / f"liver_{f.name}")
    with pytest.warns(KidsegWarning, match=r"using \(no SeriesInstanceUID\) \(20 slices\)"):
        volumes.read_ct(two)


# ------------------------------------------------------------------ one readable-CT check
def _nifti(path, data):
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 3.0, 1.0])), path)
    return path


def _body(dtype=np.int16, shape=(48, 48, 10)):
    arr = np.full(shape, -1000, np.float64)
    arr[8:40, 8:40] = 40
    arr[12:20, 12:20] = -100
    return arr.astype(dtype)


def test_readable_ct_checks_size_type_and_hu_in_one_line(tmp_path):
    cases = {
        "int8.nii.gz": (np.random.default_rng(0).integers(-100, 100, (48, 48, 10)).astype(np.int8), "not a CT"),
        "one.nii.gz": (np.full((1, 1, 1), -1000, np.int16), "is 1x1x1 voxels; a CT needs at least 8x8"),
        "nan.nii.gz": (np.full((48, 48, 10), np.nan, np.float32), "have no value (NaN)"),
    }
    for name, (data, problem) in cases.items():
        path = _nifti(tmp_path / name, data)
        with pytest.raises(KidsegError) as err:
            volumes.read_ct(path)
        assert str(path) in str(err.value) and problem in str(err.value), str(err.value)
        with pytest.warns(KidsegWarning, match=problem.replace("(", r"\(").replace(")", r"\)")):
            assert read_layers(str(path)) is None  # the napari reader: the same check, no traceback


def test_a_ct_with_some_nan_voxels_reads_them_as_air_with_a_note(tmp_path):
    arr = _body(np.float32)
    arr[:, :3] = np.nan  # 6% of the voxels
    path = _nifti(tmp_path / "nan.nii.gz", arr)
    with pytest.warns(KidsegWarning, match=r"6.2% of the voxels have no value .* read as air"):
        vol = volumes.read_ct(path)
    assert np.isfinite(vol.array).all() and vol.array.min() == volumes.AIR_HU
    with pytest.warns(KidsegWarning, match="6.2% of the voxels"):
        layers = read_layers(str(path))
    assert np.isfinite(layers[0][0]).all()


def test_a_truncated_uncompressed_nifti_is_refused(tmp_path):
    path = _nifti(tmp_path / "ct.nii", _body())
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) * 2 // 3])
    with pytest.raises(KidsegError, match=r"ct.nii: truncated file \(\d+ bytes; its header needs \d+\)"):
        volumes.read_ct(path)


def test_mhd_labels_are_written_under_their_own_names_and_a_missing_data_file_is_named(tmp_path):
    arr = np.zeros((4, 20, 20), np.uint8)
    arr[1, 5:9, 5:9] = 1
    like = volumes.volume_in_memory(arr, (1, 1, 1))
    out = volumes.write_labels(tmp_path / "labels.mhd", arr, like)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.mhd", "labels.zraw"]
    assert "ElementDataFile = labels.zraw" in out.read_text()
    assert np.array_equal(readers.read_labels(out).array, arr)
    with pytest.raises(KidsegError, match="already exists"):
        volumes.write_labels(tmp_path / "labels.mhd", arr, like)
    (tmp_path / "labels.zraw").unlink()
    with pytest.raises(KidsegError, match="its data file labels.zraw is missing"):
        readers.read_labels(out)


def test_a_dicom_seg_given_as_a_ct_is_named_as_one(tmp_path):
    from napari_kidseg.io.dicom_seg import write_dicom_seg

    liver = shared_path("realct", "dcmqi-liver-3slice")
    ct = volumes.read_ct(liver)
    labels = np.zeros(ct.array.shape, np.uint8)
    labels[:, 200:260, 200:260] = 1
    seg = write_dicom_seg(liver, labels, tmp_path / "seg.dcm")
    with pytest.raises(KidsegError, match="is a DICOM Segmentation \\(labels\\), not a CT"):
        volumes.read_ct(seg)
    alone = tmp_path / "only-seg"
    alone.mkdir()
    shutil.copy(seg, alone / "seg.dcm")
    with pytest.raises(KidsegError, match="holds only a DICOM Segmentation"):
        volumes.read_ct(alone)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a SEG beside its CT series is no second series to warn about
        shutil.copy(seg, tmp_path / "with-ct.dcm")
        both = tmp_path / "both"
        shutil.copytree(liver, both, ignore=shutil.ignore_patterns("*.nrrd"))
        shutil.copy(seg, both / "seg.dcm")
        assert volumes.read_ct(both).array.shape == ct.array.shape
