"""The Kidney cascade dock widget: run, compare, tune live, correct, measure, export.

GUI only: every number comes from the core (cascade, review, metrics). Qt is imported through
qtpy, so PyQt5 (the default) and PyQt6 both work.
"""

from __future__ import annotations

import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..errors import KidsegError
from ..fusion import DEFAULT_ALPHA, DEFAULT_KIDNEY_THRESHOLD, DEFAULT_TUMOR_THRESHOLD
from ..layers import (
    CT_WINDOW,
    LABEL_COLORS,
    LABEL_FEATURES,
    ORGAN_COLORS,
    ORGAN_FEATURES,
    REFERENCE_COLORS,
    SOURCE_KEY,
    WINDOW_PRESETS,
)
from .report_panel import ReportPanel

LAYER_NAMES = {
    "coarse": "coarse labels",
    "refined": "refined labels",
    "fused": "fused labels (editable)",
    "rois": "kidney ROIs (refine patches)",
    "disagreement": "coarse/refined disagreement",
    "removed": "removed by anatomy check",
    "organs": "organs (context)",
    "preview": "preview (not applied yet)",
}
# what a click on the canvas does (the fused layer selected, in pan/zoom mode), and its key
CLICK_MODES = {
    "off": "Shift-O",
    "delete region": "Shift-D",  # the clicked label's region; Shift-click: the whole kidney+tumor region
    "cut": "Shift-U",  # two clicks on the slice: the line that separates a region where it joins another
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
MEASURE_COLUMNS = 38  # the Review box's text is at most this wide (monospace): no horizontal scroll
# F1-F4: napari's labels layer takes the digits (1 eraser, 2 brush, 3 polygon, 4 fill, ...) also with
# Shift held, so Shift-1..4 switched the fused layer's tool; no napari layer or viewer uses F1-F4
WINDOW_KEYS = {"soft tissue": "F1", "kidney": "F2", "bone": "F3", "lung": "F4"}


def kidney_focus(regions: list[dict]):
    """The voxel (z, y, x) to show after a run: inside the largest kidney region the anatomy check
    did not flag (by its kidney mL, tumor left out), else the largest holding kidney, else the
    largest region; None without labels. Not the slice with the most labels: on a real scan that
    can be a false region (a liver cyst called tumor)."""
    kidneys = [r for r in regions if r["label"] != "tumor"]
    pick = [r for r in kidneys if not r["flagged"]] or kidneys or regions
    if not pick:
        return None
    return tuple(max(pick, key=lambda r: r["ml"] - r.get("tumor_ml", 0.0))["voxel"])


_heavy_imports = None  # the thread importing torch and segmentation_models_pytorch


def _start_heavy_imports():
    global _heavy_imports
    if _heavy_imports is None and "segmentation_models_pytorch" not in sys.modules:
        _heavy_imports = threading.Thread(target=_import_heavy, name="kidseg torch import", daemon=True)
        _heavy_imports.start()


def _import_heavy():
    import segmentation_models_pytorch  # noqa: F401
    import torch  # noqa: F401


def wait_for_heavy_imports(timeout: float | None = None):
    """Off the GUI thread (a run's worker): let the background import of torch finish first."""
    if _heavy_imports is not None:
        _heavy_imports.join(timeout)


SURFACE_NAMES = {1: "3D kidney", 2: "3D tumor", 3: "3D cyst"}


def _single_colour(colour: str):
    from napari.utils.colormaps import Colormap
    from vispy.color import Color

    rgba = Color(colour).rgba
    return Colormap([rgba, rgba], name=f"kidseg {colour}")


def export_correction_with_note(folder: Path, ct, labels, kwargs: dict):
    """Off the GUI thread: export the case (review.export_correction) and say whether a DICOM SEG
    came with it. Returns (case folder, note)."""
    import json

    from ..review import DICOM_SEG_NAME, export_correction

    case = export_correction(folder, ct, labels, **kwargs)
    note = ""
    src = ct.source
    if src is not None and src.format == "dicom" and Path(src.path).is_dir():
        seg = case / DICOM_SEG_NAME
        if seg.exists():
            note = f" and a DICOM SEG ({seg.name})"
        else:
            cases = json.loads((folder / "manifest.json").read_text())["cases"]
            why = next((c.get("dicom_seg_note") for c in cases if c["case"] == case.name), None)
            note = f"; no DICOM SEG: {why}"
    return case, note


class _Relay(QObject):
    """Carries progress from the worker thread to the GUI thread (queued signal)."""

    progress = Signal(int, int, str)


class CascadeWidget(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        # torch and the model zoo take seconds to import (4.9 s measured): in the background, so the
        # dock appears at once; a run's worker waits for it. (Importing triton in a thread once Qt
        # runs segfaulted; _widgets/__init__ keeps triton from loading, which the plugin never uses.)
        _start_heavy_imports()
        self.viewer = napari_viewer
        self.session = None
        self.ct_volume = None
        self.cascade = None
        self._cancel = threading.Event()
        self._closed = threading.Event()  # set when Qt destroys this widget (viewer closed)
        self._worker = None
        self._fuse_worker = None
        self._fuse_again = False
        self._layer_steps = []  # result layers still to add, one per event-loop turn
        self._comparison = None  # coarse/refined/disagreement maps of the latest fusion
        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)
        self.last_slider_update_ms = None
        self.fused_layer = None  # the editable fused labels layer, once a run has shown it
        self.measurements = None  # the Review box's latest volumes and diameters
        self._regions = []  # the region table's rows
        self._versions = []  # the model versions combo's rows
        self._models_key = None  # which models the loaded cascade holds
        self._carried_edits = None  # hand edits carried into a re-run with other models
        self._run_started = 0.0  # for the run's time
        self._restore_reviewed = set()  # reviewed slices of a result shown by show_prepared
        self._cut_start = None  # the first click of a cut line

        # everything in a scroll area: the widget stays usable on a laptop screen
        root = QVBoxLayout(self)
        root.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        inner = QWidget()
        scroll.setWidget(inner)
        root.addWidget(scroll)
        outer = QVBoxLayout(inner)
        # ---- input and models
        box = QGroupBox("Input and models")
        form = QFormLayout(box)
        self.ct_combo = QComboBox()
        self.ct_combo.setToolTip("The 3D image layer to segment (a CT in HU)")
        self.open_btn = QPushButton("Open...")
        self.open_btn.setToolTip(
            "Open a CT (file, DICOM folder or KiTS case with its reference) read in the background; "
            "File > Open reads on the GUI thread and freezes the viewer for a second or two"
        )
        self.open_btn.clicked.connect(lambda: self.open_ct())
        crow = QHBoxLayout()
        crow.addWidget(self.ct_combo, 1)
        crow.addWidget(self.open_btn)
        form.addRow("CT layer", crow)
        self.coarse_edit, row = self._path_row("bundled coarse model")
        form.addRow("Coarse model", row)
        self.refine_edit, row = self._path_row("bundled refine model")
        form.addRow("Refine model", row)
        self.device_combo = QComboBox()
        self.device_combo.setToolTip("Where the networks run: auto takes a GPU when there is one")
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.device_label = QLabel("")
        drow = QHBoxLayout()
        drow.addWidget(self.device_combo)
        drow.addWidget(self.device_label)
        form.addRow("Device", drow)
        self.mirror_check = QCheckBox("average with the mirror image (2x time)")
        self.mirror_check.setToolTip(
            "Runs every slice and patch again mirrored left-right and averages the two "
            "answers. Off by default: on phantoms it was not clearly better."
        )
        form.addRow("Mirror", self.mirror_check)
        outer.addWidget(box)

        # ---- run
        rrow = QHBoxLayout()
        self.run_btn = QPushButton("Run cascade")
        self.run_btn.setToolTip("Coarse stage, kidney ROIs, refine stage and fusion, in the background")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setToolTip("Stop the run (or fine-tune) within one batch; the viewer stays as it was")
        self.cancel_btn.setEnabled(False)
        rrow.addWidget(self.run_btn)
        rrow.addWidget(self.cancel_btn)
        outer.addLayout(rrow)
        self.progress = QProgressBar()
        self.progress.setFormat("%p%")
        self.status = QLabel("Pick a CT layer and press Run.")
        self.status.setWordWrap(True)
        outer.addWidget(self.progress)
        outer.addWidget(self.status)

        # ---- live fusion
        box = QGroupBox("Fusion (live)")
        form = QFormLayout(box)
        self.alpha = self._slider(form, "alpha (coarse weight)", DEFAULT_ALPHA)
        self.kidney_thr = self._slider(form, "kidney threshold", DEFAULT_KIDNEY_THRESHOLD)
        self.tumor_thr = self._slider(form, "tumor threshold", DEFAULT_TUMOR_THRESHOLD)
        self.anatomy_check = QCheckBox("remove what cannot be kidney or kidney tumor")
        self.anatomy_check.setChecked(True)
        self.anatomy_check.setToolTip(
            "Regions on the wrong side of the spine's front edge or off the kidneys' usual place, a second "
            "region far from a side's kidney, regions too small for a kidney, and tumor that touches no kidney "
            "are removed. They are outlined in the 'removed by anatomy check' layer: select that layer and "
            "click a region to restore it."
        )
        form.addRow("Anatomy check", self.anatomy_check)
        self.keep_reviewed_check = QCheckBox("sliders leave reviewed slices as they are")
        self.keep_reviewed_check.setChecked(True)
        self.keep_reviewed_check.setToolTip(
            "Slices you marked reviewed or edited keep the fusion you reviewed them on ('whole case reviewed': "
            "every slice). Uncheck to let the sliders re-fuse them too; your edits stay either way."
        )
        form.addRow("Reviewed slices", self.keep_reviewed_check)
        outer.addWidget(box)

        # ---- corrections
        box = QGroupBox("Corrections")
        lay = QVBoxLayout(box)
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
        outer.addWidget(box)
        self._pending = None  # the planned Change shown as a preview
        self._set_preview_enabled(False)

        # ---- review and measurements
        box = QGroupBox("Review")
        lay = QVBoxLayout(box)
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
        outer.addWidget(box)
        self.report_panel = ReportPanel(self._report_case, self._notify)
        outer.addWidget(self.report_panel)

        # ---- export
        box = QGroupBox("Export corrections")
        form = QFormLayout(box)
        self.export_edit, row = self._path_row("corrections folder", folder=True)
        form.addRow("Folder", row)
        self.export_edit.setToolTip("Exported cases (KiTS layout + manifest.json) and fine-tuned models go here")
        self.whole_case_check = QCheckBox("whole case reviewed")
        self.whole_case_check.setToolTip(
            "Checked: fine-tuning learns from every slice of this case. Unchecked: only "
            "from the slices you edited or marked reviewed."
        )
        self.export_btn = QPushButton("Export case")
        self.export_btn.setToolTip(
            "Write the CT and the corrected labels into the folder (once per scan: a second "
            "export of the same scan updates its case)"
        )
        erow = QHBoxLayout()
        erow.addWidget(self.export_btn)
        erow.addWidget(self.whole_case_check)
        form.addRow(erow)
        frow = QHBoxLayout()
        self.finetune_btn = QPushButton("Fine-tune models")
        self.finetune_btn.setToolTip(
            "Fine-tune the coarse and refine models on the exported corrections, in the "
            "background (about half a minute per stage on 2 CPU cores)"
        )
        self.refine_only_check = QCheckBox("refine only")
        self.refine_only_check.setToolTip(
            "Fine-tune the refine model alone (the coarse model picks the kidney "
            "regions, where most errors on a new scanner start)"
        )
        self.use_new_btn = QPushButton("Use the new models")
        self.use_new_btn.setToolTip("Switch to the fine-tuned models and run this case again with them")
        self.use_new_btn.setEnabled(False)
        frow.addWidget(self.finetune_btn)
        frow.addWidget(self.refine_only_check)
        frow.addWidget(self.use_new_btn)
        form.addRow(frow)
        self.versions_combo = QComboBox()
        self.versions_combo.setToolTip(
            "The bundled models and every fine-tuned pair in the corrections folder: "
            "pick one to switch back to it (press Run to use it)"
        )
        self.versions_combo.activated.connect(self._pick_version)
        form.addRow("Model versions", self.versions_combo)
        self.finetune_label = QLabel("")
        self.finetune_label.setWordWrap(True)
        form.addRow(self.finetune_label)
        outer.addWidget(box)
        outer.addStretch(1)

        self._review_buttons = [
            self.islands_btn,
            self.largest_btn,
            self.holes_btn,
            self.interp_btn,
            self.interp_a_btn,
            self.interp_b_btn,
            self.reviewed_btn,
            self.undo_btn,
            self.redo_btn,
            self.next_disagree_btn,
            self.next_uncertain_btn,
            self.export_btn,
            self.view3d_btn,
            self.report_panel.make_btn,
        ]
        self._set_review_enabled(False)
        self._disagree_pos = self._uncertain_pos = -1

        self.run_btn.clicked.connect(self.run)
        self.cancel_btn.clicked.connect(self.cancel)
        for s in (self.alpha, self.kidney_thr, self.tumor_thr):
            s.valueChanged.connect(self._on_params_changed)
        self.anatomy_check.toggled.connect(self._on_params_changed)
        self.keep_reviewed_check.toggled.connect(self._on_keep_reviewed)
        self.whole_case_check.toggled.connect(self._on_keep_reviewed)
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
        self.apply_btn.clicked.connect(self.apply_pending)
        self.discard_btn.clicked.connect(self.discard_pending)
        self.reviewed_btn.clicked.connect(self.mark_slice_reviewed)
        self.undo_btn.clicked.connect(lambda: self._history("undo"))
        self.redo_btn.clicked.connect(lambda: self._history("redo"))
        self.next_disagree_btn.clicked.connect(lambda: self.goto_doubtful("disagreement"))
        self.next_uncertain_btn.clicked.connect(lambda: self.goto_doubtful("uncertainty"))
        self.export_btn.clicked.connect(self.export)
        self.finetune_btn.clicked.connect(self.finetune)
        self.use_new_btn.clicked.connect(self.use_new_models)
        self.export_edit.editingFinished.connect(self._refresh_versions)
        self.new_models = None
        self._before_models = None  # labels before 'Use the new models', for the changed-voxel count
        self.reviewed_slices: set[int] = set()
        self._measure_timer = QTimer(self)  # the Review box follows every edit, debounced
        self._measure_timer.setSingleShot(True)
        self._measure_timer.setInterval(400)
        self._measure_timer.timeout.connect(self._update_measurements)
        self._measure_worker = None
        self._measure_again = False
        self._tool_worker = None
        self._export_worker = None
        self.last_export = None  # the case folder the latest export wrote
        self._surface_worker = None
        self._open_worker = None
        self._hidden_for_3d = {}  # layers the 3D view hid: name -> visible before
        self.viewer.dims.events.order.connect(self._orient_view)
        self._fuse_timer = QTimer(self)
        self._fuse_timer.setSingleShot(True)
        self._fuse_timer.setInterval(150)
        self._fuse_timer.timeout.connect(self._fuse_whole_volume)
        # closing the viewer destroys this widget: stop any run, and let the worker's late signals
        # find a closed widget instead of deleted Qt objects (the lambda holds only the Events)
        self.destroyed.connect(lambda *_, cancel=self._cancel, closed=self._closed: (closed.set(), cancel.set()))
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.inserted.connect(self._on_layer_added)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()
        closed = self._closed
        for name, key in WINDOW_KEYS.items():  # on the viewer: whichever layer is selected
            self.viewer.bind_key(
                key,
                lambda _v, name=name: None if closed.is_set() else self.window_combo.setCurrentText(name),
                overwrite=True,
            )

    # ------------------------------------------------------------------ the public face
    # What the worklist widget, the tests, benchmarks and scripts use; every name of the dock that
    # starts with "_" is its own, so its boxes can move into panels without breaking them.
    @property
    def busy(self) -> bool:
        """A run, a fine-tune or the showing of a result is under way (Run and a new case wait)."""
        return self._worker is not None

    @property
    def pending_work(self) -> frozenset:
        """What is still going on: "run" (see :attr:`busy`), "layers" (result layers still being
        added), "fusion" (the volume following the sliders), "measurements" (the Review box), "tool"
        (a correction tool being planned), "export", "3D" (the 3D surfaces being built) and "open"
        (a CT being read)."""
        work = {
            "run": self._worker is not None,
            "layers": bool(self._layer_steps),
            "fusion": self._fuse_worker is not None or self._fuse_timer.isActive(),
            "measurements": self._measure_worker is not None or self._measure_timer.isActive(),
            "tool": self._tool_worker is not None,
            "export": self._export_worker is not None,
            "3D": self._surface_worker is not None,
            "open": self._open_worker is not None,
        }
        return frozenset(k for k, going in work.items() if going)

    @property
    def idle(self) -> bool:
        return not self.pending_work

    @property
    def closed(self) -> bool:
        """The viewer was closed (Qt destroyed this widget): late worker signals are ignored."""
        return self._closed.is_set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def models(self) -> tuple:
        """``(coarse, refine, device)``: the checkpoints named in the dock (None: the bundled one)
        and the device choice, as a run (or a worklist's drafting) uses them."""
        return (self.coarse_edit.text() or None, self.refine_edit.text() or None, self.device_combo.currentText())

    def set_models(self, coarse=None, refine=None, device: str | None = None):
        """Name the checkpoints (None: the bundled ones) and optionally the device for the next run."""
        self.coarse_edit.setText("" if coarse is None else str(coarse))
        self.refine_edit.setText("" if refine is None else str(refine))
        if device is not None:
            self.device_combo.setCurrentText(device)

    @property
    def export_folder(self) -> str:
        """The corrections folder (exports and fine-tuned models); "" when none is chosen."""
        return self.export_edit.text().strip()

    @export_folder.setter
    def export_folder(self, folder):
        self.export_edit.setText(str(folder))
        self._refresh_versions()

    def open_ct(self, path=None):
        """Read a CT (a file, a DICOM series folder, or a KiTS case folder with its reference labels)
        in a worker and add its layers; the CT becomes the one to segment (over a shown case, it is
        asked about first, see :meth:`ask_about_new_ct`). :attr:`pending_work` holds "open" meanwhile."""
        from napari.qt.threading import create_worker

        from .._napari_io import read_layers
        from ..volumes import KITS_IMAGE

        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "A CT (a DICOM series: any of its files)")
            if not path:
                return
            p = Path(path)
            if p.suffix.lower() == ".dcm" or p.name == KITS_IMAGE:  # the series, or the case with its reference
                path = str(p.parent)
        if self._open_worker is not None:
            return
        self.status.setText(f"opening {Path(path).name}...")

        def done(layers):
            self._open_worker = None
            if self._closed.is_set():
                return
            if not layers:  # read_layers said why (a warning notification)
                self._notify(f"could not open {path}", error=True)
                return
            had_case = self.session is not None
            names = []
            for data, kwargs, kind in layers:
                names.append(getattr(self.viewer, f"add_{kind}")(data, **kwargs).name)
            if not had_case:
                self.select_ct(names[0])
                self.viewer.reset_view()
                self.status.setText(f"{names[0]} opened: press Run")

        def failed(exc):
            self._open_worker = None
            self._on_error(exc)

        self._open_worker = create_worker(read_layers, str(path), _connect={"returned": done, "errored": failed})

    def select_ct(self, name: str) -> bool:
        """Make the 3D image layer ``name`` the CT to segment (also one renamed or just added);
        False when there is no such layer."""
        self._refresh_layers()
        if self.ct_combo.findText(name) < 0:
            return False
        self.ct_combo.setCurrentText(name)
        return True

    @property
    def pending_change(self):
        """The previewed change waiting for Apply or Discard (a review.Change), or None."""
        return self._pending

    def click_at(self, position, modifiers=()):
        """What a click on the fused labels at this world position does in the chosen click mode,
        the layer in pan/zoom mode (the canvas click without a mouse: scripts and tests)."""
        if self.fused_layer is not None:
            press = SimpleNamespace(type="mouse_press", position=tuple(position), modifiers=tuple(modifiers))
            self._on_canvas_click(self.fused_layer, press)

    def update_measurements(self):
        """Bring the Review box (volumes, region table, Dice against a reference) up to date now."""
        self._update_measurements()

    # ------------------------------------------------------------------ small builders
    def _path_row(self, placeholder, folder=False):
        edit = QLineEdit()
        edit.setPlaceholderText(placeholder)
        edit.setToolTip(f"{placeholder}: type a path or browse with ...")
        btn = QPushButton("...")
        btn.setMaximumWidth(30)

        def browse():
            if folder:
                path = QFileDialog.getExistingDirectory(self, placeholder)
            else:
                path, _ = QFileDialog.getOpenFileName(self, placeholder, "", "Checkpoints (*.safetensors)")
            if path:
                edit.setText(path)

        btn.clicked.connect(browse)
        row = QHBoxLayout()
        row.addWidget(edit)
        row.addWidget(btn)
        return edit, row

    def _slider(self, form, name, value):
        s = QSlider(Qt.Horizontal)
        s.setRange(0, 100)
        s.setValue(int(round(value * 100)))
        label = QLabel(f"{value:.2f}")
        s.setToolTip(
            f"{name}: moves re-fuse the slice in view at once, the volume in the background; never reruns a network"
        )
        s.valueChanged.connect(lambda v: label.setText(f"{v / 100:.2f}"))
        row = QHBoxLayout()
        row.addWidget(s)
        row.addWidget(label)
        form.addRow(name, row)
        return s

    def _notify(self, message: str, error=False):
        from napari.utils.notifications import show_error, show_info

        self.status.setText(message)
        (show_error if error else show_info)(message)

    def _set_review_enabled(self, on: bool):
        for b in self._review_buttons:
            b.setEnabled(on)

    def _refresh_layers(self, event=None):
        from napari.layers import Image

        current = self.ct_combo.currentText()
        self.ct_combo.clear()
        names = [ly.name for ly in self.viewer.layers if isinstance(ly, Image) and ly.ndim == 3 and not ly.rgb]
        self.ct_combo.addItems(names)
        if current in names:
            self.ct_combo.setCurrentText(current)
        if self._worker is not None and event is not None and getattr(event, "type", "") == "removed":
            removed = getattr(event, "value", None)
            if removed is not None and removed.name == current:
                self.cancel()
                # napari also removes every layer when the viewer closes; by the next event-loop
                # turn a closing viewer has destroyed this widget, and then nobody needs telling
                closed, message = self._closed, f"layer {current!r} was deleted: run cancelled"
                QTimer.singleShot(0, lambda: None if closed.is_set() else self._notify(message, error=True))

    def _on_layer_added(self, event):
        """A reference labels layer leaves the fused layer selected (click tools keep working) and
        is scored at once; a second CT opened over a case is asked about, never left on top of the
        results (see :meth:`ask_about_new_ct`)."""
        from napari.layers import Image, Labels

        layer = getattr(event, "value", None)
        if self.session is None or self._closed.is_set() or layer is None or layer.name in LAYER_NAMES.values():
            return
        if isinstance(layer, Labels):
            fused = self.fused_layer
            # napari selects a new layer after its inserted event: the selection is given back after that
            QTimer.singleShot(0, lambda: self._reselect(fused))
            self._measure_timer.start()
        elif isinstance(layer, Image) and layer.ndim == 3 and not layer.rgb:
            before = [ly for ly in self.viewer.layers if ly is not layer]
            QTimer.singleShot(0, lambda: self._second_ct(layer, before))

    def _reselect(self, layer):
        if not self._closed.is_set() and layer is not None and layer in self.viewer.layers:
            self.viewer.layers.selection.active = layer

    def ask_about_new_ct(self, name: str, n_edited: int) -> str:
        """Replace or keep: asked when another CT is opened while a case is shown."""
        edits = f" Its {n_edited} hand-edited voxel(s) go unless exported." if n_edited else ""
        return self._ask(
            "Another CT",
            f"{name!r} was opened while a case is shown. Make it the case? The results of this one are closed." + edits,
            ("keep", f"Keep this case (close {name!r})"),
            ("replace", "Make it the case"),
        )

    def _second_ct(self, layer, before):
        """A CT opened over a shown case (File > Open, drag and drop): the new case replaces this
        one, or it is closed again; it never sits above the results hiding them. The worklist's
        CT is selected as the case when it arrives, and is not asked about."""
        from napari.layers import Labels

        if self._closed.is_set() or self.session is None or layer not in self.viewer.layers:
            return
        if layer.name == self.ct_combo.currentText():
            return
        if self.busy:
            self.viewer.layers.move(self.viewer.layers.index(layer), 0)  # below the results
            self._notify(f"a run is going: {layer.name!r} was put below the results", error=True)
            return
        self.session.sync_edits()
        if self.ask_about_new_ct(layer.name, int(self.session.hand_edited_voxels)) != "replace":
            came_with = [ly for ly in self.viewer.layers if ly not in before]  # e.g. its reference labels
            for ly in came_with:
                self.viewer.layers.remove(ly)
            self._notify(f"{layer.name!r} closed: this case stays")
            return
        old_ct = self.ct_combo.currentText()
        gone = [
            ly
            for ly in before
            if ly in self.viewer.layers
            and (
                ly.name in LAYER_NAMES.values()
                or ly.name in SURFACE_NAMES.values()
                or ly.name == old_ct
                or isinstance(ly, Labels)
            )
        ]
        self.view3d_btn.setChecked(False)
        self.discard_pending()
        self.session = self.fused_layer = self.ct_volume = self._comparison = None
        self.reviewed_slices = set()
        self.measurements, self._regions = None, []
        self.measure_label.setText("")
        self.region_table.setRowCount(0)
        self._set_review_enabled(False)
        for ly in gone:  # this case's CT, results and reference labels
            self.viewer.layers.remove(ly)
        self.select_ct(layer.name)
        self.viewer.reset_view()
        self._notify(f"{layer.name!r} is the case now: press Run")

    # ------------------------------------------------------------------ run
    def _ct_from_layer(self):
        from ..volumes import check_ct_intensities, volume_in_memory

        name = self.ct_combo.currentText()
        if not name:
            raise KidsegError("no 3D image layer to segment: open a CT first (File > Open, or the sample)")
        layer = self.viewer.layers[name]
        data = np.asarray(layer.data)
        if data.ndim != 3 or layer.rgb:
            raise KidsegError(f"layer {name!r} is not a 3D grayscale CT")
        check_ct_intensities(data, f"layer {name!r}")
        source = layer.metadata.get(SOURCE_KEY)
        if source is not None and source.array.shape == data.shape:
            source.array = data
            return source
        return volume_in_memory(data, tuple(layer.scale), tuple(layer.translate))

    def run(self):
        from napari.qt.threading import create_worker

        if self._worker is not None:
            return
        try:
            ct = self._ct_from_layer()
        except KidsegError as exc:
            self._notify(str(exc), error=True)
            return
        self._carried_edits = None
        if self.session is not None and self.session.hand_edited_voxels:
            choice = self.ask_about_edits(self.session.hand_edited_voxels)
            if choice == "cancel":
                self.status.setText("run cancelled: your edits are as they were")
                return
            if choice == "keep" and self.session.labels.shape == ct.array.shape:
                s = self.session
                s.sync_edits()
                keep = s.edited  # every voxel the user set, also where the old fusion agreed
                self._carried_edits = (np.flatnonzero(keep), s.labels.ravel()[keep.ravel()].copy())
        self.discard_pending()
        self.ct_volume = ct
        self._cancel.clear()
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress.setValue(0)
        self.status.setText("loading the models...")
        relay, cancel = self._relay, self._cancel
        reload = self.cascade is None or self._models_changed()
        paths = (self.coarse_edit.text() or None, self.refine_edit.text() or None, self.device_combo.currentText())
        params = self._params()
        mirror = self.mirror_check.isChecked()

        def job():
            # everything slow happens here, off the GUI thread: loading, inference, first fusion
            wait_for_heavy_imports()
            from ..cascade import Cascade
            from ..review import FusionParams, ReviewSession

            cascade = Cascade(*paths[:2], device=paths[2]) if reload else self.cascade
            result = cascade.run(
                ct.array,
                ct.geometry.spacing,
                progress=lambda d, t, s: relay.progress.emit(d, t, s),
                cancel=cancel.is_set,
                mirror=mirror,
            )
            session = ReviewSession(result, FusionParams(*params))
            return cascade, session, self._comparison_layers(session, focus=True)

        self._run_started = time.perf_counter()
        self._worker = create_worker(
            job, _connect={"returned": self._on_result, "errored": self._on_error, "finished": self._on_finished}
        )
        self._run_started = time.perf_counter()

    # ------------------------------------------------------------------ a result made elsewhere
    def prepare_result(self, result, labels=None):
        """Off the GUI thread: the review session of a result made elsewhere (a worklist's draft),
        with the labels as corrected so far, and its comparison maps. Pass both to
        :meth:`show_prepared` on the GUI thread."""
        from ..review import FusionParams, ReviewSession

        session = ReviewSession(result, FusionParams(*self._params()))
        if labels is not None and labels.shape == session.labels.shape:
            session.load_labels(labels)
        return session, self._comparison_layers(session, focus=True)

    def show_prepared(self, ct_volume, cascade, session, comparison, reviewed=()):
        """Show a prepared result as if this widget had run it: the same layers, review tools and
        export. The CT must already be a layer (selected in the CT box)."""
        if self._worker is not None:
            raise KidsegError("the widget is busy (a run is going): wait for it or cancel it")
        self.discard_pending()
        self.ct_volume = ct_volume
        self._carried_edits = None
        self._restore_reviewed = set(reviewed)
        self._run_started = time.perf_counter()
        self._worker = "showing"  # blocks Run until the layers are in
        self._on_result((cascade, session, comparison))

    def _ask(self, title: str, text: str, accept: tuple[str, str], destructive: tuple[str, str]) -> str:
        """A question with two answers and Cancel; returns the chosen answer's key, or "cancel"."""
        box = QMessageBox(self)
        box.setIcon(QMessageBox.Question)
        box.setWindowTitle(title)
        box.setText(text)
        buttons = {
            box.addButton(accept[1], QMessageBox.AcceptRole): accept[0],
            box.addButton(destructive[1], QMessageBox.DestructiveRole): destructive[0],
        }
        box.addButton(QMessageBox.Cancel)
        box.exec_() if hasattr(box, "exec_") else box.exec()
        return buttons.get(box.clickedButton(), "cancel")

    def ask_about_edits(self, n_voxels: int) -> str:
        """Keep, discard or cancel: asked before a run would replace hand-edited labels."""
        return self._ask(
            "Hand edits",
            f"{n_voxels} voxel(s) were corrected by hand. Running again replaces the labels.",
            ("keep", "Keep my edits"),
            ("discard", "Discard them"),
        )

    def _models_changed(self):
        want = (self.coarse_edit.text() or None, self.refine_edit.text() or None, self.device_combo.currentText())
        changed = self._models_key != want
        self._models_key = want
        return changed

    def cancel(self):
        self._cancel.set()
        self.status.setText("cancelling...")

    def _on_progress(self, done, total, stage):
        if self._closed.is_set():
            return
        self.progress.setMaximum(max(total, 1))
        self.progress.setValue(done)
        if stage.startswith("fine-tune"):  # the core's words, time left from its step times: as the CLI's
            self.status.setText(f"{stage} ({100 * done / max(total, 1):.0f}%)")
            return
        self.status.setText(f"{stage}: {done}/{total} {'slices' if stage == 'coarse' else 'patches'}")

    def _on_error(self, exc):
        from ..errors import Cancelled

        if self._closed.is_set():
            return
        if isinstance(exc, Cancelled):
            self._notify("run cancelled; the viewer is unchanged")
        elif isinstance(exc, KidsegError):
            self._notify(str(exc), error=True)
        else:
            self._notify(f"the cascade failed: {type(exc).__name__}: {exc}", error=True)

    def _on_finished(self):
        if self._closed.is_set():
            self._worker = None
            return
        if not self._layer_steps:  # else the run ends when its last layer is in (_add_next_layer)
            self._end_run()

    def _end_run(self):
        self._worker = None
        self.run_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)

    def _on_result(self, payload):
        if self._closed.is_set():
            return
        cascade, session, comparison = payload
        self.device_label.setText(f"using {cascade.device}")
        self.status.setText("adding the result layers...")
        # napari builds a labels layer's visuals on the GUI thread (about 0.3-0.6 s each under
        # software OpenGL): one layer per event-loop turn keeps the viewer responsive in between
        self._layer_steps = self._result_layer_steps(session, comparison)
        self._layer_steps.append(lambda: self._result_shown(cascade, session, comparison))
        QTimer.singleShot(0, self._add_next_layer)

    def _add_next_layer(self):
        if self._closed.is_set() or not self._layer_steps:
            return
        try:
            self._layer_steps.pop(0)()
        except Exception as exc:  # noqa: BLE001 - e.g. the viewer changed under us: say so, and free the Run button
            self._layer_steps.clear()
            self._end_run()
            self._notify(f"could not show the result: {type(exc).__name__}: {exc}", error=True)
            return
        if self._layer_steps:
            QTimer.singleShot(0, self._add_next_layer)
        else:
            self._end_run()

    def _result_shown(self, cascade, session, comparison):
        self.cascade, self.session, self._comparison = cascade, session, comparison
        session.reviewed.update(self._restore_reviewed)  # the widget marks slices in the session's own set
        self.reviewed_slices, self._restore_reviewed = session.reviewed, set()
        self._on_keep_reviewed()
        carried = self._carried_edits
        if carried is not None:  # the radiologist chose to keep the edits over the new result
            idx, values = carried
            session.apply_change(session.plan_set(idx, values, "edits kept from the last run"))
            self.fused_layer.refresh()
            self._carried_edits = None
        result = session.result
        self.viewer.reset_view()  # the whole case in view (a new case may differ in size and place)
        focus = comparison.get("focus")
        if focus is not None:  # then a kidney, not where the view happened to be
            self._focus_on(*focus)
        if self.ct_combo.currentText() in self.viewer.layers:
            self.viewer.layers[self.ct_combo.currentText()].contrast_limits = CT_WINDOW
        self.viewer.layers.selection.active = self.fused_layer
        self._set_review_enabled(True)
        n = result.shape[0] - 1
        for sb in (self.interp_from, self.interp_to):
            sb.setRange(0, n)
        secs = time.perf_counter() - self._run_started
        msg = f"done in {secs:.1f} s: {len(result.rois)} kidney ROI(s), {len(result.patches)} refine patches"
        before = self._before_models
        if before is not None and before.shape == session.labels.shape:
            changed = int((before != session.fused).sum())
            ml = changed * float(np.prod(result.spacing)) / 1000.0
            msg += f"; the new models changed {changed} voxel(s), {ml:.1f} mL, of the draft"
        self._before_models = None
        if result.messages:
            msg += "; " + "; ".join(result.messages)
        self._notify(msg)
        self._update_measurements()

    # ------------------------------------------------------------------ layers
    def _set_labels_layer(self, key, data, **kwargs):
        from ..volumes import Volume

        name = LAYER_NAMES[key]
        ct = self.ct_volume
        meta = {SOURCE_KEY: Volume(array=data, geometry=ct.geometry, source=ct.source)}
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = data
            layer.metadata.update(meta)
            layer.scale, layer.translate = ct.geometry.spacing, ct.geometry.origin_zyx
            return layer
        layer = self.viewer.add_labels(data, name=name, metadata=meta, **ct.napari_kwargs(), **kwargs)
        layer.features = dict(LABEL_FEATURES)  # napari's status bar names the label under the cursor
        return layer

    @staticmethod
    def _comparison_layers(session, removed=None, focus=False) -> dict:
        """Coarse, refined, disagreement and ROI maps (computed in a worker thread); with ``focus``,
        also the voxel the view goes to after a run (see :func:`kidney_focus`)."""
        r, p = session.result, session.params
        rois = np.zeros(r.shape, np.int8)  # each ROI's refine patches, drawn as outlines
        for pt in r.patches:
            y0, x0 = max(0, int(pt["y0"])), max(0, int(pt["x0"]))
            rois[pt["z"], y0 : max(0, pt["y0"] + r.patch_px), x0 : max(0, pt["x0"] + r.patch_px)] = pt["roi"]
        coarse = r.coarse_labels(p.kidney_threshold, p.tumor_threshold)
        refined = r.refined_labels(p.kidney_threshold, p.tumor_threshold)
        return {
            "coarse": coarse,
            "refined": refined,
            "disagreement": session.disagreement_map(),
            "rois": rois,
            # what the anatomy check took out: of the fusion just made, or the session's last
            "removed": session.removed_by_anatomy() if removed is None else removed,
            # what the refine stage alone makes of the volume (coarse outside the patches): scored
            # against a reference by the measurements, computed here once per fusion
            "refine_stage": np.where(r.patch_coverage(), refined, coarse),
            "focus": kidney_focus(session.region_table()) if focus else None,
        }

    def _result_layer_steps(self, s, comparison) -> list:
        """One callable per result layer, fused (editable, on top) last."""
        colors = dict(LABEL_COLORS)

        def rois():
            layer = self._set_labels_layer(
                "rois",
                comparison["rois"],
                opacity=0.8,
                visible=False,
                colormap={None: "transparent", 0: "transparent", 1: "cyan", 2: "orange"},
            )
            layer.contour = 2

        def removed():
            layer = self._set_labels_layer("removed", comparison["removed"], opacity=0.9, colormap=colors)
            layer.contour = 1
            if self._restore_on_click not in layer.mouse_drag_callbacks:
                layer.mouse_drag_callbacks.append(self._restore_on_click)

        def organs():  # an organ-aware cascade's neighbours, as context: hidden until asked for
            layer = self._set_labels_layer(
                "organs", s.result.organs, opacity=0.35, visible=False, colormap=dict(ORGAN_COLORS)
            )
            layer.features = dict(ORGAN_FEATURES)

        def fused():
            layer = self._set_labels_layer("fused", s.labels, opacity=0.6, colormap=colors)
            self.fused_layer = layer
            self._bind_fused_layer(layer)
            # the layer must edit the session's array itself, so that edits are seen by the session
            if layer.data is not s.labels:
                s.labels = layer.data

        return [
            lambda: self._set_labels_layer("coarse", comparison["coarse"], opacity=0.5, visible=False, colormap=colors),
            lambda: self._set_labels_layer(
                "refined", comparison["refined"], opacity=0.5, visible=False, colormap=colors
            ),
            lambda: self._set_labels_layer(
                "disagreement",
                comparison["disagreement"],
                opacity=0.7,
                visible=False,
                colormap={None: "transparent", 0: "transparent", 1: "magenta"},
            ),
            rois,
            removed,
            *([organs] if s.result.organs is not None else []),
            fused,
        ]

    # ------------------------------------------------------------------ live fusion
    def _params(self):
        return (
            self.alpha.value() / 100.0,
            self.kidney_thr.value() / 100.0,
            self.tumor_thr.value() / 100.0,
            self.anatomy_check.isChecked(),
        )

    def _restore_on_click(self, layer, event):
        """A click on the *removed by anatomy check* layer (when it is the selected layer) restores
        the region under the cursor."""
        if event.type != "mouse_press" or self.session is None:
            return
        z, y, x = (int(i) for i in np.round(layer.world_to_data(event.position)).astype(int)[-3:])
        self.plan_tool(lambda s: s.plan_restore_removed_region(z, y, x), apply=True)

    def current_slice(self) -> int:
        return int(self.viewer.dims.current_step[0])

    def _on_params_changed(self, _=None):
        if self.session is None:
            return
        t0 = time.perf_counter()
        self.session.set_params(*self._params())
        z = self.current_slice()
        self.session.refuse_slice(z)  # the slice in view, at once
        self.fused_layer.refresh()
        if z in self.session.frozen_slices():
            self.status.setText(f"slice {z} is reviewed: kept as reviewed (uncheck 'Reviewed slices' to re-fuse it)")
        self.last_slider_update_ms = (time.perf_counter() - t0) * 1000.0
        self._fuse_timer.start()  # the rest of the volume, off the GUI thread, once the slider rests

    def _fuse_whole_volume(self):
        from napari.qt.threading import create_worker

        if self._fuse_worker is not None:
            self._fuse_again = True
            return
        s = self.session
        params = s.params
        result = s.result

        def job():
            fused, removed = result.fuse_and_removed(
                params.alpha, params.kidney_threshold, params.tumor_threshold, anatomy_check=params.anatomy_check
            )
            return fused, removed, self._comparison_layers(s, removed)

        def done(payload):
            fused, removed, comparison = payload
            self._fuse_worker = None
            if self.session is not s:
                return
            s.apply_fusion(fused, removed)
            self.fused_layer.refresh()
            self._comparison = comparison
            for key in ("coarse", "refined", "disagreement", "removed"):
                if LAYER_NAMES[key] in self.viewer.layers:
                    self.viewer.layers[LAYER_NAMES[key]].data = comparison[key]
            self._update_measurements()
            if self._fuse_again:
                self._fuse_again = False
                self._fuse_whole_volume()

        def failed(exc):
            self._fuse_worker = None
            self._on_error(exc)

        self._fuse_worker = create_worker(job, _connect={"returned": done, "errored": failed})

    # ------------------------------------------------------------------ tools, review, measurements
    def _bind_fused_layer(self, layer):
        """Canvas clicks, keys and edit events of the fused layer (once per layer)."""
        if layer.metadata.get("kidseg_bound"):
            return
        layer.metadata["kidseg_bound"] = True
        layer.mouse_drag_callbacks.append(self._on_canvas_click)
        layer.events.paint.connect(self._on_edited)
        for mode, key in CLICK_MODES.items():
            layer.bind_key(key, lambda _layer, mode=mode: self.click_mode.setCurrentText(mode), overwrite=True)
        layer.bind_key("Shift-V", lambda _layer: self.mark_slice_reviewed(), overwrite=True)
        # the session's history, not napari's: napari's undo would write back old fusion labels
        layer.bind_key("Control-Z", lambda _layer: self._history("undo"), overwrite=True)
        layer.bind_key("Control-Shift-Z", lambda _layer: self._history("redo"), overwrite=True)

    def _on_edited(self, event=None):
        """napari painted (brush, eraser, fill): the session records the stroke as one hand edit."""
        if self.session is not None:
            self.session.sync_edits(_painted_slices(event), seen=self.current_slice())
        self._measure_timer.start()

    def _on_keep_reviewed(self, _=None):
        if self.session is None:
            return
        self.session.set_keep_reviewed(self.keep_reviewed_check.isChecked(), self.whole_case_check.isChecked())
        self.fused_layer.refresh()
        self._measure_timer.start()

    def _cut_click(self, z: int, y: int, x: int):
        """Cut mode: the first click starts the line, the second (on the same slice) cuts."""
        start, self._cut_start = self._cut_start, None
        if start is None or start[0] != z:
            self._cut_start = (z, y, x)
            self.status.setText(f"cut on slice {z}: click where the line ends (across the join)")
            return
        slab = self.cut_slab.value()
        self.plan_tool(lambda s: s.plan_cut(z, start[1:], (y, x), slab), apply=True)

    def _on_canvas_click(self, layer, event):
        """A click on the fused labels applies the chosen click mode to the region under it."""
        mode = self.click_mode.currentText()
        if event.type != "mouse_press" or self.session is None or mode == "off" or layer.mode != "pan_zoom":
            return
        idx = np.round(layer.world_to_data(event.position)).astype(int)[-3:]
        z, y, x = (int(i) for i in idx)
        if mode == "restore removed":
            self.plan_tool(lambda s: s.plan_restore_removed_region(z, y, x), apply=True)
        elif mode == "cut":
            self._cut_click(z, y, x)
        else:
            action = _CLICK_ACTIONS[mode]
            if action == "delete" and "Shift" in getattr(event, "modifiers", ()):
                action = "delete component"
            self.plan_tool(lambda s: s.plan_region_edit(z, y, x, action), apply=True)

    def plan_tool(self, plan, apply: bool = False):
        """Compute a tool's Change in a worker (no GUI stall), then preview it, or apply it at once
        (``apply``: the click tools, which change only the region clicked)."""
        from napari.qt.threading import create_worker

        if self.session is None or self._tool_worker is not None or self._closed.is_set():
            return
        s = self.session
        self.status.setText("working...")

        def done(change):
            self._tool_worker = None
            if self.session is not s or self._closed.is_set():
                return
            if apply:
                self._apply_change(change)
            else:
                self._show_preview(change)

        def failed(exc):
            self._tool_worker = None
            self._on_error(exc)

        self._tool_worker = create_worker(plan, s, _connect={"returned": done, "errored": failed})

    def _set_preview_enabled(self, on: bool):
        self.apply_btn.setEnabled(on)
        self.discard_btn.setEnabled(on)

    def _show_preview(self, change):
        self._pending = change
        shape = self.session.labels.shape
        if not change.voxels:
            self.preview_label.setText(f"{change.name}: nothing would change ({change.summary})")
            self.status.setText(f"{change.name}: nothing to change")
            self._pending = None
            self._set_preview_enabled(False)
            return
        preview = np.zeros(shape, np.uint8)
        preview.ravel()[change.idx] = np.where(change.new > 0, change.new, change.old)
        layer = self._set_labels_layer(
            "preview",
            preview,
            opacity=1.0,
            colormap={None: "transparent", 0: "transparent", 1: "#ff8c00", 2: "#ff2020"},
        )
        layer.contour = 1
        layer.visible = True
        self.viewer.layers.selection.active = self.fused_layer
        ml = change.voxels * float(np.prod(self.session.result.spacing)) / 1000.0
        self.preview_label.setText(
            f"Preview of {change.name}: {change.summary or f'{ml:.1f} mL changes'} (outlined). Apply or discard."
        )
        self.status.setText(f"preview: {change.name}")
        self._set_preview_enabled(True)

    def apply_pending(self):
        if self._pending is not None:
            self._apply_change(self._pending)

    def discard_pending(self):
        self._pending = None
        self.preview_label.setText("")
        self._set_preview_enabled(False)
        if LAYER_NAMES["preview"] in self.viewer.layers:
            # hidden, not removed: building a labels layer again costs the GUI thread 0.2-0.5 s
            self.viewer.layers[LAYER_NAMES["preview"]].visible = False

    def _apply_change(self, change):
        """Apply a Change on the session's history (painting is recorded there too: one Undo)."""
        s = self.session
        self.discard_pending()
        if not change.voxels:
            self.status.setText(f"{change.name}: nothing to change ({change.summary})")
            return
        try:
            s.apply_change(change, seen=self.current_slice())  # the slice in view counts as reviewed
        except KidsegError as exc:
            self._notify(str(exc), error=True)
            return
        self.fused_layer.refresh()
        self.status.setText(f"{change.name}: {change.summary or f'{change.voxels} voxel(s) changed'}")
        self._measure_timer.start()

    def _history(self, which: str):
        if self.session is None:
            return
        name = getattr(self.session, which)()
        self.fused_layer.refresh()
        self.status.setText(f"{which}: {name}" if name else f"nothing to {which}")
        self._measure_timer.start()

    def mark_slice_reviewed(self):
        if self.session is None:
            return
        z = self.current_slice()
        self.reviewed_slices.add(z)
        self.status.setText(f"slice {z} marked reviewed ({len(self.session.reviewed_slices())} slice(s) reviewed)")

    def _focus_on(self, z, y, x):
        """The slice z in view, centred on voxel (y, x)."""
        step = list(self.viewer.dims.current_step)
        step[0] = z
        self.viewer.dims.current_step = tuple(step)
        sp, origin = self.ct_volume.geometry.spacing, self.ct_volume.geometry.origin_zyx
        self.viewer.camera.center = (origin[1] + y * sp[1], origin[2] + x * sp[2])

    def _goto_region(self, row, _column=None):
        rows = self._regions
        if not 0 <= row < len(rows):
            return
        self._focus_on(*rows[row]["voxel"])
        r = rows[row]
        self.status.setText(
            f"region {r['region']}: {r['label']}, {r['side']}, {r['ml']:.1f} mL, "
            f"slices {r['slices'][0]}-{r['slices'][1]}"
        )

    def set_window(self, name: str):
        ct = self.ct_combo.currentText()
        if name in WINDOW_PRESETS and ct in self.viewer.layers:
            self.viewer.layers[ct].contrast_limits = WINDOW_PRESETS[name]

    def _toggle_3d(self, on: bool):
        """3D: the fused labels as surfaces, built in a worker, with the CT and every labels layer
        hidden (napari's own 3D labels volume froze the GUI thread 20 s on a real CT; the CT as a
        block would hide them anyway); 2D: the layers as they were."""
        from napari.qt.threading import create_worker

        from ..layers import label_surfaces

        layers = self.viewer.layers
        if not on:
            for name in SURFACE_NAMES.values():
                if name in layers:
                    layers[name].visible = False
            for name, visible in self._hidden_for_3d.items():
                if name in layers:
                    layers[name].visible = visible
            self._hidden_for_3d = {}
            self.viewer.dims.ndisplay = 2
            return
        if self.session is None or self._surface_worker is not None:
            return
        self.session.sync_edits()
        labels, geo = self.session.labels.copy(), self.ct_volume.geometry
        self.status.setText("building the 3D surfaces...")
        t0 = time.perf_counter()

        def done(surfaces):
            self._surface_worker = None
            if self._closed.is_set() or not self.view3d_btn.isChecked():
                return
            from napari.layers import Labels

            ct = self.ct_combo.currentText()
            for ly in layers:
                if (isinstance(ly, Labels) or ly.name == ct) and ly.visible:
                    self._hidden_for_3d[ly.name] = True
                    ly.visible = False
            for value, name in SURFACE_NAMES.items():
                if value not in surfaces:
                    if name in layers:
                        layers[name].visible = False
                    continue
                if name in layers:
                    layers[name].data = surfaces[value]
                    layers[name].visible = True
                else:
                    colour = LABEL_COLORS[value]
                    self.viewer.add_surface(surfaces[value], name=name, colormap=_single_colour(colour), opacity=0.8)
            self.viewer.dims.ndisplay = 3
            n = sum(len(f) for _, f, _ in surfaces.values())
            self.status.setText(f"3D: {n} triangles in {time.perf_counter() - t0:.1f} s (click 3D labels again for 2D)")

        def failed(exc):
            self._surface_worker = None
            self.view3d_btn.setChecked(False)
            self._on_error(exc)

        self._surface_worker = create_worker(
            label_surfaces, labels, geo.spacing, geo.origin_zyx, _connect={"returned": done, "errored": failed}
        )

    def _orient_view(self, event=None):
        """Coronal and sagittal views with the head up: the vertical screen axis points up when it
        shows z (superior), down when it shows y (axial: anterior at the top)."""
        order = self.viewer.dims.order
        if len(order) >= 2 and self.viewer.dims.ndisplay == 2:
            vertical = order[-2]
            horizontal = self.viewer.camera.orientation2d[1]
            self.viewer.camera.orientation2d = ("up" if vertical == 0 else "down", horizontal)

    def goto_doubtful(self, by: str):
        if self.session is None:
            return
        order = self.session.doubtful_slices(by)
        if len(order) == 0:
            self.status.setText(f"no slice stands out by {by}")
            return
        attr = "_disagree_pos" if by == "disagreement" else "_uncertain_pos"
        pos = (getattr(self, attr) + 1) % len(order)
        setattr(self, attr, pos)
        z = int(order[pos])
        step = list(self.viewer.dims.current_step)
        step[0] = z
        self.viewer.dims.current_step = tuple(step)
        self.status.setText(f"slice {z}: rank {pos + 1} of {len(order)} by {by}")

    def _update_measurements(self):
        """Volumes, diameters, the region table and (with a reference layer) Dice, in a worker."""
        from napari.qt.threading import create_worker

        s = self.session
        if s is None or self._closed.is_set():
            return
        if self._measure_worker is not None:
            self._measure_again = True
            return
        ref, problem = self._reference_layer()
        labels = s.labels.copy()
        ref_data, ref_name = (None, None) if ref is None else (np.asarray(ref.data).copy(), ref.name)

        def done(payload):
            self._measure_worker = None
            if self._closed.is_set():
                return
            self._show_measurements(payload)
            if self._measure_again:
                self._measure_again = False
                self._update_measurements()

        def failed(exc):
            self._measure_worker = None
            self._on_error(exc)

        self._measure_worker = create_worker(
            self._measurement_text,
            s,
            labels,
            ref_data,
            ref_name,
            self._comparison,
            problem,
            _connect={"returned": done, "errored": failed},
        )

    def _show_measurements(self, payload):
        text, m, regions = payload
        self.measure_label.setText(text)
        self.measurements = m
        self._regions = regions
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

    @staticmethod
    def _measurement_text(s, labels, ref, ref_name, comparison, problem=None):
        from ..metrics import false_ml, kits_scores, measurements

        sp = s.result.spacing
        m = measurements(labels, sp)
        lines = [f"{'':<7}{'kidney mL':>10}{'tumor mL':>10}{'tumor mm':>10}"]
        for side in ("right", "left", "total"):
            v = m[side]
            lines.append(f"{side:<7}{v['kidney_ml']:>10.1f}{v['tumor_ml']:>10.1f}{v['tumor_diameter_mm']:>10.0f}")
        if problem:
            lines.append(problem)
        if ref is not None:
            # two narrow blocks (Dice, then false mL), not one wide table: the dock must not need a
            # horizontal scroll bar once a reference is scored
            coarse, refined = comparison["coarse"], comparison["refine_stage"]
            lines.append(f"Dice vs {ref_name[: MEASURE_COLUMNS - 8]}")
            lines.append(f"{'':<10}{'kid+tum':>8}{'tumor':>8}{'KiTS':>8}")
            false_lines = [f"{'false mL':<10}{'kidney':>8}{'tumor':>8}"]

            def score(value, present):  # both empty: nothing to score, not a perfect 1.000
                return f"{value:>8.3f}" if present else f"{'n/a':>8}"

            for name, lab in (("coarse", coarse), ("refined", refined), ("fused", s.fused), ("corrected", labels)):
                k = kits_scores(lab, ref)
                f = false_ml(lab, ref, sp)
                has_kid, has_tum = (lab > 0).any() or (ref > 0).any(), (lab == 2).any() or (ref == 2).any()
                composite = k["kits_composite"] if has_tum else k["kidney_tumor_dice"]
                lines.append(
                    f"{name:<10}{score(k['kidney_tumor_dice'], has_kid)}{score(k['tumor_dice'], has_tum)}"
                    f"{score(composite, has_kid)}"
                )
                false_lines.append(f"{name:<10}{f['false_kidney_ml']:>8.1f}{f['false_tumor_ml']:>8.1f}")
            lines += false_lines
        verdict = s.result.verdict
        if s.params.anatomy_check and verdict is not None:
            gone = verdict.removed_ml()
            lines.append(f"anatomy check removed {gone['kidney']:.1f} mL kidney, {gone['tumor']:.1f} mL tumor")
        lines.append(f"hand-edited voxels: {np.count_nonzero(s.edited)}")  # read only: the GUI thread records edits
        lines = [
            line if len(line) <= MEASURE_COLUMNS else textwrap.fill(line, MEASURE_COLUMNS, subsequent_indent="  ")
            for line in lines
        ]
        return "<pre>" + "\n".join(lines) + "</pre>", m, s.region_table()

    def _reference_layer(self):
        """The reference labels layer (any labels layer that is not ours), and a line when one is on
        another grid and cannot be scored. A reference gets its own colours, as outlines."""
        from napari.layers import Labels

        ours = set(LAYER_NAMES.values())
        problem = None
        for layer in self.viewer.layers:
            if not isinstance(layer, Labels) or layer.name in ours:
                continue
            if layer.data.shape != self.session.labels.shape:
                problem = (
                    f"reference {layer.name!r} is on another grid ({'x'.join(map(str, layer.data.shape))} "
                    f"voxels, not {'x'.join(map(str, self.session.labels.shape))}): not scored"
                )
                continue
            if not layer.metadata.get("kidseg_reference_colours"):
                layer.metadata["kidseg_reference_colours"] = True
                layer.colormap = dict(REFERENCE_COLORS)
                layer.contour = 1
            return layer, None
        return None, problem

    def _report_case(self):
        """What the Report box measures: the CT, the labels as corrected now, and what made them."""
        import dataclasses

        from ..models import read_config

        s = self.session
        if s is None:
            return None
        s.sync_edits()
        provenance = {
            stage: f"{path.name} ({read_config(path).version})"
            for stage, path in (("coarse", self.cascade.coarse_path), ("refine", self.cascade.refine_path))
        }
        provenance.update(dataclasses.asdict(s.params), hand_edited_voxels=int(s.hand_edited_voxels))
        return self.ct_volume, s.labels.copy(), provenance

    def export(self):
        """Write the CT and the corrected labels into the corrections folder, in a worker (writing
        the files took the GUI thread 2 s). The labels are taken as they are now; :attr:`last_export`
        is the case folder once written. Asks first when the scan is there already."""
        folder = self.export_edit.text().strip()
        if self.session is None:
            self._notify("nothing to export yet: run the cascade first", error=True)
            return
        if not folder:
            self._notify("choose a corrections folder first", error=True)
            return
        if self._export_worker is not None:
            return
        s = self.session
        s.sync_edits()
        kwargs = {
            "checkpoints": {"coarse": self.cascade.coarse_path, "refine": self.cascade.refine_path},
            "params": s.params,
            "hand_edited_voxels": s.hand_edited_voxels,
            "reviewed_slices": s.reviewed_slices(),
            "whole_case_reviewed": self.whole_case_check.isChecked(),
        }
        self.last_export = None
        self._start_export(Path(folder), self.ct_volume, s.labels.copy(), kwargs)

    def _start_export(self, folder, ct, labels, kwargs):
        from napari.qt.threading import create_worker

        from ..review import ScanAlreadyExported

        self.status.setText("exporting...")

        def job():
            return export_correction_with_note(folder, ct, labels, kwargs)

        def done(payload):
            self._export_worker = None
            self.last_export, note = payload
            self._notify(f"exported {self.last_export}{note}")

        def failed(exc):
            self._export_worker = None
            if self._closed.is_set():
                return
            if isinstance(exc, ScanAlreadyExported):
                choice = self.ask_about_export(exc.case_id)
                if choice == "cancel":
                    self.status.setText("export cancelled")
                else:
                    self._start_export(folder, ct, labels, {**kwargs, "update": choice == "update"})
            elif isinstance(exc, KidsegError):
                self._notify(str(exc), error=True)
            else:
                self._on_error(exc)

        self._export_worker = create_worker(job, _connect={"returned": done, "errored": failed})

    def ask_about_export(self, case_id: str) -> str:
        """Update, copy or cancel: asked when this scan is already in the corrections folder."""
        return self._ask(
            "Already exported",
            f"This scan is already exported as {case_id}. Update that case with these labels?",
            ("update", "Update it"),
            ("copy", "Save a second copy"),
        )

    # ------------------------------------------------------------------ fine-tuning
    def finetune(self):
        """Fine-tune both models (or the refine one) on the corrections folder, in a worker."""
        from napari.qt.threading import create_worker

        from .. import finetuning
        from ..models import resolve_checkpoint
        from ..training import FinetuneSettings

        folder = self.export_edit.text().strip()
        if not folder:
            self._notify("choose the corrections folder to fine-tune on", error=True)
            return
        if self._worker is not None:
            return
        try:
            parents = {
                "coarse": resolve_checkpoint(self.coarse_edit.text() or None, "coarse"),
                "refine": resolve_checkpoint(self.refine_edit.text() or None, "refine"),
            }
        except KidsegError as exc:
            self._notify(str(exc), error=True)
            return
        stages = ("refine",) if self.refine_only_check.isChecked() else finetuning.STAGES
        self._cancel.clear()
        relay, cancel = self._relay, self._cancel
        device = self.device_combo.currentText()

        def job():
            return finetuning.finetune_models(
                folder,
                FinetuneSettings(device=device),
                stages=stages,
                **parents,
                progress=lambda d, t, st: relay.progress.emit(d, t, st),
                cancel=cancel.is_set,
                log=lambda m: None,
            )

        self.run_btn.setEnabled(False)
        self.finetune_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.status.setText(f"fine-tuning the {' and '.join(stages)} model(s)...")

        def done(report):
            b, a = report["before"], report["after"]
            where = "held-out" if report["held_out"] else "corrected case(s)' held-out slabs of"
            text = f"{Path(report['folder']).name}: "
            if b and a:
                text += (
                    f"on {len(report['scored_on'])} {where} case(s), "
                    f"kidney+tumor Dice {b['kidney_tumor_dice']:.3f} -> {a['kidney_tumor_dice']:.3f}, "
                    f"tumor Dice {b['tumor_dice']:.3f} -> {a['tumor_dice']:.3f}; "
                )
            text += f"{report['seconds']['total'] / 60:.1f} min"
            for stage, stop in report.get("stopped", {}).items():
                text += f". {stage.capitalize()}: stopped at step {stop['steps']}, {stop['why']}"
            self.new_models = report["models"]
            if report["worse"]:
                text += (
                    ". The new models score WORSE than the ones in use on these cases: keeping the ones in "
                    "use. 'Use the new models anyway' switches regardless."
                )
                self.use_new_btn.setText("Use the new models anyway")
            else:
                self.use_new_btn.setText("Use the new models")
            self.finetune_label.setText(text)
            self.use_new_btn.setEnabled(True)
            self._refresh_versions()
            self._notify("fine-tuning done" + (" (the new models are worse)" if report["worse"] else ""))

        def finished():
            self._worker = None
            self.run_btn.setEnabled(True)
            self.finetune_btn.setEnabled(True)
            self.cancel_btn.setEnabled(False)

        self._worker = create_worker(job, _connect={"returned": done, "errored": self._on_error, "finished": finished})

    def use_new_models(self):
        """Switch to the fine-tuned models and re-run this case, so the difference shows at once
        (the run asks before replacing hand edits)."""
        models = self.new_models
        if not models:
            return
        self.coarse_edit.setText(models["coarse"])
        self.refine_edit.setText(models["refine"])
        self._notify(f"now using {Path(models['coarse']).parent.name}: running this case again")
        if self.session is not None:
            self._before_models = self.session.labels.copy()
            self.run()

    def _refresh_versions(self):
        from ..finetuning import model_versions

        folder = self.export_edit.text().strip()
        self.versions_combo.clear()
        self._versions = model_versions(folder) if folder and Path(folder).is_dir() else []
        for v in self._versions:
            after = v.get("after")
            where = "held-out" if v.get("held_out") else "training cases'"
            note = f" ({where} kidney+tumor {after['kidney_tumor_dice']:.3f})" if after else ""
            self.versions_combo.addItem(v["name"] + (" - worse than its parent" if v["worse"] else "") + note)

    def _pick_version(self, index: int):
        v = self._versions[index] if 0 <= index < len(self._versions) else None
        if v is None:
            return
        bundled = v["name"] == "bundled"
        self.coarse_edit.setText("" if bundled else v["coarse"])
        self.refine_edit.setText("" if bundled else v["refine"])
        self.status.setText(f"models: {v['name']}; press Run to use them")


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
