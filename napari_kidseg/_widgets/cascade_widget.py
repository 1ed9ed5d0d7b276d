"""The Kidney cascade dock widget: run, compare, tune live, correct, measure, export.

GUI only: every number comes from the core (cascade, review, metrics, display). The dock is the
composition of its boxes (models_panel, run_panel, fusion_panel, corrections_panel, review_panel,
report_panel, export_panel: each gets callables, _controls.Hooks, and none imports the dock) and
the wiring of a case through them: a run, or a result made elsewhere (a worklist's draft), shown
layer by layer. Its public face (below) is what the worklist, tests, benchmarks and scripts use.
Qt is imported through qtpy, so PyQt5 (the default) and PyQt6 both work.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QScrollArea, QVBoxLayout, QWidget

from .._napari_io import register_background_opener
from ..errors import KidsegError
from ..layers import CT_WINDOW
from . import result_layers
from ._controls import Hooks, ask
from ._workers import start_heavy_imports, wait_for_heavy_imports
from .corrections_panel import CLICK_MODES, WINDOW_KEYS, CorrectionsPanel
from .export_panel import ExportPanel
from .fusion_panel import FusionPanel
from .models_panel import ModelsPanel
from .report_panel import ReportPanel, report_case
from .result_layers import LAYER_NAMES, unproxied
from .review_panel import ReviewPanel
from .run_panel import RunPanel

__all__ = ["CLICK_MODES", "LAYER_NAMES", "WINDOW_KEYS", "CascadeWidget"]

HEAVY_IMPORTS_AFTER_MS = 500  # torch imported in the background this long after the dock is built

# the controls of the boxes that the dock's public face names as its own (w.alpha, w.export_btn, ...)
_FACE = {
    "run_box": "run_btn cancel_btn progress status cancel",
    "models_box": "ct_combo open_btn coarse_edit refine_edit device_combo device_label mirror_check smooth_check",
    "fusion_box": "alpha kidney_thr tumor_thr anatomy_check contrast_tumor keep_reviewed_check",
    "corrections_box": "click_mode cut_slab island_ml islands_btn largest_btn holes_btn interp_from interp_to "
    "interp_btn apply_btn discard_btn reviewed_btn undo_btn redo_btn plan_tool apply_pending discard_pending "
    "mark_slice_reviewed",
    "review_box": "measure_label region_table window_combo view3d_btn next_disagree_btn next_uncertain_btn "
    "goto_doubtful set_window update_measurements",
    "export_box": "export_edit whole_case_check export_btn finetune_btn refine_only_check use_new_btn "
    "versions_combo finetune_label export finetune use_new_models",
}


class CascadeWidget(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        # torch and the model zoo take seconds to import (4.9 s measured): in the background, once
        # the dock is on screen (started here, the import held the interpreter lock while Qt laid
        # the dock out); a run's worker waits for it. (Importing triton in a thread once Qt runs
        # segfaulted; _widgets/__init__ keeps triton from loading, which the plugin never uses.)
        QTimer.singleShot(HEAVY_IMPORTS_AFTER_MS, start_heavy_imports)
        self.viewer = napari_viewer
        self.session = None
        self.ct_volume = None
        self.cascade = None
        self._cancel = threading.Event()
        self._closed = threading.Event()  # set when Qt destroys this widget (viewer closed)
        self._layer_steps = []  # result layers still to add, one per event-loop turn
        self._comparison = None  # coarse/refined/disagreement maps of the latest fusion
        self.fused_layer = None  # the editable fused labels layer, once a run has shown it
        self._carried_edits = None  # hand edits carried into a re-run with other models
        self._before_models = None  # labels before 'Use the new models', for the changed-voxel count
        self._run_started = 0.0  # for the run's time
        self._restore_reviewed = set()  # reviewed slices of a result shown by show_prepared
        self._build()
        self._wire()

    def _build(self):
        # everything in a scroll area: the widget stays usable on a laptop screen
        root = QVBoxLayout(self)
        root.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        inner = QWidget()
        scroll.setWidget(inner)
        root.addWidget(scroll)
        outer = QVBoxLayout(inner)
        self.run_box = RunPanel(self._cancel, self._closed.is_set)
        self._notify = self.run_box.notify
        hooks = Hooks(
            self.viewer,
            session=lambda: self.session,
            ct=lambda: self.ct_volume,
            fused=lambda: self.fused_layer,
            say=self.run_box.say,
            notify=self.run_box.notify,
            failed=self.run_box.failed,
            closed=self._closed.is_set,
            edited=lambda: self.review_box.measure_timer.start(),
            changed=lambda: self.review_box.update_measurements(),
        )
        self.models_box = ModelsPanel(
            hooks,
            lambda: self.busy,
            self.run_box.cancel,
            lambda name, n: self.ask_about_new_ct(name, n),
            self._close_case,
        )
        self._run = self.run_box.job  # a run, a fine-tune, or a result being shown
        self.fusion_box = FusionPanel(hooks, lambda: self.export_box.whole_case_check.isChecked(), self._refused)
        self.corrections_box = CorrectionsPanel(hooks)
        self.review_box = ReviewPanel(hooks, lambda: self.ct_combo.currentText(), lambda: self._comparison)
        self.report_panel = ReportPanel(lambda: report_case(self.ct_volume, self.cascade, self.session), hooks.notify)
        self.export_box = ExportPanel(
            hooks,
            lambda: self.cascade,
            self.models_box.choice,
            lambda coarse, refine: self.models_box.set_choice(coarse, refine),
            lambda job, done: self.run_box.start(
                job, self.run_box.progress_callback(), self._cancel.is_set, done=done, also=[self.finetune_btn]
            ),
            self._rerun_with_new_models,
            lambda case_id: self.ask_about_export(case_id),
        )
        for box in (self.models_box, self.run_box, self.fusion_box, self.corrections_box, self.review_box):
            outer.addWidget(box)
        outer.addWidget(self.report_panel)
        outer.addWidget(self.export_box)
        outer.addStretch(1)
        for box, names in _FACE.items():
            for name in names.split():
                setattr(self, name, getattr(getattr(self, box), name))
        self._review_buttons = [
            *self.corrections_box.review_buttons,
            *self.review_box.review_buttons,
            self.export_btn,
            self.report_panel.make_btn,
        ]
        self._set_review_enabled(False)

    def _wire(self):
        self.run_btn.clicked.connect(self.run)
        self.whole_case_check.toggled.connect(self.fusion_box.apply_keep_reviewed)
        # closing the viewer destroys this widget: stop any run, and let the worker's late signals
        # find a closed widget instead of deleted Qt objects (the lambda holds only the Events)
        self.destroyed.connect(lambda *_, cancel=self._cancel, closed=self._closed: (closed.set(), cancel.set()))
        self.models_box.watch_layers()
        register_background_opener(self._open_from_napari)
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
        return self._run.busy

    @property
    def pending_work(self) -> frozenset:
        """What is still going on: "run" (see :attr:`busy`), "layers" (result layers still being
        added), "fusion" (the volume following the sliders), "measurements" (the Review box), "tool"
        (a correction tool being planned), "export", "3D" (the 3D surfaces being built or shown, or
        the 2D view's layers shown again) and "open" (a CT being read)."""
        work = {
            "run": self._run.busy,
            "layers": bool(self._layer_steps),
            "fusion": self.fusion_box.fusing,
            "measurements": self.review_box.measuring,
            "tool": self.corrections_box.planning,
            "export": self.export_box.exporting,
            "3D": self.review_box.building_3d,
            "open": self.models_box.opening,
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
        return self.models_box.choice()

    def set_models(self, coarse=None, refine=None, device: str | None = None):
        """Name the checkpoints (None: the bundled ones) and optionally the device for the next run."""
        self.models_box.set_choice(coarse, refine, device)

    @property
    def export_folder(self) -> str:
        """The corrections folder (exports and fine-tuned models); "" when none is chosen."""
        return self.export_box.folder

    @export_folder.setter
    def export_folder(self, folder):
        self.export_edit.setText(str(folder))
        self.export_box.refresh_versions()

    @property
    def last_export(self):
        """The case folder the latest export wrote (None until it is written)."""
        return self.export_box.last_export

    @property
    def measurements(self):
        """The Review box's latest volumes and diameters."""
        return self.review_box.measurements

    @property
    def reviewed_slices(self) -> set:
        """The slices marked reviewed (the session's own set)."""
        return self.session.reviewed if self.session is not None else set()

    def open_ct(self, path=None):
        """Read a CT (a file, a DICOM series folder, or a KiTS case folder with its reference labels)
        in a worker and add its layers; the CT becomes the one to segment (over a shown case, it is
        asked about first, see :meth:`ask_about_new_ct`). :attr:`pending_work` holds "open" meanwhile."""
        self.models_box.open_ct(path)

    def _open_from_napari(self, path) -> bool:
        """napari's File > Open or drag and drop, handed over by the plugin's reader: read in a
        worker like the dock's Open. False (napari then reads it itself, as without the dock): the
        dock is closed or taken off the window (napari's x keeps the widget alive, parentless), or
        it is reading another file (several files dropped at once: the CT and its reference), or
        its viewer is not the current one (napari does not say which viewer a read is for)."""
        import napari

        if self.closed or unproxied(napari.current_viewer()) is not unproxied(self.viewer):
            return False
        window = self.window()
        if window is self or not window.isVisible() or self.models_box.opening:
            return False
        self.models_box.open_ct(path)
        return True

    def select_ct(self, name: str) -> bool:
        """Make the 3D image layer ``name`` the CT to segment (also one renamed or just added);
        False when there is no such layer."""
        return self.models_box.select_ct(name)

    @property
    def last_slider_update_ms(self):
        """How long the latest slider move took the GUI thread (the slice in view re-fused), in ms."""
        return self.fusion_box.last_slider_update_ms

    @property
    def pending_change(self):
        """The previewed change waiting for Apply or Discard (a review.Change), or None."""
        return self.corrections_box.pending

    def click_at(self, position, modifiers=()):
        """What a click on the fused labels at this world position does in the chosen click mode,
        the layer in pan/zoom mode (the canvas click without a mouse: scripts and tests)."""
        if self.fused_layer is not None:
            press = SimpleNamespace(type="mouse_press", position=tuple(position), modifiers=tuple(modifiers))
            self.corrections_box.on_canvas_click(self.fused_layer, press)

    def ask_about_new_ct(self, name: str, n_edited: int) -> str:
        """Replace or keep: asked when another CT is opened while a case is shown."""
        edits = f" Its {n_edited} hand-edited voxel(s) go unless exported." if n_edited else ""
        return ask(
            self,
            "Another CT",
            f"{name!r} was opened while a case is shown. Make it the case? The results of this one are closed." + edits,
            ("keep", f"Keep this case (close {name!r})"),
            ("replace", "Make it the case"),
        )

    def ask_about_edits(self, n_voxels: int) -> str:
        """Keep, discard or cancel: asked before a run would replace hand-edited labels."""
        return ask(
            self,
            "Hand edits",
            f"{n_voxels} voxel(s) were corrected by hand. Running again replaces the labels.",
            ("keep", "Keep my edits"),
            ("discard", "Discard them"),
        )

    def ask_about_export(self, case_id: str) -> str:
        """Update, copy or cancel: asked when this scan is already in the corrections folder."""
        return ask(
            self,
            "Already exported",
            f"This scan is already exported as {case_id}. Update that case with these labels?",
            ("update", "Update it"),
            ("copy", "Save a second copy"),
        )

    def _set_review_enabled(self, on: bool):
        for b in self._review_buttons:
            b.setEnabled(on)

    def _close_case(self):
        """Another CT became the case: this one's results and review state go."""
        self.review_box.clear()
        self.discard_pending()
        self.session = self.fused_layer = self.ct_volume = self._comparison = None
        self._set_review_enabled(False)

    # ------------------------------------------------------------------ run
    def run(self):
        from ..review.display import carried_edits

        if self._run.busy:
            return
        if self.models_box.opening:  # its CT and reference are still being added
            self._notify("a CT is still being opened: press Run once it is in", error=True)
            return
        try:
            ct = result_layers.ct_from_layer(self.viewer, self.ct_combo.currentText())
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
                self._carried_edits = carried_edits(self.session)
        self.discard_pending()
        self.ct_volume = ct
        self.progress.setValue(0)
        self.status.setText("loading the models...")
        progress, cancel = self.run_box.progress_callback(), self._cancel
        reload = self.cascade is None or self.models_box.models_changed()
        paths = self.models_box.choice()
        params = self.fusion_box.params()
        mirror, smooth = self.mirror_check.isChecked(), self.smooth_check.isChecked()
        old = self.cascade

        def job():
            # everything slow happens here, off the GUI thread: loading, inference, first fusion
            wait_for_heavy_imports()
            from ..cascade import Cascade
            from ..review.display import review_of

            cascade = Cascade(*paths[:2], device=paths[2]) if reload else old
            run = {"progress": progress, "cancel": cancel.is_set, "mirror": mirror, "smooth_noise": smooth}
            result = cascade.run(ct.array, ct.geometry.spacing, **run)
            return cascade, *review_of(result, params)

        self._run_started = time.perf_counter()
        self.run_box.start(job, done=self._on_result, finished=self._on_finished)

    @property
    def fusion_params(self) -> tuple:
        """The fusion's values now: ``(alpha, kidney threshold, tumor threshold, anatomy check)``."""
        return self.fusion_box.params()

    def prepare_result(self, result, labels=None, params=None):
        """Off the GUI thread: the review session of a result made elsewhere (a worklist's draft),
        with the labels as corrected so far, and its comparison maps, fused at ``params`` (read on
        the GUI thread: :attr:`fusion_params`; default: the sliders now). Pass both to
        :meth:`show_prepared` on the GUI thread."""
        from ..review.display import review_of

        return review_of(result, params if params is not None else self.fusion_box.params(), labels)

    def show_prepared(self, ct_volume, cascade, session, comparison, reviewed=()):
        """Show a prepared result as if this widget had run it: the same layers, review tools and
        export. The CT must already be a layer (selected in the CT box)."""
        if self._run.busy:
            raise KidsegError("the widget is busy (a run is going): wait for it or cancel it")
        if self.models_box.opening:  # a result put in now would land in the closing case's layers
            raise KidsegError("the widget is opening a CT: wait for it")
        self.discard_pending()
        self.ct_volume = ct_volume
        self._carried_edits = None
        self._restore_reviewed = set(reviewed)
        self._run_started = time.perf_counter()
        self._run.hold()  # Run waits until the layers are in
        self._on_result((cascade, session, comparison))

    def _on_finished(self):
        if self._closed.is_set() or not self._layer_steps:  # else the run ends when its last layer is in
            self.run_box.end()

    def _on_result(self, payload):
        if self._closed.is_set():
            return
        cascade, session, comparison = payload
        self.device_label.setText(f"using {cascade.device}")
        self.status.setText("adding the result layers...")
        # napari builds a labels layer's visuals on the GUI thread (about 0.3-0.6 s each under
        # software OpenGL): one layer per event-loop turn keeps the viewer responsive in between
        restore, ct = self.corrections_box.restore_on_click, self.ct_volume
        keyed = result_layers.result_layer_steps(self.viewer, ct, session, comparison, restore, self._fused_shown)
        # the layers there already (a re-run, a worklist's next case): only their data changes, in
        # one turn with one dims update (not three per layer)
        steps = result_layers.swap_steps(self.viewer, keyed) or [step for _, step in keyed]
        self._layer_steps = steps
        self._layer_steps.append(lambda: self._result_shown(cascade, session, comparison))
        QTimer.singleShot(0, self._add_next_layer)

    def _fused_shown(self, layer):
        self.fused_layer = layer
        self.corrections_box.bind_fused_layer(layer)

    def _add_next_layer(self):
        if self._closed.is_set() or not self._layer_steps:
            return
        try:
            self._layer_steps.pop(0)()
        except Exception as exc:  # noqa: BLE001 - e.g. the viewer changed under us: say so, and free the Run button
            self._layer_steps.clear()
            self.run_box.end()
            self._notify(f"could not show the result: {type(exc).__name__}: {exc}", error=True)
            return
        if self._layer_steps:
            QTimer.singleShot(0, self._add_next_layer)
        else:
            self.run_box.end()

    def _result_shown(self, cascade, session, comparison):
        from ..review.display import changed_voxels

        self.cascade, self.session, self._comparison = cascade, session, comparison
        session.reviewed.update(self._restore_reviewed)  # the widget marks slices in the session's own set
        self._restore_reviewed = set()
        self.fusion_box.apply_keep_reviewed()
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
            result_layers.focus_on(self.viewer, self.ct_volume, *focus)
        name = self.ct_combo.currentText()
        if name in self.viewer.layers and tuple(self.viewer.layers[name].contrast_limits) != tuple(CT_WINDOW):
            self.viewer.layers[name].contrast_limits = CT_WINDOW  # (set again, it redraws the CT)
        self.viewer.layers.selection.active = self.fused_layer
        self._set_review_enabled(True)
        self.corrections_box.set_slice_range(result.shape[0] - 1)
        secs = time.perf_counter() - self._run_started
        msg = f"done in {secs:.1f} s: {len(result.rois)} kidney ROI(s), {len(result.patches)} refine patches"
        changed = changed_voxels(self._before_models, session.fused, result.spacing)
        if changed is not None:
            msg += f"; the new models changed {changed[0]} voxel(s), {changed[1]:.1f} mL, of the draft"
        self._before_models = None
        if result.messages:
            msg += "; " + "; ".join(result.messages)
        self._notify(msg)
        self.update_measurements()

    def _refused(self, comparison):
        """The whole volume was fused again: the comparison layers and the Review box follow."""
        self._comparison = comparison
        result_layers.update_comparison(self.viewer, comparison)
        self.update_measurements()

    def _rerun_with_new_models(self):
        """After 'Use the new models': this case again, and how many voxels the new models changed."""
        if self.session is not None:
            self._before_models = self.session.labels.copy()
            self.run()
