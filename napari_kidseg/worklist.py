"""A worklist: a folder of cases reviewed one after another, drafts made ahead, nothing lost.

GUI-free: the Case worklist widget, ``kidseg review`` and ``kidseg draft`` all call this.

- :func:`find_cases` lists a folder's cases recursively: KiTS case folders, CT volume files
  (NIfTI, NRRD, MHA/MHD; label files are skipped) and DICOM series (one row per series, with its
  description and date).
- :class:`Worklist` keeps the state of the series in a state folder (beside the cases, or
  elsewhere when the case folder is read-only): ``state.json`` (one row per case: status, volumes,
  time spent, reviewer, models), ``drafts/`` (each case's cascade result, so alpha and the
  thresholds stay live on a draft), ``edits/`` (the labels as corrected so far and the slices
  reviewed) and ``worklist.csv`` for the study's records. Every file is written atomically: a
  crash leaves the previous version, never half a file. A lock file stops a second napari from
  writing the same worklist: it opens the worklist read-only and says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .errors import KidsegError, KidsegWarning
from .io import files, volumes

_log = logging.getLogger(__name__)

STATE_FOLDER = ".kidseg-worklist"
STATUSES = ("new", "drafted", "in review", "reviewed", "failed")
TODO = ("new", "drafted", "in review")


@dataclasses.dataclass
class CaseRow:
    """One case of the worklist, as the table shows it and state.json keeps it."""

    case: str  # its path relative to the worklist folder (plus the series uid for a DICOM series)
    source: str  # absolute path: the CT file, the DICOM folder, or the KiTS case folder
    kind: str  # "kits", "volume" or "dicom"
    series_uid: str | None = None
    description: str = ""
    status: str = "new"
    reason: str = ""  # why it failed
    right_kidney_ml: float | None = None
    left_kidney_ml: float | None = None
    right_tumor_ml: float | None = None
    left_tumor_ml: float | None = None
    largest_tumor_mm: float | None = None
    seconds: float = 0.0  # time spent reviewing it
    reviewer: str = ""
    models: str = ""  # the models that made its draft
    study_uid: str | None = None  # a series on a PACS: its study (napari_kidseg.pacs)
    pacs: str = ""  # what became of its results sent to the PACS (sent, or "not sent: reason")

    @property
    def ct_path(self) -> Path:
        return Path(self.source) / volumes.KITS_IMAGE if self.kind == "kits" else Path(self.source)

    @property
    def key(self) -> str:
        """A file-name-safe id for the case's draft and edit files."""
        digest = hashlib.sha1(self.case.encode()).hexdigest()[:10]
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.case)[-60:]
        return f"{stem}-{digest}"


# ----------------------------------------------------------------------------------------------
# Finding cases
# ----------------------------------------------------------------------------------------------


def _dicom_rows(folder: Path, root: Path) -> list[CaseRow]:
    import pydicom
    import SimpleITK as sitk

    from .io.volumes import SEG_SOP_CLASS_UID

    rows = []
    with volumes.itk_warnings_off():
        ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
        for uid in ids:
            names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
            if not names:
                continue
            try:
                ds = pydicom.dcmread(names[0], stop_before_pixels=True)
                if str(getattr(ds, "SOPClassUID", "")) == SEG_SOP_CLASS_UID:
                    continue  # a DICOM SEG is not a case
                desc = " ".join(str(getattr(ds, t, "") or "") for t in ("SeriesDescription", "SeriesDate")).strip()
            except Exception:  # noqa: BLE001 - unreadable header: the row still lists it, reading the CT will say why
                desc = ""
            rel = folder.relative_to(root).as_posix() or "."
            case = rel if len(ids) == 1 else f"{rel} [{uid[-12:] or volumes.uid_text(uid)}]"
            rows.append(CaseRow(case, str(folder), "dicom", uid, f"{desc} ({len(names)} slices)".strip()))
    return rows


