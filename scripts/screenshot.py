"""Makes docs/widget.png: napari with the sample case, the widget docked, after a run.

xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot.py
"""

import sys
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/widget.png")
viewer = napari.Viewer(title="napari-kidseg")
viewer.window._qt_window.resize(1500, 950)
viewer.open_sample("napari-kidseg", "phantom")
_, widget = viewer.window.add_plugin_dock_widget("napari-kidseg", "Kidney cascade")
viewer.window._qt_window.show()
widget.device_combo.setCurrentText("cpu")
widget.run_btn.click()
t0 = time.time()
while widget.busy and time.time() - t0 < 600:
    QApplication.processEvents()
    time.sleep(0.05)
fused = viewer.layers["fused labels (editable)"]
z = (
    int(np.argmax((fused.data == 2).sum(axis=(1, 2))))
    if (fused.data == 2).any()
    else int(np.argmax((fused.data > 0).sum(axis=(1, 2))))
)
viewer.dims.current_step = (z, *viewer.dims.current_step[1:])
viewer.layers["kidney ROIs (refine patches)"].visible = True
for layer in viewer.layers:
    if layer.name.endswith("reference"):
        layer.visible = False  # the widget's own layers are what the picture is for
for _ in range(40):
    QApplication.processEvents()
    time.sleep(0.05)
shot = viewer.screenshot(canvas_only=False, flash=False)
from imageio.v3 import imwrite  # noqa: E402 (imported once the picture exists: napari brings it)

out.parent.mkdir(parents=True, exist_ok=True)
imwrite(out, shot)
print(f"wrote {out} ({shot.shape[1]}x{shot.shape[0]}); slice {z}; {widget.status.text()}")
