"""Training and fine-tuning on tiny phantoms with tiny networks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_kidseg import models, roi, training
from napari_kidseg.errors import KidsegError
from napari_kidseg.io import readers, volumes
from napari_kidseg.labels import kits_foreground, map_kits_labels
from napari_kidseg.phantoms.procedural import make_phantom
from napari_kidseg.phantoms.writer import write_phantom_cases


def test_a_few_training_steps_reduce_the_loss_and_write_a_loadable_checkpoint(tiny_dataset, tmp_path):
    cases = [training.cache_case(c) for c in training.find_cases([tiny_dataset])]
    cfg = models.model_config("coarse", "tiny", input_size=64, context_slices=1)
    cfg.provenance = {"data": "tiny"}
    settings = training.TrainSettings(
        epochs=3,
        steps_per_epoch=10,
        batch_size=8,
        lr=3e-3,
        workers=0,
        device="cpu",
        augment=False,
        patience=10,
        val_samples=32,
    )
    out = tmp_path / "coarse.safetensors"
    summary = training.train(cfg, cases[:2], cases[2:], out, settings, log=lambda s: None)
    losses = [r["train_loss"] for r in summary["log"]]
    assert losses[-1] < losses[0] * 0.8, losses
    model, loaded = models.load_checkpoint(out, stage="coarse")
    assert loaded.to_json() == models.read_config(out).to_json()
    assert loaded.provenance == {"data": "tiny"} and loaded.context_slices == 1
    assert out.with_suffix(".png").exists() and out.with_suffix(".log.jsonl").exists()
    # resume continues where it stopped
    settings.epochs = 4
    summary = training.train(cfg, cases[:2], cases[2:], out, settings, resume=True, log=lambda s: None)
    assert [r["epoch"] for r in summary["log"]] == [1, 2, 3, 4]


def test_training_and_inference_cut_the_same_patches(tiny_dataset):
    case = training.cache_case(training.find_cases([tiny_dataset])[0])
    _, labels = case.arrays()
    _, roi_map = roi.kidney_rois(kits_foreground(np.asarray(labels)), case.spacing)  # organ codes are no kidney
    expected = roi.refine_patches(roi_map, case.spacing, patch_px=32)
    assert np.array_equal(training.reference_patches(case, 32), expected)
    cfg = models.model_config("refine", "tiny", input_size=32)
    samples = training.SegmentationSamples([case], cfg, None)
    assert [(z, y, x) for _, z, y, x in samples.items] == [(int(p["z"]), int(p["y0"]), int(p["x0"])) for p in expected]


def test_kits21_cysts_are_mapped_and_bad_labels_refused(tmp_path):
    lab = np.array([0, 1, 2, 3], np.uint8)
    assert map_kits_labels(lab, "x").tolist() == [0, 1, 2, 1]
    with pytest.raises(KidsegError, match=r"label values \[7\]"):
        map_kits_labels(np.array([0, 7], np.uint8), tmp_path / "seg.nii.gz")


def test_empty_or_malformed_dataset_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KidsegError, match="no cases in KiTS layout"):
        training.find_cases([tmp_path / "empty"])
    with pytest.raises(KidsegError, match="no such dataset folder"):
        training.find_cases([tmp_path / "missing"])
    # image and label grids that differ
    case = make_phantom(1, matrix=48, max_slices=12)
    d = tmp_path / "bad" / "case_00000"
    volumes.write_kits_case(tmp_path / "bad", "case_00000", case.ct, None)
    other = volumes.volume_in_memory(case.labels[:, :-2], (1, 1, 1))
    volumes.write_labels(d / volumes.KITS_LABELS, other.array, other)
    with pytest.raises(KidsegError, match="differs from the CT grid"):
        training.cache_case(d)


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tiny_dataset, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "napari_kidseg.cli",
            "train",
            str(tiny_dataset),
            "--stage",
            "coarse",
            "-o",
            str(out),
            "--preset",
            "tiny",
            "--input-size",
            "32",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "3",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert models.read_config(out).stage == "coarse"


def test_clahe_augmentation_changes_contrast_inside_the_window_only(tiny_dataset):
    import torch

    cases = [training.cache_case(c) for c in training.find_cases([tiny_dataset])]
    cfg = models.model_config("coarse", "tiny", input_size=64, context_slices=1)
    ds = training.SegmentationSamples(cases, cfg, training.Augment(), seed=0)
    x = torch.linspace(-400, 600, 3 * 64 * 64).reshape(3, 64, 64)
    x[:, 20:40, 20:40] += 60  # some structure for CLAHE to work on
    out = ds._clahe(x.clone(), 0.02)
    lo, hi = cfg.hu_window
    inside = (x > lo) & (x < hi)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out[~inside], x[~inside])  # air, fat below and bone above the window untouched
    assert (out[inside] - x[inside]).abs().max() > 5  # the window's contents were re-mapped
    assert out[inside].min() >= lo and out[inside].max() <= hi


def test_scanner_look_adds_noise_and_blur_on_the_body_only(tiny_dataset):
    """The scanner-look augmentation: off by default; noise of the asked SD (in the CT's own
    pixels, a quarter of it on a 4x-downsampled slice) on the body, never on air."""
    cases = [training.cache_case(c) for c in training.find_cases([tiny_dataset])]
    cfg = models.model_config("coarse", "tiny", input_size=64, context_slices=1)
    x = np.full((3, 64, 64), -1000.0, np.float32)
    x[:, 8:56, 8:56] = 40.0  # a flat body in air
    plain = training.SegmentationSamples(cases, cfg, training.Augment(), seed=0)
    assert np.array_equal(plain._scanner_look(x.copy(), plain.augment), x)  # off by default
    look = training.Augment(ct_noise_hu=40.0, ct_blur_px=1.5)
    ds = training.SegmentationSamples(cases, cfg, look, seed=0)
    sds, sds_small, changed = [], [], 0
    for _ in range(40):
        out = ds._scanner_look(x.copy(), look)
        assert out.dtype == np.float32 and np.array_equal(out[:, :4], x[:, :4])  # air stays air
        body = out[:, 16:48, 16:48]
        sds.append(float(body.std()))
        changed += not np.array_equal(out, x)
        sds_small.append(float(ds._scanner_look(x.copy(), look, pixels_per_input=4.0)[:, 16:48, 16:48].std()))
    assert 10 < changed < 40  # each of noise and blur on about half the samples
    assert 5 <= max(sds) <= 45 and min(sds) < 1  # within the asked SD; some samples clean
    assert max(sds_small) <= 45 / 4 + 1  # a downsampled slice gets the noise a downsample leaves


def test_data_loader_workers_draw_different_augmentations(tiny_dataset):
    import torch
    from torch.utils.data import DataLoader

    case = training.cache_case(training.find_cases([tiny_dataset])[0])
    cfg = models.model_config("coarse", "tiny", input_size=32, context_slices=0)
    aug = training.Augment(noise=0.0)  # noise comes from torch's per-worker seed; the rest from the dataset's rng
    samples = training.SegmentationSamples([case], cfg, aug, seed=3)
    loader = DataLoader(
        samples,
        batch_size=1,
        sampler=[5, 5, 5, 5],
        num_workers=2,
        worker_init_fn=training.SegmentationSamples.reseed_worker,
    )
    xs = [x for x, _ in loader]  # batches alternate between the two workers, all of the same slice
    assert not torch.equal(xs[0], xs[1]), "both workers drew the same augmentation"


def test_parallel_caching_and_phantoms_match_the_serial_ones(tiny_dataset, tmp_path):
    dirs = training.find_cases([tiny_dataset])
    assert training.cache_cases(dirs, jobs=2) == [training.cache_case(c) for c in dirs]
    write_phantom_cases(tmp_path / "serial", 2, seed=77, matrix=48, max_slices=12)
    write_phantom_cases(tmp_path / "parallel", 2, seed=77, matrix=48, max_slices=12, jobs=2)
    for name in ("case_00000", "case_00001"):
        a, la = readers.read_kits_case(tmp_path / "serial" / name)
        b, lb = readers.read_kits_case(tmp_path / "parallel" / name)
        assert np.array_equal(a.array, b.array) and np.array_equal(la.array, lb.array)


def test_bn_momentum_setting_reaches_the_batch_norm_layers(tiny_dataset, tiny_checkpoints, tmp_path):
    from safetensors.numpy import load_file

    cases = [training.cache_case(c) for c in training.find_cases([tiny_dataset])]
    cfg = models.read_config(tiny_checkpoints["coarse"])
    parent = load_file(tiny_checkpoints["coarse"])
    running = [k for k in parent if k.endswith(("running_mean", "running_var"))]
    assert running, "the tiny network has no batch norm to test"

    def trained_stats(momentum):
        settings = training.TrainSettings(
            epochs=1,
            steps_per_epoch=3,
            batch_size=4,
            workers=0,
            device="cpu",
            augment=False,
            bn_momentum=momentum,
            val_samples=0,
        )
        out = tmp_path / f"m{momentum}.safetensors"
        training.train(cfg, cases, [], out, settings, init_checkpoint=tiny_checkpoints["coarse"], log=lambda s: None)
        child = load_file(out)
        return max(float(np.abs(child[k] - parent[k]).max()) for k in running)

    assert trained_stats(0.0) == 0.0  # momentum 0: evaluation statistics stay the parent's
    assert trained_stats(0.1) > 0.0


def test_validation_scores_every_slice_unweighted_or_an_even_spread(tiny_dataset):
    """The epoch score is the validation cases' Dice: slices without kidney (where false
    positives lie) count as often as they occur, not at the training sampler's low weight."""
    cases = [training.cache_case(c) for c in training.find_cases([tiny_dataset])]
    cfg = models.model_config("coarse", "tiny", input_size=32, context_slices=0)
    val_set = training.SegmentationSamples(cases, cfg, None)
    n = len(val_set)
    assert training.validation_indices(n, 10 * n) == list(range(n))
    assert training.validation_indices(n, 0) == []
    idx = training.validation_indices(n, n // 3)
    assert len(idx) == n // 3 and idx[0] == 0 and idx[-1] == n - 1 and idx == sorted(set(idx))
    # the spread keeps the share of slices without kidney that the cases have
    empty = np.array([w == val_set.weights.min() for w in val_set.weights])
    assert 0.1 < empty.mean() < 0.9
    assert abs(empty[idx].mean() - empty.mean()) < 0.1


def test_kits23_cases_train_a_four_class_network_and_a_three_class_one_learns_cysts_as_kidney(tmp_path, monkeypatch):
    monkeypatch.setenv("KIDSEG_CACHE", str(tmp_path / "cache"))
    write_phantom_cases(tmp_path / "k23", 2, seed=3, matrix=96, max_slices=40, labels="kits23", n_tumors=1)
    cases = [training.cache_case(c) for c in training.find_cases([tmp_path / "k23"])]
    assert any((np.asarray(c.arrays()[1]) == 3).any() for c in cases)  # the cache keeps the cysts
    targets = {}
    for classes in (3, 4):
        cfg = models.model_config("coarse", "tiny", classes=classes, input_size=64)
        samples = training.SegmentationSamples(cases, cfg, None)
        targets[classes] = set().union(*(np.unique(samples[i][1].numpy()).tolist() for i in range(len(samples))))
    assert 3 in targets[4] and 3 not in targets[3]
    cfg = models.model_config("coarse", "tiny", classes=4, input_size=64)
    settings = training.TrainSettings(epochs=1, steps_per_epoch=2, batch_size=2, workers=0, device="cpu", val_samples=4)
    training.train(cfg, cases, cases[:1], tmp_path / "c4.safetensors", settings, log=lambda s: None)
    assert models.load_checkpoint(tmp_path / "c4.safetensors")[1].classes == 4


def test_freeze_encoder_moves_the_decoder_only(tiny_dataset, tiny_checkpoints, tmp_path):
    from safetensors.numpy import load_file

    cases = [training.cache_case(c) for c in training.find_cases([tiny_dataset])]
    cfg = models.read_config(tiny_checkpoints["coarse"])
    settings = training.TrainSettings(
        epochs=1, steps_per_epoch=3, batch_size=2, lr=1e-2, workers=0, device="cpu", val_samples=4, freeze_encoder=True
    )
    out = tmp_path / "child.safetensors"
    training.train(cfg, cases[:2], cases[2:], out, settings, init_checkpoint=tiny_checkpoints["coarse"], log=print)
    mother, child = load_file(str(tiny_checkpoints["coarse"])), load_file(str(out))
    weights = [k for k in mother if k.endswith("weight")]
    assert all(np.array_equal(mother[k], child[k]) for k in weights if k.startswith("encoder."))
    assert any(not np.array_equal(mother[k], child[k]) for k in weights if k.startswith("decoder."))
