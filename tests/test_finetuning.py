"""The correction -> fine-tune loop: one stage, both stages chained, refusals, the split by scan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_kidseg import finetuning, models, training
from napari_kidseg.errors import KidsegError
from napari_kidseg.io import files, readers, volumes
from napari_kidseg.labels import kits_foreground


def test_finetune_writes_a_child_with_provenance_and_leaves_the_parent(tiny_dataset, tiny_checkpoints, tmp_path):
    from napari_kidseg.review import export_correction

    corrections = tmp_path / "corrections"
    for c in training.find_cases([tiny_dataset]):
        ct, labels = readers.read_kits_case(c)
        export_correction(corrections, ct, labels.array)
    parent = tmp_path / "parent.safetensors"
    shutil.copy(tiny_checkpoints["refine"], parent)
    before_sha = files.file_sha256(parent)
    out = tmp_path / "child.safetensors"
    report = finetuning.finetune_stage(
        corrections,
        parent,
        out,
        coarse_checkpoint=tiny_checkpoints["coarse"],
        n_replay=1,
        schedule="fixed",
        epochs=1,
        steps_per_epoch=3,
        batch_size=4,
        device="cpu",
        log=lambda s: None,
    )
    assert files.file_sha256(parent) == before_sha
    cfg = models.read_config(out)
    assert cfg.provenance["parent"] == str(parent) and cfg.provenance["parent_sha256"] == before_sha
    assert cfg.provenance["parent_version"] == "test" and cfg.version.startswith("test+ft")
    assert len(cfg.provenance["held_out"]) == 1 and len(cfg.provenance["trained_on"]) == 2
    assert set(report["before"]) == set(report["after"]) >= {"kidney_tumor_dice", "tumor_dice"}
    # by default the child keeps the parent's BatchNorm statistics and learns only its weights
    from safetensors.numpy import load_file

    mother, child = load_file(parent), load_file(out)
    stats = [k for k in mother if k.endswith(("running_mean", "running_var"))]
    assert stats and all(np.array_equal(mother[k], child[k]) for k in stats)
    assert cfg.provenance["bn_momentum"] == 0.0
    assert any(not np.array_equal(mother[k], child[k]) for k in mother if k.endswith("weight"))
    with pytest.raises(KidsegError, match="holds no corrected case "):
        (tmp_path / "none").mkdir()
        finetuning.finetune_stage(tmp_path / "none", parent, tmp_path / "x.safetensors")
    with pytest.raises(KidsegError, match="must not replace its parent"):
        finetuning.finetune_stage(corrections, parent, parent)


def _corrections(tiny_dataset, root, reviewed=False):
    """The tiny dataset exported as corrections; ``reviewed``: only 3 kidney slices marked reviewed."""
    from napari_kidseg.review import export_correction

    for c in training.find_cases([tiny_dataset]):
        ct, labels = readers.read_kits_case(c)
        zs = np.flatnonzero(labels.array.reshape(labels.array.shape[0], -1).any(1))
        mid = int(zs[len(zs) // 2])
        export_correction(root, ct, labels.array, reviewed_slices=[mid - 1, mid, mid + 1] if reviewed else None)
    return root


def test_finetune_models_both_stages_chain_and_refuse(tiny_dataset, tiny_checkpoints, tmp_path):
    from napari_kidseg.finetuning import finetune_models, model_versions

    corrections = _corrections(tiny_dataset, tmp_path / "corr", reviewed=True)
    small = {"max_steps": 4, "batch_size": 2, "n_replay": 0, "device": "cpu", "log": lambda s: None}
    first = finetune_models(corrections, coarse=tiny_checkpoints["coarse"], refine=tiny_checkpoints["refine"], **small)
    folder = Path(first["folder"])
    assert folder.parent == corrections / "models" and folder.name.startswith("finetune-")
    names = {p.name for p in folder.iterdir()}
    assert {"coarse.safetensors", "refine.safetensors", "report.json"} <= names
    assert not any(n.endswith((".state.pt", ".last.safetensors")) for n in names)
    assert first["held_out"] and set(first["before"]) == set(first["after"])
    cfg = models.read_config(folder / "coarse.safetensors")
    assert cfg.provenance["reviewed_slices_only"] and all(
        len(v) == 3 for v in cfg.provenance["reviewed_slices_only"].values()
    )
    # the second fine-tune starts from the first one's children, and its provenance names the chain
    second = finetune_models(corrections, tmp_path / "second", stages=("refine",), **small)
    assert second["parents"]["refine"] == str(folder / "refine.safetensors")
    assert second["parents"]["coarse"] == str(folder / "coarse.safetensors")
    chain = models.read_config(tmp_path / "second" / "refine.safetensors").provenance["chain"]
    assert len(chain) == 2 and chain[-1].startswith(f"{folder.name}/refine.safetensors")
    assert [v["name"] for v in model_versions(corrections)] == ["bundled", folder.name]
    # refusals, one line each, nothing half-written
    with pytest.raises(KidsegError, match="not empty"):
        finetune_models(corrections, folder, **small)
    with pytest.raises(KidsegError, match="is a refine checkpoint"):
        finetune_models(corrections, tmp_path / "x", coarse=tiny_checkpoints["refine"], **small)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    bad = tmp_path / "bad"
    case = _corrections(tiny_dataset, bad) / "case_00000" / volumes.KITS_LABELS
    ct = volumes.read_ct(case.parent / volumes.KITS_IMAGE)
    for arr, msg in (
        (np.full(ct.array.shape, 7, np.uint8), "label"),
        (np.zeros(ct.array.shape, np.uint8), "no kidney or tumor"),
    ):
        volumes.write_labels(case, arr, ct, overwrite=True)
        with pytest.raises(KidsegError, match=msg) as info:
            finetune_models(bad, tmp_path / "y", **small)
        assert "segmentation.nii.gz" in str(info.value)


def test_finetune_split_keeps_copies_of_one_scan_together(tmp_path):

    from napari_kidseg.finetuning import split_by_scan

    cases = [tmp_path / f"case_{i:05d}" for i in range(4)]
    scans = ["a", "a", "b", "c"]  # case 0 and 1: two exports of one scan
    (tmp_path / "manifest.json").write_text(
        json.dumps({"cases": [{"case": c.name, "scan_sha256": s} for c, s in zip(cases, scans)]})
    )
    for fraction in (0.25, 0.5, 0.75):
        train, held = split_by_scan(tmp_path, cases, fraction)
        assert held and sorted(train + held) == cases
        assert (cases[0] in held) == (cases[1] in held)
    one_scan = tmp_path / "one"
    one_scan.mkdir()
    (one_scan / "manifest.json").write_text(
        json.dumps({"cases": [{"case": c.name, "scan_sha256": "a"} for c in cases[:2]]})
    )
    assert split_by_scan(one_scan, cases[:2], 0.5) == (cases[:2], [])


def test_heldout_slabs_alternate_two_trained_one_held_out():
    from napari_kidseg.finetuning import heldout_slabs

    train, held = heldout_slabs(range(45), z_mm=3.0, slab_mm=15.0)  # 9 slabs of 5 slices
    assert held == tuple(range(5, 10)) + tuple(range(20, 25)) + tuple(range(35, 40))
    assert sorted(train + held) == list(range(45))
    # a few reviewed slices (one slab): slice by slice; a single slice is only trained on
    assert heldout_slabs([10, 12, 11], z_mm=3.0) == ((10, 12), (11,))
    assert heldout_slabs([7], z_mm=3.0) == ((7,), ())


def test_lesson_marks_what_the_correction_changed_and_around_it():
    from napari_kidseg.finetuning import lesson_mask

    labels = np.zeros((3, 40, 40), np.uint8)
    labels[1, 5:10, 5:10] = 1  # a kidney the parents missed
    draft = np.zeros_like(labels)
    draft[1, 25:30, 25:30] = 1  # a false region the radiologist deleted
    coarse = draft.copy()
    coarse[2, 30:35, 5:10] = 1  # the coarse stage alone also calls this kidney (the anatomy check removed it)
    lesson = lesson_mask({"draft": draft, "coarse": coarse, "labels": labels, "spacing": (3.0, 1.0, 1.0)}, mm=2.0)
    assert lesson[1, 5:10, 5:10].all() and lesson[1, 25:30, 25:30].all() and lesson[2, 30:35, 5:10].all()
    assert lesson[1, 3, 7] and not lesson[1, 2, 7]  # widened by 2 mm in-plane
    assert not lesson[0].any()  # never across slices
    assert not lesson[1, 15:20, 15:20].any()


def test_lesson_rides_with_the_labels_through_augmentation(tiny_dataset, tmp_path):
    """The mask the loss weighs is moved by every flip, scale and rotation exactly as the labels."""
    import dataclasses

    case = training.cache_case(training.find_cases([tiny_dataset])[0])
    _, labels = case.arrays()
    lesson = tmp_path / "lesson.npy"
    np.save(lesson, kits_foreground(np.asarray(labels)).astype(np.uint8))  # the cache also holds organ codes
    case = dataclasses.replace(case, lesson_path=lesson)
    for stage, size in (("coarse", 64), ("refine", 96)):
        cfg = models.model_config(stage, "tiny", context_slices=1, input_size=size)
        samples = training.SegmentationSamples([case], cfg, training.Augment(), seed=3, lessons=True)
        for i in range(min(6, len(samples))):
            x, y, w = samples[i]
            assert x.shape[-2:] == y.shape == w.shape and int(y.max()) <= 2
            assert np.array_equal(w.numpy() > 0, y.numpy() > 0)
        plain = training.SegmentationSamples([case], cfg, None)
        assert len(plain[0]) == 2  # without lessons, (input, target) as before
    # the lesson's weight: 1 everywhere is the unweighted loss
    import torch

    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    ones = torch.ones(2, 8, 8)
    assert torch.isclose(
        training.dice_ce_loss(logits, target, voxel_weight=ones), training.dice_ce_loss(logits, target)
    )


def test_heldout_rule_keeps_the_best_step_says_why_and_guards_forgetting(
    tiny_dataset, tiny_checkpoints, tmp_path, monkeypatch
):
    from napari_kidseg.errors import Cancelled

    corrections = _corrections(tiny_dataset, tmp_path / "corr")
    one = tmp_path / "one"  # a single corrected scan: its own held-out slabs decide
    shutil.copytree(corrections / "case_00000", one / "case_00000")
    monkeypatch.setattr(finetuning, "EVAL_EVERY", 2)
    monkeypatch.setattr(finetuning, "PATIENCE", 1)
    monkeypatch.setattr(finetuning, "LR_DROPS", 1)
    monkeypatch.setattr(finetuning, "replay_cases", lambda n, seed: training.find_cases([tiny_dataset])[1:][:n])
    monkeypatch.setattr(finetuning, "guard_phantoms", lambda: training.find_cases([tiny_dataset])[2:])
    kw = {"coarse": tiny_checkpoints["coarse"], "refine": tiny_checkpoints["refine"], "batch_size": 2}
    kw |= {"n_replay": 1, "device": "cpu", "lr": 1e-2, "log": lambda s: None}
    report = finetuning.finetune_models(one, tmp_path / "a", max_steps=12, max_minutes=None, **kw)
    assert set(report["stopped"]) == {"coarse", "refine"}
    for stop in report["stopped"].values():
        steps = [h["step"] for h in stop["history"]]
        assert stop["best_step"] in steps and stop["steps"] <= 12 and stop["why"]
        assert stop["reason"] in ("plateau", "steps", "minutes")
        best = next(h for h in stop["history"] if h["step"] == stop["best_step"])
        assert best["heldout"] == stop["heldout_best"] >= stop["heldout_parent"] == stop["history"][0]["heldout"]
    assert not report["held_out"] and report["held_out_slabs"]["case_00000"] > 0
    assert report["before"] and report["after"] and report["phantoms_before"] and report["phantoms_after"]
    cfg = models.read_config(tmp_path / "a" / "coarse.safetensors")
    assert cfg.provenance["schedule"] == "heldout" and cfg.provenance["held_out_slices"]["case_00000"]
    # a step that forgets the held-out phantoms is never the best: every step "forgets" here
    monkeypatch.setattr(finetuning, "FORGET_TOLERANCE", -1.0)
    report = finetuning.finetune_models(one, tmp_path / "b", max_steps=6, **kw)
    assert all(stop["best_step"] == 0 for stop in report["stopped"].values())
    assert "keeps the parent's weights" in report["stopped"]["coarse"]["why"]
    from safetensors.numpy import load_file

    mother, child = load_file(tiny_checkpoints["coarse"]), load_file(tmp_path / "b" / "coarse.safetensors")
    assert all(np.array_equal(mother[k], child[k]) for k in mother)
    # Cancel: nothing written for the stage, the parents untouched
    with pytest.raises(Cancelled):
        finetuning.finetune_models(one, tmp_path / "c", max_steps=6, cancel=lambda: True, **kw)
    assert not (tmp_path / "c" / "coarse.safetensors").exists()
