"""The Run row of the Kidney cascade widget: Run and Cancel, the progress bar, the status line
(every box's messages: ``say``, ``notify``, ``failed``), and the dock's one long job at a time (a
run, a fine-tune, or a prepared result being shown).

Knows nothing of the dock: the job, what to do with its answer and when it ends are handed in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from ..errors import KidsegError
from ._workers import LatestRequest, Relay


class RunPanel(QWidget):
    """``cancel`` is the Event a long job polls; ``closed()`` is True once the viewer closed (late
    answers are dropped)."""

    def __init__(self, cancel: threading.Event, closed: Callable, parent=None):
        super().__init__(parent)
        self._cancel = cancel
        self._closed = closed
        self.job = LatestRequest(self.failed, closed)  # busy from the start of a job until end()
        self._relay = Relay()
        self._relay.progress.connect(self._on_progress)
        self._extra = ()  # other buttons off while the job runs
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        rrow = QHBoxLayout()
        self.run_btn = QPushButton("Run cascade")
        self.run_btn.setToolTip("Coarse stage, kidney ROIs, refine stage and fusion, in the background")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setToolTip("Stop the run (or fine-tune) within one batch; the viewer stays as it was")
        self.cancel_btn.setEnabled(False)
        rrow.addWidget(self.run_btn)
        rrow.addWidget(self.cancel_btn)
        lay.addLayout(rrow)
        self.progress = QProgressBar()
        self.progress.setFormat("%p%")
        self.status = QLabel("Pick a CT layer and press Run.")
        self.status.setWordWrap(True)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        self.cancel_btn.clicked.connect(self.cancel)

    def progress_callback(self) -> Callable:
        """``progress(done, total, stage)`` for the worker thread (a queued signal to this row)."""
        relay = self._relay
        return lambda d, t, s: relay.progress.emit(d, t, s)

    def start(self, job: Callable, *args, done, finished=None, also=()) -> bool:
        """``job(*args)`` as the long job: Run (and the buttons in ``also``) off, Cancel on, until
        :meth:`end` (``finished`` runs when the worker ends; by default it ends the job). False,
        and nothing starts, while another long job is going."""
        if self.job.busy:
            return False
        self._cancel.clear()
        self._extra = tuple(also)
        for b in (self.run_btn, *self._extra):
            b.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        return self.job.start(job, *args, done=done, finished=finished or self.end, keep=True)

    def end(self):
        """The long job is over: Run (and the buttons it turned off) on again, Cancel off."""
        self.job.release()
        if self._closed():
            return
        for b in (self.run_btn, *self._extra):
            b.setEnabled(True)
        self.cancel_btn.setEnabled(False)

    def cancel(self):
        self._cancel.set()
        self.status.setText("cancelling...")

    def _on_progress(self, done, total, stage):
        if self._closed():
            return
        self.progress.setMaximum(max(total, 1))
        self.progress.setValue(done)
        if stage.startswith("fine-tune"):  # the core's words, time left from its step times: as the CLI's
            self.status.setText(f"{stage} ({100 * done / max(total, 1):.0f}%)")
            return
        self.status.setText(f"{stage}: {done}/{total} {'slices' if stage == 'coarse' else 'patches'}")

    def say(self, text: str):
        """A line in the status."""
        self.status.setText(text)

    def notify(self, message: str, error=False):
        """A line in the status and as a napari notification."""
        from napari.utils.notifications import show_error, show_info

        self.status.setText(message)
        (show_error if error else show_info)(message)

    def failed(self, exc):
        """A worker's error, said in one line (a cancelled job is no error)."""
        from ..errors import Cancelled

        if self._closed():
            return
        if isinstance(exc, Cancelled):
            self.notify("run cancelled; the viewer is unchanged")
        elif isinstance(exc, KidsegError):
            self.notify(str(exc), error=True)
        else:
            self.notify(f"the cascade failed: {type(exc).__name__}: {exc}", error=True)
