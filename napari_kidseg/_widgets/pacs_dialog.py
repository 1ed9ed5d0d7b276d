"""The dialog in which the Case worklist picks a PACS: the server's DICOMweb root and the filters
of its series. GUI only: the query is :class:`napari_kidseg.pacs.Query`; credentials are never
typed here (they come from the environment or the settings file, see the README)."""

from __future__ import annotations

from qtpy.QtWidgets import QDialog, QDialogButtonBox, QFormLayout, QLabel, QLineEdit


class PacsDialog(QDialog):
    def __init__(self, parent=None, url: str = ""):
        super().__init__(parent)
        self.setWindowTitle("Cases from a PACS")
        form = QFormLayout(self)
        self.url_edit = QLineEdit(url if url.lower().startswith(("http://", "https://")) else "")
        self.url_edit.setPlaceholderText("http://127.0.0.1:8042/dicom-web")
        self.patient_edit = QLineEdit()
        self.date_edit = QLineEdit()
        self.date_edit.setPlaceholderText("YYYYMMDD or YYYYMMDD-YYYYMMDD")
        self.modality_edit = QLineEdit("CT")
        self.description_edit = QLineEdit()
        self.description_edit.setPlaceholderText("a part of the series description")
        for label, w in (
            ("DICOMweb URL", self.url_edit),
            ("Patient ID", self.patient_edit),
            ("Study date", self.date_edit),
            ("Modality", self.modality_edit),
            ("Description", self.description_edit),
        ):
            form.addRow(label, w)
        note = QLabel("User and password: KIDSEG_PACS_USER / KIDSEG_PACS_PASSWORD or the settings file (README).")
        note.setWordWrap(True)
        form.addRow(note)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def query(self):
        from ..pacs import Query

        text = {
            k: (e.text().strip() or None)
            for k, e in (
                ("patient", self.patient_edit),
                ("date", self.date_edit),
                ("modality", self.modality_edit),
                ("description", self.description_edit),
            )
        }
        return Query(self.url_edit.text().strip(), **text)


def ask_pacs_query(parent, url: str = ""):
    """The query the user fills in, or None when cancelled."""
    dialog = PacsDialog(parent, url)
    return dialog.query() if dialog.exec_() == QDialog.Accepted else None
