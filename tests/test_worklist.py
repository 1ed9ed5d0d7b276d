"""The worklist's core: finding cases, the lock, drafts, autosaved edits, failures, export."""

from __future__ import annotations

import json
import shutil
import socket

import numpy as np
import pytest
from conftest import shared_path

from napari_kidseg import worklist
from napari_kidseg.cascade import Cascade
from napari_kidseg.errors import KidsegError
from napari_kidseg.io import readers, volumes
from napari_kidseg.phantoms.procedural import make_phantom
from napari_kidseg.worklist import Worklist, draft_all, find_cases


@pytest.fixture
def folder(tmp_path):
    """Three small phantom cases: a KiTS case folder, a CT file with its label file beside it, and
    a CT in a subfolder."""
    root = tmp_path / "cases"
    for i, (where, name) in enumerate([("kits", None), (".", "b_ct.nii.gz"), ("sub", "c.nrrd")]):
        case = make_phantom(40 + i, matrix=64, max_slices=16, n_tumors=1)
        if name is None:
            volumes.write_kits_case(root / where, "case_00000", case.ct, case.labels)
        else:
            (root / where).mkdir(parents=True, exist_ok=True)
            volumes.write_volume(root / where / name, case.ct.array, case.ct)
    volumes.write_labels(root / "b_ct_labels.nii.gz", case.labels, case.ct)  # a label file: not a case
    return root


@pytest.fixture(scope="module")
def tiny_cascade(tiny_checkpoints):
    return Cascade(tiny_checkpoints["coarse"], tiny_checkpoints["refine"], device="cpu")


def test_find_cases_lists_kits_volumes_and_dicom_series_and_skips_labels(folder):
    series = shared_path("realct", "dcmqi-liver-3slice")
    shutil.copytree(series, folder / "dicom", ignore=shutil.ignore_patterns("*.nrrd"))
    rows = find_cases(folder)
    assert [(r.case, r.kind) for r in rows] == [
        ("b_ct.nii.gz", "volume"),
        ("dicom", "dicom"),
        ("kits/case_00000", "kits"),
        ("sub/c.nrrd", "volume"),
    ]
    assert "3 slices" in rows[1].description
    (folder / "empty").mkdir()
    with pytest.raises(KidsegError, match="holds no CT"):
        find_cases(folder / "empty")


def test_the_lock_opens_a_second_worklist_read_only(folder):
    a = Worklist(folder)
    b = Worklist(folder)
    assert not a.read_only and b.read_only and "opened read-only" in b.notes[0]
    b.rows[0].status = "reviewed"
    b.save()  # a read-only worklist writes nothing
    assert json.loads(a.state_path.read_text())["rows"][0]["status"] != "reviewed"
    a.close()
    c = Worklist(folder)
    assert not c.read_only
    c.close()
    # a crashed napari's lock (its process is gone) is taken over
    c.lock_path.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    d = Worklist(folder)
    assert not d.read_only
    d.close()


def test_drafts_autosaved_edits_and_resume_after_close(folder, tiny_cascade):
    wl = Worklist(folder, reviewer="dr test")
    row = wl.rows[0]
    result = wl.draft(row, tiny_cascade)
    assert row.status == "drafted" and wl.has_draft(row) and "+" in row.models
    again, note = wl.load_draft(row)
    for alpha in (0.0, 0.4, 1.0):
        assert np.array_equal(again.fuse(alpha=alpha), result.fuse(alpha=alpha))
    labels = result.fuse()
    labels[2, :5, :5] = 2  # the radiologist's edit
    wl.current = 0
    wl.save_edits(row, labels, reviewed_slices={2, 3}, seconds=42.0)
    assert row.status == "in review" and row.reviewer == "dr test"
    wl.close()
    back = Worklist(folder)
    assert back.current == 0 and back.rows[0].status == "in review" and back.rows[0].seconds == 42.0
    saved, reviewed = back.load_edits(back.rows[0])
    assert np.array_equal(saved, labels) and reviewed == {2, 3}
    assert (back.state_dir / "worklist.csv").read_text().count("\n") == 1 + len(back.rows)
    back.close()


