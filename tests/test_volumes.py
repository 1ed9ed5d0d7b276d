"""CT and label I/O: exact geometry round trips checked by a second reader, bad input, atomic writes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared_path

from napari_kidseg.errors import KidsegError, KidsegWarning
from napari_kidseg.io import geometry, readers, volumes

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ------------------------------------------------------------------ an independent view of geometry
def index_to_lps_by_other_reader(path) -> np.ndarray:
    """4x4 map from ITK index (i, j, k) to LPS mm, read without SimpleITK.

    NIfTI through nibabel; NRRD and MetaImage by parsing their text headers here.
    """
    name = str(path).lower()
    if name.endswith((".nii", ".nii.gz")):
        return LPS_FROM_RAS @ nib.load(str(path)).affine
    with open(path, "rb") as fh:
        raw = fh.read(4096).decode("latin-1")
    aff = np.eye(4)
    if name.endswith(".nrrd"):
        assert "left-posterior-superior" in raw
        vecs = re.search(r"space directions: (.*)", raw).group(1)
        cols = [list(map(float, v.split(","))) for v in re.findall(r"\(([^)]*)\)", vecs)]
        aff[:3, :3] = np.array(cols).T
        aff[:3, 3] = list(map(float, re.search(r"space origin: \(([^)]*)\)", raw).group(1).split(",")))
        return aff
    assert name.endswith((".mha", ".mhd"))
    tm = np.array(list(map(float, re.search(r"TransformMatrix = (.*)", raw).group(1).split()))).reshape(3, 3)
    sp = np.array(list(map(float, re.search(r"ElementSpacing = (.*)", raw).group(1).split())))
    aff[:3, :3] = tm.T * sp  # MetaIO lists each axis's direction as a row
    aff[:3, 3] = list(map(float, re.search(r"Offset = (.*)", raw).group(1).split()))
    return aff


def marker_world_by_other_reader(path) -> np.ndarray:
    """World (LPS) centroid of the non-zero voxels, voxels and geometry both read independently
    of the code under test: nibabel for NIfTI, SimpleITK voxels + parsed header otherwise."""
    if str(path).lower().endswith((".nii", ".nii.gz")):
        data = np.asarray(nib.load(str(path)).dataobj)  # (i, j, k)
        ijk = np.argwhere(data > 0).mean(axis=0)
    else:
        data = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # (k, j, i)
        ijk = np.argwhere(data > 0).mean(axis=0)[::-1]
    return (index_to_lps_by_other_reader(path) @ np.append(ijk, 1.0))[:3]


def asymmetric_marker(shape) -> np.ndarray:
    """A blob in the patient's left (x high), superior (z high), anterior (y low) corner."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = (shape[0] * 0.8, shape[1] * 0.2, shape[2] * 0.75)
    r = np.array(shape) * 0.12
    return (((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 < 1).astype(np.uint8)


def write_source_ct(tmp_path, fmt_suffix: str, layout: str):
    """A CT-like volume written in ``fmt_suffix`` with the on-disk ``layout``, and read back."""
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 400, size=(18, 40, 44)).astype(np.int16)
    mem = volumes.volume_in_memory(arr, (2.5, 0.8, 0.7), (-40.0, 12.5, -30.25), geometry.direction_from_code(layout))
    path = tmp_path / f"ct{fmt_suffix}"
    volumes.write_volume(path, arr, mem)
    return volumes.read_ct(path), arr, mem


@pytest.mark.parametrize("src_suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
@pytest.mark.parametrize("layout", ["IPL", "RAS", "LPS"])
def test_label_round_trip_keeps_world_position_and_header(tmp_path, src_suffix, layout):
    ct, arr, mem = write_source_ct(tmp_path, src_suffix, layout)
    # reading brings the volume back to the canonical grid it was made on
    assert np.array_equal(ct.array, arr)
    assert np.allclose(ct.geometry.spacing, mem.geometry.spacing, atol=1e-5)
    assert np.allclose(ct.geometry.origin_zyx, mem.geometry.origin_zyx, atol=1e-4)
    marker = asymmetric_marker(ct.array.shape)
    expected = ct.geometry.world_of_index(np.argwhere(marker).mean(axis=0))
    # left (+x), anterior (-y), superior (+z) of the volume's centre in LPS world coordinates
    centre = ct.geometry.world_of_index((np.array(ct.array.shape) - 1) / 2)
    assert expected[0] > centre[0] and expected[1] < centre[1] and expected[2] > centre[2]
    src_aff = index_to_lps_by_other_reader(tmp_path / f"ct{src_suffix}")
    for out_suffix in (".nii.gz", ".nrrd", ".mha"):
        out = tmp_path / f"labels{out_suffix}"
        volumes.write_labels(out, marker, ct)
        assert np.allclose(marker_world_by_other_reader(out), expected, atol=1e-3)
        # same grid as the source file: shape on disk and index->world map
        assert np.allclose(index_to_lps_by_other_reader(out), src_aff, atol=1e-4)
        assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(tmp_path / f"ct{src_suffix}")).GetSize()
        assert np.array_equal(readers.read_labels(out, like=ct).array, marker)


def test_nifti_labels_keep_the_source_header(tmp_path):
    """A NIfTI source's sform, qform and their codes survive into the labels bit for bit."""
    data = np.zeros((30, 20, 10), np.int16) - 1000
    data[5:9, 4:8, 2:5] = 50
    aff = np.array([[0.0, 0.0, -2.5, 10.0], [0.0, -0.75, 0.0, 20.0], [-0.75, 0.0, 0.0, 30.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=2)
    src = tmp_path / "ct.nii.gz"
    nib.save(img, src)
    ct = volumes.read_ct(src)
    out = tmp_path / "labels.nii.gz"
    volumes.write_labels(out, (ct.array > 0).astype(np.uint8), ct)
    a, b = nib.load(src), nib.load(out)
    assert np.array_equal(a.header.get_sform(), b.header.get_sform())
    assert np.array_equal(a.header.get_qform(), b.header.get_qform())
    assert int(a.header["sform_code"]) == int(b.header["sform_code"]) == 2
    assert int(a.header["qform_code"]) == int(b.header["qform_code"]) == 1
    assert b.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(b.dataobj) > 0, data > 0)


def test_simpleitk_and_nibabel_agree_on_world_coordinates_of_real_kits_labels():
    path = shared_path("kits19-masks", "case_00003", "segmentation.nii.gz")
    vol = readers.read_labels(path)
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    for value in (1, 2):
        ours = vol.geometry.world_of_index(np.argwhere(vol.array == value).mean(axis=0))
        theirs = (LPS_FROM_RAS @ img.affine @ np.append(np.argwhere(data == value).mean(axis=0), 1))[:3]
        assert np.allclose(ours, theirs, atol=1e-3)


def test_real_dicom_series_reads_in_hu():
    vol = volumes.read_ct(shared_path("realct", "totalseg-abdomen-3mm", "dicom-series"))
    assert vol.array.shape == (20, 512, 512)
    assert vol.source.format == "dicom" and vol.source.dicom_series_uid is not None
    assert np.allclose(vol.geometry.spacing, (2.0, 0.9765625, 0.9765625), atol=1e-4)
    arr = vol.array
    assert arr.min() == volumes.AIR_HU  # air outside the body
    body = arr[arr > -500]
    assert -150 < np.median(body) < 100  # soft tissue median in HU
    fat = ((body > -150) & (body < -50)).mean()
    assert fat > 0.05  # subcutaneous and visceral fat present at the right HU


def test_dicom_padding_is_read_as_air_and_labels_fit_the_grid():
    folder = shared_path("realct", "dcmqi-liver-3slice")
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "01.dcm")))
    assert raw.min() <= -2000  # the file itself holds GE's -3024 padding
    vol = volumes.read_ct(folder)
    assert vol.array.min() == volumes.AIR_HU
    liver = readers.read_labels(folder / "liver_seg.nrrd", like=vol)
    assert 40 < np.median(vol.array[liver.array > 0]) < 200  # contrast-enhanced liver in HU


