"""How responsive the widget is on the sample case with the bundled models; prints figures.

    xvfb-run -a -s "-screen 0 1600x1200x24" python benchmarks/bench_widget.py [--runs 2] [--moves 15]

A real napari window with the sample CT and the docked widget. While each run goes, a 50 ms
QTimer records how long the Qt event loop went without turning (the issue's target: never more
than 200 ms), split by what the run was doing at that moment (the status line: loading the
models, coarse, refine, then the result layers being added on the GUI thread). Then the alpha
slider is moved ``--moves`` times and the time from the slider's value change to the slice in
view being re-fused and refreshed is reported (target: under 50 ms), plus how long the rest of
the volume took to follow in the background. Last, every correction tool is used once (planned in
a worker, previewed, applied through napari's history, undone) while the same timer records the
event loop's longest gap per tool (target: 100 ms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import napari
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication


def pump(seconds: float):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.005)


def run_once(widget) -> dict:
    """Event-loop gaps (s) during one run, keyed by what the status line said."""
    gaps = defaultdict(list)
    last = [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        phase = widget.status.text().split(":")[0].split("...")[0].strip() or "starting"
        if phase.startswith("done"):
            phase = "result layers added"
        gaps[phase[:30]].append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.setInterval(50)
    timer.timeout.connect(tick)
    timer.start()
    t0 = time.perf_counter()
    widget.run_btn.click()
    while widget._worker is not None and time.perf_counter() - t0 < 600:
        QApplication.processEvents()
        time.sleep(0.002)
    ran = time.perf_counter() - t0
    pump(1.0)  # result layers and measurements land on the GUI thread after the worker returns
    timer.stop()
    return {"seconds": ran, "gaps": dict(gaps)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--moves", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    viewer = napari.Viewer(title="napari-kidseg benchmark")
    viewer.open_sample("napari-kidseg", "phantom")
    _, widget = viewer.window.add_plugin_dock_widget("napari-kidseg", "Kidney cascade")
    viewer.window._qt_window.show()
    widget.device_combo.setCurrentText(args.device)
    pump(1.0)

    print("| run | wall s | phase | ticks | median gap ms | longest gap ms |")
    print("|---|---|---|---|---|---|")
    for i in range(args.runs):
        r = run_once(widget)
        for phase, g in r["gaps"].items():
            print(
                f"| {i + 1} | {r['seconds']:.1f} | {phase} | {len(g)} | {statistics.median(g) * 1000:.0f} "
                f"| {max(g) * 1000:.0f} |"
            )
        if widget.session is None:
            print(f"run {i + 1} produced no result: {widget.status.text()}", file=sys.stderr)
            return 1

    fused = viewer.layers["fused labels (editable)"]
    z = int((fused.data > 0).sum(axis=(1, 2)).argmax())
    viewer.dims.current_step = (z, *viewer.dims.current_step[1:])
    pump(0.5)
    lat, follow = [], []
    for k in range(args.moves):
        widget.alpha.setValue(20 + (k * 37) % 60)  # emits valueChanged -> slice re-fused at once
        lat.append(widget.last_slider_update_ms)
        t0 = time.perf_counter()
        pump(0.05)
        while widget._fuse_worker is not None or widget._fuse_timer.isActive():
            QApplication.processEvents()
            time.sleep(0.002)
        follow.append(time.perf_counter() - t0)
    print(
        f"\nslider -> slice {z} in view re-fused and refreshed: median {statistics.median(lat):.1f} ms, "
        f"max {max(lat):.1f} ms over {len(lat)} moves"
    )
    print(
        f"rest of the volume followed in the background: median {statistics.median(follow):.2f} s "
        f"(includes the 150 ms rest before it starts)"
    )
    tool_gaps(viewer, widget, z)
    from qtpy.QtCore import QThreadPool

    QThreadPool.globalInstance().waitForDone(60_000)  # measurements still running in a worker
    viewer.close()
    return 0


class _Click:
    type = "mouse_press"

    def __init__(self, position):
        self.position = position


def tool_gaps(viewer, widget, z):
    """The longest event-loop gap while each correction tool is planned, previewed and applied."""
    fused = viewer.layers["fused labels (editable)"]
    fused.mode = "pan_zoom"
    ys, xs = (fused.data[z] > 0).nonzero()
    voxel = (z, int(ys[len(ys) // 2]), int(xs[len(xs) // 2])) if len(ys) else (z, 0, 0)
    world = tuple(float(v) for v in fused.data_to_world(voxel))
    widget.interp_from.setValue(max(0, z - 3))
    widget.interp_to.setValue(min(fused.data.shape[0] - 1, z + 3))

    def click(mode):
        def go():
            widget.click_mode.setCurrentText(mode)
            widget._on_canvas_click(fused, _Click(world))

        return go

    tools = [
        ("remove islands", widget.islands_btn.click, True),
        ("keep kidneys by anatomy", widget.largest_btn.click, True),
        ("fill holes", widget.holes_btn.click, True),
        ("interpolate", widget.interp_btn.click, True),
        ("click: swap kidney/tumor", click("swap kidney/tumor"), False),
        ("click: delete region", click("delete region"), False),
    ]
    print("\n| tool | wall s | longest event-loop gap ms | what it did |")
    print("|---|---|---|---|")
    for name, start, preview in tools:
        gaps, last = [], [time.perf_counter()]

        def tick(gaps=gaps, last=last):
            now = time.perf_counter()
            gaps.append(now - last[0])
            last[0] = now

        timer = QTimer()
        timer.setInterval(50)
        timer.timeout.connect(tick)
        timer.start()
        t0 = time.perf_counter()
        start()
        while widget._tool_worker is not None and time.perf_counter() - t0 < 120:
            QApplication.processEvents()
            time.sleep(0.002)
        if preview and widget._pending is not None:
            widget.apply_btn.click()
        pump(0.3)
        wall = time.perf_counter() - t0
        timer.stop()
        print(f"| {name} | {wall:.2f} | {max(gaps, default=0) * 1000:.0f} | {widget.status.text()[:80]} |")
        widget.undo_btn.click()
        pump(0.2)


if __name__ == "__main__":
    sys.exit(main())
