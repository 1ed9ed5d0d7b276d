"""The Case worklist widget in a real napari viewer (pytest-qt, Xvfb): three small phantom cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_kidseg._widgets.cascade_widget import LAYER_NAMES, CascadeWidget
from napari_kidseg._widgets.worklist_widget import CT_LAYER_PREFIX, WorklistWidget
from napari_kidseg.io import readers, volumes
from napari_kidseg.phantoms.procedural import make_phantom

pytestmark = pytest.mark.gui


@pytest.fixture
def cases(tmp_path):
    root = tmp_path / "cases"
    for i in range(3):
        case = make_phantom(60 + i, matrix=64, max_slices=16, n_tumors=1)
        volumes.write_kits_case(root, f"case_{i:05d}", case.ct, case.labels)
    return root


def _widgets(make_napari_viewer, qtbot, ckpts):
    viewer = make_napari_viewer()
    cw = CascadeWidget(viewer)
    qtbot.addWidget(cw)
    cw.set_models(ckpts["coarse"], ckpts["refine"], "cpu")
    wl = WorklistWidget(viewer, cascade_widget=cw)
    qtbot.addWidget(wl)
    return viewer, cw, wl


def _shown(wl, cw, qtbot, case):
    qtbot.waitUntil(
        lambda: wl._opening is None and not cw.busy and wl.current is not None
        and wl.worklist.rows[wl.current].case == case and wl.last_open_seconds is not None,
        timeout=60_000,
    )  # fmt: skip


def _quiet(wl, cw, qtbot):
    qtbot.waitUntil(lambda: not wl.drafting and wl._opening is None and not cw.busy, timeout=120_000)
    qtbot.waitUntil(lambda: not {"measurements", "fusion"} & cw.pending_work, timeout=30_000)


def test_review_loop_drafts_ahead_autosaves_resumes_and_exports(
    make_napari_viewer, qtbot, tiny_checkpoints, cases, tmp_path
):
    viewer, cw, wl = _widgets(make_napari_viewer, qtbot, tiny_checkpoints)
    wl.open_folder(str(cases))
    _shown(wl, cw, qtbot, "case_00000")
    assert wl.table.rowCount() == 3 and viewer.layers[CT_LAYER_PREFIX + "case_00000"]
    assert LAYER_NAMES["fused"] in viewer.layers and cw.session is not None
    # drafts ahead: the next two cases get their drafts in the background
    qtbot.waitUntil(lambda: wl._pool is not None and not wl.drafting, timeout=120_000)
    rows = wl.worklist.rows
    assert all(wl.worklist.has_draft(r) for r in rows) and rows[1].status == "drafted"
    # an edit is autosaved
    fused = viewer.layers[LAYER_NAMES["fused"]]
    fused.data[3, :4, :4] = 2
    cw.reviewed_slices.add(3)
    assert wl.autosave()
    edited = fused.data.copy()
    # Next: the drafted case is on screen at once (no cascade run)
    wl.next_btn.click()
    _shown(wl, cw, qtbot, "case_00001")
    print(f"next case on screen in {wl.last_open_seconds * 1000:.0f} ms")
    assert cw.ct_combo.currentText() == CT_LAYER_PREFIX + "case_00001"  # the CT box names the case shown
    assert [ly.name for ly in viewer.layers if ly.name.startswith(CT_LAYER_PREFIX)] == [CT_LAYER_PREFIX + "case_00001"]
    assert wl.worklist.rows[0].status == "in review"
    _quiet(wl, cw, qtbot)
    # close the worklist (as closing napari does) and reopen: the same case, every edit back
    wl.previous_case()
    _shown(wl, cw, qtbot, "case_00000")
    assert wl.worklist.rows[1].status == "drafted"  # only passed through, never edited: not "in review"
    assert np.array_equal(viewer.layers[LAYER_NAMES["fused"]].data, edited) and 3 in cw.reviewed_slices
    _quiet(wl, cw, qtbot)
    wl.close_worklist()
    state = json.loads((cases / ".kidseg-worklist" / "state.json").read_text())
    assert state["current"] == "case_00000"
    assert not (cases / ".kidseg-worklist" / "lock").exists()
    wl.open_folder(str(cases))
    _shown(wl, cw, qtbot, "case_00000")
    assert np.array_equal(viewer.layers[LAYER_NAMES["fused"]].data, edited)
    # a second napari on the same folder gets it read-only and cannot mark reviewed
    viewer2, cw2, wl2 = _widgets(make_napari_viewer, qtbot, tiny_checkpoints)
    wl2.open_folder(str(cases))
    assert wl2.worklist.read_only and "read-only" in wl2.note.text() and not wl2.reviewed_btn.isEnabled()
    _shown(wl2, cw2, qtbot, "case_00000")
    _quiet(wl2, cw2, qtbot)
    wl2.close_worklist()
    # mark reviewed: exported (KiTS layout), counted, and the next case opens
    cw.export_folder = tmp_path / "export"
    assert wl.mark_reviewed() and wl.exporting  # written in a worker: the GUI thread goes on
    assert wl.last_reviewed is None and wl.mark_reviewed() is None  # a second press waits for the first
    qtbot.waitUntil(lambda: wl.last_reviewed is not None, timeout=60_000)
    case_dir = wl.last_reviewed
    assert np.array_equal(readers.read_labels(case_dir / volumes.KITS_LABELS).array, edited)
    assert wl.progress.value() == 1 and wl.worklist.rows[0].status == "reviewed"
    _shown(wl, cw, qtbot, "case_00001")
    _quiet(wl, cw, qtbot)
    wl.close_worklist()


def test_a_broken_case_says_failed_and_the_list_goes_on(make_napari_viewer, qtbot, tiny_checkpoints, cases):
    blob = (cases / "case_00000" / volumes.KITS_IMAGE).read_bytes()
    (cases / "case_00000" / volumes.KITS_IMAGE).write_bytes(blob[: len(blob) // 2])
    viewer, cw, wl = _widgets(make_napari_viewer, qtbot, tiny_checkpoints)
    wl.open_folder(str(cases))
    qtbot.waitUntil(lambda: wl._opening is None, timeout=60_000)
    assert wl.worklist.rows[0].status == "failed" and "truncated" in wl.table.item(0, 1).text()
    assert "truncated" in wl.status.text()
    wl.next_case()
    _shown(wl, cw, qtbot, "case_00001")
    _quiet(wl, cw, qtbot)
    wl.close_worklist()


def test_a_folder_without_ct_is_one_message(make_napari_viewer, qtbot, tiny_checkpoints, tmp_path):
    viewer, cw, wl = _widgets(make_napari_viewer, qtbot, tiny_checkpoints)
    (tmp_path / "nothing").mkdir()
    assert wl.open_folder(str(tmp_path / "nothing")) is None
    assert "holds no CT" in wl.status.text() and wl.worklist is None


def test_new_models_mark_older_drafts_and_k_reviewed_cases_start_a_finetune(
    make_napari_viewer, qtbot, tiny_checkpoints, cases, tmp_path
):
    import shutil

    viewer, cw, wl = _widgets(make_napari_viewer, qtbot, tiny_checkpoints)
    wl.open_folder(str(cases))
    _shown(wl, cw, qtbot, "case_00000")
    qtbot.waitUntil(lambda: wl._pool is not None and not wl.drafting, timeout=120_000)
    # a fine-tuned child (here: a copy in another folder) named in the Kidney cascade widget
    child = tmp_path / "finetune-1" / "refine.safetensors"
    child.parent.mkdir()
    shutil.copy(tiny_checkpoints["refine"], child)
    cw.set_models(cw.models[0], child)
    wl._refresh_table()
    assert "older models" in wl.table.item(1, 1).text() and "older models" in wl.table.item(2, 1).text()
    assert wl.redraft_older() == 2
    qtbot.waitUntil(lambda: not wl.drafting, timeout=120_000)
    assert all("finetune-1/refine.safetensors" in r.models for r in wl.worklist.rows[1:])
    assert "older models" not in wl.table.item(1, 1).text()
    # after k = 1 reviewed case the Kidney cascade widget's fine-tune starts (its own checks apply)
    started = []
    cw.finetune = lambda: started.append(cw.export_folder)
    wl.finetune_spin.setValue(1)
    cw.export_folder = tmp_path / "export"
    _quiet(wl, cw, qtbot)
    wl.mark_reviewed()
    qtbot.waitUntil(lambda: wl.last_reviewed is not None, timeout=60_000)
    assert started == [str(tmp_path / "export")]
    _quiet(wl, cw, qtbot)
    wl.close_worklist()


@pytest.mark.slow
def test_a_cluster_drafts_the_whole_folder_and_the_rows_fill_in(make_napari_viewer, qtbot, tiny_checkpoints, cases):
    from napari_kidseg.batch import DaskCluster

    viewer, cw, wl = _widgets(make_napari_viewer, qtbot, tiny_checkpoints)
    wl.cluster_edit.setText("local:1")
    wl.ahead_spin.setValue(1)  # here: only the next case; on a cluster: every case of the folder
    wl.open_folder(str(cases))
    qtbot.waitUntil(lambda: wl.last_open_seconds is not None, timeout=240_000)  # a cluster starting beside it
    _shown(wl, cw, qtbot, "case_00000")
    qtbot.waitUntil(lambda: isinstance(wl._pool, DaskCluster) and bool(wl._drafting), timeout=240_000)
    assert "on a local cluster with 1 worker(s)" in wl.status.text()
    assert sorted(wl._drafting) == ["case_00001", "case_00002"]
    qtbot.waitUntil(lambda: not wl.drafting, timeout=240_000)
    assert [wl.table.item(i, 1).text() for i in (1, 2)] == ["drafted", "drafted"]
    assert all(wl.table.item(i, 2).text() for i in (1, 2))  # kidney mL filled in
    pool = wl._pool
    _quiet(wl, cw, qtbot)
    wl.close_worklist()
    assert pool._closed and wl._pool is None


def _drafted(make_napari_viewer, qtbot, ckpts, cases):
    """The widgets on a worklist whose cases are drafted already (``kidseg draft``), none ahead."""
    from napari_kidseg.cascade import Cascade
    from napari_kidseg.review.worklist import Worklist, draft_all

    worklist = Worklist(cases)
    draft_all(worklist, Cascade(ckpts["coarse"], ckpts["refine"], device="cpu"))
    worklist.close()
    viewer, cw, wl = _widgets(make_napari_viewer, qtbot, ckpts)
    wl.ahead_spin.setValue(0)
    wl.open_folder(str(cases))
    _shown(wl, cw, qtbot, "case_00000")
    return viewer, cw, wl


def _read_ahead(wl, qtbot, case):
    """The next case read and fused ahead (as while a radiologist reviews this one)."""
    qtbot.waitUntil(lambda: not wl.preparing and wl.prepared_case == case, timeout=60_000)


def test_next_swaps_the_case_read_ahead_into_the_same_layers(make_napari_viewer, qtbot, tiny_checkpoints, cases):
    viewer, cw, wl = _drafted(make_napari_viewer, qtbot, tiny_checkpoints, cases)
    _read_ahead(wl, qtbot, "case_00001")
    layers = {ly.name: ly for ly in viewer.layers}
    ct_layer, fused = layers[CT_LAYER_PREFIX + "case_00000"], layers[LAYER_NAMES["fused"]]
    wl.next_btn.click()
    _shown(wl, cw, qtbot, "case_00001")
    # nothing was read on Next: the case read ahead went on screen
    assert "read ahead" in wl.last_open_times and "read CT" not in wl.last_open_times
    # the same layer objects (no layer removed or added), now showing the next case
    assert len(viewer.layers) == len(layers)
    assert viewer.layers[CT_LAYER_PREFIX + "case_00001"] is ct_layer
    assert viewer.layers[LAYER_NAMES["fused"]] is fused and fused.data is cw.session.labels
    ct = volumes.read_ct(cases / "case_00001" / volumes.KITS_IMAGE)
    assert np.array_equal(ct_layer.data, ct.array) and np.allclose(ct_layer.scale, ct.geometry.spacing)
    assert np.allclose(fused.scale, ct.geometry.spacing) and fused.data.shape == ct.array.shape
    assert cw.session.params.alpha == cw.alpha.value() / 100
    for key in ("coarse", "refined", "disagreement", "rois", "removed"):
        assert layers[LAYER_NAMES[key]] is viewer.layers[LAYER_NAMES[key]]
        assert viewer.layers[LAYER_NAMES[key]].data.shape == ct.array.shape
    assert viewer.dims.nsteps[0] == ct.array.shape[0]  # the slice slider follows the new case
    _quiet(wl, cw, qtbot)
    wl.close_worklist()


def test_a_stale_read_ahead_is_not_shown(make_napari_viewer, qtbot, tiny_checkpoints, cases):
    viewer, cw, wl = _drafted(make_napari_viewer, qtbot, tiny_checkpoints, cases)
    _read_ahead(wl, qtbot, "case_00001")
    # the next case's edits change on disk after it was read ahead (another tool, a restored copy)
    row = wl.worklist.rows[1]
    edited = wl.worklist.load_draft(row)[0].fuse(0.4, 0.5, 0.5)
    edited[2:5, 10:30, 10:30] = 2
    wl.worklist.save_edits(row, edited, {3})
    wl.next_btn.click()
    _shown(wl, cw, qtbot, "case_00001")
    assert "read CT" in wl.last_open_times  # read again, not the stale copy
    assert np.array_equal(viewer.layers[LAYER_NAMES["fused"]].data, edited) and 3 in cw.reviewed_slices
    _quiet(wl, cw, qtbot)
    # a slider moved after the next case was read ahead: it is fused again at the new value
    _read_ahead(wl, qtbot, "case_00002")
    cw.alpha.setValue(cw.alpha.value() + 20)
    wl.next_btn.click()  # at once, before the read-ahead is made again
    _shown(wl, cw, qtbot, "case_00002")
    assert "read CT" in wl.last_open_times and cw.session.params.alpha == cw.alpha.value() / 100
    _quiet(wl, cw, qtbot)
    wl.close_worklist()


def test_a_tool_edit_is_autosaved(make_napari_viewer, qtbot, tiny_checkpoints, cases):
    """A correction tool changes the labels without a napari paint event: it is saved all the same."""
    viewer, cw, wl = _widgets(make_napari_viewer, qtbot, tiny_checkpoints)
    wl.ahead_spin.setValue(0)
    wl.open_folder(str(cases))
    _shown(wl, cw, qtbot, "case_00000")
    assert not wl.autosave()  # nothing edited yet: the case stays as it was
    idx = np.arange(40, 60)
    cw.plan_tool(lambda s: s.plan_set(idx, np.full(idx.size, 2, np.uint8), "test tool"), apply=True)
    qtbot.waitUntil(lambda: "tool" not in cw.pending_work, timeout=30_000)
    assert wl.autosave()
    labels, _ = wl.worklist.load_edits(wl.worklist.rows[0])
    assert (labels.ravel()[idx] == 2).all() and wl.worklist.rows[0].status == "in review"
    assert not wl.autosave()  # saved as it is: not written again
    _quiet(wl, cw, qtbot)
    wl.close_worklist()


def test_a_case_the_dock_replaced_is_not_autosaved_with_the_new_cts_labels(
    make_napari_viewer, qtbot, tiny_checkpoints, cases
):
    """The dock's Open replaced the worklist's case with another CT, which was run and edited: the
    worklist's open row keeps what it had (its autosave would write another CT's labels)."""
    viewer, cw, wl = _widgets(make_napari_viewer, qtbot, tiny_checkpoints)
    wl.ahead_spin.setValue(0)
    wl.open_folder(str(cases))
    _shown(wl, cw, qtbot, "case_00000")
    cw.ask_about_new_ct = lambda name, n_edited: "replace"
    cw.open_ct(str(cases / "case_00001"))
    qtbot.waitUntil(lambda: "open" not in cw.pending_work and cw.session is None, timeout=30_000)
    assert cw.ct_combo.currentText() == "case_00001 CT"
    cw.run()
    qtbot.waitUntil(lambda: not cw.busy and cw.session is not None, timeout=60_000)
    idx = np.arange(40, 60)
    cw.plan_tool(lambda s: s.plan_set(idx, np.full(idx.size, 2, np.uint8), "test tool"), apply=True)
    qtbot.waitUntil(lambda: "tool" not in cw.pending_work, timeout=30_000)
    assert not wl.autosave()  # not written into case_00000's edits
    assert wl.worklist.rows[0].status != "in review"
    _quiet(wl, cw, qtbot)
    wl.close_worklist()
