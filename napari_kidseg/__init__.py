"""napari-kidseg: coarse-to-fine kidney and kidney-tumor segmentation of abdominal CT.

The core (io/, phantoms/, cascade, fusion, roi, models, training, metrics) imports neither Qt nor
napari, so the ``kidseg`` command works on a server with no display; ``_widgets`` is the GUI.
"""

__version__ = "0.1.0"
