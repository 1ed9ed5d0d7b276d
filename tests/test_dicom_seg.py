"""DICOM SEG: a round trip on a real DICOM series, dciodvfy's verdict, and the refusals."""

from __future__ import annotations

import copy
import shutil
import subprocess

import numpy as np
import pytest
from conftest import shared_path

from napari_kidseg.cli import main
from napari_kidseg.errors import KidsegError
from napari_kidseg.io import readers, volumes
from napari_kidseg.io.dicom_seg import read_dicom_seg, write_dicom_seg


def _labels_for(ct):
    labels = np.zeros(ct.array.shape, np.uint8)
    labels[:, 200:300, 100:220] = 1
    labels[1, 230:260, 130:170] = 2
    labels[-1, 400:410, 300:330] = 2  # a tumor speck away from the kidney: any voxel must survive
    return labels


@pytest.fixture(scope="module")
def real_series():
    return shared_path("realct", "dcmqi-liver-3slice")


def test_round_trip_on_a_real_series_is_voxel_exact_and_valid(tmp_path, real_series):
    ct = volumes.read_ct(real_series)
    labels = _labels_for(ct)
    out = write_dicom_seg(real_series, labels, tmp_path / "kidneys.dcm", models={"coarse": "c (v4)"})
    assert volumes.is_dicom_seg(out) and not volumes.is_dicom_seg(next(real_series.glob("*.dcm")))
    on_ct = read_dicom_seg(out, like=ct)
    assert np.array_equal(on_ct.array, labels) and on_ct.geometry == ct.geometry
    own_grid = read_dicom_seg(out)  # no CT at hand: the grid the SEG itself describes
    assert np.array_equal(own_grid.array, labels)
    assert np.allclose(own_grid.geometry.spacing, ct.geometry.spacing, atol=1e-3)
    assert np.allclose(own_grid.geometry.origin_zyx, ct.geometry.origin_zyx, atol=1e-3)
    # read_labels knows a SEG file too, and the napari reader opens it as a labels layer
    assert np.array_equal(readers.read_labels(out, like=ct).array, labels)
    from napari_kidseg._napari_io import read_layers

    ((data, meta, kind),) = read_layers(str(out))
    assert kind == "labels" and np.array_equal(data, labels)

    import pydicom

    ds = pydicom.dcmread(out)
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["Kidney", "Kidney tumor"]
    assert ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "64033007"  # SNOMED kidney
    algo = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "napari-kidseg cascade" and "c (v4)" in str(algo.AlgorithmParameters)
    assert (
        ds.ReferencedSeriesSequence[0].SeriesInstanceUID
        == pydicom.dcmread(next(real_series.glob("*.dcm"))).SeriesInstanceUID
    )
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed; `make setup` installs it")
    check = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True)
    errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
    assert not errors, errors


def _series_copy(src, dst, drop=None, n=6):
    """A longer series made from one real slice: n positions 1 mm apart, new instance UIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    dst.mkdir()
    first = pydicom.dcmread(sorted(src.glob("*.dcm"))[0])
    series = generate_uid()
    for k in range(n):
        if k == drop:
            continue
        ds = copy.deepcopy(first)  # a shallow copy would share (and shift) the first's elements
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [*first.ImagePositionPatient[:2], float(first.ImagePositionPatient[2]) + k]
        ds.InstanceNumber = k + 1
        ds.save_as(dst / f"{k:02d}.dcm")
    return dst


def test_bad_input_is_refused_in_one_line(tmp_path, real_series, capsys):
    ct = volumes.read_ct(real_series)
    labels = _labels_for(ct)
    # a series with a missing slice
    gap = _series_copy(real_series, tmp_path / "gap", drop=3)
    with pytest.raises(KidsegError, match="misses slices: 2.0 mm between"):
        write_dicom_seg(gap, np.zeros((5, 512, 512), np.uint8), tmp_path / "gap.dcm")
    # two series in one folder, no --series
    mixed = _series_copy(real_series, tmp_path / "mixed", n=4)
    for f in real_series.glob("*.dcm"):
        shutil.copy(f, mixed / f"other_{f.name}")
    with pytest.raises(KidsegError, match="holds 2 DICOM series; pick one with --series"):
        write_dicom_seg(mixed, np.zeros((4, 512, 512), np.uint8), tmp_path / "mixed.dcm", series_uid=None)
    # labels of another grid; an output that exists
    with pytest.raises(KidsegError, match="do not match the CT series"):
        write_dicom_seg(real_series, labels[:2], tmp_path / "x.dcm")
    (tmp_path / "exists.dcm").write_bytes(b"x")
    with pytest.raises(KidsegError, match="already exists"):
        write_dicom_seg(real_series, labels, tmp_path / "exists.dcm")
    assert (tmp_path / "exists.dcm").read_bytes() == b"x"
    # a NIfTI CT: the CLI says a SEG needs the DICOM series, in one line
    nifti = tmp_path / "ct.nii.gz"
    volumes.write_volume(nifti, ct.array, ct)
    volumes.write_labels(tmp_path / "labels.nii.gz", labels, ct)
    assert main(["export-seg", str(nifti), str(tmp_path / "labels.nii.gz"), "-o", str(tmp_path / "n.dcm")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kidseg: error: {nifti}: DICOM SEG needs the CT's DICOM series (a folder of .dcm files)"]


def test_anonymised_series_without_uids_is_refused(tmp_path):
    series = shared_path("realct", "totalseg-abdomen-3mm", "dicom-series")
    ct = volumes.read_ct(series)
    with pytest.raises(KidsegError, match="has no StudyInstanceUID or SeriesInstanceUID"):
        write_dicom_seg(series, np.zeros(ct.array.shape, np.uint8), tmp_path / "s.dcm")
    assert not (tmp_path / "s.dcm").exists()


def test_export_of_a_dicom_case_writes_a_seg_or_says_why_not(tmp_path, real_series):
    import json

    from napari_kidseg.review import DICOM_SEG_NAME, export_correction

    ct = volumes.read_ct(real_series)
    labels = _labels_for(ct)
    case = export_correction(tmp_path / "corr", ct, labels)
    assert np.array_equal(read_dicom_seg(case / DICOM_SEG_NAME, like=ct).array, labels)
    entry = json.loads((tmp_path / "corr" / "manifest.json").read_text())["cases"][0]
    assert entry["dicom_seg"] == DICOM_SEG_NAME and entry["dicom_seg_note"] is None
    anon = volumes.read_ct(shared_path("realct", "totalseg-abdomen-3mm", "dicom-series"))
    case = export_correction(tmp_path / "corr", anon, np.zeros(anon.array.shape, np.uint8) + 1)
    entry = json.loads((tmp_path / "corr" / "manifest.json").read_text())["cases"][1]
    assert not (case / DICOM_SEG_NAME).exists() and "has no StudyInstanceUID" in entry["dicom_seg_note"]
    assert (case / volumes.KITS_LABELS).exists()  # the KiTS export itself went through


def test_a_kits23_cyst_is_a_third_segment_and_comes_back(tmp_path, real_series):
    import pydicom

    ct = volumes.read_ct(real_series)
    labels = _labels_for(ct)
    labels[0, 210:220, 110:120] = 3
    out = write_dicom_seg(real_series, labels, tmp_path / "k23.dcm")
    assert [s.SegmentLabel for s in pydicom.dcmread(out).SegmentSequence] == ["Kidney", "Kidney tumor", "Kidney cyst"]
    assert np.array_equal(read_dicom_seg(out, like=ct).array, labels)
