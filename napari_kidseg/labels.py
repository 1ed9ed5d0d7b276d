"""The label vocabulary: KiTS's labels the user sees, and the organ groups the networks learn.

What a user reads, exports and corrects is KiTS: 0 background, 1 kidney, 2 tumor, 3 cyst
(KiTS21/23). Version 5 networks also learn the kidney's neighbours as classes of their own
(``ORGANS``), so that a voxel the network calls spleen is not kidney: the organ channels compete
with kidney and tumor in the softmax, and the anatomy check names the organ a removed region
lies on. Organs never reach a label file the user edits; they are a context layer.

Three codings, one per place, converted only here:

* **organ maps** (``organs.nii.gz`` beside a training case): 0 none, ``ORGANS[k-1]`` for k >= 1,
  ``UNLABELLED`` where nobody said (a partial map: such voxels teach nothing);
* **training targets** (the cached label arrays): the KiTS labels 0-3 as they are, an organ k as
  ``ORGAN_TARGET0 + k - 1`` where the KiTS label is background, ``UNLABELLED`` ignored;
* **network channels**: the KiTS classes (3 or 4) first, then one channel per organ.
"""

from __future__ import annotations

import numpy as np

from .errors import KidsegError

BACKGROUND, KIDNEY, TUMOR, CYST = 0, 1, 2, 3
LABEL_NAMES = {BACKGROUND: "background", KIDNEY: "kidney", TUMOR: "tumor"}  # KiTS19's labels, named once
KITS23_LABEL_NAMES = {**LABEL_NAMES, CYST: "cyst"}  # KiTS21 and KiTS23 add the cyst
LABEL_SETS = {"kits19": LABEL_NAMES, "kits23": KITS23_LABEL_NAMES}
CLASSES = tuple(LABEL_NAMES.values())  # a 3-class network's channels, in order (a 4th is the cyst)

# organ groups, coded 1..7 in organ maps; what FLARE 2022 and TotalSegmentator label, collapsed to
# the neighbours that get called kidney or tumor (stomach, duodenum and bowel look alike on CT)
ORGANS = ("liver", "spleen", "bowel", "pancreas", "gallbladder", "adrenal", "vessel")
ORGAN_CODE = {name: k + 1 for k, name in enumerate(ORGANS)}
UNLABELLED = 255
ORGAN_TARGET0 = 4  # training target code of organ 1 (after KiTS23's cyst, 3)

# FLARE 2022 label -> organ code (2 and 13, the kidneys, are KiTS labels, not organs)
FLARE_TO_ORGAN = {
    1: ORGAN_CODE["liver"],
    3: ORGAN_CODE["spleen"],
    4: ORGAN_CODE["pancreas"],
    5: ORGAN_CODE["vessel"],
    6: ORGAN_CODE["vessel"],
    7: ORGAN_CODE["adrenal"],
    8: ORGAN_CODE["adrenal"],
    9: ORGAN_CODE["gallbladder"],
    10: ORGAN_CODE["bowel"],
    11: ORGAN_CODE["bowel"],
    12: ORGAN_CODE["bowel"],
}
# TotalSegmentator "total" class -> organ code (its map is in totalsegmentator/map_to_binary.py)
TOTALSEG_TO_ORGAN = {
    1: ORGAN_CODE["spleen"],
    4: ORGAN_CODE["gallbladder"],
    5: ORGAN_CODE["liver"],
    6: ORGAN_CODE["bowel"],
    7: ORGAN_CODE["pancreas"],
    8: ORGAN_CODE["adrenal"],
    9: ORGAN_CODE["adrenal"],
    18: ORGAN_CODE["bowel"],
    19: ORGAN_CODE["bowel"],
    20: ORGAN_CODE["bowel"],
    52: ORGAN_CODE["vessel"],
    63: ORGAN_CODE["vessel"],
    64: ORGAN_CODE["vessel"],
}


def kits_foreground(labels):
    """Kidney and masses (kidney, tumor, cyst): KiTS21's outermost region. Works on numpy arrays
    and torch tensors alike, and on training targets (organ codes are not foreground)."""
    return (labels >= KIDNEY) & (labels <= CYST)


