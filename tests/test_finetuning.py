"""The correction -> fine-tune loop: one stage, both stages chained, refusals, the split by scan."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from napari_kidseg import finetuning, heldout_rule, models, training
from napari_kidseg.errors import KidsegError
from napari_kidseg.io import files, readers, volumes
from napari_kidseg.labels import kits_foreground
from napari_kidseg.training import FinetuneSettings


@pytest.fixture(autouse=True)
def _no_shared_kidney_free_scan(monkeypatch):
    """The shared 512 x 512 liver slices cost the tiny cascade seconds a run: tests that want a
    kidney-free scan name one themselves."""
    monkeypatch.setenv(finetuning.KIDNEY_FREE_ENV, "")


def test_finetune_writes_a_child_with_provenance_and_leaves_the_parent(tiny_dataset, tiny_checkpoints, tmp_path):
    from napari_kidseg.review.corrections_folder import export_correction

    corrections = tmp_path / "corrections"
    for c in training.find_cases([tiny_dataset]):
        ct, labels = readers.read_kits_case(c)
        export_correction(corrections, ct, labels.array)
    parent = tmp_path / "parent.safetensors"
    shutil.copy(tiny_checkpoints["refine"], parent)
    before_sha = files.file_sha256(parent)
    out = tmp_path / "child.safetensors"
    fixed = FinetuneSettings(schedule="fixed", epochs=1, steps_per_epoch=3, batch_size=4, n_replay=1, device="cpu")
    report = finetuning.finetune_stage(
        corrections, parent, out, fixed, coarse_checkpoint=tiny_checkpoints["coarse"], log=lambda s: None
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
    from napari_kidseg.review.corrections_folder import export_correction

    for c in training.find_cases([tiny_dataset]):
        ct, labels = readers.read_kits_case(c)
        zs = np.flatnonzero(labels.array.reshape(labels.array.shape[0], -1).any(1))
        mid = int(zs[len(zs) // 2])
        export_correction(root, ct, labels.array, reviewed_slices=[mid - 1, mid, mid + 1] if reviewed else None)
    return root


def test_finetune_models_both_stages_chain_and_refuse(tiny_dataset, tiny_checkpoints, tmp_path):
    from napari_kidseg.finetuning import finetune_models, model_versions

    corrections = _corrections(tiny_dataset, tmp_path / "corr", reviewed=True)
    small = {"settings": FinetuneSettings(max_steps=4, batch_size=2, n_replay=0, device="cpu"), "log": lambda s: None}
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
    monkeypatch.setattr(heldout_rule, "EVAL_EVERY", 2)
    monkeypatch.setattr(heldout_rule, "PATIENCE", 1)
    monkeypatch.setattr(heldout_rule, "LR_DROPS", 1)
    monkeypatch.setattr(finetuning, "replay_cases", lambda n, seed: training.find_cases([tiny_dataset])[1:][:n])
    monkeypatch.setattr(finetuning, "guard_phantoms", lambda: training.find_cases([tiny_dataset])[2:])
    kw = {"coarse": tiny_checkpoints["coarse"], "refine": tiny_checkpoints["refine"], "log": lambda s: None}
    rule = FinetuneSettings(batch_size=2, n_replay=1, device="cpu", lr=1e-2, max_steps=6)
    report = finetuning.finetune_models(
        one, tmp_path / "a", dataclasses.replace(rule, max_steps=12, max_minutes=None), **kw
    )
    assert set(report["stopped"]) == {"coarse", "refine"}
    for stop in report["stopped"].values():
        steps = [h["step"] for h in stop["history"]]
        assert stop["best_step"] in steps and stop["steps"] <= 12 and stop["why"]
        assert stop["reason"] in ("plateau", "steps", "minutes")
        best = next(h for h in stop["history"] if h["step"] == stop["best_step"])
        assert best["heldout"] == stop["heldout_best"] >= stop["heldout_parent"] == stop["history"][0]["heldout"]
    assert not report["held_out"] and report["held_out_slabs"]["case_00000"] > 0
    assert report["before"] and report["after"] and report["phantoms_before"] and report["phantoms_after"]
    # the false-kidney guard: the corrected case away from its kidneys, before and after, said so
    assert set(report["false_kidney_before"]["scans"]) == set(report["false_kidney_after"]["scans"]) == {"case_00000"}
    assert "the corrected cases only" in report["false_kidney_guard"]
    assert all(stop["false_kidney_parent_ml"] is not None for stop in report["stopped"].values())
    cfg = models.read_config(tmp_path / "a" / "coarse.safetensors")
    assert cfg.provenance["schedule"] == "heldout" and cfg.provenance["held_out_slices"]["case_00000"]
    # a step that forgets the held-out phantoms is never the best: every step "forgets" here
    monkeypatch.setattr(heldout_rule, "FORGET_TOLERANCE", -1.0)
    report = finetuning.finetune_models(one, tmp_path / "b", rule, **kw)
    assert all(stop["best_step"] == 0 for stop in report["stopped"].values())
    assert "keeps the parent's weights" in report["stopped"]["coarse"]["why"]
    from safetensors.numpy import load_file

    mother, child = load_file(tiny_checkpoints["coarse"]), load_file(tmp_path / "b" / "coarse.safetensors")
    assert all(np.array_equal(mother[k], child[k]) for k in mother)
    # Cancel: nothing written for the stage, the parents untouched
    with pytest.raises(Cancelled):
        finetuning.finetune_models(one, tmp_path / "c", rule, cancel=lambda: True, **kw)
    assert not (tmp_path / "c" / "coarse.safetensors").exists()


def _one_case(tiny_dataset, root, reviewed):
    """Case 0 of the tiny dataset as the only corrected case, ``reviewed`` slices around its kidney's middle."""
    from napari_kidseg.review.corrections_folder import export_correction

    ct, labels = readers.read_kits_case(training.find_cases([tiny_dataset])[0])
    zs = np.flatnonzero(labels.array.reshape(labels.array.shape[0], -1).any(1))
    mid = int(zs[len(zs) // 2])
    export_correction(
        root, ct, labels.array, reviewed_slices=list(range(mid - reviewed // 2, mid - reviewed // 2 + reviewed))
    )
    return root


def test_a_one_slice_correction_trains_under_the_rule(tiny_dataset, tiny_checkpoints, tmp_path, monkeypatch):
    """One reviewed slice leaves nothing to hold out: the rule still runs on the full step budget, its
    trained slice scored (training data, said so) with the guard phantoms; before, it trained
    max_steps // 4 steps unchecked (none for 3 steps, as the widget's test found)."""
    monkeypatch.setattr(heldout_rule, "EVAL_EVERY", 1)
    monkeypatch.setattr(finetuning, "guard_phantoms", lambda: training.find_cases([tiny_dataset])[2:])
    monkeypatch.setattr(finetuning, "replay_cases", lambda n, seed: training.find_cases([tiny_dataset])[1:][:n])
    corrections = _one_case(tiny_dataset, tmp_path / "corr", reviewed=1)
    settings = FinetuneSettings(max_steps=3, batch_size=2, n_replay=1, device="cpu")
    kw = {"coarse": tiny_checkpoints["coarse"], "refine": tiny_checkpoints["refine"], "log": lambda s: None}
    report = finetuning.finetune_models(corrections, tmp_path / "a", settings, stages=("coarse",), **kw)
    stop = report["stopped"]["coarse"]
    assert stop["steps"] == 3 and stop["reason"] == "steps" and stop["checked_on"] == "trained slices"
    assert [h["step"] for h in stop["history"]] == [0, 1, 2, 3] and stop["phantoms_parent"] is not None
    assert "training data" in stop["why"] and "Dice of the trained slices" in stop["why"]


def test_the_time_budget_counts_training_steps_not_scoring(tiny_dataset, tiny_checkpoints, tmp_path, monkeypatch):
    """Scoring that takes longer than the whole budget (as under a load of 20 it did) leaves the
    steps their budget (3 s here, the step-0 scores 6 s): before, the step-0 scores spent it and the
    child kept the parent's weights."""
    add = training.DiceCounter.add

    def slow_add(self, *args):
        time.sleep(1.5)
        return add(self, *args)

    monkeypatch.setattr(training.DiceCounter, "add", slow_add)
    # this test is about the time budget: on an idle machine the tiny model took enough steps in
    # its 3 s to reach the plateau rule first (CI stopped on "plateau"), so that rule is set aside
    monkeypatch.setattr(heldout_rule, "PATIENCE", 10**6)
    monkeypatch.setattr(finetuning, "guard_phantoms", lambda: training.find_cases([tiny_dataset])[2:])
    monkeypatch.setattr(finetuning, "replay_cases", lambda n, seed: training.find_cases([tiny_dataset])[1:][:n])
    corrections = _one_case(tiny_dataset, tmp_path / "corr", reviewed=3)
    budget = FinetuneSettings(max_minutes=0.05, max_steps=1000, batch_size=2, n_replay=1, lesson_weight=0, device="cpu")
    ticks = []
    ft = finetuning.finetune_stage(
        corrections, tiny_checkpoints["coarse"], tmp_path / "c.safetensors", budget, stage="coarse", score=False,
        progress=lambda done, total, what: ticks.append(what), log=lambda s: None,
    )  # fmt: skip
    stop = ft["stopped"]
    assert stop["reason"] == "minutes" and stop["steps"] >= 1, stop["why"]  # before: 0 steps
    assert 3.0 <= ft["training_seconds"] < 3.0 + ft["training_seconds"] / stop["steps"] + 1.0  # at most a step over
    assert ft["seconds"] > ft["training_seconds"] + 5.0  # the step-0 scores (4 batches of 1.5 s) are not in it
    assert ticks[0] == "step 1/1000, timing the steps" and len(ticks) == stop["steps"]


def test_time_left_comes_from_the_step_times_alone():
    from napari_kidseg.heldout_rule import StepClock

    now = [0.0]
    clock = StepClock(max_minutes=1, clock=lambda: now[0])
    now[0] = 5.0
    clock.step()  # the first step also starts the data loader: left out of the pace
    assert clock.seconds_left(1, 100) is None and clock.says(1, 100) == "timing the steps"
    now[0] = 5.5
    clock.step()
    assert clock.seconds_left(2, 100) == pytest.approx(0.5 * 98)
    now[0] = 100.0  # 94.5 s of scoring: neither a step nor spent budget
    clock.resume()
    now[0] = 100.5
    clock.step()
    assert clock.trained_s == pytest.approx(6.0) and not clock.spent()
    assert clock.says(3, 100) == "about 0.8 min of training left"  # 97 steps of 0.5 s
    now[0] = 150.5  # one slow step: the median pace stays, the budget caps what is left
    clock.step()
    assert clock.seconds_left(4, 100) == pytest.approx(60 - 56.0)
    now[0] = 155.5
    clock.step()
    assert clock.spent() and clock.seconds_left(5, 100) == 0.0
    assert not StepClock(None).spent()


def test_settings_refuse_what_is_out_of_range():
    assert FinetuneSettings().check() == FinetuneSettings()
    for bad, words in (
        ({"schedule": "slow"}, "schedule"),
        ({"max_steps": 0}, "max_steps"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"n_replay": -1}, "n_replay"),
        ({"lr": 0}, "learning rate"),
        ({"holdout_fraction": 1.0}, "held-out fraction"),
        ({"max_minutes": 0}, "time budget"),
        ({"lesson_weight": -1}, "lesson"),
    ):
        with pytest.raises(KidsegError, match=words):
            FinetuneSettings(**bad).check()


def test_the_rule_scores_organ_answers_as_not_kidney(tiny_dataset):
    """An organ-aware network (bundled version 5) that answers "spleen" everywhere finds no kidney:
    the held-out rule scored every organ answer as kidney (pred > 0) and judged v5 children on it."""
    import torch

    from napari_kidseg.heldout_rule import _scorer
    from napari_kidseg.labels import ORGANS

    cfg = models.model_config("coarse", "tiny", context_slices=1, input_size=64, organs=tuple(ORGANS))

    class SaysSpleen(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], cfg.out_channels, *x.shape[-2:])
            logits[:, cfg.classes] = 1.0  # the first organ channel
            return logits

    case = training.cache_case(training.find_cases([tiny_dataset])[0])
    score = _scorer(SaysSpleen(), cfg, [case], 16, "cpu", kidney_only=True)
    assert score() == 0.0


def _rising_heldout(monkeypatch):
    """Held-out Dice that rises at every check (guard phantoms steady): without another guard,
    every check's step beats the one before."""
    scorer = heldout_rule._scorer

    def rising(model, cfg, cases, cap, device, kidney_only=False):
        real = scorer(model, cfg, cases, cap, device, kidney_only)
        if real is None or kidney_only:
            return (lambda: 0.5) if real else None
        calls = iter(range(1000))
        return lambda: 0.1 + 0.1 * next(calls)

    monkeypatch.setattr(heldout_rule, "_scorer", rising)


def test_a_step_that_calls_false_kidney_is_never_the_best(tiny_dataset, tiny_checkpoints, tmp_path, monkeypatch):
    """The real proxy's failure: a child gaining held-out Dice on its corrected case (0.658 -> 0.835)
    called 142 mL of another real scan kidney, and the rule kept it. Now a step whose cascade calls
    false kidney beyond the limit is never the best: the best step that does not is kept, or the parent."""
    monkeypatch.setattr(heldout_rule, "EVAL_EVERY", 1)
    _rising_heldout(monkeypatch)
    corrections = _one_case(tiny_dataset, tmp_path / "corr", reviewed=6)
    settings = FinetuneSettings(max_steps=4, batch_size=2, n_replay=0, lesson_weight=0, device="cpu")
    measured = []

    def meter_calling(ml_of_call):
        def make(scans, coarse, refine, stage, device):
            assert [s.name for s in scans] == ["case_00000"] and stage == "coarse"

            def measure(model):
                measured.append(model.training)
                return ml_of_call(len(measured) - 1)

            return measure

        return make

    def run(name, ml_of_call):
        monkeypatch.setattr(finetuning, "false_kidney_meter", meter_calling(ml_of_call))
        measured.clear()
        out = tmp_path / f"{name}.safetensors"
        ft = finetuning.finetune_stage(
            corrections, tiny_checkpoints["coarse"], out, settings, stage="coarse", score=False, log=lambda s: None
        )
        return ft["stopped"], out

    clean, _ = run("clean", lambda call: 1.0)  # no step adds false kidney: the last check wins
    assert clean["best_step"] == 4 and not clean["false_kidney_refused"] and len(measured) == 5
    assert all(measured)  # the meter sees the model in training, as it is
    # from step 3 on every step calls 10 mL more than the parent (limit 1 + 2 mL): step 2 is kept
    later, _ = run("later", lambda call: 1.0 if call < 3 else 11.0)
    assert later["best_step"] == 2 and later["false_kidney_refused"] == [3, 4]
    assert later["false_kidney_parent_ml"] == 1.0 and later["false_kidney_best_ml"] == 1.0
    assert "more false kidney than 3.0 mL" in later["why"] and "first: step 3" in later["why"]
    # every step does: the child is the parent
    always, out = run("always", lambda call: 1.0 if call == 0 else 50.0)
    assert always["best_step"] == 0 and always["false_kidney_refused"] == [1, 2, 3, 4]
    assert "keeps the parent's weights" in always["why"]
    from safetensors.numpy import load_file

    mother, child = load_file(tiny_checkpoints["coarse"]), load_file(out)
    assert all(np.array_equal(mother[k], child[k]) for k in mother)
    # nothing to score (no held-out or trained slab the scorer can use): the last step is the child
    # (the parent's weights were written before), unless it calls false kidney
    monkeypatch.setattr(heldout_rule, "_scorer", lambda *a, **k: None)
    unchecked, out = run("unchecked", lambda call: 1.0)
    assert unchecked["reason"] == "unchecked" and unchecked["best_step"] == 4
    assert any(not np.array_equal(mother[k], v) for k, v in load_file(out).items())
    refused, out = run("unchecked-refused", lambda call: 1.0 if call == 0 else 50.0)
    assert refused["best_step"] == 0 and "parent kept" in refused["why"] and refused["false_kidney_refused"] == [4]
    assert all(np.array_equal(mother[k], v) for k, v in load_file(out).items())


def test_false_kidney_limit_and_the_worse_guard_on_it():
    from napari_kidseg.heldout_rule import false_kidney_limit

    assert false_kidney_limit(0.0) == 2.0 and false_kidney_limit(13.5) == pytest.approx(16.875)
    taught = {"before": {"false_kidney": {"ml": 13.5}}, "held": [], "slabs": {}, "train_dirs": [], "scans_line": "x"}
    settings = FinetuneSettings()

    def worse_on(ml):
        after = {"false_kidney": {"ml": ml}}
        return finetuning._report(taught, after, {}, ("coarse",), {}, {}, Path("."), {}, settings)["worse_on"]

    assert worse_on(16.0) == [] and worse_on(25.9) == ["false_kidney"]  # 25.9: the proxy's rule child


def test_false_kidney_scans_count_far_from_the_kidneys_and_all_of_a_kidney_free_scan(
    tiny_dataset, tmp_path, monkeypatch
):
    from scipy import ndimage

    from napari_kidseg.labels import kits_foreground

    case = training.find_cases([tiny_dataset])[0]
    labels = readers.read_kits_case(case)[1].array
    zs = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(1))
    other = training.find_cases([tiny_dataset])[1] / volumes.KITS_IMAGE
    monkeypatch.setenv(finetuning.KIDNEY_FREE_ENV, str(other))
    (scan, free), line = finetuning.false_kidney_scans([case], {})
    assert scan.name == "case_00000" and free.name == f"kidney-free:{other.name}" and free.where is None
    assert "1 real scan(s) without kidneys" in line
    fg = kits_foreground(labels)
    dist = ndimage.distance_transform_edt(~fg, sampling=scan.spacing)
    assert np.array_equal(scan.where, dist > heldout_rule.FALSE_KIDNEY_MM)
    assert finetuning.false_kidney_ml(fg.astype(np.uint8), scan) == 0.0
    assert finetuning.false_kidney_ml(np.ones_like(labels), free) > 0
    # only the reviewed slices count
    (scan, _), _ = finetuning.false_kidney_scans([case], {"case_00000": (int(zs[0]),)})
    assert not scan.where[np.arange(len(scan.where)) != zs[0]].any() and scan.where[zs[0]].any()
    # none named: the corrected cases only, and it says so; a named scan that is not there: one line
    monkeypatch.setenv(finetuning.KIDNEY_FREE_ENV, "")
    scans, line = finetuning.false_kidney_scans([case], {})
    assert len(scans) == 1 and "no real scan without kidneys" in line and "the corrected cases only" in line
    monkeypatch.setenv(finetuning.KIDNEY_FREE_ENV, str(tmp_path / "gone"))
    with pytest.raises(KidsegError, match="scan without kidneys") as info:
        finetuning.false_kidney_scans([case], {})
    assert "gone" in str(info.value)


def test_the_shared_liver_slices_are_the_default_kidney_free_scan(monkeypatch):
    from conftest import shared_path

    liver = shared_path("realct", "dcmqi-liver-3slice")
    monkeypatch.delenv(finetuning.KIDNEY_FREE_ENV)
    assert finetuning.kidney_free_scans() == [liver] == [finetuning.SHARED_KIDNEY_FREE]
    monkeypatch.setattr(finetuning, "SHARED_KIDNEY_FREE", liver.parent / "not-here")
    assert finetuning.kidney_free_scans() == []
