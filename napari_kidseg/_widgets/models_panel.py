"""The Input and models box of the Kidney cascade widget: the CT layer (and opening a CT), the
checkpoints, the device.

Knows the viewer's layers and callables handed in; never the dock. A CT is read in a worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QPushButton

from . import result_layers
from ._controls import Hooks, check_row, path_row
from ._workers import LatestRequest
from .result_layers import LAYER_NAMES, SURFACE_NAMES, remove_layers


class ModelsPanel(QGroupBox):
    """``hooks``: see _controls.Hooks; ``busy()`` says whether a run is going (``cancel()`` stops
    it), ``ask_new_ct(name,
    n_edited)`` asks whether a CT opened over the case replaces it ("replace"), ``close_case()``
    closes the case shown (its layers are removed here)."""

    def __init__(self, hooks: Hooks, busy, cancel, ask_new_ct, close_case: Callable, parent=None):
        super().__init__("Input and models", parent)
        self.viewer, self._hooks = hooks.viewer, hooks
        self._busy, self._cancel, self._ask_new_ct, self._close_case = busy, cancel, ask_new_ct, close_case
        self._opening = LatestRequest(hooks.failed, hooks.closed)
        # the closed case's layers still being removed (hidden, one per turn): Run and the worklist's
        # Next wait, since a result put in now would go into those layers (found by name) and go with them
        self._closing = []
        self._models_key = None  # which models the loaded cascade holds
        form = QFormLayout(self)
        self.ct_combo = QComboBox()
        self.ct_combo.setToolTip("The 3D image layer to segment (a CT in HU)")
        self.open_btn = QPushButton("Open...")
        self.open_btn.setToolTip(
            "Open a CT (file, DICOM folder or KiTS case with its reference) read in the background; "
            "napari's File > Open and drag and drop come here too while this dock is open"
        )
        self.open_btn.clicked.connect(lambda: self.open_ct())
        crow = QHBoxLayout()
        crow.addWidget(self.ct_combo, 1)
        crow.addWidget(self.open_btn)
        form.addRow("CT layer", crow)
        self.coarse_edit, row = path_row(self, "bundled coarse model")
        form.addRow("Coarse model", row)
        self.refine_edit, row = path_row(self, "bundled refine model")
        form.addRow("Refine model", row)
        self.device_combo = QComboBox()
        self.device_combo.setToolTip("Where the networks run: auto takes a GPU when there is one")
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.device_label = QLabel("")
        drow = QHBoxLayout()
        drow.addWidget(self.device_combo)
        drow.addWidget(self.device_label)
        form.addRow("Device", drow)
        self.mirror_check = check_row(
            form,
            "Mirror",
            "average with the mirror image (2x time)",
            "Runs every slice and patch again mirrored left-right and averages the two "
            "answers. Off by default: on phantoms it was not clearly better.",
        )
        self.smooth_check = check_row(
            form,
            "Noise",
            "smooth a CT noisier than the training CTs",
            "A CT whose noise is above the 18 HU the networks were trained on is smoothed in-plane "
            "first, and the status line says so. Off by default: on 27 real tumor slices it found more "
            "tumor (Dice 0.07 -> 0.15), on the shared real CT the kidneys fell 0.85 -> 0.84.",
        )

    def choice(self) -> tuple:
        """``(coarse, refine, device)``: the checkpoints named (None: the bundled one), the device."""
        return (self.coarse_edit.text() or None, self.refine_edit.text() or None, self.device_combo.currentText())

    def set_choice(self, coarse=None, refine=None, device: str | None = None):
        self.coarse_edit.setText("" if coarse is None else str(coarse))
        self.refine_edit.setText("" if refine is None else str(refine))
        if device is not None:
            self.device_combo.setCurrentText(device)

    def models_changed(self) -> bool:
        """Whether the models chosen differ from the ones of the last call (the cascade to reload)."""
        want = self.choice()
        changed = self._models_key != want
        self._models_key = want
        return changed

    def refresh_layers(self):
        """The CT list follows the viewer's 3D grayscale image layers, the choice kept where it can."""
        from napari.layers import Image

        current = self.ct_combo.currentText()
        self.ct_combo.clear()
        names = [ly.name for ly in self.viewer.layers if isinstance(ly, Image) and ly.ndim == 3 and not ly.rgb]
        self.ct_combo.addItems(names)
        if current in names:
            self.ct_combo.setCurrentText(current)
        return current

    def select_ct(self, name: str) -> bool:
        """Make the 3D image layer ``name`` the CT to segment (also one renamed or just added);
        False when there is no such layer."""
        self.refresh_layers()
        if self.ct_combo.findText(name) < 0:
            return False
        self.ct_combo.setCurrentText(name)
        return True

    @property
    def opening(self) -> bool:
        """A CT is being read or added, or the case it replaces is still being closed."""
        return self._opening.busy or bool(self._closing)

    def open_ct(self, path=None):
        """Read a CT (a file, a DICOM series folder, or a KiTS case folder with its reference labels)
        in a worker and add its layers as the CT to segment; over a shown case, asked first (kept:
        no layer is built or removed on the GUI thread)."""
        from .._napari_io import read_layers
        from ..io.volumes import KITS_IMAGE

        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "A CT (a DICOM series: any of its files)")
            if not path:
                return
            p = Path(path)
            if p.suffix.lower() == ".dcm" or p.name == KITS_IMAGE:  # the series, or the case with its reference
                path = str(p.parent)
        if self.opening:  # a file still being read or added, or the case it replaced still being closed
            self._hooks.notify(f"still opening the last file: {Path(path).name} was not opened", error=True)
            return
        self._hooks.say(f"opening {Path(path).name}...")

        def read_and_build(path):
            layer_data = read_layers(path)
            return result_layers.built_layers(layer_data) if layer_data else None

        def done(layers):
            try:
                show(layers)
            except Exception as exc:  # noqa: BLE001 - said, and Open stays usable
                self._opening_failed(exc)

        def show(layers):
            from napari.layers import Image

            h, release = self._hooks, self._opening.release
            if not layers:  # read_layers said why (a warning notification)
                release()
                h.notify(f"could not open {path}", error=True)
                return
            if not isinstance(layers[0], Image):  # a labels file (a reference): added beside the case, nothing asked
                self.viewer.add_layer(layers[0])
                release()
                h.say(f"{layers[0].name} added")
                return
            if self._busy():  # a run (the first one has no session yet) keeps its CT
                release()
                h.notify(f"a run is going: {Path(path).name} was not opened", error=True)
                return
            session = h.session()
            if session is not None:  # asked before its layers are added (kept: none is added, none removed)
                session.sync_edits()
                if self._ask_new_ct(layers[0].name, int(session.hand_edited_voxels)) != "replace":
                    release()
                    h.notify(f"{layers[0].name!r} not opened: this case stays")
                    return
            closing = self._close_shown_case(list(self.viewer.layers)) if session is not None else []

            def opened():
                release()
                self.select_ct(layers[0].name)
                self.viewer.reset_view()
                h.say(f"{layers[0].name} opened: press Run")

            # the closed case's layers go one per turn (hidden at once), then each new one is added
            # in a turn of its own
            first = [*closing, self._closed_case] if closing else []
            QTimer.singleShot(
                0,
                lambda: result_layers.add_one_per_turn(
                    self.viewer, layers, opened, h.closed, self._opening_failed, first=first
                ),
            )

        self._opening.start(read_and_build, str(path), done=done, failed=self._opening_failed, keep=True)

    def _opening_failed(self, exc):
        self._opening.release()
        try:
            self._closed_case()
        finally:
            self._hooks.failed(exc)

    def watch_layers(self):
        """Follow the viewer's layers: the CT list, a CT deleted during a run, a reference labels
        layer, a second CT."""
        self.viewer.layers.events.inserted.connect(self._on_layers_changed)
        self.viewer.layers.events.inserted.connect(self._on_layer_added)
        self.viewer.layers.events.removed.connect(self._on_layers_changed)
        self.refresh_layers()

    def _on_layers_changed(self, event=None):
        current = self.refresh_layers()
        if self._busy() and event is not None and getattr(event, "type", "") == "removed":
            removed = getattr(event, "value", None)
            if removed is not None and removed.name == current:
                self._cancel()
                # napari also removes every layer when the viewer closes; by the next event-loop
                # turn a closing viewer has destroyed this widget, and then nobody needs telling
                closed, message = self._hooks.closed, f"layer {current!r} was deleted: run cancelled"
                QTimer.singleShot(0, lambda: None if closed() else self._hooks.notify(message, error=True))

    def _on_layer_added(self, event):
        """A reference labels layer leaves the fused layer selected (click tools keep working) and
        is scored at once; a second CT opened over a case is asked about, never left on top of the
        results (see :meth:`ask_about_new_ct`)."""
        from napari.layers import Image, Labels

        layer = getattr(event, "value", None)
        h = self._hooks
        if h.session() is None or h.closed() or layer is None or layer.name in LAYER_NAMES.values():
            return
        if isinstance(layer, Labels):
            fused = h.fused()
            # napari selects a new layer after its inserted event: the selection is given back after that
            QTimer.singleShot(0, lambda: self._reselect(fused))
            h.edited()
        elif isinstance(layer, Image) and layer.ndim == 3 and not layer.rgb:
            before = [ly for ly in self.viewer.layers if ly is not layer]
            QTimer.singleShot(0, lambda: self._second_ct(layer, before))

    def _reselect(self, layer):
        if not self._hooks.closed() and layer is not None and layer in self.viewer.layers:
            self.viewer.layers.selection.active = layer

    def _second_ct(self, layer, before):
        """A CT opened over a shown case (File > Open, drag and drop): the new case replaces this
        one, or it is closed again; it never sits above the results hiding them. The worklist's
        CT is selected as the case when it arrives, and is not asked about."""
        h = self._hooks
        session = h.session()
        if h.closed() or session is None or layer not in self.viewer.layers:
            return
        if layer.name == self.ct_combo.currentText():
            return
        if self._busy():
            self.viewer.layers.move(self.viewer.layers.index(layer), 0)  # below the results
            h.notify(f"a run is going: {layer.name!r} was put below the results", error=True)
            return
        session.sync_edits()
        if self._ask_new_ct(layer.name, int(session.hand_edited_voxels)) != "replace":
            came_with = [ly for ly in self.viewer.layers if ly not in before]  # e.g. its reference labels
            remove_layers(self.viewer, came_with)
            h.notify(f"{layer.name!r} closed: this case stays")
            return
        closing = self._close_shown_case(before)
        self.select_ct(layer.name)

        def shown():
            self._closed_case()
            self.viewer.reset_view()
            h.notify(f"{layer.name!r} is the case now: press Run")

        def failed(exc):
            try:
                self._closed_case()
            finally:
                h.failed(exc)

        result_layers.one_per_turn(closing, shown, h.closed, failed)

    def _close_shown_case(self, before) -> list:
        """The case shown is closed now: its CT, results and reference labels (of the layers
        ``before``) hidden at once; the steps that remove them (:func:`result_layers.removal_steps`)."""
        from napari.layers import Labels

        ours = {*LAYER_NAMES.values(), *SURFACE_NAMES.values(), self.ct_combo.currentText()}
        gone = [ly for ly in before if ly in self.viewer.layers and (ly.name in ours or isinstance(ly, Labels))]
        steps = result_layers.removal_steps(self.viewer, gone)  # hidden first: leaving 3D then slices none
        self._close_case()
        self._closing = gone
        return steps

    def _closed_case(self):
        """The closed case's layers are gone: those a failed step left are removed now, in one
        batch, else one by one (a layer that cannot be removed does not keep the others)."""
        left, self._closing = [ly for ly in self._closing if ly in self.viewer.layers], []
        if not left or self._hooks.closed():
            return
        try:
            result_layers.remove_layers(self.viewer, left)
        except Exception:  # noqa: BLE001 - the step's own error is the one reported
            for ly in left:
                with contextlib.suppress(Exception):
                    if ly in self.viewer.layers:
                        self.viewer.layers.remove(ly)
