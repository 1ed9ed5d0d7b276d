"""The Case worklist dock widget: a folder of cases reviewed one after another.

GUI only: the state, drafts, autosaves and exports are :mod:`napari_kidseg.review.worklist`'s. A case
opens in the Kidney cascade widget (docked beside it, or given), its draft shown at once when it
was made ahead; the next cases are drafted in the background at low priority while this one is
reviewed. Edits are autosaved two seconds after the last one (and on every case switch); a
second napari opening the same worklist gets it read-only.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..errors import KidsegError
from ..review.corrections_folder import export_provenance
from ..review.worklist import draft_case
from ._workers import LatestRequest

COLUMNS = (
    ("case", "case"),
    ("status", "status"),
    ("right_kidney_ml", "kidney R mL"),
    ("left_kidney_ml", "kidney L mL"),
    ("tumor_ml", "tumor mL"),
    ("largest_tumor_mm", "largest tumor mm"),
    ("minutes", "minutes"),
    ("reviewer", "reviewer"),
    ("models", "models"),
)
KEYS = {
    "next case": "Shift-N",
    "previous case": "Shift-B",
    "mark reviewed": "Shift-E",
    "next disagreement": "Shift-G",
    "next uncertain slice": "Shift-Y",  # not Shift-U: the dock's cut mode on the fused layer
}
AUTOSAVE_AFTER_EDIT_MS = 2000
AUTOSAVE_EVERY_MS = 30_000
CT_LAYER_PREFIX = "worklist: "
PREPARE_AFTER_MS = 1500  # the next case is read ahead this long after a case is shown or a slider rests


class WorklistWidget(QWidget):
    def __init__(self, napari_viewer, cascade_widget=None):
        super().__init__()
        self.viewer = napari_viewer
        self._cascade_widget = cascade_widget
        self.worklist = None
        self.current = None  # index of the case open for review
        self._case_started = 0.0
        self._seconds_before = 0.0
        self._opening = None  # the worker opening a case
        self._drafting = None  # {case: future} of the drafts being made ahead, or None
        self._pool = None  # the drafting process
        self._pool_start = LatestRequest()  # the drafting process being started
        self._cascade = None  # the Cascade that drafts (and made the shown draft)
        self._cascade_lock = threading.Lock()
        self.last_open_seconds = None  # from Next to the draft on screen (benchmarks read it)
        self.last_open_times = {}  # and when each step of that ended (s after Next)
        self._reviewed_since_finetune = 0
        self._touched = False  # the open case was edited since it opened
        self._reviewed_at_open = set()
        self._exporting = LatestRequest(closed=lambda: self.worklist is None)  # Mark reviewed's export
        self._preparing = LatestRequest(closed=lambda: self.worklist is None)  # the next case, read ahead
        self._prepared = None  # (index, key, payload) of the next case, read and fused ahead
        self._dirty = False  # edited since the last autosave
        self._revision_at_open = self._revision_saved = 0  # the session's edit state when opened, last saved
        self._reviewed_saved = set()
        self._watching_fusion = False
        self.last_reviewed = None  # the case folder the latest Mark reviewed exported
        lay = QVBoxLayout(self)
        self._build_form(lay)
        self._build_case_list(lay)
        self._set_enabled(False)
        self._start_timers()
        self._bind_keys()
        # closing napari destroys this widget: end the drafting process and give the lock back
        # (through this dict: the lambda must not touch Qt objects that are being destroyed)
        holder = self._holder = {"worklist": None, "pool": None}
        self.destroyed.connect(lambda *_: (_stop_pool(holder), holder["worklist"] and holder["worklist"].close()))

    def _build_form(self, lay):
        form = QFormLayout()
        row = QHBoxLayout()
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("a folder of CTs, KiTS cases or DICOM series, or a DICOMweb URL")
        browse = QPushButton("...")
        browse.clicked.connect(self._browse)
        self.pacs_btn = QPushButton("PACS...")
        self.pacs_btn.setToolTip("Review the CT series a DICOMweb PACS finds (patient, date, description)")
        self.pacs_btn.clicked.connect(self._choose_pacs)
        self.open_btn = QPushButton("Open")
        self.open_btn.clicked.connect(lambda: self.open_folder(self.folder_edit.text().strip()))
        for w in (self.folder_edit, browse, self.pacs_btn, self.open_btn):
            row.addWidget(w)
        form.addRow("Folder", row)
        self.state_edit = QLineEdit()
        self.state_edit.setPlaceholderText("beside the cases (a read-only folder: your cache)")
        form.addRow("State folder", self.state_edit)
        self.reviewer_edit = QLineEdit()
        self.reviewer_edit.setPlaceholderText("your name (default: the OS user)")
        form.addRow("Reviewer", self.reviewer_edit)
        self.ahead_spin = QSpinBox()
        self.ahead_spin.setRange(0, 10)
        self.ahead_spin.setValue(2)
        self.ahead_spin.setToolTip("How many of the next cases to draft in the background while you review")
        form.addRow("Drafts ahead", self.ahead_spin)
        self.cluster_edit = QLineEdit()
        self.cluster_edit.setPlaceholderText("empty: one drafting process here")
        self.cluster_edit.setToolTip(
            "local, local:N or tcp://HOST:PORT: draft every case of the folder on Dask distributed (a "
            "local cluster of N worker processes, or an existing scheduler whose workers see these files) "
            "instead of the next few here; the rows fill in as the cases end. Taken when a folder opens"
        )
        form.addRow("Cluster", self.cluster_edit)
        self.finetune_spin = QSpinBox()
        self.finetune_spin.setRange(0, 100)
        self.finetune_spin.setValue(0)
        self.finetune_spin.setSpecialValueText("off")
        self.finetune_spin.setToolTip(
            "After this many cases marked reviewed, fine-tune the models on the exported cases (the "
            "Kidney cascade widget's Fine-tune, with its checks); 'Use the new models' then drafts "
            "the cases not yet opened with them"
        )
        form.addRow("Fine-tune after", self.finetune_spin)
        lay.addLayout(form)

    def _build_case_list(self, lay):
        self.note = QLabel("")
        self.note.setWordWrap(True)
        lay.addWidget(self.note)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels([h for _, h in COLUMNS])
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectRows)
        self.table.cellDoubleClicked.connect(lambda r, _c: self.open_case(r))
        self.table.setToolTip("Double-click a case to open it")
        self.table.setMinimumHeight(180)
        lay.addWidget(self.table)
        self.progress = QProgressBar()
        self.progress.setFormat("%v of %m reviewed")
        lay.addWidget(self.progress)
        row = QHBoxLayout()
        self.prev_btn = QPushButton("Previous")
        self.next_btn = QPushButton("Next")
        self.reviewed_btn = QPushButton("Mark reviewed")
        self.reviewed_btn.setToolTip("Export this case (KiTS layout, DICOM SEG for DICOM) and open the next one")
        self.redraft_btn = QPushButton("Redraft")
        self.redraft_btn.setToolTip("Draft this case again with the models in the Kidney cascade widget")
        self.redraft_older_btn = QPushButton("Redraft older")
        self.redraft_older_btn.setToolTip(
            "Draft again, in the background, every case not yet opened whose draft was made by other "
            "models than the Kidney cascade widget's (after a fine-tune, say)"
        )
        self.redraft_older_btn.clicked.connect(self.redraft_older)
        self.retry_btn = QPushButton("Retry sends")
        self.retry_btn.setToolTip("Send again the results the PACS did not take (rows 'not sent: ...')")
        self.retry_btn.clicked.connect(self.retry_sends)
        self.retry_btn.setVisible(False)
        for b in (self.prev_btn, self.next_btn, self.reviewed_btn, self.redraft_btn, self.redraft_older_btn,
                  self.retry_btn):  # fmt: skip
            row.addWidget(b)
        lay.addLayout(row)
        self.prev_btn.clicked.connect(self.previous_case)
        self.next_btn.clicked.connect(self.next_case)
        self.reviewed_btn.clicked.connect(self.mark_reviewed)
        self.redraft_btn.clicked.connect(self.redraft)
        keys = QLabel(
            "Keys: "
            + ", ".join(f"{k} {what}" for what, k in KEYS.items())
            + "; napari's labels keys paint (brush, eraser, fill) and Ctrl-Z undoes."
        )
        keys.setWordWrap(True)
        lay.addWidget(keys)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        lay.addWidget(self.status)
        lay.addStretch(1)

    def _start_timers(self):
        self._autosave_timer = QTimer(self)  # after the last edit
        self._autosave_timer.setSingleShot(True)
        self._autosave_timer.setInterval(AUTOSAVE_AFTER_EDIT_MS)
        self._autosave_timer.timeout.connect(self.autosave)
        self._periodic = QTimer(self)  # and every 30 s while a case is open
        self._periodic.setInterval(AUTOSAVE_EVERY_MS)
        self._periodic.timeout.connect(self.autosave)
        self._poll = QTimer(self)  # takes in the drafts the drafting process finishes
        self._poll.setInterval(200)
        self._poll.timeout.connect(self._poll_drafts)
        self._prepare_timer = QTimer(self)  # the next case read ahead once the viewer rests
        self._prepare_timer.setSingleShot(True)
        self._prepare_timer.setInterval(PREPARE_AFTER_MS)
        self._prepare_timer.timeout.connect(self._prepare_next)
        self._pacs_poll = QTimer(self)  # a PACS worklist: fetches and sends done in its threads
        self._pacs_poll.setInterval(500)
        self._pacs_poll.timeout.connect(self._poll_pacs)

    # ------------------------------------------------------------------ helpers
    @property
    def drafting(self) -> bool:
        """Whether drafts are being made ahead (or the drafting process is starting)."""
        return self._pool_start.busy or bool(self._drafting)

    @property
    def cascade_widget(self):
        if self._cascade_widget is None:
            _, self._cascade_widget = self.viewer.window.add_plugin_dock_widget("napari-kidseg", "Kidney cascade")
        return self._cascade_widget

    def _notify(self, message: str, error=False):
        from napari.utils.notifications import show_error, show_info

        self.status.setText(message)
        (show_error if error else show_info)(message)

    def _set_enabled(self, on: bool):
        for b in (self.prev_btn, self.next_btn, self.reviewed_btn, self.redraft_btn, self.redraft_older_btn):
            b.setEnabled(on)

    def _browse(self):
        folder = QFileDialog.getExistingDirectory(self, "Worklist folder")
        if folder:
            self.folder_edit.setText(folder)
            self.open_folder(folder)

    def _choose_pacs(self):
        from .pacs_dialog import ask_pacs_query

        query = ask_pacs_query(self, self.folder_edit.text().strip())
        if query is not None:
            self.open_folder(query)

    def _poll_pacs(self):
        wl = self.worklist
        if wl is not None and getattr(wl, "changed", False):
            wl.changed = False
            self._refresh_table()
            self._draft_ahead()  # the series fetched meanwhile can be drafted now

    def retry_sends(self):
        """Send again, in the background, what waits in a PACS worklist's outbox."""
        wl = self.worklist
        if wl is not None and hasattr(wl, "retry_outbox") and not wl.read_only:
            wl.retry_outbox()
            self.status.setText(f"retrying {len(wl.outbox.pending())} send(s) to the PACS")

    def _bind_keys(self):
        actions = {
            "next case": self.next_case,
            "previous case": self.previous_case,
            "mark reviewed": self.mark_reviewed,
            "next disagreement": lambda: self.cascade_widget.goto_doubtful("disagreement"),
            "next uncertain slice": lambda: self.cascade_widget.goto_doubtful("uncertainty"),
        }
        for what, key in KEYS.items():
            self.viewer.bind_key(key, lambda _viewer, f=actions[what]: f(), overwrite=True)

    def _current_models(self) -> str | None:
        """The models the Kidney cascade widget names now, as the rows name their drafts' models."""
        from ..models import resolve_checkpoint
        from ..review.worklist import models_label

        cw = self._cascade_widget
        if cw is None:
            return None
        try:
            paths = [resolve_checkpoint(path, stage) for path, stage in zip(cw.models[:2], ("coarse", "refine"))]
        except KidsegError:
            return None
        return models_label(*paths)

    def redraft_older(self):
        """Forget the drafts of unopened cases made by other models; the drafting process redoes them."""
        wl = self.worklist
        now = self._current_models()
        if wl is None or now is None or wl.read_only:
            return 0
        older = [
            r
            for i, r in enumerate(wl.rows)
            if i != self.current and r.status == "drafted" and r.models and r.models != now
        ]  # the open case keeps the draft on screen (passing through leaves a case "drafted")
        for r in older:
            wl.drop_draft(r)
        self._refresh_table()
        self.ahead_spin.setValue(max(self.ahead_spin.value(), min(len(older), 10)))
        self._draft_ahead()
        self.status.setText(f"{len(older)} draft(s) of older models dropped; drafting them again in the background")
        return len(older)

    def _get_cascade(self):
        """The drafting cascade, with the models and device the Kidney cascade widget names."""
        from ..cascade import Cascade

        cw = self.cascade_widget
        paths = cw.models
        with self._cascade_lock:
            c = self._cascade
            if (
                c is None
                or (paths[0] and str(c.coarse_path) != paths[0])
                or (paths[1] and str(c.refine_path) != paths[1])
            ):
                self._cascade = c = Cascade(paths[0], paths[1], device=paths[2])
            return c

    # ------------------------------------------------------------------ the folder
    def open_folder(self, folder, state_dir: str | None = None):
        """Open a worklist on a folder, a DICOMweb URL or a :class:`napari_kidseg.pacs.Query`."""
        from ..pacs import open_worklist

        if not folder:
            self._notify("choose a folder of cases first", error=True)
            return None
        self.close_worklist()
        try:
            wl = open_worklist(
                folder, state_dir or self.state_edit.text().strip() or None, self.reviewer_edit.text() or None
            )
        except KidsegError as exc:
            self._notify(str(exc), error=True)
            return None
        self.worklist = self._holder["worklist"] = wl
        pacs = getattr(wl, "query", None)
        self.folder_edit.setText(pacs.url if pacs else str(wl.folder))
        self.retry_btn.setVisible(pacs is not None)
        if pacs is not None:
            self._pacs_poll.start()
        if not self.reviewer_edit.text():
            self.reviewer_edit.setText(wl.reviewer)
        self.note.setText("\n".join(wl.notes))
        self._refresh_table()
        self._set_enabled(True)
        self.reviewed_btn.setEnabled(not wl.read_only)
        start = wl.current if wl.current is not None else wl.next_todo()
        if start is not None:
            self.open_case(start)
        else:
            self._notify(f"all {len(wl.rows)} cases are reviewed or failed")
        return wl

    def close_worklist(self):
        self.autosave()
        self.stop_drafting()
        self._prepare_timer.stop()
        self._prepared = None
        self._periodic.stop()
        self._pacs_poll.stop()
        if self.worklist is not None:
            self.worklist.close()
        self.worklist = self._holder["worklist"] = None
        self.current = None

    def _refresh_table(self):
        wl = self.worklist
        if wl is None:
            return
        self.table.setRowCount(len(wl.rows))
        current_models = self._current_models()
        for i, r in enumerate(wl.rows):
            tumor = None if r.right_tumor_ml is None else (r.right_tumor_ml or 0) + (r.left_tumor_ml or 0)
            older = r.status == "drafted" and r.models and current_models and r.models != current_models
            values = {
                "case": r.case + (f"  {r.description}" if r.description else ""),
                "status": r.status
                + (" (older models)" if older else "")
                + (f": {r.reason}" if r.reason else "")
                + (f" ({wl.row_note(r)})" if wl.row_note(r) else "")
                + (" *" if i == self.current else ""),
                "right_kidney_ml": r.right_kidney_ml,
                "left_kidney_ml": r.left_kidney_ml,
                "tumor_ml": tumor,
                "largest_tumor_mm": r.largest_tumor_mm,
                "minutes": round(r.seconds / 60.0, 1),
                "reviewer": r.reviewer,
                "models": r.models,
            }
            for c, (key, _) in enumerate(COLUMNS):
                v = values[key]
                self.table.setItem(
                    i, c, QTableWidgetItem("" if v is None else f"{v:g}" if isinstance(v, float) else str(v))
                )
        self.progress.setMaximum(len(wl.rows))
        self.progress.setValue(wl.reviewed)

    # ------------------------------------------------------------------ cases
    def _elapsed(self) -> float:
        return self._seconds_before + (time.perf_counter() - self._case_started if self.current is not None else 0.0)

    def _edits_to_save(self):
        """``(row, labels copy, reviewed slices, seconds, measurements)`` of the open case, or None
        when nothing was edited or marked reviewed since it opened (a case only passed through
        stays as it was: not "in review"), or since the last autosave (then only the time spent
        moves on, into the state written next)."""
        wl, cw = self.worklist, self._cascade_widget
        if wl is None or self.current is None or cw is None or cw.session is None or wl.read_only:
            return None
        if CT_LAYER_PREFIX + wl.rows[self.current].case not in self.viewer.layers:
            return None  # the dock's Open closed this case for another CT: the labels shown are not this case's
        s = cw.session
        marked = set(cw.reviewed_slices)  # a tool's edit changes the session's revision, a stroke _touched too
        if not self._touched and s.revision == self._revision_at_open and marked == self._reviewed_at_open:
            return None
        if not self._dirty and s.revision == self._revision_saved and marked == self._reviewed_saved:
            wl.rows[self.current].seconds = self._elapsed()
            return None
        s.sync_edits()
        measured = cw.measurements if "measurements" not in cw.pending_work else None  # None: stale
        return wl.rows[self.current], s.labels.copy(), s.reviewed_slices(), self._elapsed(), measured

    def _saved(self, revision, marked):
        """The open case's edits up to ``revision`` and slices ``marked`` reviewed are on disk."""
        self._dirty = False
        self._revision_saved, self._reviewed_saved = revision, marked

    def autosave(self):
        """Save the open case's labels and reviewed slices (atomic); a failure keeps the edits in
        memory and says why."""
        self._autosave_timer.stop()
        what = self._edits_to_save()
        if what is None:
            return False
        cw = self._cascade_widget
        revision, marked = cw.session.revision, set(cw.reviewed_slices)
        try:
            self.worklist.save_edits(*what)
        except KidsegError as exc:
            self._notify(f"autosave failed, your edits are still here: {exc}", error=True)
            return False
        self._saved(revision, marked)
        self._refresh_table()
        return True

    def _on_edit(self, event=None):
        self._touched = self._dirty = True
        self._autosave_timer.start()

    def _load_case(self, row, pending=None, params=None, times=None, t0=0.0, draft=True):
        """Off the GUI thread: ``(ct, cascade, session, comparison, reviewed)`` of a case: its CT,
        its draft (made now when there is none, unless ``draft`` is False: then None), its
        autosaved edits, fused at ``params``. ``times`` gets when each step ended."""
        wl, cw = self.worklist, self.cascade_widget
        times = {} if times is None else times
        ct = wl.read_ct(row)
        times["read CT"] = time.perf_counter() - t0
        if pending is not None:
            with contextlib.suppress(Exception):  # it failed or was cancelled: drafted below
                pending.result(timeout=600)
        cached = wl.load_draft(row)
        if cached is None and not draft:
            return None
        cascade = self._get_cascade()
        if cached is None:
            result = wl.draft(row, cascade, ct=ct)
            if result is None:
                raise KidsegError(f"could not draft {row.case}: {row.reason}")
        else:
            result = cached[0]
        edits = wl.load_edits(row)
        labels, reviewed = edits if edits else (None, set())
        times["draft and edits read"] = time.perf_counter() - t0
        session, comparison = cw.prepare_result(result, labels, params)
        times["fused"] = time.perf_counter() - t0
        return ct, cascade, session, comparison, reviewed

    def _case_key(self, row) -> tuple:
        """What a case read ahead was made from: the fusion's values, the models named, and its CT,
        draft and autosave files (a slider moved, other models, a draft made again, edits saved:
        what was read ahead is stale)."""

        def stamp(path):
            try:
                st = os.stat(path)
            except OSError:
                return None
            return st.st_mtime_ns, st.st_size

        wl = self.worklist
        files = (row.ct_path, wl.draft_path(row), wl.edits_path(row), wl.edits_backup_path(row))
        cw = self.cascade_widget
        return (tuple(cw.fusion_params), tuple(cw.models), *(stamp(p) for p in files))

    @property
    def preparing(self) -> bool:
        """The next case is being read and fused ahead."""
        return self._preparing.busy

    @property
    def prepared_case(self) -> str | None:
        """The case read and fused ahead for Next (fresh or not), or None."""
        return None if self._prepared is None or self.worklist is None else self.worklist.rows[self._prepared[0]].case

    def _prepare_next(self):
        """Read and fuse the next case ahead, in a worker while this one is reviewed (its CT, draft
        and edits, the review session and comparison maps: 0.9-1.6 s of Next under load), so that
        Next only swaps the layers' data. Once its draft is in (the drafting process may be
        making it); a later request (a slider moved) runs when this one ends."""
        self._preparing.request(self._prepare_job)

    def _prepare_job(self):
        wl, cw = self.worklist, self._cascade_widget
        if wl is None or cw is None or self.current is None or self._opening is not None or wl.read_only:
            return None
        i = wl.next_todo(self.current)
        if i is None or i == self.current:
            return None
        row = wl.rows[i]
        if not wl.has_draft(row) or row.case in (self._drafting or {}):
            return None  # again when its draft is in (_poll_drafts)
        key = self._case_key(row)
        if self._prepared is not None and self._prepared[:2] == (i, key):
            return None
        self._prepared = None
        params = key[0]

        def job():
            return self._load_case(row, params=params, draft=False)

        def done(payload):
            if payload is not None and self.worklist is wl and self.current != i:
                self._prepared = (i, key, payload)

        return job, done

    def _take_prepared(self, index):
        """The payload read ahead for the case ``index`` when it is still what opening it would
        read now (else None); taken once (its session is the one shown and edited)."""
        prepared, self._prepared = self._prepared, None
        if prepared is None or prepared[0] != index or self.worklist is None:
            return None
        if prepared[1] != self._case_key(self.worklist.rows[index]):
            return None  # stale: a slider moved, its draft or edits changed since
        return prepared[2]

    def open_case(self, index: int):
        """Open a case: what was read ahead for it when still fresh, else its draft (made ahead, or
        drafted now), with the edits autosaved before; then draft the next cases in the background."""
        from napari.qt.threading import create_worker

        wl = self.worklist
        if wl is None or not 0 <= index < len(wl.rows) or self._opening is not None or self._exporting.busy:
            return
        if self.cascade_widget.busy:
            self._notify("the Kidney cascade widget is busy: wait for its run to end", error=True)
            return
        if "open" in self.cascade_widget.pending_work:
            self._notify("the Kidney cascade widget is opening a CT: wait for it", error=True)
            return
        t0 = time.perf_counter()
        self._prepare_timer.stop()
        leaving = self._edits_to_save()  # the case being left: saved in the job, off the GUI thread
        self._autosave_timer.stop()
        row = wl.rows[index]
        self.status.setText(f"opening {row.case}...")
        self.last_open_seconds = None
        prepared = self._take_prepared(index)
        if prepared is not None and leaving is None:  # read ahead and nothing to save: on screen now
            self.last_open_times = {"read ahead": 0.0}
            self._show_case(index, prepared, t0)
            return
        pending = (self._drafting or {}).get(row.case)  # the drafting process may be making it now
        params = self.cascade_widget.fusion_params

        def job():
            times = {"queued": time.perf_counter() - t0}
            if leaving is not None:
                try:
                    wl.save_edits(*leaving)
                except KidsegError as exc:  # the session is not replaced: the edits stay open here
                    raise KidsegError(f"{leaving[0].case} stays open, its edits could not be saved: {exc}") from None
            times["autosave"] = time.perf_counter() - t0
            if prepared is not None:
                times["read ahead"] = times["autosave"]
                payload = prepared
            else:
                payload = self._load_case(row, pending, params, times, t0)
            self.last_open_times = times
            return payload

        def done(payload):
            self._opening = None
            self._show_case(index, payload, t0)

        def failed(exc):
            self._opening = None
            self._refresh_table()
            self._notify(str(exc) if isinstance(exc, KidsegError) else f"could not open the case: {exc!r}", error=True)

        self._opening = create_worker(job, _connect={"returned": done, "errored": failed})

    def _show_case(self, index, payload, t0):
        from ..layers import ct_layer_data
        from .result_layers import one_dims_update, place_layer

        ct, cascade, session, comparison, reviewed = payload
        self.last_open_times["job returned"] = time.perf_counter() - t0
        wl, cw = self.worklist, self.cascade_widget
        if wl is None:
            return
        if cw.busy or "open" in cw.pending_work:  # a run, or the dock opening a CT, began meanwhile
            self._refresh_table()
            self._notify(f"{wl.rows[index].case} not shown: the Kidney cascade widget is busy", error=True)
            self._prepare_timer.start()
            return
        row = wl.rows[index]
        data, kwargs, _ = ct_layer_data(ct, name=CT_LAYER_PREFIX + row.case)
        old = [ly for ly in self.viewer.layers if ly.name.startswith(CT_LAYER_PREFIX)]
        if old and old[0].ndim == 3:
            # the case's CT goes into the layer of the one before: napari keeps its canvas node
            # (a new image layer costs the GUI thread a few hundred ms to build), one dims update
            layer = old[0]
            with one_dims_update(self.viewer):
                place_layer(layer, kwargs["scale"], kwargs["translate"])
                layer.data = data
            layer.metadata = kwargs["metadata"]
            layer.contrast_limits = kwargs["contrast_limits"]
            layer.name = kwargs["name"]
            for extra in old[1:]:
                self.viewer.layers.remove(extra)
        else:
            self.viewer.add_image(data, **kwargs)
        cw.select_ct(CT_LAYER_PREFIX + row.case)  # also a renamed layer
        if not self._watching_fusion:  # a slider moved: the next case is read ahead again at its values
            cw.fusion_box.changed.connect(self._prepare_timer.start)
            self._watching_fusion = True
        cw.show_prepared(ct, cascade, session, comparison, reviewed)
        self.current = wl.current = index
        self._seconds_before = row.seconds
        self._case_started = time.perf_counter()
        self._touched, self._reviewed_at_open = False, set(reviewed)  # "in review" once edited (autosave)
        row.reviewer = row.reviewer or self.reviewer_edit.text() or wl.reviewer
        wl.save()
        self._refresh_table()
        self.table.selectRow(index)
        self._periodic.start()
        QTimer.singleShot(0, lambda: self._watch_edits(t0, row.case))

    def _watch_edits(self, t0, case):
        """After the layers are in: edits mark the case dirty; the time to the draft on screen."""
        cw = self.cascade_widget
        if cw.busy:  # layers still being added, one per event-loop turn
            QTimer.singleShot(20, lambda: self._watch_edits(t0, case))
            return
        self.last_open_seconds = time.perf_counter() - t0
        # what changed the layer until now was the dock putting this case's result in: not an edit
        self._touched = False
        if cw.session is not None:
            self._revision_at_open = cw.session.revision
            self._saved(cw.session.revision, set(self._reviewed_at_open))
        if cw.fused_layer is not None:
            for event in (cw.fused_layer.events.data, cw.fused_layer.events.paint):
                event.disconnect(self._on_edit)  # connected once, whichever case it was for
                event.connect(self._on_edit)
        self.status.setText(f"{case}: on screen in {self.last_open_seconds:.1f} s")
        self._draft_ahead()  # now, not while napari builds the layers on the GUI thread
        self._prepare_timer.start()  # and the next case read ahead once the viewer rests

    def _draft_ahead(self):
        """Draft the next few cases not drafted yet, in a separate low-priority process (its long
        numpy calls cannot hold this process's interpreter lock, so the viewer keeps turning)."""
        wl = self.worklist
        n = self.ahead_spin.value()
        if wl is None or n <= 0 or self._drafting or wl.read_only:
            return
        order, i = [], self.current
        cluster = self.cluster_edit.text().strip()
        if cluster:  # the whole folder, not only the next few
            order = [j for j in wl.to_draft() if j != self.current]
            i = None
        while len(order) < n and i is not None:
            i = wl.next_todo(i)
            if i is None or i == self.current or i in order:
                break
            if not wl.has_draft(wl.rows[i]):
                order.append(i)
            elif len(order) + 1 >= n:
                break
        order = wl.ready_for_draft(order)  # a PACS worklist fetches the others first
        if not order:
            return
        if self._pool is None:  # start the process from a worker thread, then come back here
            self._start_pool()
            return
        cw = self.cascade_widget
        models = cw.models
        pool = self._pool
        self._drafting = {}
        for i in order:
            row = wl.rows[i]
            fut = pool.submit(draft_case, str(row.ct_path), row.series_uid, str(wl.draft_path(row)), *models)
            self._drafting[row.case] = fut
            if cluster:
                pool.outputs.append(wl.draft_path(row))
        if cluster:
            self.status.setText(f"drafting {len(order)} case(s) on {pool.describe()}")
        self._poll.start()

    def _start_pool(self):
        """The drafting process, started off the GUI thread (starting it there stalled the viewer
        for about 0.4 s); its first no-op task returns once it runs."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from ..review.worklist import drafting_process_init

        if self._pool_start.busy:
            return
        cluster = self.cluster_edit.text().strip()
        cw = self.cascade_widget
        models = cw.models

        def job():
            if cluster:  # Dask distributed; its workers at low priority beside this napari
                from ..batch import DaskCluster, checked_models

                return DaskCluster(cluster, models=checked_models(*models), nice=10)
            # spawn, not fork: this process holds Qt and torch threads a fork would copy mid-lock
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=drafting_process_init)
            pool.submit(int).result(timeout=300)
            return pool

        def done(pool):
            if self.worklist is None:  # closed meanwhile
                _stop_pool({"pool": pool})
                return
            self._pool = self._holder["pool"] = pool
            self._draft_ahead()

        def failed(exc):
            why = str(exc) if isinstance(exc, KidsegError) else repr(exc)
            self.status.setText(f"no drafting process ({why}): cases are drafted when opened")

        self._pool_start.start(job, done=done, failed=failed)

    def _poll_drafts(self):
        """Take in the drafts the drafting process finished (the state is written here, by the
        napari that holds the worklist's lock)."""
        wl = self.worklist
        if not self._drafting:
            self._poll.stop()
            self._drafting = None
            return
        for case, fut in list(self._drafting.items()):
            if not fut.done():
                continue
            del self._drafting[case]
            if wl is None or fut.cancelled():
                continue
            try:
                info = fut.result()
            except Exception as exc:  # noqa: BLE001 - the drafting process died: the case is drafted on opening instead
                info = None
                self.status.setText(f"drafting {case} in the background failed ({exc!r}); it is drafted when opened")
            if info is not None and case in [r.case for r in wl.rows]:
                wl.record_draft(wl.rows[wl.index_of(case)], info)
                self._refresh_table()
                self._prepare_timer.start()  # the next case may be read ahead now
        if not self._drafting:
            self._poll.stop()
            self._drafting = None

    def stop_drafting(self):
        """Cancel queued drafts and end the drafting process (a draft half-written is never kept:
        its file is renamed into place only when complete)."""
        self._poll.stop()
        self._drafting = None
        _stop_pool(self._holder)
        self._pool = None

    def next_case(self):
        wl = self.worklist
        if wl is None:
            return
        i = wl.next_todo(self.current if self.current is not None else -1)
        if i is None:
            self._notify(f"all {len(wl.rows)} cases are reviewed (or failed): the worklist is done")
            return
        self.open_case(i)

    def previous_case(self):
        if self.worklist is not None and self.current:
            self.open_case(self.current - 1)

    def mark_reviewed(self):
        """Export the case (KiTS layout + manifest, DICOM SEG for DICOM CTs) in a worker (writing it
        held the GUI thread 2-5 s), then open the next one. True once the export started;
        :attr:`last_reviewed` is the case folder when it is written."""
        wl, cw = self.worklist, self.cascade_widget
        if wl is None or self.current is None or cw.session is None or self._exporting.busy:
            return None
        folder = cw.export_folder
        if not folder:
            folder = cw.export_folder = str(wl.state_dir / "export")
        s = cw.session
        s.sync_edits()
        row = wl.rows[self.current]
        ct, labels, seconds = cw.ct_volume, s.labels.copy(), self._elapsed()
        kwargs = export_provenance(s, cw.cascade)
        self.last_reviewed = None
        self._autosave_timer.stop()  # the worklist's state is written by the export meanwhile
        self._periodic.stop()
        self.status.setText(f"exporting {row.case}...")

        def failed(exc):
            self._periodic.start()
            self._notify(str(exc) if isinstance(exc, KidsegError) else f"export failed: {exc!r}", error=True)

        return self._exporting.start(
            lambda: wl.mark_reviewed(row, ct, labels, folder, seconds=seconds, **kwargs),
            done=lambda case_dir: self._reviewed(row, case_dir, folder),
            failed=failed,
        )

    def _reviewed(self, row, case_dir, folder):
        """The case is exported: saved, counted, then the next case (or the fine-tune it is time for)."""
        cw = self.cascade_widget
        self.last_reviewed = case_dir
        self._periodic.start()
        self.autosave()
        self._refresh_table()
        sending = "; sending the DICOM SEG and the report to the PACS" if row.pacs else ""
        self._notify(f"{row.case} reviewed and exported to {case_dir}{sending}")
        self._reviewed_since_finetune += 1
        k = self.finetune_spin.value()
        if k and self._reviewed_since_finetune >= k and not cw.busy:
            self._reviewed_since_finetune = 0
            self.status.setText(f"{k} case(s) reviewed: fine-tuning the models on {folder} in the background")
            cw.finetune()  # its progress, checks and 'Use the new models' are the Kidney cascade widget's
            return
        self.next_case()

    @property
    def exporting(self) -> bool:
        """Mark reviewed's export is being written."""
        return self._exporting.busy

    def redraft(self):
        """Draft the open case again with the models now in the Kidney cascade widget."""
        wl = self.worklist
        if wl is None or self.current is None:
            return
        wl.drop_draft(wl.rows[self.current])
        self.open_case(self.current)


def _stop_pool(holder: dict):
    pool = holder.get("pool")
    holder["pool"] = None
    if pool is None:
        return
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:  # a draft under way is not waited for: the viewer is closing
        with contextlib.suppress(Exception):
            proc.terminate()
