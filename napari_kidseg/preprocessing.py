"""What a network sees of a CT: the HU window scaled to [-1, 1] and the 2.5D slice context.

Shared by inference (:mod:`cascade`) and training (:mod:`training`), so both feed the networks
the same numbers.
"""

from __future__ import annotations

import numpy as np


def hu_to_input(x, window):
    """Clip HU to the window and scale to [-1, 1] (torch tensors; the training code uses it too)."""
    lo, hi = float(window[0]), float(window[1])
    return (x.clamp(lo, hi) - (lo + hi) / 2.0) * (2.0 / (hi - lo))


def context_indices(z: np.ndarray | int, n_slices: int, k: int) -> np.ndarray:
    """Slice indices [z-k .. z+k], clamped at the volume's ends: the 2.5D channels of slice z."""
    z = np.atleast_1d(np.asarray(z))
    return np.clip(z[:, None] + np.arange(-k, k + 1)[None, :], 0, n_slices - 1)
