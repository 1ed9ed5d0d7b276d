"""Background work for the widgets: one helper for every kind of job that runs off the GUI thread.

A :class:`LatestRequest` holds at most one napari worker of one kind (a run, the fusion following
the sliders, the Review box, a tool, an export, ...). ``start`` refuses a second job while one
runs (a button pressed twice); ``request`` keeps the latest request made meanwhile and starts it
when the running job ends, so the latest request runs last (a slider dragged: only the last
position is fused again). ``hold`` keeps it busy without a worker (a prepared result being shown).
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable

from qtpy.QtCore import QObject, Signal


class LatestRequest:
    """One background job of one kind at a time; see the module's docstring."""

    def __init__(self, failed: Callable | None = None, closed: Callable[[], bool] = lambda: False):
        self._failed = failed  # the errored handler when a job names none
        self._closed = closed  # True once the widget is gone: results are dropped
        self._worker = None
        self._held = False
        self._waiting = None  # the latest request made while a job ran

    @property
    def busy(self) -> bool:
        return self._worker is not None or self._held

    def hold(self):
        """Busy without a worker until :meth:`release` (e.g. a result's layers still being added)."""
        self._held = True

    def release(self):
        self._held = False
        self._worker = None

    def start(self, job: Callable, *args, done=None, failed=None, finished=None, keep=False) -> bool:
        """``job(*args)`` in a worker unless one is going (then False, and nothing starts). ``done``
        and ``failed`` run on the GUI thread (not once the widget is closed); with ``keep`` the
        helper stays busy after the job until :meth:`release` (``finished`` decides)."""
        from napari.qt.threading import create_worker

        if self.busy:
            return False
        failed = failed or self._failed

        def returned(value):
            if not keep:
                self._worker = None
            if done is not None and not self._closed():
                done(value)
            self._next()

        def errored(exc):
            if not keep:
                self._worker = None
            self._waiting = None
            if failed is not None and not self._closed():
                failed(exc)

        connect = {"returned": returned, "errored": errored}
        if finished is not None:
            connect["finished"] = finished
        self._worker = create_worker(job, *args, _connect=connect)
        return True

    def request(self, prepare: Callable):
        """``prepare()`` now, or when the running job ends (a later request replaces a waiting
        one). On the GUI thread it returns ``(job, done)`` to start, or None for nothing to do."""
        if self.busy:
            self._waiting = prepare
            return
        todo = prepare()
        if todo is not None:
            job, done = todo
            self.start(job, done=done)

    def _next(self):
        prepare, self._waiting = self._waiting, None
        if prepare is not None and not self._closed():
            self.request(prepare)


class Relay(QObject):
    """Carries progress from the worker thread to the GUI thread (queued signal)."""

    progress = Signal(int, int, str)


_heavy_imports = None  # the thread importing torch and segmentation_models_pytorch


def start_heavy_imports():
    """Import torch and the model zoo in a thread (once; already imported: only the gc freeze)."""
    global _heavy_imports
    with _start_lock:
        if _heavy_imports is None:
            _heavy_imports = threading.Thread(target=_import_heavy, name="kidseg torch import", daemon=True)
            _heavy_imports.start()


_start_lock = threading.Lock()


def _import_heavy():
    from ..models import import_network_libraries

    import_network_libraries()

    # torch and the model zoo bring some 360,000 objects that every full garbage collection walks
    # with the interpreter lock held: 3-4 s under load, measured, and napari collects on each layer
    # it removes (a Windows OpenGL workaround), so closing a second CT froze the viewer 10-25 s. The
    # objects alive now (modules, the viewer) are moved out of every later collection; a layer that
    # exists now and is removed later may stay in memory (at most the CT opened before the dock).
    # KIDSEG_GC_FREEZE=0 keeps them collectable (the test suite: many viewers, each one closed).
    if os.environ.get("KIDSEG_GC_FREEZE", "1") != "0":
        gc.freeze()


def wait_for_heavy_imports(timeout: float | None = None):
    """Off the GUI thread (a run's worker): let the background import of torch finish first
    (started now when the dock had not started it yet)."""
    start_heavy_imports()
    _heavy_imports.join(timeout)
