"""The Report box of the Kidney cascade widget: the case report, its text for dictation, its files.

A sub-widget of :class:`CascadeWidget` that knows only a callback giving the case to report on;
the measuring is :func:`napari_kidseg.report.describe_case`, run in a worker so the event loop
stays free on a large case.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qtpy.QtWidgets import (
    QApplication,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
)

from ..errors import KidsegError


def report_case(ct, cascade, s):
    """What the Report box measures: the CT, the labels as corrected now, and what made them
    (None without a result)."""
    import dataclasses

    from ..models import read_config

    if s is None:
        return None
    s.sync_edits()
    provenance = {
        stage: f"{path.name} ({read_config(path).version})"
        for stage, path in (("coarse", cascade.coarse_path), ("refine", cascade.refine_path))
    }
    provenance.update(dataclasses.asdict(s.params), hand_edited_voxels=int(s.hand_edited_voxels))
    return ct, s.labels.copy(), provenance


class ReportPanel(QGroupBox):
    """``case()`` returns ``(ct Volume, labels array, provenance dict)`` or None when there is no result;
    ``notify(message, error)`` shows a message the way the parent widget does."""

    def __init__(self, case: Callable, notify: Callable, parent=None):
        super().__init__("Report", parent)
        self._case = case
        self._notify = notify
        self._worker = None
        self._save_worker = None
        self.report = None
        self.written = None  # the files the latest save wrote
        self._inputs = None
        lay = QVBoxLayout(self)
        row = QHBoxLayout()
        self.make_btn = QPushButton("Make report")
        self.make_btn.setToolTip(
            "Kidney volumes and lengths; per tumor volume, diameters, exophytic share, position and "
            "distance to the renal sinus fat (the measurable parts of R.E.N.A.L.), from the labels as they are now"
        )
        self.copy_btn = QPushButton("Copy text")
        self.copy_btn.setToolTip("Copy the report's text to the clipboard (for dictation software)")
        self.save_btn = QPushButton("Save files...")
        self.save_btn.setToolTip("Write report.json, report.csv, report.png and a one-page report.pdf into a folder")
        for b in (self.make_btn, self.copy_btn, self.save_btn):
            row.addWidget(b)
        lay.addLayout(row)
        self.text = QPlainTextEdit()
        self.text.setReadOnly(True)
        self.text.setPlaceholderText("Run the cascade, correct, then make the report")
        self.text.setMaximumHeight(150)
        lay.addWidget(self.text)
        self.make_btn.clicked.connect(self.make_report)
        self.copy_btn.clicked.connect(self.copy_text)
        self.save_btn.clicked.connect(lambda: self.save())
        self._set_ready(False)

    def _set_ready(self, ready: bool):
        self.copy_btn.setEnabled(ready)
        self.save_btn.setEnabled(ready)

    def make_report(self):
        from napari.qt.threading import create_worker

        from ..report import describe_case, report_text

        case = self._case()
        if case is None:
            self._notify("nothing to report yet: run the cascade first", True)
            return
        if self._worker is not None:
            return
        ct, labels, provenance = case
        self.make_btn.setEnabled(False)
        self.text.setPlainText("measuring...")

        def job():
            report = describe_case(labels, ct.geometry.spacing, ct=ct.array, provenance=provenance)
            return report, report_text(report)

        def done(payload):
            self._worker = None
            self.make_btn.setEnabled(True)
            self.report, text = payload
            self._inputs = (ct, labels)
            self.text.setPlainText(text)
            self._set_ready(True)

        def failed(exc):
            self._worker = None
            self.make_btn.setEnabled(True)
            self.text.setPlainText("")
            self._notify(str(exc) if isinstance(exc, KidsegError) else f"report failed: {exc!r}", True)

        self._worker = create_worker(job, _connect={"returned": done, "errored": failed})

    def copy_text(self):
        QApplication.clipboard().setText(self.text.toPlainText())
        self._notify("report text copied to the clipboard", False)

    @property
    def saving(self) -> bool:
        return self._save_worker is not None

    def save(self, folder: str | Path | None = None):
        """Write the report files into a folder, in a worker (the figure takes the GUI thread a
        second); :attr:`written` lists them once written. An existing file is refused with a message."""
        from napari.qt.threading import create_worker

        from ..report import write_report

        if self.report is None or self._save_worker is not None:
            return
        if folder is None:
            folder = QFileDialog.getExistingDirectory(self, "Folder for the report files")
            if not folder:
                return
        ct, labels = self._inputs
        report = self.report
        self.written = None

        def done(written):
            self._save_worker = None
            self.written = written
            self._notify(f"report written to {folder}", False)

        def failed(exc):
            self._save_worker = None
            self._notify(str(exc) if isinstance(exc, KidsegError) else f"report not saved: {exc!r}", True)

        self._save_worker = create_worker(
            lambda: write_report(report, folder, ct=ct.array, labels=labels, spacing=ct.geometry.spacing),
            _connect={"returned": done, "errored": failed},
        )
