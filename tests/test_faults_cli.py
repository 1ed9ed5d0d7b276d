"""Command-line faults found by the fault campaign (issue 25): outputs that would replace inputs or
make odd folders, arguments out of range, corrupt manifests, an interrupted fine-tune, messages
that said too little or too much. Every mistake is one line, never a traceback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import shared_path

from napari_kidseg import cli, finetuning
from napari_kidseg.cli import main
from napari_kidseg.cli.segment import _prediction_jobs
from napari_kidseg.io import readers, volumes
from napari_kidseg.phantoms.procedural import make_phantom


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small phantom CT file and its labels."""
    root = tmp_path_factory.mktemp("small")
    case = make_phantom(80, matrix=64, max_slices=16, n_tumors=1)
    volumes.write_volume(root / "ct.nii.gz", case.ct.array, case.ct)
    volumes.write_labels(root / "ct_labels.nii.gz", case.labels, case.ct)
    return root


def _one_line(capsys, rc, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    for needle in needles:
        assert needle in err[0], err
    return err[0]


def test_predict_never_replaces_its_input_and_names_bad_outputs(tmp_path, small, capsys):
    ct = tmp_path / "ct.nii.gz"
    shutil.copy(small / "ct.nii.gz", ct)
    before = ct.read_bytes()
    _one_line(capsys, main(["predict", str(ct), "-o", str(ct), "--overwrite"]), "is an input CT")
    assert ct.read_bytes() == before
    (tmp_path / "existing.dcm").write_bytes(b"x")
    for out in ("existing.dcm", "lab.png", "new.dcm"):
        _one_line(capsys, main(["predict", str(ct), "-o", str(tmp_path / out)]), out, "cannot write labels there")
    assert not (tmp_path / "lab.png").exists() and not (tmp_path / "new.dcm").exists()


def test_predict_on_a_folder_takes_its_dicom_series_and_skips_label_files(tmp_path, small):
    liver = shared_path("realct", "dcmqi-liver-3slice")  # 3 DICOM slices and liver_seg.nrrd
    assert _prediction_jobs(liver, tmp_path) == [(liver, tmp_path / "dcmqi-liver-3slice_labels.nii.gz")]
    assert _prediction_jobs(small, tmp_path) == [(small / "ct.nii.gz", tmp_path / "ct_labels.nii.gz")]


def test_report_to_a_file_and_label_values_are_named(tmp_path, small, capsys):
    (tmp_path / "report.txt").write_text("x")
    rc = main(["report", str(small / "ct.nii.gz"), str(small / "ct_labels.nii.gz"), "-o", str(tmp_path / "report.txt")])
    _one_line(capsys, rc, "report.txt", "is a file")
    ct = volumes.read_ct(small / "ct.nii.gz")
    bad = readers.read_labels(small / "ct_labels.nii.gz").array.copy()
    bad[0, 0, 0] = 7
    volumes.write_labels(tmp_path / "bad.nii.gz", bad, ct)
    rc = main(["report", str(small / "ct.nii.gz"), str(tmp_path / "bad.nii.gz"), "-o", str(tmp_path / "r")])
    _one_line(capsys, rc, f"{tmp_path / 'bad.nii.gz'}: holds label(s) 7")


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "CT", "-o", "OUT", "--alpha", "5"],
        ["predict", "CT", "-o", "OUT", "--alpha", "nan"],
        ["predict", "CT", "-o", "OUT", "--tumor-threshold", "-0.1"],
        ["predict", "CT", "-o", "OUT", "--batch-size", "0"],
        ["phantom", "OUT", "--cases", "0"],
        ["phantom", "OUT", "--matrix", "0"],
        ["phantom", "OUT", "--max-slices", "0"],
        ["phantom", "OUT", "--slice-thickness", "-2"],
        ["bench", "--sizes", "0"],
        ["bench", "--sizes", "-3"],
        ["train", "DATA", "--stage", "coarse", "-o", "x.safetensors", "--epochs", "0"],
        ["finetune", "CORR", "--holdout", "2"],
        ["finetune", "CORR", "--lr", "-1"],
    ],
    ids=lambda a: " ".join(a[:1] + a[-2:]),
)
def test_arguments_out_of_range_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "must be" in err[0] and argv[-2] in err[0], err


@pytest.fixture
def corrections(tmp_path, small):
    root = tmp_path / "corrections"
    case = root / "case_00000"
    case.mkdir(parents=True)
    shutil.copy(small / "ct.nii.gz", case / volumes.KITS_IMAGE)
    shutil.copy(small / "ct_labels.nii.gz", case / volumes.KITS_LABELS)
    return root


@pytest.mark.parametrize("manifest", ["{", "[1, 2]", json.dumps({"cases": [3]})])
def test_finetune_with_a_corrupt_manifest_is_one_line_and_leaves_no_folder(
    corrections, tiny_checkpoints, capsys, manifest
):
    (corrections / "manifest.json").write_text(manifest)
    models = ["--coarse", str(tiny_checkpoints["coarse"]), "--refine", str(tiny_checkpoints["refine"])]
    _one_line(capsys, main(["finetune", str(corrections), *models]), "manifest.json")
    assert not list((corrections / "models").glob("finetune-*"))  # no half child folder


def test_finetune_into_an_existing_file_is_one_line(corrections, tiny_checkpoints, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    models = ["--coarse", str(tiny_checkpoints["coarse"]), "--refine", str(tiny_checkpoints["refine"])]
    _one_line(capsys, main(["finetune", str(corrections), "-o", str(tmp_path / "taken"), *models]), "is a file")


def test_an_interrupted_finetune_is_never_the_next_parent(corrections, tiny_checkpoints):
    half = corrections / "models" / "finetune-20991231-235959"
    half.mkdir(parents=True)
    shutil.copy(tiny_checkpoints["coarse"], half / "coarse.safetensors")  # killed before its refine and report
    assert finetuning.latest_children(corrections) == {}
    (half / "report.json").write_text("{}")
    assert finetuning.latest_children(corrections) == {"coarse": half / "coarse.safetensors"}


def test_a_cancelled_batch_says_which_outputs_were_kept(tmp_path, small, tiny_checkpoints, monkeypatch, capsys):
    from napari_kidseg.cascade import Cascade

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        shutil.copy(small / "ct.nii.gz", src / name)
    real_run, calls = Cascade.run, []

    def run_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Cascade, "run", run_then_interrupt)
    models = ["--coarse", str(tiny_checkpoints["coarse"]), "--refine", str(tiny_checkpoints["refine"])]
    assert main(["predict", str(src), "-o", str(tmp_path / "out"), "--device", "cpu", *models]) == 130
    err = capsys.readouterr().err
    kept = tmp_path / "out" / "a_labels.nii.gz"
    assert kept.exists() and not (tmp_path / "out" / "b_labels.nii.gz").exists()
    assert f"cancelled; the output in progress was not written; kept the 1 output(s) finished before it: {kept}" in err
    assert "no partial output" not in err
    assert np.asarray(readers.read_labels(kept).array).shape == volumes.read_ct(small / "ct.nii.gz").array.shape
    cli._WRITTEN.clear()
