"""The kidseg command, in-process (one end-to-end subprocess test): predict, evaluate, report,
export-seg, train, finetune; bad input is one line and nothing is overwritten."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import shared_path

from napari_kidseg import cascade, metrics, models
from napari_kidseg.cli import build_parser, main
from napari_kidseg.io import files, readers, volumes


def _tiny(ckpts) -> list[str]:
    return ["--coarse", str(ckpts["coarse"]), "--refine", str(ckpts["refine"]), "--device", "cpu"]


def _seg_labels(ct):
    labels = np.zeros(ct.array.shape, np.uint8)
    labels[:, 200:300, 100:220] = 1
    labels[1, 230:260, 130:170] = 2
    return labels


def test_predict_end_to_end_in_a_subprocess_then_evaluate(tmp_path, tiny_checkpoints, small_case_dir, capsys):
    """The one subprocess test: ``python -m napari_kidseg.cli`` as a user runs it."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "napari_kidseg.cli", "predict", str(small_case_dir), "-o", str(out)]
    args += [*_tiny(tiny_checkpoints), "--save-probabilities", "--mirror", "--smooth-noise"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pred = out / small_case_dir.name / "segmentation.nii.gz"
    ct = volumes.read_ct(small_case_dir / "imaging.nii.gz")
    labels = readers.read_labels(pred, like=ct)  # same grid as the CT, or this raises
    assert np.array_equal(nib.load(str(pred)).affine, nib.load(str(small_case_dir / "imaging.nii.gz")).affine)
    assert labels.array.shape == ct.array.shape
    assert (out / small_case_dir.name / "segmentation_probabilities.npz").exists()
    # the rest in-process (no torch import per call): a second run refuses to overwrite, in one line
    capsys.readouterr()
    assert main(args[3:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]
    ev = ["evaluate", str(pred), str(small_case_dir / "segmentation.nii.gz")]
    assert main([*ev, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ref = readers.read_labels(small_case_dir / "segmentation.nii.gz")
    expected = metrics.kits_scores(labels.array, ref.array)
    assert report["mean"]["kits_composite"] == pytest.approx(expected["kits_composite"])
    found = metrics.tumor_detection(labels.array, ref.array, ref.geometry.spacing)
    assert report["cases"][0]["tumors"] == found["tumors"] and len(found["tumors"]) >= 1  # the phantom has a tumor
    assert sum(row["tumors"] for row in report["tumor_detection_by_size"]) == len(found["tumors"])
    assert main(ev) == 0
    table = capsys.readouterr().out
    assert "tumors found" in table and "tumors by reference volume" in table


def test_predict_into_an_existing_folder_writes_inside_it(tmp_path, tiny_checkpoints, small_case_dir):
    out = tmp_path / "existing"
    out.mkdir()
    assert main(["predict", str(small_case_dir), "-o", str(out), *_tiny(tiny_checkpoints)]) == 0
    assert (out / small_case_dir.name / "segmentation.nii.gz").exists()


def test_evaluate_refuses_labels_outside_kits_and_reports_false_ml(tmp_path, small_case_dir, capsys):
    ct = volumes.read_ct(small_case_dir / "imaging.nii.gz")
    ref = readers.read_labels(small_case_dir / "segmentation.nii.gz", like=ct)
    bad = ref.array.copy()
    bad[0, 0, 0] = 7
    volumes.write_labels(tmp_path / "seven.nii.gz", bad, ct)
    assert main(["evaluate", str(tmp_path / "seven.nii.gz"), str(small_case_dir / "segmentation.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "seven.nii.gz" in err and "label(s) 7" in err and len(err.splitlines()) == 1
    extra = ref.array.copy()
    extra[0, :4, :5] = 2  # 20 voxels of tumor where the reference has none
    volumes.write_labels(tmp_path / "extra.nii.gz", extra, ct)
    assert (
        main(["evaluate", str(tmp_path / "extra.nii.gz"), str(small_case_dir / "segmentation.nii.gz"), "--json"]) == 0
    )
    row = json.loads(capsys.readouterr().out)["cases"][0]
    voxel_ml = float(np.prod(ct.geometry.spacing)) / 1000.0
    new_fp = int(((extra > 0) & (ref.array == 0)).sum())
    assert row["false_kidney_ml"] == pytest.approx(new_fp * voxel_ml)
    assert row["false_tumor_ml"] == pytest.approx(int(((extra == 2) & (ref.array != 2)).sum()) * voxel_ml)


def test_predict_prints_what_the_anatomy_check_removed(tmp_path, tiny_checkpoints, small_case_dir, capsys, monkeypatch):
    """Nothing is removed silently: kidseg predict lists the check's removals, and
    --no-anatomy-check keeps them."""
    real_fuse = cascade.CascadeResult.fuse

    def fuse_with_a_false_tumor(self, *a, **kw):  # only a tumor far from any kidney, whatever the tiny nets say
        self.coarse_meta[:] = 0
        self.coarse_tumor[:] = 0
        self.refined = {}
        self.coarse_meta[:, :4, :4] = 255
        self.coarse_tumor[:, :4, :4] = 255
        return real_fuse(self, *a, **kw)

    monkeypatch.setattr(cascade.CascadeResult, "fuse", fuse_with_a_false_tumor)
    common = [str(small_case_dir), *_tiny(tiny_checkpoints)]
    assert main(["predict", *common, "-o", str(tmp_path / "on.nii.gz")]) == 0
    err = capsys.readouterr().err
    assert "anatomy check removed" in err
    assert main(["predict", *common, "-o", str(tmp_path / "off.nii.gz"), "--no-anatomy-check"]) == 0
    assert "anatomy check removed" not in capsys.readouterr().err
    on = readers.read_labels(tmp_path / "on.nii.gz").array
    off = readers.read_labels(tmp_path / "off.nii.gz").array
    assert (off[:, :4, :4] > 0).all() and not on[:, :4, :4].any()


def test_predict_applies_tumor_by_contrast_unless_told_not_to(tmp_path, tiny_checkpoints, small_case_dir, monkeypatch):
    seen, real_fuse = [], cascade.CascadeResult.fuse

    def fuse(self, *a, **kw):
        seen.append(kw.get("contrast_tumor"))
        return real_fuse(self, *a, **kw)

    monkeypatch.setattr(cascade.CascadeResult, "fuse", fuse)
    common = [str(small_case_dir), *_tiny(tiny_checkpoints)]
    assert main(["predict", *common, "-o", str(tmp_path / "on.nii.gz")]) == 0
    assert main(["predict", *common, "-o", str(tmp_path / "off.nii.gz"), "--no-contrast-tumor"]) == 0
    assert seen == [True, False]


def test_bad_input_is_one_line_without_traceback(tmp_path, capsys):
    rng = np.random.default_rng(2)
    ct = rng.integers(-1000, 1000, (30, 30, 10)).astype(np.int16)
    blob = gzip.compress(nib.Nifti1Image(ct, np.eye(4)).to_bytes())
    (tmp_path / "truncated.nii.gz").write_bytes(blob[: len(blob) // 2])
    assert main(["predict", str(tmp_path / "truncated.nii.gz"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kidseg: error:") and "truncated.nii.gz" in lines[0], err


def test_train_refuses_to_overwrite(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep me")
    assert main(["train", str(tiny_dataset), "--stage", "coarse", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"


def test_train_init_starts_from_a_checkpoint_and_says_so(tiny_dataset, tiny_checkpoints, tmp_path, capsys):
    parent = tiny_checkpoints["coarse"]
    parent_cfg = models.read_config(parent)
    out = tmp_path / "continued.safetensors"
    base = [
        "train",
        str(tiny_dataset),
        "--stage",
        "coarse",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    assert main([*base, "-o", str(out), "--init", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.safetensors" in err[0]
    assert main([*base, "-o", str(out), "--init", str(parent)]) == 0
    cfg = models.read_config(out)
    # the architecture comes from the parent (not the default paper preset), the provenance names it
    assert cfg.encoder == parent_cfg.encoder and cfg.input_size == parent_cfg.input_size
    assert cfg.provenance["init"]["sha256"] == files.file_sha256(parent)


def test_finetune_defaults_are_the_finetune_function_defaults():
    """The widget fine-tunes with FinetuneSettings() and the CLI builds its own: they must not drift apart."""
    from napari_kidseg.cli.training import _finetune_settings
    from napari_kidseg.training import FinetuneSettings

    args = build_parser().parse_args(["finetune", "corrections"])
    assert args.stage == "both"
    assert _finetune_settings(args) == FinetuneSettings()


def test_export_seg_and_report_on_it(tmp_path, capsys):
    real_series = shared_path("realct", "dcmqi-liver-3slice")
    ct = volumes.read_ct(real_series)
    volumes.write_labels(tmp_path / "labels.nii.gz", _seg_labels(ct), ct)
    seg = tmp_path / "seg.dcm"
    assert main(["export-seg", str(real_series), str(tmp_path / "labels.nii.gz"), "-o", str(seg)]) == 0
    assert main(["report", str(real_series), str(seg), "-o", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "Tumor 1" in out and (tmp_path / "rep" / "report.pdf").exists()


def test_predict_report_writes_one_row_per_case(tmp_path, tiny_checkpoints, small_case_dir, capsys):
    out = tmp_path / "pred"
    assert main(["predict", str(small_case_dir.parent), "-o", str(out), "--report", *_tiny(tiny_checkpoints)]) == 0
    rows = (out / "report.csv").read_text().splitlines()
    assert rows[0].startswith("case,right_kidney_ml") and len(rows) == 2 and small_case_dir.name in rows[1]
    labels = readers.read_labels(out / small_case_dir.name / volumes.KITS_LABELS)
    kidney_ml = float((labels.array == 1).sum()) * labels.geometry.voxel_volume_ml
    right, left = float(rows[1].split(",")[1]), float(rows[1].split(",")[3])
    assert right + left == pytest.approx(kidney_ml, abs=0.02)
    assert main(["predict", str(small_case_dir.parent), "-o", str(out), "--report", *_tiny(tiny_checkpoints)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_draft_fills_the_worklist_cache_and_a_folder_without_ct_is_one_line(
    tmp_path, tiny_checkpoints, small_case_dir, capsys
):
    from napari_kidseg.review.worklist import Worklist

    folder = tmp_path / "list"
    shutil.copytree(small_case_dir, folder / "case_00000")
    shutil.copytree(small_case_dir, folder / "case_00001")
    assert main(["draft", str(folder), *_tiny(tiny_checkpoints)]) == 0
    assert "2 case(s) drafted" in capsys.readouterr().out
    wl = Worklist(folder)
    assert [r.status for r in wl.rows] == ["drafted", "drafted"] and all(wl.has_draft(r) for r in wl.rows)
    wl.close()
    (tmp_path / "empty").mkdir()
    assert main(["draft", str(tmp_path / "empty"), *_tiny(tiny_checkpoints)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no CT" in err[0]


def test_evaluate_reports_kits21_hierarchical_dice_when_cysts_are_labelled(tmp_path, capsys):
    from napari_kidseg.phantoms.procedural import make_phantom

    case = make_phantom(3, matrix=96, max_slices=40, labels="kits23", n_tumors=1)  # a cyst and a tumor
    ref = case.labels
    assert {1, 2, 3} <= set(np.unique(ref))
    pred = np.where(ref == 3, 1, ref).astype(np.uint8)  # a 3-class model: the cyst called kidney
    volumes.write_labels(tmp_path / "ref.nii.gz", ref, case.ct)
    volumes.write_labels(tmp_path / "pred.nii.gz", pred, case.ct)
    assert main(["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["cases"][0]
    masses = 2 * ((pred >= 2) & (ref >= 2)).sum() / ((pred >= 2).sum() + (ref >= 2).sum())
    assert row["kidney_masses_dice"] == pytest.approx(1.0) and row["masses_dice"] == pytest.approx(masses)
    assert row["masses_dice"] < 1.0 and row["tumor_dice"] == pytest.approx(1.0)
    assert row["kits21_mean_dice"] == pytest.approx((1.0 + masses + 1.0) / 3)
    assert main(["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz")]) == 0
    assert "kid+masses_dice" in capsys.readouterr().out


def test_kits23_round_trip_phantom_train_predict_evaluate_export(tmp_path, capsys, monkeypatch):
    from napari_kidseg.review.corrections_folder import export_correction

    monkeypatch.setenv("KIDSEG_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "k23"
    assert main(["phantom", str(data), "--cases", "2", "--seed", "3", "--matrix", "64", "--max-slices", "24",
                 "--labels", "kits23"]) == 0  # fmt: skip
    assert any((readers.read_labels(c / volumes.KITS_LABELS).array == 3).any() for c in sorted(data.glob("case_*")))
    common = ["--preset", "tiny", "--labels", "kits23", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2",
              "--workers", "0", "--device", "cpu", "--val-samples", "4"]  # fmt: skip
    for stage, size in (("coarse", "64"), ("refine", "64")):
        out = tmp_path / f"{stage}.safetensors"
        assert main(["train", str(data), "--stage", stage, "-o", str(out), "--input-size", size, *common]) == 0
        assert models.read_config(out).classes == 4
    ckpts = {"coarse": tmp_path / "coarse.safetensors", "refine": tmp_path / "refine.safetensors"}
    assert main(["predict", str(data), "-o", str(tmp_path / "pred"), *_tiny(ckpts)]) == 0
    pred = tmp_path / "pred" / "case_00000" / volumes.KITS_LABELS
    assert set(np.unique(readers.read_labels(pred).array)) <= {0, 1, 2, 3}
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "pred"), str(data)]) == 0
    assert "kid+masses_dice" in capsys.readouterr().out  # the references hold cysts: KiTS21's Dice
    ct, ref = readers.read_kits_case(data / "case_00000")
    case = tmp_path / "corr" / export_correction(tmp_path / "corr", ct, ref.array)["case"]
    assert np.array_equal(readers.read_labels(case / volumes.KITS_LABELS).array, ref.array)  # cysts exported as 3
