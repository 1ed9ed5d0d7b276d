"""Makes docs/split-off.png: the dock's Split off on the trapped draft of scripts/correction_count.py.

xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot_split_off.py

A label-map phantom (FLARE 2022 map 3, as in the count) opened in napari, the bundled cascade run
from the dock, then the count's two traps painted into the fused layer (a liver cyst drafted as
tumor with a kidney rim on the right kidney, the spleen's tip as kidney on the left). Left half:
the slice through the cyst's join before; right half: after two Split off clicks (the cyst, then
the right kidney) through the dock's own canvas click. Needs ../shared/data.
"""

import sys
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import correction_count as count  # noqa: E402

from napari_kidseg.layers import ct_layer_data  # noqa: E402
from napari_kidseg.phantoms.labelmap import make_labelmap_phantom  # noqa: E402


def settle(widget, seconds=600):
    t0 = time.time()
    while (widget.busy or not widget.idle) and time.time() - t0 < seconds:
        QApplication.processEvents()
        time.sleep(0.05)
    for _ in range(30):
        QApplication.processEvents()
        time.sleep(0.05)


def world(ct, zyx):
    return tuple(o + i * d for o, i, d in zip(ct.geometry.origin_zyx, zyx, ct.geometry.spacing))


out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/split-off.png")
case = make_labelmap_phantom(count.FLARE / "FLARE22_Tr_0003.nii.gz", 26, matrix=512, phase="venous", n_tumors=0)
sp = case.ct.geometry.spacing
right, left = count.kidney_sides(case.labels, sp)
cyst = count.liver_cyst_trap(case.labels, case.organs, sp, right)

viewer = napari.Viewer(title="napari-kidseg: Split off")
viewer.window._qt_window.resize(1500, 950)
data, kwargs, _ = ct_layer_data(case.ct, name="CT")
viewer.add_image(data, **kwargs)
_, widget = viewer.window.add_plugin_dock_widget("napari-kidseg", "Kidney cascade")
viewer.window._qt_window.show()
widget.device_combo.setCurrentText("cpu")
widget.run_btn.click()
settle(widget)
fused = widget.fused_layer
fused.data[cyst > 0] = cyst[cyst > 0]  # in place: the dock's review session shares this array
fused.refresh()
joined = count.ndimage.binary_dilation(right, structure=count.STRUCT) & (cyst > 0)
z = int(np.flatnonzero(joined.any((1, 2)))[len(np.flatnonzero(joined.any((1, 2)))) // 2])
viewer.dims.current_step = (z, *viewer.dims.current_step[1:])
ys, xs = np.nonzero(right[z] | (cyst[z] > 0))
viewer.camera.center = world(case.ct, (z, ys.mean(), xs.mean()))[1:]
viewer.camera.zoom = 3.0
viewer.layers.selection.active = fused
fused.mode = "pan_zoom"
for layer in viewer.layers:
    if layer.name not in ("CT", fused.name):
        layer.visible = False
settle(widget)
before = viewer.screenshot(canvas_only=True, flash=False)
widget.click_mode.setCurrentText("split off")
deep = count.ndimage.distance_transform_edt(cyst[z] > 0)
a = (z, *np.unravel_index(np.argmax(deep), deep.shape))
deep = count.ndimage.distance_transform_edt(right[z])
b = (z, *np.unravel_index(np.argmax(deep), deep.shape))
widget.click_at(world(case.ct, a))
widget.click_at(world(case.ct, b))
settle(widget)
status = widget.status.text()
after = viewer.screenshot(canvas_only=True, flash=False)
from imageio.v3 import imwrite  # noqa: E402 (napari brings it)

h = min(before.shape[0], after.shape[0])
gap = np.full((h, 8, before.shape[2]), 255, before.dtype)
out.parent.mkdir(parents=True, exist_ok=True)
imwrite(out, np.concatenate([before[:h], gap, after[:h]], axis=1))
print(f"wrote {out}; slice {z}; clicks {a} then {b}; {status}")
viewer.close()
