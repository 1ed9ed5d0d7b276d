"""The Fusion (live) box of the Kidney cascade widget: alpha, the thresholds, the anatomy check,
and the live fusion they drive (the slice in view at once, the volume in a worker).

Knows the review session and the fused layer only through callables handed in; never the dock.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import QFormLayout, QGroupBox

from ..fusion import DEFAULT_ALPHA, DEFAULT_CONTRAST_TUMOR, DEFAULT_KIDNEY_THRESHOLD, DEFAULT_TUMOR_THRESHOLD
from . import result_layers
from ._controls import Hooks, check_row, slider
from ._workers import LatestRequest


class FusionPanel(QGroupBox):
    """``hooks``: see _controls.Hooks; ``whole_case()`` says whether the whole case is marked
    reviewed; ``refused(comparison)`` gets the comparison maps of each whole-volume fusion."""

    changed = Signal()  # a slider or the anatomy check moved (after the slice in view is re-fused)

    def __init__(self, hooks: Hooks, whole_case: Callable, refused: Callable):
        super().__init__("Fusion (live)")
        self.viewer = hooks.viewer
        self._session, self._fused, self._say, self._edited = hooks.session, hooks.fused, hooks.say, hooks.edited
        self._whole_case, self._refused = whole_case, refused
        self._fusion = LatestRequest(hooks.failed, hooks.closed)
        self.last_slider_update_ms = None  # the slice in view re-fused after the latest move
        form = QFormLayout(self)
        self.alpha = slider(form, "alpha (coarse weight)", DEFAULT_ALPHA)
        self.kidney_thr = slider(form, "kidney threshold", DEFAULT_KIDNEY_THRESHOLD)
        self.tumor_thr = slider(form, "tumor threshold", DEFAULT_TUMOR_THRESHOLD)
        self.anatomy_check = check_row(
            form,
            "Anatomy check",
            "remove what cannot be kidney or kidney tumor",
            "Regions on the wrong side of the spine's front edge or off the kidneys' usual place, a second "
            "region far from a side's kidney, regions too small for a kidney, and tumor that touches no kidney "
            "are removed. They are outlined in the 'removed by anatomy check' layer: select that layer and "
            "click a region to restore it. Tumor regions under 0.5 mL (about 1 cm across) are left as kidney.",
            checked=True,
        )
        self.contrast_tumor = check_row(
            form,
            "Tumor by contrast",
            "hypoenhancing kidney parts become tumor",
            "After fusion and the anatomy check, the parts of a kidney region at least 40 HU darker than the "
            "kidneys' enhanced tissue (and above 20 HU, at least 6 mm across, "
            "300 mm\N{SUPERSCRIPT TWO} on the slice, 2 mL in all) become tumor. Only where the kidney is "
            "contrast-enhanced (100 HU or more). The bundled networks call most real tumors kidney; this rule "
            "finds more of them (weights/README.md).",
            checked=DEFAULT_CONTRAST_TUMOR,
        )
        self.keep_reviewed_check = check_row(
            form,
            "Reviewed slices",
            "sliders leave reviewed slices as they are",
            "Slices you marked reviewed or edited keep the fusion you reviewed them on ('whole case reviewed': "
            "every slice). Uncheck to let the sliders re-fuse them too; your edits stay either way.",
            checked=True,
        )
        self._fuse_timer = QTimer(self)
        self._fuse_timer.setSingleShot(True)
        self._fuse_timer.setInterval(150)
        self._fuse_timer.timeout.connect(self._fuse_whole_volume)
        for s in (self.alpha, self.kidney_thr, self.tumor_thr):
            s.valueChanged.connect(self._on_params_changed)
        self.anatomy_check.toggled.connect(self._on_params_changed)
        self.contrast_tumor.toggled.connect(self._on_params_changed)
        self.keep_reviewed_check.toggled.connect(self.apply_keep_reviewed)

    def params(self) -> tuple:
        """``(alpha, kidney threshold, tumor threshold, anatomy check, tumor by contrast)``, the fields
        of FusionParams."""
        return (
            self.alpha.value() / 100.0,
            self.kidney_thr.value() / 100.0,
            self.tumor_thr.value() / 100.0,
            self.anatomy_check.isChecked(),
            self.contrast_tumor.isChecked(),
        )

    @property
    def fusing(self) -> bool:
        """The volume is being fused again (or will be, once the slider rests)."""
        return self._fusion.busy or self._fuse_timer.isActive()

    def _on_params_changed(self, _=None):
        session = self._session()
        if session is None:
            return
        t0 = time.perf_counter()
        session.set_params(*self.params())
        z = result_layers.current_slice(self.viewer)
        session.refuse_slice(z)  # the slice in view, at once
        self._fused().refresh()
        if z in session.frozen_slices():
            self._say(f"slice {z} is reviewed: kept as reviewed (uncheck 'Reviewed slices' to re-fuse it)")
        self.last_slider_update_ms = (time.perf_counter() - t0) * 1000.0
        self._fuse_timer.start()  # the rest of the volume, off the GUI thread, once the slider rests
        self.changed.emit()

    def _fuse_whole_volume(self):
        self._fusion.request(self._fusion_job)

    def _fusion_job(self):
        """The whole volume fused at the sliders' values (the latest request: see _workers)."""
        from ..review.display import comparison_maps

        s = self._session()
        if s is None:
            return None
        params, result = s.params, s.result

        def job():
            fused, removed = result.fuse_and_removed(**dataclasses.asdict(params))
            return fused, removed, comparison_maps(s, removed)

        def done(payload):
            fused, removed, comparison = payload
            if self._session() is not s:
                return
            s.apply_fusion(fused, removed)
            self._fused().refresh()
            self._refused(comparison)

        return job, done

    def apply_keep_reviewed(self, _=None):
        """Whether the sliders leave reviewed slices (or the whole case) as they are."""
        session = self._session()
        if session is None:
            return
        session.set_keep_reviewed(self.keep_reviewed_check.isChecked(), self._whole_case())
        self._fused().refresh()
        self._edited()
