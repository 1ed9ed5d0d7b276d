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
