"""A worklist on the CT series a PACS query finds: fetched ahead of the reviewer, results sent back
through the outbox."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import Cancelled, KidsegError
from ..worklist import CaseRow, Worklist
from .client import Pacs
from .outbox import Outbox, encapsulated_pdf

SERIES_FOLDER = "series"  # fetched series, one folder each, in the state folder


def is_pacs_url(text) -> bool:
    """Whether a worklist source names a DICOMweb server rather than a folder."""
    return str(text).lower().startswith(("http://", "https://"))


# ----------------------------------------------------------------------------------------------
# A worklist on a PACS query
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Query:
    """A worklist's source on a PACS: the server and the filters of its series."""

    url: str
    patient: str | None = None
    date: str | None = None
    modality: str | None = "CT"
    description: str | None = None

    def default_state_dir(self) -> Path:
        """A folder of the user's cache named after the server and the filters."""
        digest = hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        base = Path(os.environ.get("KIDSEG_CACHE", Path.home() / ".cache" / "napari-kidseg"))
        return base / "pacs-worklists" / f"{urlsplit(self.url).hostname}-{digest}"

    def label(self) -> str:
        filters = [f"{k} {v}" for k, v in dataclasses.asdict(self).items() if k != "url" and v]
        return self.url + (f" ({', '.join(filters)})" if filters else "")