def find_cases(folder, state_dir=None) -> list[CaseRow]:
    """The cases under a folder, sorted by path; one line naming the folder when there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise KidsegError("no such folder", root)
    skip = {Path(state_dir).resolve()} if state_dir else set()
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and (d / n).resolve() not in skip)
        if (d / volumes.KITS_IMAGE).exists():
            rows.append(CaseRow(d.relative_to(root).as_posix(), str(d), "kits"))
            dirnames[:] = []
            continue
        if any(f.lower().endswith(volumes.DICOM_SUFFIXES) for f in filenames):
            rows.extend(_dicom_rows(d, root))
        for f in sorted(filenames):
            p = d / f
            fmt = volumes.volume_format(p)
            if fmt not in (None, "dicom") and not volumes.is_label_file(p):
                rows.append(CaseRow(p.relative_to(root).as_posix(), str(p), "volume"))
    if not rows:
        raise KidsegError(
            "holds no CT: no KiTS case folder, CT volume file (.nii.gz, .nrrd, .mha, .mhd) or DICOM series", root
        )
    return sorted(rows, key=lambda r: r.case)


# ----------------------------------------------------------------------------------------------
# The worklist and its state
# ----------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def default_state_dir(folder) -> Path:
    """Beside the cases; for a read-only folder, a folder of the user's cache named after it."""
    root = Path(folder).resolve()
    if os.access(root, os.W_OK):
        return root / STATE_FOLDER
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    base = Path(os.environ.get("KIDSEG_CACHE", Path.home() / ".cache" / "napari-kidseg"))
    return base / "worklists" / f"{root.name}-{digest}"


