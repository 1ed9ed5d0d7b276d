"""The corrections folder (napari_kidseg.review.corrections_folder), without a display: the export
writes the KiTS layout and the manifest and returns the entry it wrote; the manifest is read, the
cases checked, the reviewed slices listed and the cases split by scan by the same module."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import shared_path

from napari_kidseg.errors import KidsegError
from napari_kidseg.io import readers, volumes
from napari_kidseg.review.corrections_folder import (
    MANIFEST,
    ScanAlreadyExported,
    check_corrections,
    export_correction,
    manifest_cases,
    reviewed_slices,
    split_by_scan,
)
from napari_kidseg.review.session import FusionParams


def test_export_writes_kits_layout_and_manifest_without_overwriting(tmp_path, small_case):
    src = tmp_path / "ct.nii.gz"
    volumes.write_volume(src, small_case.ct.array, small_case.ct)
    ct = volumes.read_ct(src)
    root = tmp_path / "corr"
    a = export_correction(root, ct, small_case.labels, params=FusionParams(0.3, 0.5, 0.6), hand_edited_voxels=7)
    b = export_correction(root, ct, small_case.labels, case_id=a["case"], update=False)  # a copy, on purpose
    assert a["case"] == "case_00000" and b["case"] == "case_00001"
    assert manifest_cases(root) == [a, b], "the entries returned are the ones written"
    assert a["hand_edited_voxels"] == 7 and a["source_sha256"] and a["fusion"]["alpha"] == 0.3
    case = root / a["case"]
    back = readers.read_labels(case / volumes.KITS_LABELS, like=volumes.read_ct(case / volumes.KITS_IMAGE))
    assert np.array_equal(back.array, small_case.labels)
    assert "dicom_seg" not in a  # a NIfTI CT: no DICOM SEG, and no note about one


def test_export_to_an_unwritable_place_is_a_clear_error(tmp_path, small_case):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KidsegError, match="cannot create the corrections folder"):
        export_correction(blocker / "sub", small_case.ct, small_case.labels)


def test_export_once_per_scan(tmp_path, small_case):
    """The defect: exporting twice made a second case with another CT copy, and fine-tuning then
    split one scan into 'train' and 'held-out'. Now the second export is refused or updates."""
    root = tmp_path / "corr"
    a = export_correction(root, small_case.ct, small_case.labels, hand_edited_voxels=3)
    case = root / a["case"]
    ct_mtime = (case / volumes.KITS_IMAGE).stat().st_mtime_ns
    with pytest.raises(ScanAlreadyExported) as info:
        export_correction(root, small_case.ct, small_case.labels)
    assert info.value.case_id == a["case"]
    fixed = small_case.labels.copy()
    fixed[fixed == 2] = 1
    b = export_correction(root, small_case.ct, fixed, hand_edited_voxels=9, update=True, reviewed_slices=[3, 1])
    assert b["case"] == a["case"] and (case / volumes.KITS_IMAGE).stat().st_mtime_ns == ct_mtime
    assert sorted(p.name for p in root.glob("case_*")) == [a["case"]]
    assert manifest_cases(root) == [b] and b["hand_edited_voxels"] == 9 and b["updates"] == 1
    assert b["reviewed_slices"] == [1, 3] and reviewed_slices(root) == {a["case"]: (1, 3)}
    back = readers.read_labels(case / volumes.KITS_LABELS, like=volumes.read_ct(case / volumes.KITS_IMAGE))
    assert not (back.array == 2).any()


@pytest.mark.parametrize("text", ["{", "[1, 2]", json.dumps({"cases": [3]}), json.dumps({"cases": [{"case": 1}]})])
def test_a_corrupt_manifest_is_one_line_for_every_reader_and_the_export(tmp_path, small_case, text):
    """The defect: the export read manifest.json itself and raised a raw JSONDecodeError or
    TypeError on a corrupt one (the fine-tune's reader already said one line). Every reader of
    the folder now goes through one reader, and the manifest is left as it was."""
    root = tmp_path / "corr"
    root.mkdir()
    (root / MANIFEST).write_text(text)
    for call in (
        lambda: manifest_cases(root),
        lambda: reviewed_slices(root),
        lambda: split_by_scan(root, [], 0.25),
        lambda: export_correction(root, small_case.ct, small_case.labels),
    ):
        with pytest.raises(KidsegError, match="manifest.json") as info:
            call()
        assert "\n" not in str(info.value)
    assert (root / MANIFEST).read_text() == text and not list(root.glob("case_*"))


def test_reviewed_slices_of_a_whole_case_or_an_old_export_are_all_slices(tmp_path):
    (tmp_path / MANIFEST).write_text(
        json.dumps({"cases": [
            {"case": "case_00000", "reviewed_slices": [4, 5]},
            {"case": "case_00001", "reviewed_slices": [4], "whole_case_reviewed": True},
            {"case": "case_00002"},  # exported before the list existed
            {"case": "case_00003", "reviewed_slices": ["x"]},
        ]})
    )  # fmt: skip
    with pytest.raises(KidsegError, match="case_00003 that are not slice numbers"):
        reviewed_slices(tmp_path)
    cases = json.loads((tmp_path / MANIFEST).read_text())
    cases["cases"].pop()
    (tmp_path / MANIFEST).write_text(json.dumps(cases))
    assert reviewed_slices(tmp_path) == {"case_00000": (4, 5)}
    assert reviewed_slices(tmp_path / "none") == {} and manifest_cases(tmp_path / "none") == []


def test_split_keeps_copies_of_one_scan_together(tmp_path):
    cases = [tmp_path / f"case_{i:05d}" for i in range(4)]
    scans = ["a", "a", "b", "c"]  # case 0 and 1: two exports of one scan
    (tmp_path / MANIFEST).write_text(
        json.dumps({"cases": [{"case": c.name, "scan_sha256": s} for c, s in zip(cases, scans)]})
    )
    for fraction in (0.25, 0.5, 0.75):
        train, held = split_by_scan(tmp_path, cases, fraction)
        assert held and sorted(train + held) == cases
        assert (cases[0] in held) == (cases[1] in held)
    one_scan = tmp_path / "one"
    one_scan.mkdir()
    (one_scan / MANIFEST).write_text(json.dumps({"cases": [{"case": c.name, "scan_sha256": "a"} for c in cases[:2]]}))
    assert split_by_scan(one_scan, cases[:2], 0.5) == (cases[:2], [])


def test_check_corrections_names_the_bad_file(tmp_path, small_case):
    with pytest.raises(KidsegError, match="no such corrections folder"):
        check_corrections(tmp_path / "none")
    with pytest.raises(KidsegError, match="holds no corrected case"):
        check_corrections(tmp_path)
    entry = export_correction(tmp_path, small_case.ct, small_case.labels)
    case = tmp_path / entry["case"]
    assert check_corrections(tmp_path) == [case]
    for arr, msg in (
        (np.full(small_case.labels.shape, 7, np.uint8), "label"),
        (np.zeros(small_case.labels.shape, np.uint8), "no kidney or tumor"),
    ):
        volumes.write_labels(case / volumes.KITS_LABELS, arr, small_case.ct, overwrite=True)
        with pytest.raises(KidsegError, match=msg) as info:
            check_corrections(tmp_path)
        assert "segmentation.nii.gz" in str(info.value)


def test_the_docks_export_note_comes_from_the_entry_written(tmp_path, small_case):
    """The dock says whether a DICOM SEG came with an export from the entry export_correction
    returns (it read manifest.json itself before). No display needed: a function, no widget."""
    pytest.importorskip("qtpy")
    from napari_kidseg._widgets.export_panel import export_correction_with_note

    case, note = export_correction_with_note(tmp_path, small_case.ct, small_case.labels, {})
    assert case == tmp_path / "case_00000" and note == ""  # a NIfTI CT: nothing to say
    series = volumes.read_ct(shared_path("realct", "dcmqi-liver-3slice"))
    labels = np.zeros(series.array.shape, np.uint8)
    labels[:, 200:300, 100:220] = 1
    case, note = export_correction_with_note(tmp_path, series, labels, {})
    assert note == " and a DICOM SEG (segmentation.seg.dcm)" and (case / "segmentation.seg.dcm").exists()
    anon = volumes.read_ct(shared_path("realct", "totalseg-abdomen-3mm", "dicom-series"))
    case, note = export_correction_with_note(tmp_path, anon, np.ones(anon.array.shape, np.uint8), {})
    assert note.startswith("; no DICOM SEG: ") and "has no StudyInstanceUID" in note


def test_the_drafts_organ_map_goes_with_the_correction_and_trains_the_organs(tmp_path, small_case, monkeypatch):
    """An organ-aware network fine-tuned on a correction must keep seeing the spleen as spleen
    where the radiologist left background (else the fine-tune calls it kidney again)."""
    from napari_kidseg import labels as lab
    from napari_kidseg import training

    monkeypatch.setattr(training, "cache_root", lambda: tmp_path / "cache")
    src = tmp_path / "ct.nii.gz"
    volumes.write_volume(src, small_case.ct.array, small_case.ct)
    ct = volumes.read_ct(src)
    kits = small_case.labels
    spleen = lab.ORGANS.index("spleen") + 1  # organ codes are 1-based (CascadeResult.organs)
    organs = np.zeros_like(kits)
    organs[:, :4, :4] = spleen  # a corner the labels leave background
    assert not kits[:, :4, :4].any()
    root = tmp_path / "corr"
    with pytest.raises(KidsegError, match="shape"):
        export_correction(root, ct, kits, organs=organs[:-1])
    entry = export_correction(root, ct, kits, organs=organs)
    case = root / entry["case"]
    assert entry["organs"] == volumes.KITS_ORGANS and (case / volumes.KITS_ORGANS).exists()
    target = np.load(training.cache_case(case).labels_path)
    assert np.all(target[:, :4, :4] == lab.ORGAN_TARGET0 - 1 + spleen), "the spleen is taught as spleen"
    assert np.array_equal(target[kits > 0], kits[kits > 0]), "the corrected kidneys stay the lesson"
    again = export_correction(root, ct, kits, update=True)  # an update without the draft's organs
    assert again["organs"] is None and not (case / volumes.KITS_ORGANS).exists(), "no stale organ map"
