"""Worklist faults found by the fault campaign (issue 25): a changed case file, a corrupt state,
truncated drafts and autosaves, a broken lock, temporary files of killed writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_kidseg.cascade import Cascade
from napari_kidseg.errors import KidsegWarning
from napari_kidseg.io import volumes
from napari_kidseg.phantoms.procedural import make_phantom
from napari_kidseg.worklist import Worklist


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "cases"
    root.mkdir()
    for i, name in enumerate(("a.nii.gz", "b.nii.gz")):
        case = make_phantom(60 + i, matrix=64, max_slices=16, n_tumors=1)
        volumes.write_volume(root / name, case.ct.array, case.ct)
    return root


@pytest.fixture(scope="module")
def tiny_cascade(tiny_checkpoints):
    return Cascade(tiny_checkpoints["coarse"], tiny_checkpoints["refine"], device="cpu")


def _drafted_with_edits(folder, cascade):
    wl = Worklist(folder)
    row = wl.rows[0]
    ct = wl.read_ct(row)
    labels = wl.draft(row, cascade).fuse()
    labels[1, :4, :4] = 2
    wl.save_edits(row, labels, {1})
    wl.close()
    return ct, labels


def test_a_changed_case_file_gets_no_stale_draft_or_edits(folder, tiny_cascade):
    ct, labels = _drafted_with_edits(folder, tiny_cascade)
    # the same case file now holds another scan on the same grid
    other = ct.array.copy()
    other[:, ::2] += 30
    volumes.write_volume(folder / "a.nii.gz", other, ct, overwrite=True)
    wl = Worklist(folder)
    row = wl.rows[0]
    wl.read_ct(row)
    with pytest.warns(KidsegWarning, match="a.nii.gz: its draft was made from another CT .* drafted again"):
        assert wl.load_draft(row) is None
    assert not wl.has_draft(row)
    with pytest.warns(KidsegWarning, match="autosaved edits were made on another CT .* kept aside"):
        assert wl.load_edits(row) is None
    assert (wl.state_dir / "edits" / f"{row.key}.npz.other-ct").exists()  # nothing the user did is deleted
    wl.close()
    # on another grid (8 slices of the 16): the same
    _drafted_with_edits(folder, tiny_cascade)
    fewer = volumes.volume_in_memory(ct.array[:8].copy(), ct.geometry.spacing)
    volumes.write_volume(folder / "a.nii.gz", fewer.array, fewer, overwrite=True)
    wl = Worklist(folder)
    row = wl.rows[0]
    assert wl.read_ct(row).array.shape[0] == 8
    with pytest.warns(KidsegWarning, match="another CT"):
        assert wl.load_draft(row) is None and wl.load_edits(row) is None
    wl.close()
    # the unchanged case still opens as before
    wl = Worklist(folder)
    wl.read_ct(wl.rows[1])
    assert wl.load_draft(wl.rows[1]) is None  # never drafted
    wl.close()


def test_a_corrupt_state_is_kept_and_the_last_good_copy_restores_it(folder):
    wl = Worklist(folder)
    wl.rows[0].status, wl.rows[0].seconds = "reviewed", 12.0
    wl.save()
    wl.close()
    for broken in ("{not json", "[]", json.dumps({"rows": [1, 2]}), json.dumps({"rows": [{"case": 3}]})):
        (wl.state_dir / "state.json").write_text(broken)
        again = Worklist(folder)
        assert again.rows[0].status == "reviewed" and again.rows[0].seconds == 12.0, broken
        assert any("restored from the last good copy" in n for n in again.notes), again.notes
        again.close()
    kept = sorted(wl.state_dir.glob("state.json.broken-*"))
    assert kept and kept[-1].read_text() == json.dumps({"rows": [{"case": 3}]})
    # no good copy either: the statuses come back from the files on disk, and it says so
    again = Worklist(folder)
    again.save_edits(again.rows[1], np.zeros((2, 2, 2), np.uint8))
    again.close()
    (wl.state_dir / "state.json").write_text("{")
    (wl.state_dir / "state.json.bak").write_text("{")
    again = Worklist(folder)
    assert again.rows[1].status == "in review" and any("no good copy" in n for n in again.notes)
    again.close()


def test_a_row_with_wrong_field_types_keeps_its_good_fields(folder):
    wl = Worklist(folder)
    wl.close()
    rows = json.loads(wl.state_path.read_text())["rows"]
    rows[0].update(status="bogus", seconds="lots", right_kidney_ml=[1], reviewer="dr a")
    wl.state_path.write_text(json.dumps({"rows": rows}))
    again = Worklist(folder)
    r = again.rows[0]
    assert (r.status, r.seconds, r.right_kidney_ml, r.reviewer) == ("new", 0.0, None, "dr a")
    again.close()


def test_a_truncated_draft_is_dropped_and_a_truncated_autosave_falls_back(folder, tiny_cascade):
    wl = Worklist(folder)
    row = wl.rows[0]
    wl.read_ct(row)
    first = wl.draft(row, tiny_cascade).fuse()
    blob = wl.draft_path(row).read_bytes()
    wl.draft_path(row).write_bytes(blob[: len(blob) // 2])
    with pytest.warns(KidsegWarning, match="its draft was unreadable .* drafted again"):
        assert wl.load_draft(row) is None
    assert not wl.draft_path(row).exists()
    second = first.copy()
    second[2, :3, :3] = 1
    wl.save_edits(row, first, {0})
    wl.save_edits(row, second, {0, 2})
    blob = wl.edits_path(row).read_bytes()
    wl.edits_path(row).write_bytes(blob[: len(blob) - 40])
    with pytest.warns(KidsegWarning, match="its autosave was unreadable"):
        labels, reviewed = wl.load_edits(row)
    assert np.array_equal(labels, first) and reviewed == {0}  # the last good copy
    wl.close()


@pytest.mark.parametrize("lock", [b"", b"{", b"[1]", b'{"pid": "x"}'])
def test_an_empty_or_corrupt_lock_is_taken_over(folder, lock):
    wl = Worklist(folder)
    wl.close()
    wl.lock_path.write_bytes(lock)
    again = Worklist(folder)
    assert not again.read_only and any("named no process" in n for n in again.notes)
    assert json.loads(again.lock_path.read_text())["pid"] > 0  # the new lock is whole
    again.close()


def test_temporary_files_of_killed_writes_are_cleaned_at_open(folder):
    wl = Worklist(folder)
    wl.close()
    junk = [
        wl.state_dir / "edits" / ".a-123.npz.k2j3.tmp.npz",
        wl.state_dir / "drafts" / ".a-123.npz.x9.tmp.npz",
        wl.state_dir / ".state.json.abc.tmp.json",
    ]
    for j in junk:
        j.write_bytes(b"half")
    Worklist(folder).close()
    assert not any(j.exists() for j in junk)


def test_a_series_without_uid_is_named_so_in_the_rows(tmp_path):
    import shutil

    from conftest import shared_path

    from napari_kidseg.worklist import find_cases

    both = tmp_path / "both"
    both.mkdir()
    for f in shared_path("realct", "totalseg-abdomen-3mm", "dicom-series").glob("*.dcm"):
        shutil.copy(f, both / f.name)  # this series has an empty SeriesInstanceUID
    for f in shared_path("realct", "dcmqi-liver-3slice").glob("*.dcm"):
        shutil.copy(f, both / f"liver_{f.name}")
    names = [r.case for r in find_cases(tmp_path)]
    assert "both [(no SeriesInstanceUID)]" in names and len(names) == 2, names
