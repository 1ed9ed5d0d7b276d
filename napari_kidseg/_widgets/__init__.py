"""The GUI layer: Qt (through qtpy) and napari only here; all numerics live in the core."""

from .cascade_widget import CascadeWidget

__all__ = ["CascadeWidget"]
