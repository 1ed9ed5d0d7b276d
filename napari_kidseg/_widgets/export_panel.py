"""The Export corrections box of the Kidney cascade widget: export the case, fine-tune the models
on the corrections folder, and switch between model versions.

Knows the case and the models only through callables handed in; never the dock. Exports and
fine-tunes run in workers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QPushButton

from ..errors import KidsegError
from ._controls import Hooks, path_row
from ._workers import LatestRequest


def export_correction_with_note(folder: Path, ct, labels, kwargs: dict):
    """Off the GUI thread: export the case (corrections_folder.export_correction) and say whether a
    DICOM SEG came with it (the entry it wrote says). Returns (case folder, note)."""
    from ..review.corrections_folder import export_correction

    entry = export_correction(folder, ct, labels, **kwargs)
    note = ""
    src = ct.source
    if src is not None and src.format == "dicom" and Path(src.path).is_dir():
        if entry.get("dicom_seg"):
            note = f" and a DICOM SEG ({entry['dicom_seg']})"
        else:
            note = f"; no DICOM SEG: {entry.get('dicom_seg_note')}"
    return Path(folder) / entry["case"], note


class ExportPanel(QGroupBox):
    """``hooks``: see _controls.Hooks; ``cascade()`` is the cascade that made the result shown;
    ``models()`` the ``(coarse, refine, device)`` chosen and ``set_models(coarse, refine)`` names
    others; ``background(job, done)`` runs a fine-tune's ``job(progress, cancel)`` as the dock's
    long job (False when one is going); ``rerun()`` runs the case again with the models named;
    ``ask(case_id)`` asks about a scan exported before."""

    def __init__(self, hooks: Hooks, cascade, models, set_models, background, rerun, ask: Callable):
        super().__init__("Export corrections")
        self._hooks, self._cascade, self._models, self._set_models = hooks, cascade, models, set_models
        self._background, self._rerun, self._ask = background, rerun, ask
        self._say, self._notify, self._failed = hooks.say, hooks.notify, hooks.failed
        self._export = LatestRequest(hooks.failed, hooks.closed)
        self.last_export = None  # the case folder the latest export wrote
        self.new_models = None  # the latest fine-tune's checkpoints
        self._versions = []  # the model versions combo's rows
        self._build()
        self.export_btn.clicked.connect(self.export)
        self.finetune_btn.clicked.connect(self.finetune)
        self.use_new_btn.clicked.connect(self.use_new_models)
        self.export_edit.editingFinished.connect(self.refresh_versions)

    def _build(self):
        form = QFormLayout(self)
        self.export_edit, row = path_row(self, "corrections folder", folder=True)
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

    @property
    def folder(self) -> str:
        return self.export_edit.text().strip()

    @property
    def exporting(self) -> bool:
        return self._export.busy

    def export(self):
        """Write the CT and the corrected labels into the corrections folder, in a worker (writing
        the files took the GUI thread 2 s). The labels are taken as they are now; :attr:`last_export`
        is the case folder once written. Asks first when the scan is there already."""
        folder = self.export_edit.text().strip()
        s = self._hooks.session()
        if s is None:
            self._notify("nothing to export yet: run the cascade first", error=True)
            return
        if not folder:
            self._notify("choose a corrections folder first", error=True)
            return
        if self._export.busy:
            return
        from ..review.corrections_folder import export_provenance

        ct, cascade = self._hooks.ct(), self._cascade()
        s.sync_edits()
        kwargs = {
            **export_provenance(s, cascade),
            "reviewed_slices": s.reviewed_slices(),
            "whole_case_reviewed": self.whole_case_check.isChecked(),
        }
        self.last_export = None
        self._start_export(Path(folder), ct, s.labels.copy(), kwargs)

    def _start_export(self, folder, ct, labels, kwargs):
        from ..review.corrections_folder import ScanAlreadyExported

        self._say("exporting...")

        def done(payload):
            self.last_export, note = payload
            self._notify(f"exported {self.last_export}{note}")

        def failed(exc):
            if isinstance(exc, ScanAlreadyExported):
                choice = self._ask(exc.case_id)
                if choice == "cancel":
                    self._say("export cancelled")
                else:
                    self._start_export(folder, ct, labels, {**kwargs, "update": choice == "update"})
            elif isinstance(exc, KidsegError):
                self._notify(str(exc), error=True)
            else:
                self._failed(exc)

        self._export.start(export_correction_with_note, folder, ct, labels, kwargs, done=done, failed=failed)

    def finetune(self):
        """Fine-tune both models (or the refine one) on the corrections folder, in a worker."""
        from .. import finetuning
        from ..models import resolve_checkpoint
        from ..training import FinetuneSettings

        folder = self.export_edit.text().strip()
        if not folder:
            self._notify("choose the corrections folder to fine-tune on", error=True)
            return
        coarse, refine, device = self._models()
        try:
            parents = {
                "coarse": resolve_checkpoint(coarse, "coarse"),
                "refine": resolve_checkpoint(refine, "refine"),
            }
        except KidsegError as exc:
            self._notify(str(exc), error=True)
            return
        stages = ("refine",) if self.refine_only_check.isChecked() else finetuning.STAGES

        def job(progress, cancel):
            return finetuning.finetune_models(
                folder,
                settings=FinetuneSettings(device=device),
                stages=stages,
                **parents,
                progress=progress,
                cancel=cancel,
                log=lambda m: None,
            )

        if self._background(job, self._finetuned):
            self._say(f"fine-tuning the {' and '.join(stages)} model(s)...")

    def _finetuned(self, report):
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
        self.refresh_versions()
        self._notify("fine-tuning done" + (" (the new models are worse)" if report["worse"] else ""))

    def use_new_models(self):
        """Switch to the fine-tuned models and re-run this case, so the difference shows at once
        (the run asks before replacing hand edits)."""
        models = self.new_models
        if not models:
            return
        self._set_models(models["coarse"], models["refine"])
        self._notify(f"now using {Path(models['coarse']).parent.name}: running this case again")
        self._rerun()

    def refresh_versions(self):
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
        self._set_models(None if bundled else v["coarse"], None if bundled else v["refine"])
        self._say(f"models: {v['name']}; press Run to use them")
