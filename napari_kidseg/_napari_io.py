"""npe2 contributions that need no Qt: the reader, the labels writer and the sample data.

The reader never raises inside napari: a path it cannot read gives ``None`` (napari then tries
other readers) and the one-line reason is shown as a warning notification.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .errors import KidsegError, KidsegWarning
from .io import readers, volumes
from .layers import SOURCE_KEY, ct_layer_data, labels_layer_data


def _is_kits_case(path: Path) -> bool:
    return path.is_dir() and (path / volumes.KITS_IMAGE).exists()


def get_reader(path):
    """npe2 reader hook: a read function for paths this plugin understands, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(os.fspath(path))
    if _is_kits_case(p) or volumes.volume_format(p) is not None:
        return read_layers
    return None


def read_layers(path):
    if isinstance(path, list):
        path = path[0]
    p = Path(os.fspath(path))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", KidsegWarning)
            layers = _read_layers(p)
        for w in caught:
            warnings.warn(str(w.message), KidsegWarning, stacklevel=2)
        return layers
    except KidsegError as exc:
        warnings.warn(f"napari-kidseg could not open {exc}", KidsegWarning, stacklevel=2)
        return None


def _read_layers(p: Path) -> list:
    if _is_kits_case(p):
        ct, labels = readers.read_kits_case(p)
        layers = [ct_layer_data(ct, name=f"{p.name} CT")]
        if labels is not None:
            layers.append(labels_layer_data(labels.array, ct, name=f"{p.name} reference"))
        return layers
    vol, kind = readers.read_any(p)  # decoded once, whatever it turns out to be
    if kind == "labels":
        return [labels_layer_data(vol.array, vol, name=_stem(p))]
    return [ct_layer_data(vol, name=_stem(p))]


def _stem(p: Path) -> str:
    name = p.name
    for suffix in volumes.VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def write_labels(path: str, data, attributes: dict) -> list[str]:
    """npe2 single-layer writer: labels go back onto the grid of the CT they were read with."""
    source = attributes.get("metadata", {}).get(SOURCE_KEY)
    labels = np.asarray(data)
    if labels.ndim != 3:
        raise KidsegError(f"only 3D label layers can be saved (this one is {labels.ndim}D)", path)
    if source is None or source.array.shape != labels.shape:
        # a layer made in napari: its scale and translate are the only geometry there is
        scale = attributes.get("scale", (1.0, 1.0, 1.0))
        translate = attributes.get("translate", (0.0, 0.0, 0.0))
        source = volumes.volume_in_memory(labels, scale, translate)
    # napari's File > Save has already asked the user before replacing a file
    out = volumes.write_labels(path, labels, source, overwrite=True)
    return [str(out)]


def sample_case_dir() -> Path:
    """The bundled phantom case (installed inside the package; the repository's copy otherwise)."""
    here = Path(__file__).parent
    for root in (here / "sample_data", here.parent / "sample_data"):
        if (root / "case_00000" / volumes.KITS_IMAGE).exists():
            return root / "case_00000"
    raise KidsegError("the sample case is not installed", here / "sample_data")


def sample_phantom_case() -> list:
    """File > Open Sample: the phantom CT (soft-tissue window) and its reference labels."""
    return _read_layers(sample_case_dir())