def test_dicom_folder_with_two_series_picks_the_larger_and_says_so(tmp_path):
    a = shared_path("realct", "totalseg-abdomen-3mm", "dicom-series")
    b = shared_path("realct", "dcmqi-liver-3slice")
    for f in list(a.iterdir()) + [p for p in b.iterdir() if p.suffix == ".dcm"]:
        shutil.copy(f, tmp_path / f"{f.parent.name}_{f.name}")
    with pytest.warns(KidsegWarning, match=r"2 DICOM series; using .* \(20 slices\)"):
        vol = volumes.read_ct(tmp_path)
    assert vol.array.shape[0] == 20
    other = [u for u in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(tmp_path)) if u != vol.source.dicom_series_uid]
    assert volumes.read_ct(tmp_path, series_uid=other[0]).array.shape[0] == 3


def test_large_nifti_read_holds_about_two_copies(tmp_path):
    """Peak RSS while reading a 512x512x300 int16 .nii.gz stays under 2.5 volumes."""
    path = tmp_path / "big.nii.gz"
    arr = np.full((300, 512, 512), -1000, np.int16)
    arr[:, 100:400, 100:400] = 40
    arr[:, 200:300, 200:300] = -100
    img = sitk.GetImageFromArray(arr)
    img.SetDirection((-1, 0, 0, 0, 0, 1, 0, -1, 0))  # not the canonical layout: the read must reorient
    sitk.WriteImage(img, str(path), useCompression=True)
    nbytes = arr.nbytes
    del arr, img
    code = (
        "import resource,sys; import numpy, SimpleITK, nibabel; from napari_kidseg.io import volumes;"
        "base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        f"v=volumes.read_ct(r'{path}');"
        "print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, v.array.shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    grown = (int(out[1]) - int(out[0])) * 1024
    assert grown < 2.5 * nbytes, f"read grew RSS by {grown / nbytes:.2f} volumes"


# ------------------------------------------------------------------ bad input
def _nifti(tmp_path, name, data, affine=None):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_bad_inputs_give_one_line_errors_naming_the_file(tmp_path):
    rng = np.random.default_rng(1)
    ct = rng.integers(-1000, 1000, (20, 20, 8)).astype(np.int16)
    good = _nifti(tmp_path, "good.nii.gz", ct)
    blob = good.read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "corrupt.nii.gz").write_bytes(b"\x1f\x8b" + rng.bytes(2000))
    (tmp_path / "garbage.nii").write_bytes(rng.bytes(2000))
    (tmp_path / "empty_dicom").mkdir()
    _nifti(tmp_path, "flat.nii.gz", ct[:, :, 0])
    _nifti(tmp_path, "fourd.nii.gz", np.stack([ct, ct, ct], axis=-1))
    _nifti(tmp_path, "photo.nii.gz", rng.integers(0, 255, (20, 20, 8)).astype(np.uint8))
    rgb = sitk.GetImageFromArray(rng.integers(0, 255, (8, 20, 20, 3)).astype(np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    cases = {
        "missing.nii.gz": "no such file",
        "truncated.nii.gz": "truncated",
        "corrupt.nii.gz": "corrupt",
        "garbage.nii": "cannot read",
        "empty_dicom": "no DICOM series",
        "flat.nii.gz": "2D image",
        "fourd.nii.gz": "4D image",
        "photo.nii.gz": "not a CT",
        "rgb.mha": "RGB",
        "notes.txt": "not a supported volume",
    }
    (tmp_path / "notes.txt").write_text("hello")
    for name, problem in cases.items():
        with pytest.raises(KidsegError) as err:
            volumes.read_ct(tmp_path / name)
        msg = str(err.value)
        assert str(tmp_path / name) in msg and problem in msg and "\n" not in msg, msg
    assert volumes.read_ct(good).array.shape == (8, 20, 20)


def test_writes_are_atomic_and_never_overwrite_silently(tmp_path, monkeypatch):
    arr = np.zeros((4, 5, 6), np.uint8)
    like = volumes.volume_in_memory(arr, (1, 1, 1))
    out = tmp_path / "labels.nii.gz"
    volumes.write_labels(out, arr, like)
    before = out.read_bytes()
    with pytest.raises(KidsegError, match="already exists"):
        volumes.write_labels(out, arr + 1, like)
    assert out.read_bytes() == before

    def half_write_then_fail(image, path, *a, **k):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", half_write_then_fail)
    with pytest.raises(KidsegError, match="No space left"):
        volumes.write_labels(tmp_path / "new.mha", arr, like)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz"]  # no partial or temporary file
    monkeypatch.undo()
    volumes.write_labels(out, arr + 1, like, overwrite=True)
    assert out.read_bytes() != before


def test_kits_case_round_trip(tmp_path, small_case):
    case = volumes.write_kits_case(tmp_path, "case_00007", small_case.ct, small_case.labels)
    assert volumes.kits_cases(tmp_path) == [case]
    ct, labels = readers.read_kits_case(case)
    # the scanner's padding outside the reconstruction circle (-3024) reads back as air
    expected = np.where(small_case.ct.array <= -3024, volumes.AIR_HU, small_case.ct.array)
    assert np.array_equal(ct.array, expected)
    assert np.array_equal(labels.array, small_case.labels)
    assert nib.aff2axcodes(nib.load(str(case / volumes.KITS_IMAGE)).affine) == ("I", "P", "L")
    with pytest.raises(KidsegError, match="already exists"):
        volumes.write_kits_case(tmp_path, "case_00007", small_case.ct, small_case.labels)


def test_labels_on_a_different_grid_are_refused(tmp_path, small_case):
    case = volumes.write_kits_case(tmp_path, "case_00000", small_case.ct, small_case.labels)
    ct = volumes.read_ct(case / volumes.KITS_IMAGE)
    other = volumes.volume_in_memory(small_case.labels[:, :-1], (1, 1, 1))
    volumes.write_labels(tmp_path / "bad.nii.gz", other.array, other)
    with pytest.raises(KidsegError, match="differs from the CT grid"):
        readers.read_labels(tmp_path / "bad.nii.gz", like=ct)


def test_single_slice_ct_reads(tmp_path):
    arr = np.full((1, 32, 32), -1000, np.int16)
    arr[0, 8:24, 8:24] = 40
    vol = volumes.volume_in_memory(arr, (5, 0.8, 0.8))
    volumes.write_volume(tmp_path / "one.nrrd", arr, vol)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert volumes.read_ct(tmp_path / "one.nrrd").array.shape == (1, 32, 32)
