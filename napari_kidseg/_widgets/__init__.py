"""The GUI layer: Qt (through qtpy) and napari only here; all numerics live in the core."""

import sys

# Loading triton's native library (which bundles its own LLVM) after napari has opened an OpenGL
# context on Mesa (llvmpipe, radeonsi: Mesa's LLVM) segfaults the process. The plugin never uses
# triton (only torch.compile does), so when torch is not loaded yet it is kept from loading it;
# torch then reports triton as absent. A process that imported torch before napari is unaffected.
if "torch" not in sys.modules and "triton" not in sys.modules:
    sys.modules["triton"] = None

from .cascade_widget import CascadeWidget  # noqa: E402
from .worklist_widget import WorklistWidget  # noqa: E402

__all__ = ["CascadeWidget", "WorklistWidget"]
