"""napari layer-data tuples for CTs and labels: the contract between the core and napari.

Plain tuples and dicts (napari's LayerData), so nothing here imports napari or Qt. The reader,
the sample data and the widgets all build their layers here, so every layer gets the same
physical scale, CT window and label colours.
"""

from __future__ import annotations

import numpy as np

from .io.volumes import Volume
from .labels import KITS23_LABEL_NAMES, ORGANS

# Soft-tissue window (W400/L40): fixed limits, so that scanner padding or metal in a volume
# cannot stretch the display the way min/max contrast limits would.
CT_WINDOW = (-160.0, 240.0)
LABEL_COLORS = {None: "transparent", 0: "transparent", 1: "#2ca02c", 2: "#ffd700", 3: "#1f77b4"}  # 3: KiTS23 cyst
# a reference (ground truth) opened next to a result gets colours of its own, drawn as outlines
REFERENCE_COLORS = {None: "transparent", 0: "transparent", 1: "#00e5ff", 2: "#ff00ff", 3: "#ff8c00"}
# napari shows a labels layer's features for the label under the cursor: names, not 1 and 2
LABEL_FEATURES = {"index": list(KITS23_LABEL_NAMES), "name": list(KITS23_LABEL_NAMES.values())}
# the organ context layer of an organ-aware cascade (labels.ORGANS codes): muted colours, so the
# KiTS labels stay what the eye goes to
ORGAN_COLORS = {
    None: "transparent",
    0: "transparent",
    **{k + 1: c for k, c in enumerate(["#8c564b", "#9467bd", "#e377c2", "#bcbd22", "#17becf", "#ff7f0e", "#d62728"])},
}
ORGAN_FEATURES = {"index": [0, *range(1, len(ORGANS) + 1)], "name": ["none", *ORGANS]}
# window/level presets (name: HU limits): W400/L40, W700/L100, W1800/L400, W1500/L-600
WINDOW_PRESETS = {
    "soft tissue": CT_WINDOW,
    "kidney": (-250.0, 450.0),
    "bone": (-500.0, 1300.0),
    "lung": (-1350.0, 150.0),
}
SOURCE_KEY = "kidseg_source"  # layer.metadata key holding the volumes.Volume the layer was read from


def ct_layer_data(ct: Volume, name: str = "CT") -> tuple:
    return (
        ct.array,
        {
            "name": name,
            **ct.napari_kwargs(),
            "colormap": "gray",
            "contrast_limits": CT_WINDOW,
            "metadata": {SOURCE_KEY: ct},
        },
        "image",
    )


def labels_layer_data(labels: np.ndarray, like: Volume, name: str = "labels", **extra) -> tuple:
    # the labels' own Volume (same grid and source as the CT) lets the writer put them back on disk
    source = Volume(array=labels, geometry=like.geometry, source=like.source)
    return (
        labels,
        {
            "name": name,
            **like.napari_kwargs(),
            "colormap": dict(LABEL_COLORS),
            "features": dict(LABEL_FEATURES),
            "metadata": {SOURCE_KEY: source},
            **extra,
        },
        "labels",
    )


def label_surfaces(labels: np.ndarray, spacing, origin_zyx, step: int = 1) -> dict[int, tuple]:
    """Per label value present, its surface as napari Surface data ``(vertices, faces, values)`` in
    world coordinates (mm), by marching cubes on the label's bounding box (padded, so every surface
    is closed). ``step``: marching-cubes step in voxels (2 is 4-8x faster, coarser). For the 3D view:
    a few hundred thousand triangles instead of a labels volume napari would upload and render."""
    from skimage.measure import marching_cubes

    from .metrics import bounding_box

    out = {}
    for value in (int(v) for v in np.unique(labels) if v):
        mask = labels == value
        box = bounding_box(mask, pad=1)
        sub = np.pad(mask[box], 1).astype(np.uint8)
        if min(sub.shape) < 2 + step:
            continue
        verts, faces, _, _ = marching_cubes(sub, 0.5, spacing=tuple(float(s) for s in spacing), step_size=step)
        shift = [o + (b.start - 1) * s for o, b, s in zip(origin_zyx, box, spacing)]
        verts = (verts + np.asarray(shift)).astype(np.float32)
        out[value] = (verts, faces.astype(np.int32), np.ones(len(verts), np.float32))
    return out
