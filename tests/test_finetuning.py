"""The correction -> fine-tune loop: one stage, both stages chained, refusals, the split by scan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_kidseg import finetuning, models, training, volumes
from napari_kidseg.errors import KidsegError


def test_finetune_writes_a_child_with_provenance_and_leaves_the_parent(tiny_dataset, tiny_checkpoints, tmp_path):
    from napari_kidseg.review import export_correction

    corrections = tmp_path / "corrections"
    for c in training.find_cases([tiny_dataset]):
        ct, labels = volumes.read_kits_case(c)
        export_correction(corrections, ct, labels.array)
    parent = tmp_path / "parent.safetensors"
    shutil.copy(tiny_checkpoints["refine"], parent)
    before_sha = models.file_sha256(parent)
    out = tmp_path / "child.safetensors"
    report = finetuning.finetune_stage(
        corrections,
        parent,
        out,
        coarse_checkpoint=tiny_checkpoints["coarse"],
        n_replay=1,
        epochs=1,
        steps_per_epoch=3,
        batch_size=4,
        device="cpu",
        log=lambda s: None,
    )
    assert models.file_sha256(parent) == before_sha
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
        ct, labels = volumes.read_kits_case(c)
        zs = np.flatnonzero(labels.array.reshape(labels.array.shape[0], -1).any(1))
        mid = int(zs[len(zs) // 2])
        export_correction(root, ct, labels.array, reviewed_slices=[mid - 1, mid, mid + 1] if reviewed else None)
    return root


def test_finetune_models_both_stages_chain_and_refuse(tiny_dataset, tiny_checkpoints, tmp_path):
    from napari_kidseg.finetuning import finetune_models, model_versions

    corrections = _corrections(tiny_dataset, tmp_path / "corr", reviewed=True)
    small = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "n_replay": 0, "device": "cpu", "log": lambda s: None}
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
