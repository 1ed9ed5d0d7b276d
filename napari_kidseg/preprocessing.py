"""What a network sees of a CT: the HU window scaled to [-1, 1] and the 2.5D slice context.

Shared by inference (:mod:`cascade`) and training (:mod:`training`), so both feed the networks
the same numbers.
"""

from __future__ import annotations

import numpy as np


def hu_to_input(x, window):
    """Clip HU to the window and scale to [-1, 1] (torch tensors; the training code uses it too)."""
    lo, hi = float(window[0]), float(window[1])
    # in place on clamp's fresh copy: one allocation instead of three, the same numbers
    return x.clamp(lo, hi).sub_((lo + hi) / 2.0).mul_(2.0 / (hi - lo))


def context_indices(z: np.ndarray | int, n_slices: int, k: int) -> np.ndarray:
    """Slice indices [z-k .. z+k], clamped at the volume's ends: the 2.5D channels of slice z."""
    z = np.atleast_1d(np.asarray(z))
    return np.clip(z[:, None] + np.arange(-k, k + 1)[None, :], 0, n_slices - 1)


def resample_factors(spacing, voxel_mm: float) -> tuple[float, float, float]:
    """Zoom factors taking a volume of ``spacing`` (z, y, x mm) to isotropic ``voxel_mm`` voxels."""
    a, b, c = (float(s) / float(voxel_mm) for s in spacing)
    return a, b, c


def resample(volume: np.ndarray, factors, *, order: int, shape=None) -> np.ndarray:
    """A volume zoomed by ``factors`` (or to exactly ``shape``): linear for HU and probabilities
    (``order`` 1), nearest for labels (``order`` 0)."""
    from scipy import ndimage

    if shape is not None:
        factors = [t / s for t, s in zip(shape, volume.shape)]
    out = ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True)
    if shape is not None and out.shape != tuple(shape):  # rounding: crop or pad by a voxel
        out = np.pad(out, [(0, max(0, t - o)) for t, o in zip(shape, out.shape)], mode="edge")
        out = out[tuple(slice(0, t) for t in shape)]
    return out


# The noise the networks were trained on, by :func:`noise_sd_hu`: the bundled version 5's 92
# training phantoms read a median 12 HU, 95% of them at most 18 HU (the highest 24). Real
# thin-slice CT reads more: the 27 real KiTS19 slices a median 28 HU (6-39), the shared real CT 20.
TRAINED_NOISE_HU = 18.0
_SMOOTHING_PX = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # in-plane Gaussian sigmas tried, gentlest first


def _slice_noise_hu(hu: np.ndarray) -> float | None:
    """Image noise of one slice (HU): the robust spread of what a 3 x 3 mean leaves, on the
    flattest third of soft tissue (20-200 HU), so edges and texture count as little as they can."""
    from scipy import ndimage

    hu = hu.astype(np.float32, copy=False)
    tissue = (hu > 20) & (hu < 200)
    if tissue.sum() < 500:
        return None
    residual = hu - ndimage.uniform_filter(hu, 3)
    edges = ndimage.gaussian_gradient_magnitude(ndimage.gaussian_filter(hu, 2), 1)
    flat = tissue & (edges <= np.percentile(edges[tissue], 30))  # <=: a noiseless flat body is all 0
    r = residual[flat]
    if r.size < 100:
        return None
    # MAD -> SD for a normal spread; x1.5: the 3 x 3 residual of white noise has 0.94 of its SD,
    # and the correlated noise of a CT (and of the phantoms) about two thirds of it
    sd = float(1.4826 * np.median(np.abs(r - np.median(r))) * 1.5)
    return sd if np.isfinite(sd) else None


def _sampled_slices(n: int, n_slices: int = 5) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n_slices, n)).astype(int))


def noise_sd_hu(ct: np.ndarray, n_slices: int = 5) -> float | None:
    """Image noise of a CT volume ``(z, y, x)`` in HU: the median of :func:`_slice_noise_hu` over up
    to ``n_slices`` evenly spread slices; None when no slice holds enough soft tissue."""
    values = [
        v for v in (_slice_noise_hu(np.asarray(ct[z])) for z in _sampled_slices(len(ct), n_slices)) if v is not None
    ]
    return float(np.median(values)) if values else None


def _smoothed(slices, sigma: float) -> np.ndarray:
    from scipy import ndimage

    out = np.empty((len(slices), *slices[0].shape), np.float32)
    for i, s in enumerate(slices):
        ndimage.gaussian_filter(np.asarray(s, np.float32), sigma, output=out[i], truncate=3.0)
    return out


def smooth_noise(ct: np.ndarray, target_hu: float = TRAINED_NOISE_HU) -> tuple[np.ndarray, str | None]:
    """The CT with its noise brought down to ``target_hu`` (the trained range) by the gentlest
    in-plane Gaussian of :data:`_SMOOTHING_PX` that does it, and a one-line note; a CT already
    within the range (or with no soft tissue to measure) comes back as it is, with no note. The
    smoothing is chosen on :func:`noise_sd_hu`'s slices, then the volume is smoothed once. The
    "after" figure is the same measure, which smoothing lowers more than the noise's true SD."""
    before = noise_sd_hu(ct)
    if before is None or before <= target_hu:
        return ct, None
    sample = [np.asarray(ct[z]) for z in _sampled_slices(len(ct))]
    for sigma in _SMOOTHING_PX:
        after = noise_sd_hu(_smoothed(sample, sigma))
        if after is None or after <= target_hu:
            break
    measured = "" if after is None else f" (measured the same way: {after:.0f} HU)"
    return _smoothed(ct, sigma), (
        f"noise smoothed: the CT's noise {before:.0f} HU, above the {target_hu:.0f} HU the networks "
        f"were trained on; smoothed in-plane by {sigma:g} px{measured}"
    )
