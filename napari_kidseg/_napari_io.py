"""npe2 contributions that need no Qt: the reader, the labels writer and the sample data.

The reader never raises inside napari: a path it cannot read gives ``None`` (napari then tries
other readers) and the one-line reason is shown as a warning notification.

Where a Kidney cascade dock is docked in the current viewer, napari's File > Open and drag and
drop hand the path to the dock, which reads it in a worker (napari itself calls readers on the GUI
thread, which froze the viewer for about a second on a 512 x 512 x 300 CT): one way to open a
case, with the dock's question before a shown case is replaced. napari then gets npe2's "handled,
no layers" answer: ``viewer.open`` returns no layers (they arrive a moment later), and a file the
dock cannot read is said by the dock, not passed on to other readers. Without a dock, or while
the dock reads another file, it is read here as before. (napari does not say which viewer a read
is for: the current one is taken, the window last activated.)
"""

from __future__ import annotations

import os
import warnings
import weakref
from pathlib import Path

import numpy as np

from .errors import KidsegError, KidsegWarning
from .io import readers, volumes
from .layers import SOURCE_KEY, ct_layer_data, labels_layer_data


def _is_kits_case(path: Path) -> bool:
    return path.is_dir() and (path / volumes.KITS_IMAGE).exists()


# each dock's "open this path in the background" (a weak method: a closed dock drops out by itself)
_BACKGROUND_OPENERS: list[weakref.WeakMethod] = []

# npe2's documented answer of a reader that handled a path without returning layers itself
NO_LAYERS_HERE = [(None,)]


def register_background_opener(open_path) -> None:
    """A dock reads what File > Open gives: ``open_path(path)`` (a bound method) starts it and
    says True, or False when it cannot take it (not the current viewer's dock, busy, closed)."""
    _BACKGROUND_OPENERS[:] = [ref for ref in _BACKGROUND_OPENERS if ref() is not None]
    _BACKGROUND_OPENERS.append(weakref.WeakMethod(open_path))


def _handed_to_a_dock(path) -> bool:
    return any(opener(path) for ref in list(_BACKGROUND_OPENERS) if (opener := ref()) is not None)


def get_reader(path):
    """npe2 reader hook: a read function for paths this plugin understands, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(os.fspath(path))
    if not (_is_kits_case(p) or volumes.volume_format(p) is not None):
        return None
    if not _BACKGROUND_OPENERS:
        return read_layers

    def hand_to_dock(path, **_):
        path = path[0] if isinstance(path, list) else os.fspath(path)
        return NO_LAYERS_HERE if _handed_to_a_dock(path) else read_layers(path)

    return hand_to_dock


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
