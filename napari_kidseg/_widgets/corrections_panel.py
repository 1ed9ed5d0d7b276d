"""The Corrections box of the Kidney cascade widget: click modes, region tools with a preview,
undo and redo on the review session's history, and the fused layer's keys.

Knows the review session and the fused layer only through callables handed in; never the dock.
Every tool's change is planned in a worker (no GUI stall) and applied on the GUI thread.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from ..errors import KidsegError
from . import result_layers
from ._controls import Hooks
from ._workers import LatestRequest

# what a click on the canvas does (the fused layer selected, in pan/zoom mode), and its key
CLICK_MODES = {
    "off": "Shift-O",
    "delete region": "Shift-D",  # the clicked label's region; Shift-click: the whole kidney+tumor region
    "cut": "Shift-U",  # two clicks on the slice: the line that separates a region where it joins another
    "split off": "Shift-A",  # two clicks: the false part, then the kidney to keep; the false side goes
    "make tumor": "Shift-T",
    "make kidney": "Shift-K",
    "make cyst": "Shift-C",  # KiTS23's cyst class
    "swap kidney/tumor": "Shift-S",
    "restore removed": "Shift-R",
}
_CLICK_ACTIONS = {
    "delete region": "delete",
    "make tumor": "tumor",
    "make kidney": "kidney",
    "make cyst": "cyst",
    "swap kidney/tumor": "swap",
}
# F1-F4: napari's labels layer takes the digits (1 eraser, 2 brush, 3 polygon, 4 fill, ...) also with
# Shift held, so Shift-1..4 switched the fused layer's tool; no napari layer or viewer uses F1-F4
WINDOW_KEYS = {"soft tissue": "F1", "kidney": "F2", "bone": "F3", "lung": "F4"}


class CorrectionsPanel(QGroupBox):
    """``hooks``: see _controls.Hooks."""

    def __init__(self, hooks: Hooks, parent=None):
        super().__init__("Corrections", parent)
        self.viewer = hooks.viewer
        self._session, self._fused, self._ct = hooks.session, hooks.fused, hooks.ct
        self._say, self._notify, self._edited, self._closed = hooks.say, hooks.notify, hooks.edited, hooks.closed
        self._changed = hooks.changed
        self._tool = LatestRequest(hooks.failed, hooks.closed)
        self._pending = None  # the planned Change shown as a preview
        self._cut_start = None  # the first click of a cut line
        self._split_start = None  # the first click of a split: the false part
        self._build()
        self._set_preview_enabled(False)
        # the controls' values are read here, on the GUI thread; the plans run in a worker
        self.islands_btn.clicked.connect(
            lambda: self.plan_tool(lambda s, ml=self.island_ml.value(): s.plan_remove_islands(ml))
        )
        self.largest_btn.clicked.connect(lambda: self.plan_tool(lambda s: s.plan_keep_kidneys()))
        self.holes_btn.clicked.connect(lambda: self.plan_tool(lambda s: s.plan_fill_holes()))
        self.interp_btn.clicked.connect(
            lambda: self.plan_tool(
                lambda s, a=self.interp_from.value(), b=self.interp_to.value(): s.plan_interpolate_slices(a, b)
            )
        )
        self.click_mode.currentTextChanged.connect(self._forget_first_clicks)
        self.apply_btn.clicked.connect(self.apply_pending)
        self.discard_btn.clicked.connect(self.discard_pending)
        self.reviewed_btn.clicked.connect(self.mark_slice_reviewed)
        self.undo_btn.clicked.connect(lambda: self.history("undo"))
        self.redo_btn.clicked.connect(lambda: self.history("redo"))

    def _build(self):
        lay = QVBoxLayout(self)
        form = QFormLayout()
        self.click_mode = QComboBox()
        self.click_mode.addItems(list(CLICK_MODES))
        self.click_mode.setToolTip(
            "What a click on a region of the fused labels does (select the fused layer, "
            "pan/zoom mode). Keys: " + ", ".join(f"{k} {m}" for m, k in CLICK_MODES.items())
        )
        form.addRow("Click on canvas", self.click_mode)
        self.cut_slab = QDoubleSpinBox()
        self.cut_slab.setRange(0.0, 200.0)
        self.cut_slab.setValue(10.0)
        self.cut_slab.setSuffix(" mm")
        self.cut_slab.setToolTip("A cut line clears the labels under it on the slices of this slab around the slice")
        form.addRow("Cut through", self.cut_slab)
        lay.addLayout(form)
        row = QHBoxLayout()
        self.island_ml = QDoubleSpinBox()
        self.island_ml.setRange(0.0, 500.0)
        self.island_ml.setValue(5.0)
        self.island_ml.setSuffix(" mL")
        self.island_ml.setToolTip("Regions smaller than this are removed")
        self.islands_btn = QPushButton("Remove islands <")
        self.islands_btn.setToolTip("Preview the connected regions under the size at the right, then Apply")
        row.addWidget(self.islands_btn)
        row.addWidget(self.island_ml)
        lay.addLayout(row)
        row = QHBoxLayout()
        self.largest_btn = QPushButton("Keep kidneys by anatomy")
        self.largest_btn.setToolTip(
            "One kidney per side, chosen by the anatomy check (side of the spine, position "
            "behind its front edge, size), not the largest region; previews what goes"
        )
        self.holes_btn = QPushButton("Fill holes")
        self.holes_btn.setToolTip("Fill holes enclosed in a slice: in tumor with tumor, elsewhere with kidney")
        row.addWidget(self.largest_btn)
        row.addWidget(self.holes_btn)
        lay.addLayout(row)
        row = QHBoxLayout()
        self.interp_from, self.interp_to = QSpinBox(), QSpinBox()
        self.interp_a_btn, self.interp_b_btn = QPushButton("A = this slice"), QPushButton("B = this slice")
        for sb, btn in ((self.interp_from, self.interp_a_btn), (self.interp_to, self.interp_b_btn)):
            sb.setToolTip("slice index (the slider's position)")
            btn.setToolTip("take the slice in view")
            btn.clicked.connect(lambda _=False, sb=sb: sb.setValue(self.current_slice()))
            row.addWidget(btn)
            row.addWidget(sb)
        self.interp_btn = QPushButton("Interpolate A-B")
        self.interp_btn.setToolTip(
            "Preview the slices between A and B redrawn by shape-based interpolation of A and B, then Apply"
        )
        row.addWidget(self.interp_btn)
        lay.addLayout(row)
        row = QHBoxLayout()
        self.preview_label = QLabel("")
        self.preview_label.setWordWrap(True)
        self.apply_btn, self.discard_btn = QPushButton("Apply"), QPushButton("Discard preview")
        self.apply_btn.setToolTip("Apply the previewed change (Undo takes it back)")
        self.discard_btn.setToolTip("Forget the previewed change")
        row.addWidget(self.apply_btn)
        row.addWidget(self.discard_btn)
        lay.addWidget(self.preview_label)
        lay.addLayout(row)
        row = QHBoxLayout()
        self.reviewed_btn = QPushButton("Slice reviewed")
        self.reviewed_btn.setToolTip(
            "Mark the slice in view as checked, even without an edit (Shift-V); the "
            "export lists reviewed slices so fine-tuning can train on those alone"
        )
        self.undo_btn, self.redo_btn = QPushButton("Undo"), QPushButton("Redo")
        self.undo_btn.setToolTip("Undo the last painting or tool change (one history with napari's own undo)")
        self.redo_btn.setToolTip("Redo what Undo took back")
        row.addWidget(self.reviewed_btn)
        row.addWidget(self.undo_btn)
        row.addWidget(self.redo_btn)
        lay.addLayout(row)
        keys = QLabel(
            "Keys (fused layer selected): "
            + ", ".join(f"{k} {m}" for m, k in CLICK_MODES.items())
            + "; Shift-V slice reviewed; "
            + ", ".join(f"{k} {w}" for w, k in WINDOW_KEYS.items())
            + " window (any layer selected); napari's brush, eraser and fill bucket paint by hand."
        )
        keys.setWordWrap(True)
        lay.addWidget(keys)

    @property
    def review_buttons(self) -> list:
        """The buttons that need a result."""
        return [
            self.islands_btn,
            self.largest_btn,
            self.holes_btn,
            self.interp_btn,
            self.interp_a_btn,
            self.interp_b_btn,
            self.reviewed_btn,
            self.undo_btn,
            self.redo_btn,
        ]

    @property
    def pending(self):
        """The previewed change waiting for Apply or Discard (a review.Change), or None."""
        return self._pending

    @property
    def planning(self) -> bool:
        return self._tool.busy

    def current_slice(self) -> int:
        return result_layers.current_slice(self.viewer)

    def set_slice_range(self, n: int):
        for sb in (self.interp_from, self.interp_to):
            sb.setRange(0, n)

    def bind_fused_layer(self, layer):
        """Canvas clicks, keys and edit events of the fused layer (once per layer)."""
        if layer.metadata.get("kidseg_bound"):
            return
        layer.metadata["kidseg_bound"] = True
        layer.mouse_drag_callbacks.append(self.on_canvas_click)
        layer.events.paint.connect(self._on_edited)
        for mode, key in CLICK_MODES.items():
            layer.bind_key(key, lambda _layer, mode=mode: self.click_mode.setCurrentText(mode), overwrite=True)
        layer.bind_key("Shift-V", lambda _layer: self.mark_slice_reviewed(), overwrite=True)
        # the session's history, not napari's: napari's undo would write back old fusion labels
        layer.bind_key("Control-Z", lambda _layer: self.history("undo"), overwrite=True)
        layer.bind_key("Control-Shift-Z", lambda _layer: self.history("redo"), overwrite=True)

    def _on_edited(self, event=None):
        """napari painted (brush, eraser, fill): the session records the stroke as one hand edit."""
        if self._session() is not None:
            self._session().sync_edits(_painted_slices(event), seen=self.current_slice())
        self._edited()

    def restore_on_click(self, layer, event):
        """A click on the *removed by anatomy check* layer (when it is the selected layer) restores
        the region under the cursor."""
        if event.type != "mouse_press" or self._session() is None:
            return
        z, y, x = (int(i) for i in np.round(layer.world_to_data(event.position)).astype(int)[-3:])
        self.plan_tool(lambda s: s.plan_restore_removed_region(z, y, x), apply=True)

    def _forget_first_clicks(self, _mode=None):
        """A new click mode forgets a half-made cut or split: its first click, made for another
        tool, must not become the second of this one (a split would delete the wrong side)."""
        self._cut_start = self._split_start = None

    def _cut_click(self, z: int, y: int, x: int):
        """Cut mode: the first click starts the line, the second (on the same slice) cuts."""
        start, self._cut_start = self._cut_start, None
        if start is None or start[0] != z:
            self._cut_start = (z, y, x)
            self._say(f"cut on slice {z}: click where the line ends (across the join)")
            return
        slab = self.cut_slab.value()
        self.plan_tool(lambda s: s.plan_cut(z, start[1:], (y, x), slab), apply=True)

    def _split_click(self, z: int, y: int, x: int):
        """Split off: the first click marks the false part, the second (on any slice) the kidney
        to keep; the region they share is divided along the CT's edges and the false side deleted."""
        start, self._split_start = self._split_start, None
        if start is None:
            self._split_start = (z, y, x)
            self._say(f"split off: false part marked on slice {z}; now click the kidney to keep")
            return
        ct = self._ct()
        hu = None if ct is None else ct.array
        self.plan_tool(lambda s: s.plan_split_off(start, (z, y, x), hu), apply=True)

    def on_canvas_click(self, layer, event):
        """A click on the fused labels applies the chosen click mode to the region under it."""
        mode = self.click_mode.currentText()
        if event.type != "mouse_press" or self._session() is None or mode == "off" or layer.mode != "pan_zoom":
            return
        idx = np.round(layer.world_to_data(event.position)).astype(int)[-3:]
        z, y, x = (int(i) for i in idx)
        if mode == "restore removed":
            self.plan_tool(lambda s: s.plan_restore_removed_region(z, y, x), apply=True)
        elif mode == "cut":
            self._cut_click(z, y, x)
        elif mode == "split off":
            self._split_click(z, y, x)
        else:
            action = _CLICK_ACTIONS[mode]
            if action == "delete" and "Shift" in getattr(event, "modifiers", ()):
                action = "delete component"
            self.plan_tool(lambda s: s.plan_region_edit(z, y, x, action), apply=True)

    def plan_tool(self, plan, apply: bool = False):
        """Compute a tool's Change in a worker (no GUI stall), then preview it, or apply it at once
        (``apply``: the click tools, which change only the region clicked)."""
        s = self._session()
        if s is None or self._tool.busy or self._closed():
            return
        self._say("working...")

        def done(change):
            if self._session() is not s:
                return
            if apply:
                self._apply_change(change)
            else:
                self._show_preview(change)

        self._tool.start(plan, s, done=done)

    def _set_preview_enabled(self, on: bool):
        self.apply_btn.setEnabled(on)
        self.discard_btn.setEnabled(on)

    def _show_preview(self, change):
        self._pending = change
        session = self._session()
        shape = session.labels.shape
        if not change.voxels:
            self.preview_label.setText(f"{change.name}: nothing would change ({change.summary})")
            self._say(f"{change.name}: nothing to change")
            self._pending = None
            self._set_preview_enabled(False)
            return
        preview = np.zeros(shape, np.uint8)
        preview.ravel()[change.idx] = np.where(change.new > 0, change.new, change.old)
        result_layers.preview_layer(self.viewer, self._ct(), preview).visible = True
        ml = change.voxels * float(np.prod(session.result.spacing)) / 1000.0
        self.preview_label.setText(
            f"Preview of {change.name}: {change.summary or f'{ml:.1f} mL changes'} (outlined). Apply or discard."
        )
        self._say(f"preview: {change.name}")
        self._set_preview_enabled(True)

    def apply_pending(self):
        if self._pending is not None:
            self._apply_change(self._pending)

    def discard_pending(self):
        self._forget_first_clicks()  # a run, a case closed or swapped: an old first click is of another case
        self._pending = None
        self.preview_label.setText("")
        self._set_preview_enabled(False)
        name = result_layers.LAYER_NAMES["preview"]
        if name in self.viewer.layers:
            # hidden, not removed: building a labels layer again costs the GUI thread 0.2-0.5 s
            self.viewer.layers[name].visible = False

    def _apply_change(self, change):
        """Apply a Change on the session's history (painting is recorded there too: one Undo)."""
        s = self._session()
        self.discard_pending()
        if not change.voxels:
            self._say(f"{change.name}: nothing to change ({change.summary})")
            return
        try:
            s.apply_change(change, seen=self.current_slice())  # the slice in view counts as reviewed
        except KidsegError as exc:
            self._notify(str(exc), error=True)
            return
        self._fused().refresh()
        self._say(f"{change.name}: {change.summary or f'{change.voxels} voxel(s) changed'}")
        self._changed()  # one change, not a stroke of many: no need to wait for the edits to rest

    def history(self, which: str):
        """ "undo" or "redo" on the session's history."""
        if self._session() is None:
            return
        name = getattr(self._session(), which)()
        self._fused().refresh()
        self._say(f"{which}: {name}" if name else f"nothing to {which}")
        self._changed()

    def mark_slice_reviewed(self):
        s = self._session()
        if s is None:
            return
        z = self.current_slice()
        s.reviewed.add(z)
        self._say(f"slice {z} marked reviewed ({len(s.reviewed_slices())} slice(s) reviewed)")


def _painted_slices(event):
    """The slices a napari paint event changed, as a (first, stop) pair (None: look everywhere)."""
    zs = []
    for atom in getattr(event, "value", None) or ():
        key = getattr(atom, "slice_key", None)  # a masked paint atom: its bounding box
        if key is not None and isinstance(key[0], slice) and None not in (key[0].start, key[0].stop):
            zs += [key[0].start, key[0].stop - 1]
        elif isinstance(atom, tuple) and len(atom) == 3 and len(atom[0]) and np.size(atom[0][0]):
            zs += [int(np.min(atom[0][0])), int(np.max(atom[0][0]))]  # (indices, old, new)
        else:
            return None
    return (min(zs), max(zs) + 1) if zs else None
