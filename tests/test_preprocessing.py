"""What the networks see: the noise estimate and the smoothing of a CT noisier than the training CTs."""

from __future__ import annotations

import numpy as np
import pytest

from napari_kidseg import preprocessing
from napari_kidseg.cascade import Cascade
from napari_kidseg.errors import KidsegError


def _body(noise_sd: float, seed: int = 0, shape=(6, 128, 128)) -> np.ndarray:
    """Air around a flat 60 HU body with a brighter 150 HU organ, plus white noise of ``noise_sd``."""
    rng = np.random.default_rng(seed)
    ct = np.full(shape, -1000.0, np.float32)
    ct[:, 16:112, 16:112] = 60.0
    ct[:, 40:70, 40:70] = 150.0
    body = ct > -500
    ct[body] += rng.standard_normal(int(body.sum())).astype(np.float32) * noise_sd
    return ct


@pytest.mark.parametrize("sd", [8.0, 20.0, 35.0])
def test_the_noise_estimate_reads_the_noise_drawn(sd):
    est = preprocessing.noise_sd_hu(_body(sd))
    assert est == pytest.approx(sd * 1.5 * 0.94, rel=0.2)  # the x1.5 assumes CT's correlated noise


def test_the_noise_estimate_of_a_ct_without_soft_tissue_is_none():
    assert preprocessing.noise_sd_hu(np.full((3, 64, 64), -1000.0, np.float32)) is None


def test_a_noiseless_ct_reads_no_noise_and_is_left_alone():
    """A flat body without noise: its flattest third is all of it (no NaN, no 2 px smoothing)."""
    flat = _body(0.0)
    assert preprocessing.noise_sd_hu(flat) == 0.0
    same, note = preprocessing.smooth_noise(flat)
    assert same is flat and note is None


def test_a_quiet_ct_is_left_alone_and_a_noisy_one_smoothed_into_the_trained_range():
    quiet = _body(8.0)
    same, note = preprocessing.smooth_noise(quiet)
    assert same is quiet and note is None
    noisy = _body(30.0)
    before = preprocessing.noise_sd_hu(noisy)
    assert before > preprocessing.TRAINED_NOISE_HU
    smoothed, note = preprocessing.smooth_noise(noisy)
    assert smoothed.shape == noisy.shape and smoothed.dtype == np.float32
    assert preprocessing.noise_sd_hu(smoothed) <= preprocessing.TRAINED_NOISE_HU
    assert "noise smoothed" in note and f"{before:.0f} HU" in note
    assert np.array_equal(noisy, _body(30.0))  # the input itself is not changed
    # the organ's mean is kept (the smoothing is in-plane, not a shift of the HU)
    assert abs(float(smoothed[:, 45:65, 45:65].mean()) - 150.0) < 3


def test_the_cascade_smooths_only_when_asked_and_says_so(tiny_checkpoints):
    cas = Cascade(tiny_checkpoints["coarse"], tiny_checkpoints["refine"], device="cpu", batch_size=4)
    noisy = _body(30.0)
    plain = cas.run(noisy, (5.0, 1.0, 1.0))
    smoothed = cas.run(noisy, (5.0, 1.0, 1.0), smooth_noise=True)
    assert not any("noise smoothed" in m for m in plain.messages)
    assert any("noise smoothed" in m for m in smoothed.messages)
    assert not np.array_equal(plain.coarse_meta, smoothed.coarse_meta)  # the networks saw another CT
    quiet = cas.run(_body(8.0), (5.0, 1.0, 1.0), smooth_noise=True)
    assert not any("noise smoothed" in m for m in quiet.messages)
    # a coarse answer made beforehand is of the unsmoothed CT: refused, not mixed
    with pytest.raises(KidsegError, match="cannot be combined with smooth_noise"):
        cas.run(noisy, (5.0, 1.0, 1.0), coarse=cas.run_coarse(noisy, (5.0, 1.0, 1.0)), smooth_noise=True)
