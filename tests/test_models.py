"""Model factory and checkpoints: round trip, refusals, devices, atomic saves, no hub."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from napari_kidseg import models
from napari_kidseg.errors import KidsegError


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
    cfg5 = models.model_config("coarse", "tiny", classes=5)
    five = models.save_checkpoint(tmp_path / "five.safetensors", models.build_model(cfg5), cfg5)
    with pytest.raises(KidsegError, match="5 classes; the cascade needs 3"):
        models.load_checkpoint(five)


def test_unavailable_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(KidsegError, match="no CUDA GPU"):
        models.pick_device("cuda")


def test_interrupted_save_keeps_the_previous_checkpoint(tiny_checkpoints, tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "c.safetensors"
    shutil.copy(tiny_checkpoints["coarse"], path)
    before = path.read_bytes()
    model, cfg = models.load_checkpoint(path)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(KidsegError, match="No space left"):
        models.save_checkpoint(path, model, cfg, overwrite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_imagenet_weights_without_a_hub_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = models.model_config("coarse", "tiny")
    with pytest.raises(KidsegError, match="could not fetch imagenet weights"):
        models.build_model(cfg, encoder_weights="imagenet")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["paper", "small", "resnet34", "fpn", "coarse3d"])
def test_every_preset_trains_saves_loads_and_runs_the_cascade(preset, tiny_dataset, tmp_path, small_case):
    """A few steps of each stage at a tiny input size, then the whole cascade with the children."""
    from napari_kidseg import training
    from napari_kidseg.cascade import Cascade

    cases = [training.cache_case(c) for c in training.find_cases([tiny_dataset])]
    settings = training.TrainSettings(
        epochs=1, steps_per_epoch=2, batch_size=2, lr=1e-4, workers=0, device="cpu", augment=False, val_samples=4
    )
    ckpts = {}
    for stage in ("coarse", "refine"):
        cfg = models.model_config(stage, preset, input_size=64)
        if not cfg.is_3d:  # 2.5D input for the 2D stages; the 3D one sees the whole volume
            cfg.context_slices = 1
        ckpts[stage] = tmp_path / f"{stage}.safetensors"
        training.train(cfg, cases[:2], cases[2:], ckpts[stage], settings, log=lambda s: None)
        loaded = models.read_config(ckpts[stage])
        assert loaded.provenance["preset"] == preset and loaded.arch == cfg.arch and loaded.encoder == cfg.encoder
    if preset == "fpn":  # the refine stage is a feature pyramid, the coarse one the paper's U-Net
        assert models.read_config(ckpts["refine"]).arch == "FPN" and models.read_config(ckpts["coarse"]).arch == "Unet"
    if preset == "coarse3d":  # a 3D coarse stage at its own voxel size, a 2D refine stage
        assert (
            models.read_config(ckpts["coarse"]).voxel_mm == 3.0 and models.read_config(ckpts["refine"]).arch == "Unet"
        )
    result = Cascade(ckpts["coarse"], ckpts["refine"], device="cpu").run(
        small_case.ct.array, small_case.ct.geometry.spacing
    )
    labels = result.fuse(anatomy_check=False)
    assert labels.shape == small_case.ct.array.shape and set(np.unique(labels)) <= {0, 1, 2}


def test_presets_mix_between_stages_and_unknown_ones_are_refused():
    coarse = models.model_config("coarse", "resnet34")
    refine = models.model_config("refine", "fpn")
    assert (coarse.encoder, coarse.arch, refine.encoder, refine.arch) == ("resnet34", "Unet", "resnet50", "FPN")
    assert models.model_config("coarse", "fpn").encoder == models.PAPER["encoder"]
    with pytest.raises(KidsegError, match="unknown architecture preset 'unet3d'"):
        models.model_config("coarse", "unet3d")
    with pytest.raises(KidsegError, match="context-slices does not apply"):
        models.build_model(models.model_config("coarse", "coarse3d", context_slices=1))