def check_label_values(labels: np.ndarray, path=None, *, cysts: bool = False) -> None:
    """Refuse labels outside KiTS19's {0, 1, 2} (KiTS21/23's {0, 1, 2, 3} with ``cysts``): a
    KidsegError naming the file and the values."""
    allowed = tuple(KITS23_LABEL_NAMES if cysts else LABEL_NAMES)
    labels = np.asarray(labels)
    if labels.dtype.kind == "u" and labels.size and labels.max() <= max(allowed):
        return  # one pass over the volume: the common case costs milliseconds
    if labels.dtype == np.uint8:  # a lookup over 256 values instead of a sort of the volume
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=256))
    else:
        present = np.unique(labels)
    bad = [v for v in present.tolist() if v not in allowed]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:5])
        known = ", ".join(f"{k} ({v})" for k, v in (KITS23_LABEL_NAMES if cysts else LABEL_NAMES).items())
        raise KidsegError(f"holds label(s) {shown}; only {known} are understood", path)


def organ_map_from(table: dict, array: np.ndarray, unlabelled=None) -> np.ndarray:
    """An organ map (codes 1..7) from another vocabulary's label array; values not in ``table``
    become 0, and ``unlabelled`` (that vocabulary's "not labelled" value) becomes UNLABELLED."""
    lut = np.zeros(256 if array.dtype == np.uint8 else int(array.max(initial=0)) + 1, np.uint8)
    for src, code in table.items():
        if src < len(lut):
            lut[src] = code
    out = lut[np.clip(array, 0, len(lut) - 1).astype(np.intp)]
    if unlabelled is not None:
        out[array == unlabelled] = UNLABELLED
    return out


def training_target(kits: np.ndarray, organs: np.ndarray | None) -> np.ndarray:
    """The cached training target: KiTS labels, organs where the KiTS label is background, and
    UNLABELLED where the organ map does not know what a background voxel is."""
    out = np.asarray(kits, np.uint8).copy()
    if organs is None:
        return out
    bg = out == BACKGROUND
    known = bg & (organs >= 1) & (organs <= len(ORGANS))
    out[known] = ORGAN_TARGET0 - 1 + organs[known]
    out[bg & (organs == UNLABELLED)] = UNLABELLED
    return out


def network_target(y, kits_classes: int, n_organs: int):
    """A training target (torch) as a network with ``kits_classes`` KiTS classes and ``n_organs``
    organ channels learns it: cysts are kidney for a 3-class network, organs are background for
    a network without organ channels, UNLABELLED stays (cross-entropy ignores it)."""
    import torch

    if kits_classes == 3:
        y = torch.where(y == CYST, KIDNEY, y)
    is_organ = (y >= ORGAN_TARGET0) & (y != UNLABELLED)
    if n_organs:
        return torch.where(is_organ, y - ORGAN_TARGET0 + kits_classes, y)
    return torch.where(is_organ, BACKGROUND, y)


KITS_LABEL_MAP = {BACKGROUND: BACKGROUND, KIDNEY: KIDNEY, TUMOR: TUMOR, CYST: KIDNEY}  # KiTS21/23 cyst -> kidney


def map_kits_labels(labels: np.ndarray, path, classes: int = 3) -> np.ndarray:
    """KiTS19/21/23 labels for a network of ``classes`` classes: a 3-class (KiTS19) network learns
    a KiTS21/23 cyst as kidney, a 4-class one keeps it. Values that are no KiTS label are refused."""
    values = np.unique(labels)
    bad = [int(v) for v in values if int(v) not in KITS_LABEL_MAP]
    if bad:
        raise KidsegError(f"label values {bad} are not KiTS labels (0 background, 1 kidney, 2 tumor, 3 cyst)", path)
    if classes == 3 and values.max(initial=0) > TUMOR:
        labels = np.where(labels == CYST, KIDNEY, labels).astype(np.uint8)
    return labels
