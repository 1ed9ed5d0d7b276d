"""Reading what a user hands over, whatever it is: a CT, a label volume, a DICOM SEG, a KiTS case.

Above both :mod:`volumes` (CT volumes, series, label files on disk) and :mod:`dicom_seg` (DICOM
Segmentation objects): the one place that knows which of the two reads a path, so neither
imports the other.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import KidsegError
from .dicom_seg import read_dicom_seg
from .volumes import KITS_IMAGE, KITS_LABELS, Volume, check_same_grid, is_dicom_seg, read_ct, read_volume, readable_ct


def read_labels(path: str | os.PathLike, like: Volume | None = None) -> Volume:
    """Read a label volume (0 background, 1 kidney, 2 tumor, ...) as uint8.

    With ``like``, the labels must lie on the same grid as that CT (same shape and geometry). A
    DICOM Segmentation file is read by :mod:`dicom_seg` (onto ``like``'s grid when given).
    """
    if is_dicom_seg(path):
        vol = read_dicom_seg(path, like=like)
        if like is not None:
            check_same_grid(like, vol, path)
        return vol
    vol = read_volume(path)
    arr = vol.array
    if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
        raise KidsegError("label volume holds fractional values", path)
    if arr.min() < 0 or arr.max() > 255:
        raise KidsegError(f"label values {arr.min()}..{arr.max()} are outside 0..255", path)
    vol.array = arr.astype(np.uint8, copy=False)
    if like is not None:
        check_same_grid(like, vol, path)
    return vol


def read_kits_case(case_dir: str | os.PathLike, *, with_labels: bool = True) -> tuple[Volume, Volume | None]:
    case_dir = Path(case_dir)
    ct = read_ct(case_dir / KITS_IMAGE)
    labels = None
    if with_labels and (case_dir / KITS_LABELS).exists():
        labels = read_labels(case_dir / KITS_LABELS, like=ct)
    return ct, labels


def looks_like_labels(vol: Volume) -> bool:
    """Integer volumes with a handful of small non-negative values are label maps, not CTs."""
    arr = vol.array
    if arr.dtype.kind not in "iub":
        return False
    sample = arr[:: max(1, arr.shape[0] // 16), ::4, ::4]
    return sample.min() >= 0 and sample.max() < 64 and np.unique(sample).size <= 16


def read_any(path: str | os.PathLike) -> tuple[Volume, str]:
    """Read a file or a DICOM folder once and say what it is: ``(volume, "ct")`` or
    ``(volume, "labels")``.

    A DICOM SEG is labels (on its CT's grid when that series lies beside it); an integer volume
    with a handful of small values is labels (uint8); anything else is a CT and gets the checks
    every CT reader makes (:func:`volumes.readable_ct`), on the voxels already read.
    """
    p = Path(os.fspath(path))
    if is_dicom_seg(p):
        return read_labels(p), "labels"
    vol = read_volume(p)
    if looks_like_labels(vol):
        vol.array = vol.array.astype(np.uint8)
        return vol, "labels"
    return readable_ct(vol, p), "ct"
