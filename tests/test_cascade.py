"""Cascade engine: ROI coverage on real KiTS19 labels, fusion arithmetic, checkpoints, CLI, faults."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_kidseg import cascade, models
from napari_kidseg.errors import KidsegError


# ------------------------------------------------------------------ ROI and patches on real labels
# ------------------------------------------------------------------ fusion arithmetic
# ------------------------------------------------------------------ metrics
# ------------------------------------------------------------------ checkpoints
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


def test_a_coarse_answer_made_once_refines_like_a_whole_run(tiny_checkpoints, small_case):
    """run(coarse=run_coarse(...)) is the whole run with the coarse network not called again (the
    fine-tune's false-kidney guard re-runs only the refine stage it trains)."""
    cas = cascade.Cascade(tiny_checkpoints["coarse"], tiny_checkpoints["refine"], device="cpu", batch_size=4)
    ct, spacing = small_case.ct.array, small_case.ct.geometry.spacing
    whole = cas.run(ct, spacing)
    coarse = cas.run_coarse(ct, spacing)
    calls = []
    cas.coarse.register_forward_hook(lambda m, args, out: calls.append(1))
    again = cas.run(ct, spacing, coarse=coarse)
    assert not calls  # the coarse network did not run
    assert np.array_equal(again.fuse(), whole.fuse()) and len(again.patches) == len(whole.patches)
    assert np.array_equal(again.coarse_meta, whole.coarse_meta)
    with pytest.raises(KidsegError, match="cannot be refined on one of"):
        cas.run(ct[:-1], spacing, coarse=coarse)


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


def test_a_kits23_cascade_fuses_cysts_keeps_them_in_drafts_and_refuses_mixed_models(
    tmp_path, small_case, tiny_checkpoints
):
    from napari_kidseg.cascade import CascadeResult

    ckpts = {}
    for stage in ("coarse", "refine"):
        cfg = models.model_config(
            stage, "tiny", classes=4, context_slices=1, input_size=64 if stage == "coarse" else 96
        )
        ckpts[stage] = models.save_checkpoint(tmp_path / f"{stage}4.safetensors", models.build_model(cfg), cfg)
    ct = small_case.ct
    r = cascade.Cascade(ckpts["coarse"], ckpts["refine"], device="cpu").run(ct.array, ct.geometry.spacing)
    assert r.coarse_cyst is not None and r.coarse_cyst.shape == ct.array.shape
    assert all(region.cyst is not None for region in r.refined.values())
    # a block the networks call kidney with a likely cyst: fused as cyst (3) outside the refine patches
    r.refined = {}
    r.coarse_meta[:] = 0
    r.coarse_meta[5:9, 10:20, 10:20] = 250
    r.coarse_tumor[:] = 0
    r.coarse_cyst[:] = 0
    r.coarse_cyst[5:9, 12:16, 12:16] = 200
    labels = r.fuse(anatomy_check=False)
    assert (labels[5:9, 12:16, 12:16] == 3).all() and (labels[5:9, 10:12, 10:20] == 1).all()
    assert set(np.unique(labels)) == {0, 1, 3}
    r.save_probabilities(tmp_path / "draft.npz")
    back, _ = CascadeResult.load_probabilities(tmp_path / "draft.npz")
    assert np.array_equal(back.fuse(anatomy_check=False), labels)
    with pytest.raises(KidsegError, match="coarse model predicts 4 classes and the refine model 3"):
        cascade.Cascade(ckpts["coarse"], tiny_checkpoints["refine"], device="cpu")


def test_overlapping_refine_patches_blend_without_a_seam(tiny_checkpoints):
    """Two overlapping patches whose network answers differ: the stitched map changes smoothly
    across the overlap (plain averaging steps by half the difference where the second patch starts)."""
    from napari_kidseg.roi import PATCH_DTYPE

    class PerPatch(torch.nn.Module):  # one kidney probability per patch, from the patch's mean input
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 1, *x.shape[2:])
            return torch.cat([torch.zeros_like(m), 4.0 * m, torch.full_like(m, -20.0)], dim=1)

    cas = cascade.Cascade(tiny_checkpoints["coarse"], tiny_checkpoints["refine"], device="cpu")
    cas.refine = PerPatch()
    size = cas.refine_cfg.input_size
    nx = size + size // 2
    ct = np.tile(np.linspace(-100, 300, nx, dtype=np.float32).astype(np.int16), (3, size, 1))
    patches = np.array([(1, 1, 0, 0), (1, 1, 0, size // 2)], dtype=PATCH_DTYPE)
    region = cas._refine(ct, patches, None, None)[1]
    row = region.meta[size // 2].astype(float)  # a row through both patches' centres
    alone_a, alone_b = row[: size // 2 - 1].mean(), row[size + 1 :].mean()
    assert abs(alone_b - alone_a) > 40  # the two patches do disagree
    steps = np.abs(np.diff(row))
    assert steps.max() <= 0.1 * abs(alone_b - alone_a), f"a step of {steps.max():.0f} levels at x={steps.argmax()}"
    # and a pixel only one patch covers keeps that patch's own answer
    assert np.ptp(row[: size // 2 - 1]) <= 1 and np.ptp(row[size + 1 :]) <= 1


def test_levels_brought_up_as_uint8_on_the_cpu_match_the_float_path_within_a_level(monkeypatch):
    """The CPU path (uint8 bilinear) and the other devices' path (float bilinear, rounded after)
    give the same levels up to 1; checked on the CPU by sending a tensor that claims another device
    through the float branch."""
    import torch.nn.functional as F

    seen, interpolate = [], F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda x, **kw: seen.append(x.dtype) or interpolate(x, **kw))
    p = torch.softmax(torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0)) * 3, 1)[:, :2]
    on_cpu = cascade.upsampled_levels(p, 128)
    assert on_cpu.dtype == torch.uint8 and on_cpu.shape == (2, 2, 128, 128)

    class Elsewhere(torch.Tensor):  # the float branch, as CUDA and MPS take it
        @property
        def device(self):
            return torch.device("meta")

    floats = cascade.upsampled_levels(p.as_subclass(Elsewhere), 128).as_subclass(torch.Tensor)
    assert seen[0] == torch.uint8 and set(seen[1:]) == {torch.float32}  # each path took its own branch
    assert floats.dtype == torch.uint8
    assert (on_cpu.int() - floats.int()).abs().max() <= 1
    assert (on_cpu != floats).float().mean() < 0.5
