"""The one error type a user can cause, and the one warning type the tool emits.

Everything a user can get wrong (a missing file, a corrupt volume, a checkpoint of the wrong
stage) raises :class:`KidsegError` with a one-line message that names the file and the problem.
The CLI prints that line and exits non-zero; the napari reader returns None; the widget shows a
notification. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class KidsegError(Exception):
    """A user-facing problem, with a one-line message that names the file and the problem."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        text = message if self.path is None else f"{self.path}: {message}"
        super().__init__(" ".join(text.split()))  # one line, whatever the caller wrote


class Cancelled(Exception):
    """The user cancelled a run, a training or a fine-tune; nothing was written. Raised by the
    cascade and by training, so it lives here, below both."""


class KidsegWarning(UserWarning):
    """Something the user should know that does not stop the work (e.g. which DICOM series was picked)."""