class Worklist:
    """A folder's cases and their review state; see the module's description."""

    gone_reason = "deleted from the folder"  # a case listed before and not found now

    def __init__(self, folder, state_dir=None, reviewer: str | None = None):
        self.folder = Path(folder).resolve()
        self.notes: list[str] = []
        self.state_dir = Path(state_dir).resolve() if state_dir else default_state_dir(self.folder)
        if not state_dir and not str(self.state_dir).startswith(str(self.folder)):
            self.notes.append(f"{self.folder} is read-only: the worklist's state is kept in {self.state_dir}")
        self.rows = self._find_rows()
        self.reviewer = reviewer or _os_user()
        try:
            for sub in ("", "drafts", "edits"):
                (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KidsegError(f"cannot create the worklist's state folder ({exc.strerror})", self.state_dir) from None
        self.read_only = not self._lock()
        if not self.read_only:  # temporary files of a process killed mid-write (drafting, autosave)
            for sub in ("", "drafts", "edits"):
                for junk in (self.state_dir / sub).glob(".*.tmp*"):
                    junk.unlink(missing_ok=True)
        self.current: int | None = None  # the case open for review, kept in state.json to resume at
        self._identity: dict[str, str] = {}  # case -> identity of its CT as last read (ct_identity)
        self._load_state()
        self.save()

    def _find_rows(self) -> list[CaseRow]:
        return find_cases(self.folder, self.state_dir)

    def ready_for_draft(self, indices) -> list[int]:
        """Of these cases, those that can be drafted now (a PACS worklist fetches the others)."""
        return list(indices)

    def row_note(self, row: CaseRow) -> str:
        """What the table adds to a case's status (a PACS worklist: fetch progress, sends)."""
        return ""

    # ------------------------------------------------------------ lock
    @property
    def lock_path(self) -> Path:
        return self.state_dir / "lock"

    def _lock(self) -> bool:
        """Take the lock, or say who holds it. The lock is written whole to a temporary file and
        linked into place, so it is never seen empty; one that names no live process on this
        host (a crash's, or an empty one left by an older version) is taken over."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "user": _os_user(), "since": time.time()}
        for _ in range(3):
            try:
                _create_whole(self.lock_path, json.dumps(me))
            except FileExistsError:
                try:
                    raw = self.lock_path.read_bytes()
                except OSError:
                    continue  # given back meanwhile
                try:
                    other = json.loads(raw)
                except ValueError:
                    other = None
                if not isinstance(other, dict) or not isinstance(other.get("pid"), int):
                    with contextlib.suppress(OSError):
                        if self.lock_path.read_bytes() == raw:  # still that unreadable lock
                            self.lock_path.unlink()
                    self.notes.append(f"{self.lock_path} named no process (a crash's): taken over")
                    continue
                same_host = other.get("host") == me["host"]
                if same_host and not _pid_alive(other["pid"]):
                    self.lock_path.unlink(missing_ok=True)  # a crashed napari's lock: take it over
                    continue
                who = f"{other.get('user', 'someone')} (pid {other.get('pid', '?')} on {other.get('host', '?')})"
                self.notes.append(f"another napari has this worklist open, {who}: opened read-only")
                return False
            return True
        return False

    def close(self):
        """Save and give the lock back (only the worklist that holds it)."""
        if not self.read_only:
            self.save()
            self.lock_path.unlink(missing_ok=True)
            self.read_only = True

    # ------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def csv_path(self) -> Path:
        return self.state_dir / "worklist.csv"

    @property
    def backup_path(self) -> Path:
        """The last good state.json, written after each save (restored from when state.json breaks)."""
        return self.state_dir / "state.json.bak"

    def _read_state(self, path: Path) -> tuple[dict, str | None]:
        """``{case: row}`` and the current case of a state file; KidsegError when unreadable."""
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise KidsegError(f"unreadable ({type(exc).__name__})", path) from None
        rows = state.get("rows") if isinstance(state, dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("case"), str) for r in rows):
            raise KidsegError("is not a worklist state (an object with a list of case rows)", path)
        current = state.get("current")
        return {r["case"]: _valid_fields(r) for r in rows}, current if isinstance(current, str) else None

    def _load_state(self):
        saved, current_case = {}, None
        if self.state_path.exists():
            try:
                saved, current_case = self._read_state(self.state_path)
            except KidsegError as exc:
                saved, current_case = self._recover_state(exc)
        elif self.backup_path.exists():  # killed between a save's two files: the copy is as good
            with contextlib.suppress(KidsegError):
                saved, current_case = self._read_state(self.backup_path)
        fields = {f.name for f in dataclasses.fields(CaseRow)}
        for row in self.rows:
            old = saved.pop(row.case, None)
            if old:
                for k, v in old.items():
                    if k in fields and k not in ("case", "source", "kind", "series_uid"):
                        setattr(row, k, v)
            if row.status == "failed" and row.reason == self.gone_reason:
                row.status, row.reason = "new", ""  # it is back
        for old in saved.values():  # listed before, gone from the folder now
            if not all(isinstance(old.get(k), str) for k in ("case", "source", "kind")):
                continue  # a recovered row without its paths: nothing to list
            row = CaseRow(**{k: v for k, v in old.items() if k in fields})
            row.status, row.reason = "failed", self.gone_reason
            self.rows.append(row)
        self.rows.sort(key=lambda r: r.case)
        cases = [r.case for r in self.rows]
        self.current = cases.index(current_case) if current_case in cases else None

    def _recover_state(self, exc: KidsegError) -> tuple[dict, str | None]:
        """A broken state.json is kept aside (never overwritten), and the state comes back from
        its last good copy; without one, from the drafts and autosaves on disk."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kept = self.state_dir / f"state.json.broken-{stamp}"
        n = 1
        while kept.exists():  # an earlier broken one of the same second stays too
            n += 1
            kept = self.state_dir / f"state.json.broken-{stamp}-{n}"
        if self.read_only:
            kept = self.state_path
        else:
            os.replace(self.state_path, kept)
        try:
            saved, current = self._read_state(self.backup_path)
            self.notes.append(f"{exc}; kept as {kept.name}; restored from the last good copy ({self.backup_path.name})")
            return saved, current
        except KidsegError:
            pass
        saved = {}
        for row in self.rows:
            if self.edits_path(row).exists() or self.edits_backup_path(row).exists():
                saved[row.case] = {"status": "in review"}
            elif self.draft_path(row).exists():
                saved[row.case] = {"status": "drafted"}
        self.notes.append(
            f"{exc}; kept as {kept.name}; no good copy, so each case's status comes from its draft and "
            "autosave files (reviewed cases show as in review: check them against the exports)"
        )
        return saved, None

    def save(self):
        """state.json and worklist.csv, atomically; a full disk is one clear error, the old files stay.
        A copy of state.json (``state.json.bak``) follows each save: the last good one."""
        if self.read_only:
            return
        from .report import rows_to_csv

        current = None if self.current is None else self.rows[self.current].case
        state = {"folder": str(self.folder), "current": current, "rows": [dataclasses.asdict(r) for r in self.rows]}
        text = json.dumps(state, indent=1)
        for path in (self.state_path, self.backup_path):
            with files.atomic_path(path, overwrite=True) as tmp:
                tmp.write_text(text)
        table = [
            {k: v for k, v in dataclasses.asdict(r).items() if k not in ("source", "series_uid")} for r in self.rows
        ]
        with files.atomic_path(self.csv_path, overwrite=True) as tmp:
            tmp.write_text(rows_to_csv(table))

    def index_of(self, case: str) -> int:
        return next(i for i, r in enumerate(self.rows) if r.case == case)

    def next_todo(self, after: int = -1) -> int | None:
        """The next case not yet reviewed (and not failed) after index ``after``, wrapping around."""
        n = len(self.rows)
        for k in range(1, n + 1):
            i = (after + k) % n
            if self.rows[i].status in TODO:
                return i
        return None

    @property
    def reviewed(self) -> int:
        return sum(r.status == "reviewed" for r in self.rows)

    # ------------------------------------------------------------ reading, drafts, edits
    def read_ct(self, row: CaseRow) -> volumes.Volume:
        """The case's CT; a case that cannot be read is marked failed with the reason (and re-raised)."""
        if not Path(row.source).exists():
            row.status, row.reason = "failed", "deleted from the folder"
            self.save()
            raise KidsegError("was deleted from the worklist folder", row.source)
        try:
            ct = volumes.read_ct(row.ct_path, series_uid=row.series_uid)
        except KidsegError as exc:
            row.status, row.reason = "failed", str(exc).split(": ", 1)[-1]
            self.save()
            raise
        self._identity[row.case] = ct_identity(ct)
        return ct

    def draft_path(self, row: CaseRow) -> Path:
        return self.state_dir / "drafts" / f"{row.key}.npz"

    def edits_path(self, row: CaseRow) -> Path:
        return self.state_dir / "edits" / f"{row.key}.npz"

    def has_draft(self, row: CaseRow) -> bool:
        return self.draft_path(row).exists()

    def to_draft(self, order=None, *, redraft=False) -> list[int]:
        """The indices (in ``order``) of the cases a batch drafts: neither reviewed nor failed, and
        not drafted yet (or drafted, with ``redraft``)."""
        rows = [(i, self.rows[i]) for i in (order if order is not None else range(len(self.rows)))]
        return [i for i, r in rows if r.status not in ("reviewed", "failed") and (redraft or not self.has_draft(r))]

    def draft(self, row: CaseRow, cascade, *, ct=None, cancel=None, progress=None):
        """Run the cascade on one case and keep its result in the draft cache (atomically: a
        cancelled or failed draft leaves no file). Returns the result, or None when it failed."""
        from .errors import Cancelled

        try:
            ct = ct if ct is not None else self.read_ct(row)
            result = cascade.run(ct.array, ct.geometry.spacing, cancel=cancel, progress=progress)
        except Cancelled:
            return None
        except KidsegError as exc:
            self.record_draft(row, {"error": str(exc)})
            return None
        self._identity[row.case] = identity = ct_identity(ct)
        info = _keep_draft(result, cascade, None if self.read_only else self.draft_path(row), identity)
        self.record_draft(row, info)
        return result

    def record_draft(self, row: CaseRow, info: dict):
        """Note a draft made here or by :func:`draft_case` in another process: its models and
        volumes, or why it failed."""
        if "error" in info:
            row.status, row.reason = "failed", info["error"].split(": ", 1)[-1]
        else:
            row.models = info["models"]
            if row.status in ("new", "failed"):
                row.status, row.reason = "drafted", ""
            self._measure(row, info["measurements"])
        self.save()

    def load_draft(self, row: CaseRow, ct=None):
        """The case's cached draft ``(result, note)``, or None: none yet, or one that cannot serve
        (unreadable, or made from another CT than the case's file holds now: it changed), which is
        dropped with a note so that the case is drafted again. ``ct``: the case's CT (default: the
        one :meth:`read_ct` read last)."""
        from .cascade import CascadeResult

        path = self.draft_path(row)
        if not path.exists():
            return None
        try:
            result, note = CascadeResult.load_probabilities(path)
        except KidsegError as exc:
            return self._drop(row, path, f"its draft was unreadable ({str(exc).split(': ', 1)[-1]})")
        if not self._same_ct(row, ct, note.get("ct"), result.shape):
            return self._drop(row, path, "its draft was made from another CT than its file holds now")
        return result, note

    def _same_ct(self, row: CaseRow, ct, saved_identity, saved_shape) -> bool:
        """Whether a draft or autosave made from the CT ``saved_identity`` belongs to this case's
        CT as it is now (older files without an identity: when the grid is the same)."""
        identity = ct_identity(ct) if ct is not None else self._identity.get(row.case)
        if identity is None:
            return True  # the CT was not read here: nothing to compare with
        if saved_identity:
            return saved_identity == identity
        return tuple(int(s) for s in saved_shape) == _identity_shape(identity)

    def _drop(self, row: CaseRow, path: Path, why: str, keep_as: Path | None = None):
        """A draft or autosave that cannot serve: removed (or kept aside), with a note; None."""
        note = f"{row.case}: {why}; " + (f"kept aside as {keep_as.name}" if keep_as else "dropped, it is drafted again")
        if not self.read_only:
            if keep_as is not None:
                os.replace(path, keep_as)
            else:
                path.unlink(missing_ok=True)
        self.notes.append(note)
        _log.warning("%s", note)
        warnings.warn(note, KidsegWarning, stacklevel=3)
        return None

    def drop_draft(self, row: CaseRow):
        """Forget a draft (to redraft it with other models)."""
        if not self.read_only:
            self.draft_path(row).unlink(missing_ok=True)
            if row.status == "drafted":
                row.status = "new"
            self.save()

    def edits_backup_path(self, row: CaseRow) -> Path:
        """The autosave before the last one: what loads when the last one is unreadable."""
        return self.state_dir / "edits" / f"{row.key}.bak.npz"

    def save_edits(
        self,
        row: CaseRow,
        labels: np.ndarray,
        reviewed_slices=(),
        seconds: float = 0.0,
        measured: dict | None = None,
        ct=None,
    ):
        """Autosave: the labels as corrected so far and the slices reviewed (atomic; the previous
        autosave is kept as the last good copy). An autosave has to be quick, so it measures
        nothing itself: ``measured`` (metrics.measurements of these labels, as the Review box has
        them) updates the row's volumes."""
        if self.read_only:
            return
        path = self.edits_path(row)
        identity = ct_identity(ct) if ct is not None else self._identity.get(row.case, "")
        with files.atomic_path(path, overwrite=True) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(
                    fh, labels=labels, reviewed=np.array(sorted(reviewed_slices), np.int32), ct=np.array(identity)
                )
            if path.exists():  # killed from here to the rename: the copy loads
                os.replace(path, self.edits_backup_path(row))
        row.seconds = float(seconds)
        if measured is not None:
            self._measure(row, measured)
        if row.status != "reviewed":
            row.status = "in review"
        row.reviewer = row.reviewer or self.reviewer
        self.save()

    def load_edits(self, row: CaseRow, ct=None):
        """The autosaved ``(labels, reviewed slices)`` of a case, or None. An unreadable autosave
        is kept aside and its last good copy loads; edits made on another CT than the case's file
        holds now are kept aside too (with a note), not laid over this one."""
        for path in (self.edits_path(row), self.edits_backup_path(row)):
            if not path.exists():
                continue
            try:
                with np.load(path, allow_pickle=False) as f:
                    labels, reviewed = f["labels"], {int(z) for z in f["reviewed"]}
                    identity = str(f["ct"]) if "ct" in f else ""
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                aside = path.with_name(f"{path.name}.unreadable")
                self._drop(row, path, f"its autosave was unreadable ({type(exc).__name__})", keep_as=aside)
                continue
            if not self._same_ct(row, ct, identity, labels.shape):
                aside = path.with_name(f"{path.name}.other-ct")
                self._drop(row, path, "its autosaved edits were made on another CT than its file holds now", aside)
                continue
            return labels, reviewed
        return None

    def mark_reviewed(self, row: CaseRow, ct, labels, export_dir, *, seconds=None, **export_kwargs) -> Path:
        """Export the case (KiTS layout + manifest; DICOM SEG for a DICOM CT) and mark it reviewed."""
        from .metrics import measurements
        from .review import export_correction

        if self.read_only:
            raise KidsegError("is open read-only in this napari (another one holds it)", self.state_dir)
        own = Path(row.case).name  # a KiTS case keeps its name in the export (else the next free case_NNNNN)
        case_dir = export_correction(
            Path(export_dir), ct, labels, whole_case_reviewed=True, update=True,
            case_id=own if volumes.CASE_RE.match(own) else None, **export_kwargs,
        )  # fmt: skip
        row.status, row.reason = "reviewed", ""
        row.reviewer = row.reviewer or self.reviewer
        if seconds is not None:
            row.seconds = float(seconds)
        self._measure(row, measurements(labels, ct.geometry.spacing))
        self.save()
        return case_dir

    @staticmethod
    def _measure(row: CaseRow, m: dict):
        row.right_kidney_ml = round(m["right"]["kidney_ml"], 1)
        row.left_kidney_ml = round(m["left"]["kidney_ml"], 1)
        row.right_tumor_ml = round(m["right"]["tumor_ml"], 1)
        row.left_tumor_ml = round(m["left"]["tumor_ml"], 1)
        row.largest_tumor_mm = round(m["total"]["tumor_diameter_mm"], 1)


def ct_identity(ct: volumes.Volume) -> str:
    """What a draft or an autosave records of the CT it was made from: its grid and a digest of
    its voxels (every 4th row and column of every slice), so that a case file replaced by another
    scan, on the same grid or not, is noticed."""
    arr = ct.array
    digest = hashlib.blake2b(digest_size=12)
    digest.update(repr((arr.shape, str(arr.dtype), ct.geometry)).encode())
    digest.update(np.ascontiguousarray(arr[:, ::4, ::4]).data)
    return "x".join(str(s) for s in arr.shape) + ":" + digest.hexdigest()


def _identity_shape(identity: str) -> tuple[int, ...]:
    return tuple(int(s) for s in identity.split(":")[0].split("x"))


def _valid_fields(row: dict) -> dict:
    """The fields of a saved row that have the type CaseRow gives them (a hand-edited or damaged
    state.json cannot put a list where a volume goes)."""
    out = {}
    for f in dataclasses.fields(CaseRow):
        if f.name not in row:
            continue
        v = row[f.name]
        if f.name == "status":
            ok = v in STATUSES
        elif f.type in ("float | None",):
            ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
        elif f.type == "float":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif f.type == "str | None":
            ok = v is None or isinstance(v, str)
        else:
            ok = isinstance(v, str)
        if ok:
            out[f.name] = v
    return out


def _create_whole(path: Path, text: str) -> None:
    """Create ``path`` holding ``text``, never seen half written; FileExistsError when it exists."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        try:
            os.link(tmp, path)  # atomic, and fails when the path exists
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: create exclusively, then write
            fd2 = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd2, "w") as fh:
                fh.write(text)
    finally:
        os.unlink(tmp)


def _keep_draft(result, cascade, path, identity: str = "") -> dict:
    from .metrics import measurements

    models = models_label(cascade.coarse_path, cascade.refine_path)
    if path is not None:
        result.save_probabilities(path, overwrite=True, note={"models": models, "ct": identity})
    return {"models": models, "measurements": measurements(result.fuse(), result.spacing)}


def models_label(coarse, refine) -> str:
    """How a row names the models of its draft: folder and file of each (fine-tuned children share
    file names with the bundled models, not folders)."""
    return " + ".join(f"{Path(p).parent.name}/{Path(p).name}" for p in (coarse, refine))


def drafting_process_init():
    """A drafting process runs at low priority: the radiologist's napari comes first."""
    with contextlib.suppress(OSError, AttributeError):
        os.nice(10)


def draft_case(ct_path, series_uid, draft_path, coarse=None, refine=None, device="auto") -> dict:
    """Draft one case in this process and keep it at ``draft_path`` (atomically); returns what
    :meth:`Worklist.record_draft` takes. Run in a separate process by the widget (drafts ahead),
    so that no long call of the drafting holds the GUI process's interpreter lock."""
    from .cascade import cached_cascade

    try:
        cascade = cached_cascade(coarse, refine, device)
        ct = volumes.read_ct(ct_path, series_uid=series_uid)
        result = cascade.run(ct.array, ct.geometry.spacing)
        return _keep_draft(result, cascade, Path(draft_path), ct_identity(ct))
    except KidsegError as exc:
        return {"error": str(exc)}


def draft_all(worklist: Worklist, cascade, *, order=None, cancel=None, progress=None, redraft=False) -> int:
    """Draft every case not drafted yet (or all, with ``redraft``) in ``order`` (indices), in this
    process; returns how many were drafted. What ``kidseg draft`` runs (on a GPU machine overnight,
    say); the widget drafts ahead in another process with :func:`draft_case`."""
    done = 0
    for i in worklist.to_draft(order, redraft=redraft):
        if cancel is not None and cancel():
            break
        row = worklist.rows[i]
        if worklist.draft(row, cascade, cancel=cancel) is not None:
            done += 1
        if progress:
            progress(done, len(worklist.rows), row.case)
    return done


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no user name in this environment (no passwd entry, no LOGNAME)
        return ""
