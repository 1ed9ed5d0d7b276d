"""The Review box of the Kidney cascade widget: doubtful slices, the measurements (volumes,
diameters, Dice against a reference), the region table, the CT window and the 3D view.

Knows the review session and the case only through callables handed in; never the dock. The
measuring (:func:`napari_kidseg.review.display.score_text`) and the 3D surfaces run in workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from ..layers import WINDOW_PRESETS
from . import result_layers
from ._controls import Hooks
from ._workers import LatestRequest
from .corrections_panel import WINDOW_KEYS


class ReviewPanel(QGroupBox):
    """``hooks``: see _controls.Hooks; ``ct_name()`` is the CT layer's name, ``comparison()`` the
    latest fusion's comparison maps."""

    def __init__(self, hooks: Hooks, ct_name: Callable, comparison: Callable, parent=None):
        super().__init__("Review", parent)
        self.viewer = hooks.viewer
        self._session, self._ct, self._ct_name, self._comparison = hooks.session, hooks.ct, ct_name, comparison
        self._say, self._failed, self._closed = hooks.say, hooks.failed, hooks.closed
        failed, closed = hooks.failed, hooks.closed
        self.measurements = None  # the latest volumes and diameters
        self.regions = []  # the region table's rows
        self._disagree_pos = self._uncertain_pos = -1
        self._hidden_for_3d = {}  # layers the 3D view hid: name -> visible before
        self._view3d_turn = 0  # counts the 3D button's clicks: steps of an older click do nothing
        self._leaving_3d = None  # the click whose 2D steps are still running
        self._measuring = LatestRequest(failed, closed)
        self._surfaces = LatestRequest(failed, closed)
        self._build()
        self.measure_timer = QTimer(self)  # the box follows every edit, debounced
        self.measure_timer.setSingleShot(True)
        self.measure_timer.setInterval(400)
        self.measure_timer.timeout.connect(self.update_measurements)
        self.next_disagree_btn.clicked.connect(lambda: self.goto_doubtful("disagreement"))
        self.next_uncertain_btn.clicked.connect(lambda: self.goto_doubtful("uncertainty"))
        self.viewer.dims.events.order.connect(self._orient_view)

    def _build(self):
        lay = QVBoxLayout(self)
        row = QHBoxLayout()
        self.next_disagree_btn = QPushButton("Next disagreement")
        self.next_disagree_btn.setToolTip(
            "Go to the slice where the coarse and refined labels differ most (then the next)"
        )
        self.next_uncertain_btn = QPushButton("Next uncertain slice")
        self.next_uncertain_btn.setToolTip("Go to the slice with the most voxels of kidney probability 0.2-0.8")
        row.addWidget(self.next_disagree_btn)
        row.addWidget(self.next_uncertain_btn)
        lay.addLayout(row)
        self.measure_label = QLabel("")
        self.measure_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        lay.addWidget(self.measure_label)
        self.region_table = QTableWidget(0, 6)
        self.region_table.setHorizontalHeaderLabels(["region", "label", "side", "mL", "slices", "anatomy"])
        self.region_table.setToolTip("Connected regions of the labels, largest first; click a row to go to it")
        self.region_table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.region_table.setSelectionBehavior(QTableWidget.SelectRows)
        self.region_table.setMinimumHeight(120)
        self.region_table.cellClicked.connect(self._goto_region)
        lay.addWidget(self.region_table)
        row = QHBoxLayout()
        self.window_combo = QComboBox()
        self.window_combo.addItems(list(WINDOW_PRESETS))
        self.window_combo.setToolTip("CT window/level: " + ", ".join(f"{w} {WINDOW_KEYS[w]}" for w in WINDOW_PRESETS))
        self.window_combo.currentTextChanged.connect(self.set_window)
        self.view3d_btn = QPushButton("3D labels")
        self.view3d_btn.setCheckable(True)
        self.view3d_btn.setToolTip("A 3D view of the labels with the CT hidden (click again for 2D)")
        self.view3d_btn.toggled.connect(self._toggle_3d)
        row.addWidget(QLabel("Window"))
        row.addWidget(self.window_combo)
        row.addWidget(self.view3d_btn)
        lay.addLayout(row)

    @property
    def review_buttons(self) -> list:
        """The buttons that need a result."""
        return [self.next_disagree_btn, self.next_uncertain_btn, self.view3d_btn]

    @property
    def measuring(self) -> bool:
        """The box is being brought up to date (or will be, once the edits rest)."""
        return self._measuring.busy or self.measure_timer.isActive()

    @property
    def building_3d(self) -> bool:
        """The 3D surfaces are being built or shown, or the 2D view's layers shown again."""
        return self._surfaces.busy or (self._leaving_3d is not None and self._leaving_3d == self._view3d_turn)

    def clear(self):
        """No case: no measurements, no rows, no 3D view. The case's layers are being removed, so
        none the 3D view hid is shown again, and steps of a 3D view still being shown do nothing."""
        self._view3d_turn += 1
        self._hidden_for_3d.clear()
        blocked = self.view3d_btn.blockSignals(True)
        self.view3d_btn.setChecked(False)
        self.view3d_btn.blockSignals(blocked)
        if self.viewer.dims.ndisplay == 3:
            self.viewer.dims.ndisplay = 2
        self.measurements, self.regions = None, []
        self.measure_label.setText("")
        self.region_table.setRowCount(0)

    def _goto_region(self, row, _column=None):
        rows = self.regions
        if not 0 <= row < len(rows):
            return
        result_layers.focus_on(self.viewer, self._ct(), *rows[row]["voxel"])
        r = rows[row]
        self._say(
            f"region {r['region']}: {r['label']}, {r['side']}, {r['ml']:.1f} mL, "
            f"slices {r['slices'][0]}-{r['slices'][1]}"
        )

    def set_window(self, name: str):
        ct = self._ct_name()
        if name in WINDOW_PRESETS and ct in self.viewer.layers:
            self.viewer.layers[ct].contrast_limits = WINDOW_PRESETS[name]

    def _toggle_3d(self, on: bool):
        """3D: the fused labels as surfaces, built in a worker, with the CT and every labels layer
        hidden (napari's own 3D labels volume froze the GUI thread 20 s on a real CT; the CT as a
        block would hide them anyway); 2D: the layers as they were. Both are shown in steps, one
        per event-loop turn; each click starts a new turn of the button, and the steps of an older
        one do nothing."""
        self._view3d_turn += 1
        if not on:
            turn = self._view3d_turn  # a later click stops the layers still to be shown again
            self._leaving_3d = turn  # building_3d until the last layer is shown again

            def left(exc=None):
                if self._leaving_3d == turn:
                    self._leaving_3d = None
                if exc is not None:
                    self._failed(exc)

            steps = result_layers.hide_surfaces_steps(self.viewer, self._hidden_for_3d)
            result_layers.one_per_turn(steps, left, lambda: self._closed() or turn != self._view3d_turn, left)
            return
        self._show_3d(self._view3d_turn)

    def _show_3d(self, turn: int):
        def current():
            return turn == self._view3d_turn and self.view3d_btn.isChecked()

        s = self._session()
        if s is None or not current():
            return
        if self._surfaces.busy:  # the last 3D view is still being built or shown: this one after it
            QTimer.singleShot(100, lambda: None if self._closed() else self._show_3d(turn))
            return
        s.sync_edits()
        labels, geo = s.labels.copy(), self._ct().geometry
        self._say("building the 3D surfaces...")
        t0 = time.perf_counter()

        def done(surfaces):
            if not current():
                self._surfaces.release()
                return
            steps = result_layers.show_surfaces_steps(self.viewer, surfaces, self._ct_name(), self._hidden_for_3d)
            # each in a turn of its own (the view made 3D, then each surface: 0.1-0.3 s each); a
            # click back to 2D meanwhile makes the steps left do nothing
            steps = [lambda st=st: st() if current() else None for st in steps]
            n = sum(len(data[1]) for data, _ in surfaces.values())

            def shown():
                self._surfaces.release()
                if current():
                    self._say(f"3D: {n} triangles in {time.perf_counter() - t0:.1f} s (click 3D labels again for 2D)")

            result_layers.one_per_turn(steps, shown, self._closed, failed)

        def failed(exc):
            self._surfaces.release()
            self.view3d_btn.setChecked(False)
            self._failed(exc)

        shown = {n for n in result_layers.SURFACE_NAMES.values() if n in self.viewer.layers}  # they take the data
        args = (labels, geo.spacing, geo.origin_zyx, shown)
        self._surfaces.start(result_layers.surface_layers, *args, done=done, failed=failed, keep=True)

    def _orient_view(self, event=None):
        """Coronal and sagittal views with the head up: the vertical screen axis points up when it
        shows z (superior), down when it shows y (axial: anterior at the top)."""
        order = self.viewer.dims.order
        if len(order) >= 2 and self.viewer.dims.ndisplay == 2:
            vertical = order[-2]
            horizontal = self.viewer.camera.orientation2d[1]
            self.viewer.camera.orientation2d = ("up" if vertical == 0 else "down", horizontal)

    def goto_doubtful(self, by: str):
        s = self._session()
        if s is None:
            return
        order = s.doubtful_slices(by)
        if len(order) == 0:
            self._say(f"no slice stands out by {by}")
            return
        attr = "_disagree_pos" if by == "disagreement" else "_uncertain_pos"
        pos = (getattr(self, attr) + 1) % len(order)
        setattr(self, attr, pos)
        z = int(order[pos])
        result_layers.show_slice(self.viewer, z)
        self._say(f"slice {z}: rank {pos + 1} of {len(order)} by {by}")

    def update_measurements(self):
        """Volumes, diameters, the region table and (with a reference layer) Dice, in a worker; a
        request while one is measured runs when it ends (the latest labels)."""
        if self._session() is None or self._closed():
            return
        self.measure_timer.stop()
        self._measuring.request(self._measure_job)

    def _measure_job(self):
        from ..review.display import score_text

        s = self._session()
        if s is None:
            return None
        ref, problem = result_layers.reference_layer(self.viewer, s.labels.shape)
        labels = s.labels.copy()
        ref_data, ref_name = (None, None) if ref is None else (np.asarray(ref.data).copy(), ref.name)
        comparison = self._comparison()
        return (lambda: score_text(s, labels, ref_data, ref_name, comparison, problem)), self._show_measurements

    def _show_measurements(self, payload):
        text, m, regions = payload
        self.measure_label.setText(text)
        self.measurements = m
        self.regions = regions
        self.region_table.setRowCount(len(regions))
        for i, r in enumerate(regions):
            cells = (
                str(r["region"]),
                r["label"],
                r["side"],
                f"{r['ml']:.1f}",
                f"{r['slices'][0]}-{r['slices'][1]}",
                "flagged" if r["flagged"] else "",
            )
            for j, c in enumerate(cells):
                self.region_table.setItem(i, j, QTableWidgetItem(c))