def test_failed_deleted_and_cancelled_cases(folder, tiny_cascade):
    blob = (folder / "b_ct.nii.gz").read_bytes()
    (folder / "b_ct.nii.gz").write_bytes(blob[: len(blob) // 2])  # a copy that broke off half-way
    wl = Worklist(folder)
    assert draft_all(wl, tiny_cascade) == 2  # the truncated one fails, the others are drafted
    bad = wl.rows[wl.index_of("b_ct.nii.gz")]
    assert bad.status == "failed" and "truncated" in bad.reason and not wl.has_draft(bad)
    assert wl.next_todo(-1) != wl.index_of("b_ct.nii.gz")
    wl.drop_draft(wl.rows[wl.index_of("sub/c.nrrd")])
    assert wl.draft(wl.rows[wl.index_of("sub/c.nrrd")], tiny_cascade, cancel=lambda: True) is None
    assert not wl.has_draft(wl.rows[wl.index_of("sub/c.nrrd")])  # a cancelled draft leaves no file
    wl.close()
    (folder / "sub" / "c.nrrd").unlink()
    wl = Worklist(folder)
    gone = wl.rows[wl.index_of("sub/c.nrrd")]
    assert gone.status == "failed" and gone.reason == "deleted from the folder"
    wl.close()


def test_read_only_folder_keeps_state_elsewhere_and_full_disk_keeps_edits(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("KIDSEG_CACHE", str(tmp_path / "cache"))
    real_access = worklist.os.access
    monkeypatch.setattr(worklist.os, "access", lambda p, m: False if str(p) == str(folder) else real_access(p, m))
    wl = Worklist(folder)
    assert str(wl.state_dir).startswith(str(tmp_path / "cache")) and "is read-only" in wl.notes[0]
    row = wl.rows[0]
    wl.save_edits(row, np.ones((2, 2, 2), np.uint8))
    before = wl.edits_path(row).read_bytes()

    def full_disk(*a, **k):
        raise KidsegError("could not write (No space left on device)", wl.edits_path(row))

    monkeypatch.setattr(worklist.files, "atomic_path", full_disk)
    with pytest.raises(KidsegError, match="No space left"):
        wl.save_edits(row, np.zeros((2, 2, 2), np.uint8))
    assert wl.edits_path(row).read_bytes() == before  # the last good autosave is intact
    monkeypatch.undo()
    wl.close()


def test_mark_reviewed_exports_and_counts(folder, tiny_cascade, tmp_path):
    wl = Worklist(folder)
    row = wl.rows[wl.index_of("kits/case_00000")]
    ct = wl.read_ct(row)
    labels = np.zeros(ct.array.shape, np.uint8)
    labels[4:8, 20:30, 10:20] = 1
    case_dir = wl.mark_reviewed(row, ct, labels, tmp_path / "export", seconds=90)
    assert row.status == "reviewed" and wl.reviewed == 1 and row.seconds == 90
    assert np.array_equal(readers.read_labels(case_dir / volumes.KITS_LABELS).array, labels)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["cases"][0]["whole_case_reviewed"] is True
    # marking it again (a second look) updates the same exported case
    assert wl.mark_reviewed(row, ct, labels, tmp_path / "export") == case_dir
    assert wl.next_todo(wl.index_of("kits/case_00000")) != wl.index_of("kits/case_00000")
    wl.close()


def test_an_export_keeps_the_worklist_case_name_and_autosaves_carry_the_volumes(tmp_path):
    from napari_kidseg.metrics import measurements

    root = tmp_path / "cases"
    case = make_phantom(47, matrix=64, max_slices=16, n_tumors=1)
    volumes.write_kits_case(root, "case_00007", case.ct, case.labels)
    wl = Worklist(root)
    row = wl.rows[0]
    ct = wl.read_ct(row)
    labels = case.labels.astype(np.uint8)
    m = measurements(labels, ct.geometry.spacing)
    wl.save_edits(row, labels, {3}, 5.0, measured=m)  # the Review box's figures of these labels
    assert row.right_kidney_ml == round(m["right"]["kidney_ml"], 1) and row.status == "in review"
    # the export is the worklist's case_00007, not the next free case_00000 (another worklist case)
    case_dir = wl.mark_reviewed(row, ct, labels, tmp_path / "export")
    assert case_dir.name == "case_00007"
    wl.close()