class PacsWorklist(Worklist):
    """A worklist on the CT series a PACS query finds (see the module's description)."""

    gone_reason = "no longer on the server"

    def __init__(self, query: Query, state_dir=None, reviewer=None, pacs: Pacs | None = None):
        self.query = query
        self.pacs = pacs or Pacs(query.url)
        state = Path(state_dir or query.default_state_dir()).resolve()
        try:
            (state / SERIES_FOLDER).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KidsegError(f"cannot create the worklist's state folder ({exc.strerror})", state) from None
        self._lock_state = threading.RLock()  # the rows and state.json, between the GUI and the threads
        self._fetch_lock = threading.Lock()  # one fetch at a time (the reviewer's or the prefetch's)
        self._fetching: dict[str, str] = {}  # case -> what its fetch is doing (progress, or why it failed)
        self._fetch_queue: list[CaseRow] = []
        self._fetch_thread = None
        self._send_thread = None
        self.changed = False  # set by the background threads; the widget refreshes its table
        self.fetched_bytes, self.fetch_seconds = 0, 0.0
        self.server_notes: list[str] = []
        super().__init__(state, state, reviewer)
        self.folder = state
        self.notes[:0] = [f"PACS {query.label()}: {len(self.rows)} series"] + self.server_notes
        for junk in (state / SERIES_FOLDER).glob(".*.partial-*"):  # a fetch that died: never complete
            shutil.rmtree(junk, ignore_errors=True)
        self.outbox = Outbox(state)
        if not self.read_only and self.outbox.pending():
            self.retry_outbox()  # what a crash or a dead server left behind

    # ------------------------------------------------------------ rows from the server
    def _find_rows(self) -> list[CaseRow]:
        q = self.query
        try:
            found = self.pacs.find(q.patient, q.date, q.modality, q.description)
        except KidsegError as exc:  # the cases found last time are still reviewable
            self.server_notes.append(f"{exc}; showing the series found before")
            return self._rows_from_state()
        if not found:
            raise KidsegError(f"no series match ({q.label()})", self.query.url)
        rows = []
        for s in found:
            case = f"{s.patient_id or 'no-id'}/{s.date or 'no-date'} [{s.series_uid[-12:]}]"
            folder = self.state_dir / SERIES_FOLDER / self.pacs.series_folder_name(s.series_uid)
            desc = f"{s.description} ({s.slices if s.slices is not None else '?'} slices)".strip()
            rows.append(CaseRow(case, str(folder), "dicom", s.series_uid, desc, study_uid=s.study_uid))
        return rows

    def _rows_from_state(self) -> list[CaseRow]:
        fields = {f.name for f in dataclasses.fields(CaseRow)}
        with contextlib.suppress(OSError, ValueError, KeyError):
            return [
                CaseRow(**{k: v for k, v in r.items() if k in fields})
                for r in json.loads(self.state_path.read_text())["rows"]
            ]
        raise KidsegError(f"{self.server_notes[-1]} (and no series found before)")

    def save(self):
        with self._lock_state:
            super().save()

    # ------------------------------------------------------------ fetching ahead
    def is_fetched(self, row: CaseRow) -> bool:
        return Path(row.source).is_dir()

    def fetch(self, row: CaseRow, cancel=None) -> Path:
        """Fetch one case's series now (atomically); a failure marks the row failed and raises."""

        def progress(done, total, nbytes):
            self._fetching[row.case] = f"fetching {done}/{total} slices ({nbytes / 1e6:.0f} MB)"
            self.changed = True

        t0 = time.perf_counter()
        try:
            with self._fetch_lock:
                if self.is_fetched(row):
                    return Path(row.source)
                slices = re.search(r"\((\d+) slices\)$", row.description)  # as _find_rows wrote it
                out = self.pacs.fetch(
                    row.study_uid, row.series_uid, row.source, expected=int(slices[1]) if slices else None,
                    progress=progress, cancel=cancel,
                )  # fmt: skip
        except KidsegError as exc:
            self._fetching[row.case] = "not fetched"
            row.status, row.reason = "failed", f"not fetched: {str(exc).split(': ', 1)[-1]}"
            self.save()
            self.changed = True
            raise
        except Cancelled:
            self._fetching.pop(row.case, None)
            raise
        info = self.pacs.last_fetch
        self.fetched_bytes += info.get("bytes", 0)
        self.fetch_seconds += time.perf_counter() - t0
        self._fetching[row.case] = "fetched"
        if row.status == "failed" and row.reason.startswith("not fetched"):
            row.status, row.reason = "new", ""
        self.changed = True
        return out

    def prefetch(self, indices) -> None:
        """Fetch these cases' series in a background thread, in this order (after any queued)."""
        with self._lock_state:
            queued = {r.case for r in self._fetch_queue}
            for i in indices:
                row = self.rows[i]
                if not self.is_fetched(row) and row.case not in queued and row.status != "failed":
                    self._fetch_queue.append(row)
                    self._fetching[row.case] = "waiting to be fetched"
            if self._fetch_queue and (self._fetch_thread is None or not self._fetch_thread.is_alive()):
                self._fetch_thread = threading.Thread(target=self._fetch_loop, name="kidseg-pacs-fetch", daemon=True)
                self._fetch_thread.start()

    def _fetch_loop(self):
        while True:
            with self._lock_state:
                if not self._fetch_queue or self.read_only:
                    return
                row = self._fetch_queue.pop(0)
            with contextlib.suppress(KidsegError, Cancelled):
                self.fetch(row, cancel=lambda: self.read_only)

    def wait_fetched(self, timeout=None) -> bool:
        t = self._fetch_thread
        if t is not None:
            t.join(timeout)
        return t is None or not t.is_alive()

    def ready_for_draft(self, indices) -> list[int]:
        """Of these cases, those whose series is here; the others are fetched in the background."""
        missing = [i for i in indices if not self.is_fetched(self.rows[i])]
        if missing:
            self.prefetch(missing)
        return [i for i in indices if self.is_fetched(self.rows[i])]

    def read_ct(self, row: CaseRow):
        if not self.is_fetched(row):
            self.fetch(row)
        return super().read_ct(row)

    def row_note(self, row: CaseRow) -> str:
        notes = []
        fetch = self._fetching.get(row.case)
        if fetch and fetch not in ("fetched", "not fetched") and not self.is_fetched(row):
            notes.append(fetch)
        if row.pacs:
            notes.append(row.pacs)
        return "; ".join(notes)

    # ------------------------------------------------------------ results back
    def mark_reviewed(self, row, ct, labels, export_dir, *, seconds=None, **export_kwargs):
        """Export as a folder worklist does, then send the DICOM SEG and the report (Encapsulated
        PDF) to the server in the background, through the outbox."""
        case_dir = super().mark_reviewed(row, ct, labels, export_dir, seconds=seconds, **export_kwargs)
        try:
            paths = self.results_to_send(row, case_dir, ct, labels)
        except KidsegError as exc:
            row.pacs = f"not sent: {exc}"
            self.save()
            return case_dir
        self.outbox.add(row.case, paths)
        row.pacs = "waiting to be sent"
        self.save()
        self.retry_outbox()
        return case_dir

    def results_to_send(self, row, case_dir: Path, ct, labels) -> list[Path]:
        """The export's DICOM SEG and the case report as an Encapsulated PDF, in ``case_dir``."""
        from ..report import describe_case, write_report
        from ..review import DICOM_SEG_NAME, MANIFEST

        seg = Path(case_dir) / DICOM_SEG_NAME
        if not seg.exists():
            manifest = json.loads((Path(case_dir).parent / MANIFEST).read_text())
            note = next((c.get("dicom_seg_note") for c in manifest["cases"] if c["case"] == Path(case_dir).name), None)
            raise KidsegError(f"no DICOM SEG was written ({note or 'unknown reason'})")
        report = describe_case(labels, ct.geometry.spacing, ct=ct.array, provenance={"case": row.case})
        written = write_report(
            report, Path(case_dir) / "report", ct=ct.array, labels=labels, spacing=ct.geometry.spacing, overwrite=True
        )
        pdf = next(p for p in written if p.suffix == ".pdf")
        first = sorted(Path(row.source).glob("*.dcm"))[0]
        return [seg, encapsulated_pdf(pdf, first, Path(case_dir) / "report.pdf.dcm")]

    def retry_outbox(self) -> None:
        """Send what waits in the outbox, in a background thread (on start, and by a button)."""
        with self._lock_state:
            if self._send_thread is not None and self._send_thread.is_alive():
                return
            self._send_thread = threading.Thread(target=self.send_pending, name="kidseg-pacs-send", daemon=True)
            self._send_thread.start()

    def wait_sent(self, timeout=None) -> bool:
        t = self._send_thread
        if t is not None:
            t.join(timeout)
        return t is None or not t.is_alive()

    def send_pending(self) -> int:
        """Send every outbox entry now; each row says what became of its case. Returns how many
        went out."""
        n = 0
        for entry in self.outbox.pending():
            info = self.outbox.read(entry)
            rows = [r for r in self.rows if r.case == info["case"]]
            try:
                sent = self.outbox.send(entry, self.pacs)
            except KidsegError as exc:
                text = f"not sent: {str(exc).split(': ', 1)[-1] if str(exc).startswith(self.pacs.url) else exc}"
            else:
                n += 1
                times = len(self.outbox.sent(info["case"]))
                seg = next((uid for name, uid in sent["series"].items() if name.endswith(".seg.dcm")), "")
                text = f"sent to the PACS: SEG series {seg} and the report (PDF)"
                if times > 1:
                    text += f"; sent {times} times, each a new series (the earlier ones stay on the server)"
            for r in rows:
                r.pacs = text
            self.changed = True
            self.save()
        return n

    def close(self):
        read_only = self.read_only
        super().close()  # read_only now: the fetch loop stops after its current series
        if not read_only:
            self.wait_sent(timeout=self.pacs.settings.timeout)


def open_worklist(source, state_dir=None, reviewer=None, **filters):
    """A worklist on a folder, or (``source`` an http(s) URL) on a PACS query with ``filters``
    (patient, date, modality, description)."""
    if isinstance(source, Query):
        return PacsWorklist(source, state_dir, reviewer)
    if is_pacs_url(source):
        return PacsWorklist(Query(str(source), **filters), state_dir, reviewer)
    return Worklist(source, state_dir, reviewer)
