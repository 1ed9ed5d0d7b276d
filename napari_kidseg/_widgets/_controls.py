"""What the dock's panels share: the hooks the dock hands them, and small control builders (a
path row, a 0-1 slider, a three-way question)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QCheckBox, QFileDialog, QHBoxLayout, QLabel, QLineEdit, QMessageBox, QPushButton, QSlider


@dataclass(frozen=True)
class Hooks:
    """What a box may ask of the case shown and how it tells the user: callables the dock hands
    in, so that no box imports the dock (as ReportPanel gets ``case`` and ``notify``)."""

    viewer: object
    session: Callable  # the review session, None before a result
    ct: Callable  # the case's CT Volume, None before a run
    fused: Callable  # the editable fused labels layer, None before a result
    say: Callable  # say(text): a line in the status
    notify: Callable  # notify(message, error=False): the status line and a napari notification
    failed: Callable  # failed(exc): a worker's error, in one line
    closed: Callable  # closed(): the viewer was closed, late answers are dropped
    edited: Callable  # edited(): the labels changed by a stroke, the Review box follows (debounced)
    changed: Callable  # changed(): the labels changed by a tool, undo or redo: the Review box follows now


def path_row(parent, placeholder, folder=False):
    """A path field with a browse button: ``(QLineEdit, row layout)``; files are checkpoints."""
    edit = QLineEdit()
    edit.setPlaceholderText(placeholder)
    edit.setToolTip(f"{placeholder}: type a path or browse with ...")
    btn = QPushButton("...")
    btn.setMaximumWidth(30)

    def browse():
        if folder:
            path = QFileDialog.getExistingDirectory(parent, placeholder)
        else:
            path, _ = QFileDialog.getOpenFileName(parent, placeholder, "", "Checkpoints (*.safetensors)")
        if path:
            edit.setText(path)

    btn.clicked.connect(browse)
    row = QHBoxLayout()
    row.addWidget(edit)
    row.addWidget(btn)
    return edit, row


def check_row(form, name, text, tip, checked=False):
    """A checkbox with its tooltip, added as a row ``name`` of ``form``."""
    box = QCheckBox(text)
    box.setChecked(checked)
    box.setToolTip(tip)
    form.addRow(name, box)
    return box


def slider(form, name, value):
    """A 0-100 slider for a value in [0, 1], its value shown beside it, added as a row of ``form``."""
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


def ask(parent, title: str, text: str, accept: tuple[str, str], destructive: tuple[str, str]) -> str:
    """A question with two answers and Cancel; returns the chosen answer's key, or "cancel"."""
    box = QMessageBox(parent)
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
