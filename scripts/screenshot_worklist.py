"""Makes docs/worklist.png: napari with the Case worklist on four sample-sized phantoms.

xvfb-run -a -s "-screen 0 1700x1050x24" python scripts/screenshot_worklist.py [OUT.png]

The first case is reviewed and exported, the second opened (its draft made ahead), the others
drafted in the background, so every status shows.
"""

import sys
import tempfile
import time
from pathlib import Path

import napari
from qtpy.QtCore import QThreadPool
from qtpy.QtWidgets import QApplication

import napari_kidseg._widgets  # noqa: F401  (first: it keeps torch from loading triton next to napari's OpenGL)
from napari_kidseg.io import volumes
from napari_kidseg.phantoms.procedural import make_phantom


def pump_until(cond, limit=600.0):
    t0 = time.perf_counter()
    while not cond() and time.perf_counter() - t0 < limit:
        QApplication.processEvents()
        time.sleep(0.01)


if __name__ == "__main__":  # the drafting process is spawned: it imports this file without running it
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/worklist.png")
    work = Path(tempfile.mkdtemp(prefix="kidseg-worklist-shot-"))
    for i in range(4):
        c = make_phantom(7 + i, matrix=384, max_slices=64, slice_thickness=5.0)
        volumes.write_kits_case(work / "cases", f"case_{i:05d}", c.ct, c.labels)
    viewer = napari.Viewer(title="napari-kidseg worklist")
    viewer.window._qt_window.resize(1650, 1000)
    _, cw = viewer.window.add_plugin_dock_widget("napari-kidseg", "Kidney cascade")
    _, wl = viewer.window.add_plugin_dock_widget("napari-kidseg", "Case worklist")
    viewer.window._qt_window.show()
    cw.export_folder = work / "export"
    wl.reviewer_edit.setText("dr. example")
    wl.open_folder(str(work / "cases"))

    def shown(case):
        return (
            wl._opening is None
            and not cw.busy
            and wl.current is not None
            and (wl.worklist.rows[wl.current].case == case and wl.last_open_seconds is not None)
        )

    pump_until(lambda: shown("case_00000"))
    pump_until(lambda: wl._pool is not None and not wl.drafting)
    wl.mark_reviewed()
    pump_until(lambda: shown("case_00001"))
    pump_until(lambda: not wl.drafting and "measurements" not in cw.pending_work)
    for _ in range(40):
        QApplication.processEvents()
        time.sleep(0.05)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    from imageio.v3 import imwrite

    out.parent.mkdir(parents=True, exist_ok=True)
    imwrite(out, shot)
    print(f"wrote {out} ({shot.shape[1]}x{shot.shape[0]}); {wl.status.text()}")
    wl.close_worklist()
    QThreadPool.globalInstance().waitForDone(60_000)
    viewer.close()
