"""Cascade engine: ROI coverage on real KiTS19 labels, fusion arithmetic, checkpoints, CLI, faults."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shared_path

from napari_kidseg import cascade, fusion, metrics, models, roi, volumes
from napari_kidseg.errors import KidsegError


# ------------------------------------------------------------------ ROI and patches on real labels
@pytest.mark.slow
def test_refine_patches_cover_real_kits19_kidneys_and_tumors():
    """Every 4th real KiTS19 label volume fed as a perfect coarse result (the benchmark runs all 160)."""
    root = shared_path("kits19-masks")
    worst, tumor_full, n_tumor_cases = 1.0, 0, 0
    for case in sorted(root.glob("case_*"))[::4]:
        vol = volumes.read_labels(case / "segmentation.nii.gz")
        labels = vol.array
        rois, roi_map = roi.kidney_rois(labels > 0, vol.geometry.spacing)
        assert len(rois) == 2, f"{case.name}: {len(rois)} kidney ROIs"
        assert {r.side for r in rois} == {"left", "right"}
        patches = roi.refine_patches(roi_map, vol.geometry.spacing)
        cov = roi.patch_coverage(patches, labels.shape)
        worst = min(worst, cov[labels > 0].mean())
        if (labels == 2).any():
            n_tumor_cases += 1
            tumor_full += bool(cov[labels == 2].all())
    assert worst >= 0.995
    assert tumor_full >= 0.99 * n_tumor_cases


def test_wide_kidney_is_tiled_not_cut():
    """A 300 x 400 px kidney footprint (a big tumor at fine spacing) gets several patches covering it."""
    ids = np.zeros((3, 512, 512), np.int8)
    ids[:, 50:350, 60:460] = 1
    patches = roi.refine_patches(ids, (2.0, 0.5, 0.5), patch_px=256, margin_mm=4)
    assert len(patches) > 3
    cov = roi.patch_coverage(patches, ids.shape)
    assert cov[ids > 0].all()


def test_rois_drop_small_regions_and_keep_sides():
    meta = np.zeros((20, 128, 128), bool)
    meta[5:15, 60:90, 10:40] = True  # right kidney (low x)
    meta[5:15, 60:90, 80:110] = True  # left kidney
    meta[2, 5:7, 5:7] = True  # a speck
    rois, roi_map = roi.kidney_rois(meta, (5.0, 1.0, 1.0), min_volume_ml=5)
    ids = roi_map.full()
    assert [r.side for r in rois] == ["right", "left"]
    assert ids[2, 5, 5] == 0 and ids[10, 70, 20] == 1 and ids[10, 70, 90] == 2
    assert rois[0].volume_ml == pytest.approx(10 * 30 * 30 * 5 / 1000, rel=0.15)


# ------------------------------------------------------------------ fusion arithmetic
def test_fusion_against_a_hand_computed_case():
    coarse_meta = np.array([[[200, 100, 40]]], np.uint8)  # p(kid+tum) 0.78, 0.39, 0.16
    coarse_tum = np.array([[[150, 20, 0]]], np.uint8)
    region = fusion.RefinedRegion(
        0,
        0,
        np.array([[100, 250, 200]], np.uint8),
        np.array([[20, 200, 10]], np.uint8),
        np.array([[True, True, False]]),
    )
    labels = fusion.fuse_volume(
        coarse_meta, coarse_tum, {0: region}, alpha=0.4, kidney_threshold=0.5, tumor_threshold=0.5
    )
    # voxel 0: meta 0.4*200+0.6*100=140 > 127.5 -> kidney; tumor 0.4*150+0.6*20=72 < 127.5 -> kidney (1)
    # voxel 1: meta 0.4*100+0.6*250=190 -> kidney; tumor 0.4*20+0.6*200=128 > 127.5 -> tumor (2)
    # voxel 2: not covered -> coarse only: meta 40 -> background
    assert labels.tolist() == [[[1, 2, 0]]]


def test_alpha_one_is_coarse_and_alpha_zero_is_refined_inside_the_rois():
    rng = np.random.default_rng(0)
    shape = (4, 40, 50)
    cm, ct = rng.integers(0, 256, shape).astype(np.uint8), rng.integers(0, 256, shape).astype(np.uint8)
    refined = {}
    for z in (1, 2):
        cov = np.zeros((20, 30), bool)
        cov[2:18, 3:25] = True
        refined[z] = fusion.RefinedRegion(
            5, 10, rng.integers(0, 256, (20, 30)).astype(np.uint8), rng.integers(0, 256, (20, 30)).astype(np.uint8), cov
        )
    for kt, tt in ((0.5, 0.5), (0.3, 0.7), (0.4, 0.4)):  # 0.4 * 255 = 102 exactly: the edge case
        coarse = fusion.labels_from_levels(cm, ct, kt, tt)
        assert np.array_equal(fusion.fuse_volume(cm, ct, refined, 1.0, kt, tt), coarse)
        alone = fusion.refined_only_labels(shape, refined, kt, tt)
        fused0 = fusion.fuse_volume(cm, ct, refined, 0.0, kt, tt)
        for z, r in refined.items():
            win = fused0[z][r.window]
            assert np.array_equal(win[r.covered], alone[z][r.window][r.covered])
            assert np.array_equal(fused0[z][r.window][~r.covered], coarse[z][r.window][~r.covered])
        # one slice at a time gives the same as the whole volume
        for z in range(shape[0]):
            assert np.array_equal(
                fusion.fuse_slice(cm[z], ct[z], refined.get(z), 0.4, kt, tt),
                fusion.fuse_volume(cm, ct, refined, 0.4, kt, tt)[z],
            )


# ------------------------------------------------------------------ metrics
def test_metrics_by_hand():
    ref = np.zeros((2, 10, 10), np.uint8)
    ref[0, :4, :5] = 1  # 20 kidney voxels
    ref[0, :2, :5] = 2  # 10 of them tumor
    pred = np.zeros_like(ref)
    pred[0, :4, :4] = 1  # 16 kidney+tumor voxels inside ref's 20
    s = metrics.kits_scores(pred, ref)
    assert s["kidney_tumor_dice"] == pytest.approx(2 * 16 / 36)
    assert s["kidney_tumor_jaccard"] == pytest.approx(16 / 20)
    assert s["tumor_dice"] == 0.0
    assert s["kits_composite"] == pytest.approx((2 * 16 / 36) / 2)
    empty = metrics.kits_scores(np.zeros_like(ref), np.zeros_like(ref))
    assert empty["tumor_dice"] == 1.0 and empty["kidney_tumor_jaccard"] == 1.0  # empty vs empty is a match
    assert metrics.volume_ml(ref > 0, (2.0, 1.0, 0.5)) == pytest.approx(20 * 1.0 / 1000)
    line = np.zeros((1, 1, 30), bool)
    line[0, 0, 5:25] = True
    assert metrics.largest_diameter_mm(line, (1.0, 1.0, 0.7)) == pytest.approx(19 * 0.7)


def test_tumor_detection_counts_each_tumor_and_each_false_one():
    spacing = (2.0, 1.0, 1.0)  # 2 mm^3 per voxel: 500 voxels per mL
    ref = np.zeros((10, 40, 40), np.uint8)
    ref[1:9, 2:38, 2:38] = 1
    ref[2:4, 5:10, 5:10] = 2  # tumor A: 50 voxels, 0.1 mL
    ref[5:9, 20:35, 20:35] = 2  # tumor B: 900 voxels, 1.8 mL
    pred = ref.copy()
    pred[2:4, 5:10, 5:10] = 1  # A missed entirely
    pred[5:9, 20:35, 20:26] = 1  # B: 6 of 15 columns missed, so 60% of it found
    pred[2, 30:32, 30:32] = 2  # a false tumor of 4 voxels, diagonal-touching nothing in ref's tumors
    d = metrics.tumor_detection(pred, ref, spacing)
    a, b = sorted(d["tumors"], key=lambda t: t["volume_ml"])
    assert a == {"volume_ml": pytest.approx(0.1), "recall": 0.0, "found": False}
    assert b["volume_ml"] == pytest.approx(1.8) and b["recall"] == pytest.approx(0.6) and b["found"]
    assert d["false_tumors_ml"] == [pytest.approx(4 * 2 / 1000)]
    rows = metrics.detection_by_size([d, d], bins_ml=(1.0,))
    assert [(r["tumors"], r["found"]) for r in rows] == [(2, 0), (2, 2)]
    assert rows[1]["mean_recall"] == pytest.approx(0.6)
    none = metrics.tumor_detection(np.zeros_like(ref), np.zeros_like(ref), spacing)
    assert none == {"tumors": [], "false_tumors_ml": []}
    for score in (metrics.kits_scores, lambda p, r: metrics.tumor_detection(p, r, spacing)):
        with pytest.raises(KidsegError, match="differs from the reference grid"):
            score(pred[:5], ref)


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_and_refusals(tmp_path, tiny_checkpoints):
    model, cfg = models.load_checkpoint(tiny_checkpoints["coarse"], stage="coarse")
    assert cfg.stage == "coarse" and cfg.in_channels == 3 and cfg.encoder == "tu-resnet10t"
    assert cfg.to_json() == models.read_config(tiny_checkpoints["coarse"]).to_json()
    with pytest.raises(KidsegError, match="is a coarse checkpoint, but a refine"):
        models.load_checkpoint(tiny_checkpoints["coarse"], stage="refine")
    with pytest.raises(KidsegError, match="expects 3 input channels, not 1"):
        models.load_checkpoint(tiny_checkpoints["coarse"], in_channels=1)
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(tiny_checkpoints["coarse"].read_bytes()[:5000])
    with pytest.raises(KidsegError, match="corrupt.safetensors"):
        models.load_checkpoint(bad)
    cfg4 = models.model_config("coarse", "tiny", classes=4)
    four = models.save_checkpoint(tmp_path / "four.safetensors", models.build_model(cfg4), cfg4)
    with pytest.raises(KidsegError, match="4 classes"):
        models.load_checkpoint(four)


# ------------------------------------------------------------------ the cascade
def test_cascade_runs_and_refuses_nothing_on_odd_sizes(tiny_checkpoints, small_case):
    cas = cascade.Cascade(tiny_checkpoints["coarse"], tiny_checkpoints["refine"], device="cpu", batch_size=4)
    ct = small_case.ct
    result = cas.run(ct.array, ct.geometry.spacing)
    assert result.coarse_meta.shape == ct.array.shape
    labels = result.fuse()
    assert labels.shape == ct.array.shape and set(np.unique(labels)) <= {0, 1, 2}
    # 1 slice and a non-square slice both work
    one = cas.run(ct.array[10:11, :, :100], ct.geometry.spacing)
    assert one.fuse().shape == (1, 128, 100)


def test_cascade_on_a_volume_without_kidneys_says_so(tiny_checkpoints):
    cas = cascade.Cascade(tiny_checkpoints["coarse"], tiny_checkpoints["refine"], device="cpu")
    # make the coarse net predict background everywhere by biasing its last layer
    head = [m for m in cas.coarse.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        head.bias[:] = torch.tensor([50.0, -50.0, -50.0])
    air = np.full((6, 64, 64), -1000, np.int16)
    result = cas.run(air, (5.0, 1.0, 1.0))
    assert result.rois == [] and len(result.patches) == 0
    assert not result.fuse().any()
    assert any("no kidney found" in m for m in result.messages)


def test_cancel_stops_within_a_batch(tiny_checkpoints, small_case):
    cas = cascade.Cascade(tiny_checkpoints["coarse"], tiny_checkpoints["refine"], device="cpu", batch_size=4)
    seen = []

    def progress(done, total, stage):
        seen.append(done)

    with pytest.raises(cascade.Cancelled):
        cas.run(small_case.ct.array, small_case.ct.geometry.spacing, progress=progress, cancel=lambda: len(seen) >= 2)
    assert seen == [4, 8]


def test_predict_without_installed_weights_says_so(tmp_path, small_case_dir, monkeypatch):
    monkeypatch.setattr(models, "bundled_checkpoint", lambda stage: None)
    with pytest.raises(KidsegError, match="no coarse checkpoint is installed"):
        cascade.Cascade(device="cpu")


def test_unavailable_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(KidsegError, match="no CUDA GPU"):
        models.pick_device("cuda")


def test_fixed_batch_shape_pads_short_batches_and_changes_no_result(tiny_checkpoints, small_case):
    # on CUDA every batch is padded to the full size so cuDNN tunes one shape; checked here on the CPU
    ct = small_case.ct
    plain = cascade.Cascade(tiny_checkpoints["coarse"], tiny_checkpoints["refine"], device="cpu", batch_size=16)
    padded = cascade.Cascade(tiny_checkpoints["coarse"], tiny_checkpoints["refine"], device="cpu", batch_size=16)
    assert not plain.fixed_batch_shape  # the CPU default
    padded.fixed_batch_shape = True
    seen = []
    padded.coarse.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    a = plain.run(ct.array, ct.geometry.spacing)
    b = padded.run(ct.array, ct.geometry.spacing)
    assert ct.array.shape[0] % 16 and set(seen) == {16}, seen  # the short last batch went in padded
    # the same probabilities, up to one uint8 level of float rounding between batch shapes
    for x, y in ((a.coarse_meta, b.coarse_meta), (a.coarse_tumor, b.coarse_tumor)):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


def test_mirror_averages_each_input_with_its_mirror_image(tiny_checkpoints, small_case):
    cas = cascade.Cascade(tiny_checkpoints["coarse"], tiny_checkpoints["refine"], device="cpu", batch_size=4)
    x = torch.randn(3, cas.coarse_cfg.in_channels, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain, of_mirror = cas._forward(cas.coarse, x), cas._forward(cas.coarse, x.flip(-1))
        mirrored = cas._forward(cas.coarse, x, mirror=True)
        assert torch.allclose(mirrored, 0.5 * (plain + of_mirror.flip(-1)), atol=1e-5)
        # so the answer for a mirrored CT is the mirror image of the answer (a plain net's is not)
        assert torch.allclose(cas._forward(cas.coarse, x.flip(-1), mirror=True), mirrored.flip(-1), atol=1e-5)
        assert not torch.allclose(of_mirror, plain.flip(-1), atol=1e-3)
    ct = small_case.ct
    result = cas.run(ct.array, ct.geometry.spacing, mirror=True)
    assert result.fuse().shape == ct.array.shape and result.refined  # both stages ran mirrored
