"""Model factory and checkpoints: round trip, refusals, devices, atomic saves, no hub."""

from __future__ import annotations

import shutil

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
    cfg4 = models.model_config("coarse", "tiny", classes=4)
    four = models.save_checkpoint(tmp_path / "four.safetensors", models.build_model(cfg4), cfg4)
    with pytest.raises(KidsegError, match="4 classes"):
        models.load_checkpoint(four)


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
