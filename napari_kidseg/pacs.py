"""The PACS in the loop: cases from a DICOMweb server, the DICOM SEG and the report back to it.

GUI-free: ``kidseg pacs ...``, ``kidseg review URL``, ``kidseg draft URL`` and the Case worklist
widget all call this.

- :class:`Pacs` is one server, reached through its DICOMweb root (``dicomweb-client``): QIDO-RS
  finds series (:meth:`Pacs.find`), WADO-RS fetches them (:meth:`Pacs.fetch`, into a temporary
  folder renamed into place when every instance is in: a fetch that dies leaves nothing that
  looks complete), STOW-RS stores results (:meth:`Pacs.store`), or DIMSE C-STORE (``pynetdicom``)
  where the settings name a DICOM node.
- Credentials never come from the command line: ``KIDSEG_PACS_USER`` / ``KIDSEG_PACS_PASSWORD``,
  or a settings file readable by its owner only (``KIDSEG_PACS_CONFIG``, default
  ``~/.config/napari-kidseg/pacs.json``; refused otherwise). A URL carrying a user or password is
  refused. HTTPS verifies certificates (``ca_bundle`` / ``KIDSEG_PACS_CA_BUNDLE`` names a CA);
  there is no fallback to an unverified connection.
- Every fault a user meets (wrong password, unreachable server, timeout, a refused store, a
  series gone between find and fetch, an answer that is not DICOM) is one :class:`KidsegError`
  line naming the server, without credentials.
- :class:`PacsWorklist` is a :class:`~napari_kidseg.worklist.Worklist` on the series a query
  finds: each is fetched into the state folder ahead of the reviewer (:meth:`PacsWorklist.prefetch`,
  in a background thread, with progress), and Mark reviewed sends the case's DICOM SEG and its
  report as an Encapsulated PDF through an outbox (``outbox/`` in the state folder): a failed send
  stays there, the row says ``not sent: reason``, and it is retried on the next start and on
  request. Every send is a new series on the server; nothing there is replaced.

Why an Encapsulated PDF and not a DICOM SR for the report: the report the tool writes is a
one-page PDF (figure, table, method notes) and every PACS viewer shows an Encapsulated PDF as the
page the radiologist saw; an SR (TID 1500) renders as a bare tree of coded values in most viewers,
and the structured content it would add (the segments, their volumes) is already in the DICOM SEG
sent beside it, which any consumer can measure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import stat
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests

from .errors import Cancelled, KidsegError
from .io import files
from .worklist import CaseRow, Worklist

ENV_USER, ENV_PASSWORD = "KIDSEG_PACS_USER", "KIDSEG_PACS_PASSWORD"
ENV_CONFIG, ENV_CA_BUNDLE = "KIDSEG_PACS_CONFIG", "KIDSEG_PACS_CA_BUNDLE"
DEFAULT_TIMEOUT_S = 30.0
QIDO_PAGE = 500  # series asked for at a time
ENCAPSULATED_PDF_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.104.1"
SERIES_FOLDER = "series"  # fetched series, one folder each, in the state folder
OUTBOX, SENT = "outbox", "sent"


def is_pacs_url(text) -> bool:
    """Whether a worklist source names a DICOMweb server rather than a folder."""
    return str(text).lower().startswith(("http://", "https://"))


# ----------------------------------------------------------------------------------------------
# Settings: credentials, CA bundle, timeout, DIMSE
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    """How to reach a server. ``dimse``: ``{"host", "port", "called_aet", "calling_aet"}`` to
    store results by C-STORE instead of STOW-RS."""

    user: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    ca_bundle: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    dimse: dict | None = None


def settings_path() -> Path:
    return Path(os.environ.get(ENV_CONFIG) or Path.home() / ".config" / "napari-kidseg" / "pacs.json")


def load_settings() -> Settings:
    """The settings file (when there is one, owner-readable only), then the environment on top."""
    path = settings_path()
    raw = {}
    if path.exists():
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KidsegError(
                f"holds PACS credentials but others may read it (mode {stat.S_IMODE(mode):o}); chmod 600 it", path
            )
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise KidsegError(f"is not a readable JSON settings file ({type(exc).__name__})", path) from None
        unknown = set(raw) - {f.name for f in dataclasses.fields(Settings)}
        if unknown:
            raise KidsegError(f"has unknown keys {sorted(unknown)}", path)
    s = Settings(**raw)
    s.user = os.environ.get(ENV_USER) or s.user
    s.password = os.environ.get(ENV_PASSWORD) or s.password
    s.ca_bundle = os.environ.get(ENV_CA_BUNDLE) or s.ca_bundle
    if s.ca_bundle and not Path(s.ca_bundle).is_file():
        raise KidsegError("no such CA bundle (ca_bundle / KIDSEG_PACS_CA_BUNDLE)", s.ca_bundle)
    if s.dimse is not None:
        missing = {"host", "port", "called_aet"} - set(s.dimse)
        if missing:
            raise KidsegError(f"its dimse entry lacks {sorted(missing)}", path)
    return s


# ----------------------------------------------------------------------------------------------
# One server
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SeriesInfo:
    """One series as QIDO-RS describes it."""

    study_uid: str
    series_uid: str
    patient_id: str = ""
    date: str = ""
    description: str = ""
    modality: str = ""
    slices: int | None = None

    @property
    def row(self) -> str:
        return "\t".join(
            [
                self.patient_id or "-",
                self.date or "-",
                self.description or "-",
                str(self.slices or "?"),
                self.series_uid,
            ]
        )


def _value(item: dict, tag: str) -> str:
    v = (item.get(tag) or {}).get("Value") or [""]
    v = v[0]
    if isinstance(v, dict):  # a person name
        v = v.get("Alphabetic", "")
    return str(v)


class Pacs:
    """One DICOMweb server (see the module's description)."""

    def __init__(self, url: str, settings: Settings | None = None):
        from dicomweb_client.api import DICOMwebClient

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise KidsegError("is not a DICOMweb URL (expected http(s)://host[:port]/path)", url)
        if parts.username or parts.password:
            # never echo it: the URL holds a secret
            raise KidsegError(
                f"a PACS URL must not carry credentials; set {ENV_USER} and {ENV_PASSWORD} (or the settings file)"
            )
        self.url = url.rstrip("/")
        self.settings = settings if settings is not None else load_settings()
        session = _Session()
        if self.settings.user:
            session.auth = (self.settings.user, self.settings.password or "")
        session.verify = self.settings.ca_bundle or True
        self._client = DICOMwebClient(self.url, session=session, timeout=self.settings.timeout)
        self._client.set_http_retry_params(retry=False)  # a fault is one line now, not after minutes
        self.last_fetch: dict = {}

    def __repr__(self):
        return f"Pacs({self.url!r})"

    @contextlib.contextmanager
    def _faults(self, what: str):
        """Every way a server can fail, as one line naming it (never the credentials)."""
        import pydicom

        try:
            yield
        except KidsegError:
            raise
        except requests.exceptions.SSLError:
            raise KidsegError(
                f"{what}: the server's certificate is not trusted; name its CA with {ENV_CA_BUNDLE} "
                "(no unverified connection is made)",
                self.url,
            ) from None
        except requests.exceptions.Timeout:
            raise KidsegError(f"{what}: no answer within {self.settings.timeout:g} s (timeout)", self.url) from None
        except requests.exceptions.ConnectionError:
            raise KidsegError(f"{what}: cannot reach the server (connection refused or lost)", self.url) from None
        except requests.exceptions.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            why = {
                401: "the server refused the credentials (HTTP 401): check KIDSEG_PACS_USER / KIDSEG_PACS_PASSWORD",
                403: "the server does not allow this (HTTP 403)",
                404: "not on the server (HTTP 404)",
            }.get(code, f"the server answered HTTP {code}")
            raise KidsegError(f"{what}: {why}", self.url) from None
        except requests.exceptions.JSONDecodeError:  # a RequestException too: before it
            raise KidsegError(f"{what}: the answer is not DICOM (not DICOM JSON)", self.url) from None
        except requests.exceptions.RequestException:  # a stream cut mid-answer, among others
            raise KidsegError(f"{what}: the connection broke off (the server stopped?)", self.url) from None
        except (ValueError, KeyError, TypeError, pydicom.errors.InvalidDicomError) as exc:
            raise KidsegError(f"{what}: the answer is not DICOM ({type(exc).__name__})", self.url) from None

    # ------------------------------------------------------------ QIDO-RS
    def find(self, patient=None, date=None, modality="CT", description=None) -> list[SeriesInfo]:
        """The series that match (``date``: YYYYMMDD or YYYYMMDD-YYYYMMDD; ``description``: a
        case-insensitive part of the series description), by patient, date and series UID."""
        filters = {}
        if patient:
            filters["PatientID"] = patient
        if date:
            _check_date(date)
            filters["StudyDate"] = date
        if modality:
            filters["Modality"] = modality
        fields = ["PatientID", "StudyDate", "SeriesDescription", "NumberOfSeriesRelatedInstances", "StudyInstanceUID"]
        found = self._search("finding series", self._client.search_for_series, search_filters=filters, fields=fields)
        out = []
        for item in found:
            info = self._info(item)
            # matched here, not by the server: wildcard and case rules differ between PACS
            if description and description.lower() not in info.description.lower():
                continue
            if info.series_uid and info.study_uid:
                out.append(info)
        return sorted(out, key=lambda s: (s.patient_id, s.date, s.description, s.series_uid))

    def _search(self, what, search, **kwargs) -> list[dict]:
        """Every page of a QIDO-RS answer (a server that ignores ``offset`` repeats its first page:
        that ends it too, where dicomweb-client's own paging would loop for ever)."""
        out, seen = [], set()
        with self._faults(what):
            while True:
                page = search(limit=QIDO_PAGE, offset=len(out), **kwargs)
                if not isinstance(page, list) or any(not isinstance(i, dict) for i in page):
                    raise ValueError("not a list of datasets")
                key = json.dumps(page[:1], sort_keys=True)
                if not page or key in seen:
                    return out
                seen.add(key)
                out += page
                if len(page) < QIDO_PAGE:
                    return out

    def lookup(self, series_uid: str) -> SeriesInfo:
        """One series by its UID (any modality), or one line saying the server does not hold it."""
        with self._faults(f"finding series {series_uid}"):
            found = self._client.search_for_series(
                search_filters={"SeriesInstanceUID": series_uid},
                fields=["PatientID", "StudyDate", "SeriesDescription", "NumberOfSeriesRelatedInstances"],
            )
        for item in found:
            if _value(item, "0020000E") == series_uid:
                return self._info(item)
        raise KidsegError(f"holds no series {series_uid}", self.url)

    @staticmethod
    def _info(item: dict) -> SeriesInfo:
        n = _value(item, "00201209")
        return SeriesInfo(
            study_uid=_value(item, "0020000D"),
            series_uid=_value(item, "0020000E"),
            patient_id=_value(item, "00100020"),
            date=_value(item, "00080020"),
            description=_value(item, "0008103E"),
            modality=_value(item, "00080060"),
            slices=int(n) if n.isdigit() else None,
        )

    def ping(self) -> list[str]:
        """What the server answers to: QIDO-RS always; WADO-RS on one series' metadata when it
        holds one; DIMSE C-ECHO when configured. STOW-RS is not probed (a probe would store)."""
        t0 = time.perf_counter()
        with self._faults("QIDO-RS"):
            studies = self._client.search_for_studies(limit=1)
            if not isinstance(studies, list):
                raise ValueError("not a list")
        lines = [f"QIDO-RS: answers ({1000 * (time.perf_counter() - t0):.0f} ms)"]
        with self._faults("QIDO-RS"):
            series = self._client.search_for_series(limit=1)
        if series:
            with self._faults("WADO-RS"):
                meta = self._client.retrieve_series_metadata(
                    _value(series[0], "0020000D"), _value(series[0], "0020000E")
                )
            lines.append(f"WADO-RS: answers (metadata of a series of {len(meta)} instance(s))")
        else:
            lines.append("WADO-RS: not checked (the server holds no series)")
        lines.append("STOW-RS: not probed (a probe would store an object); `kidseg pacs push` tells")
        if self.settings.dimse:
            lines.append(f"DIMSE C-ECHO: {self._echo()}")
        return lines

    # ------------------------------------------------------------ WADO-RS
    def series_folder_name(self, series_uid: str) -> str:
        return "".join(c if c.isalnum() or c in ".-_" else "_" for c in series_uid)

    def fetch(self, study_uid: str, series_uid: str, dest, *, expected=None, progress=None, cancel=None) -> Path:
        """Fetch one series as a folder of DICOM files at ``dest``, atomically: the instances go
        into a temporary folder beside it, renamed onto ``dest`` only when all of them are in and
        each is an instance of this series. An existing ``dest`` is a complete fetch: kept.
        ``progress(done, total, bytes)`` after each instance. Returns ``dest``."""
        import pydicom

        dest = Path(dest)
        if dest.is_dir():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        t0, done, nbytes = time.perf_counter(), 0, 0
        try:
            if expected is None:
                expected = len(
                    self._search(
                        f"finding the instances of series {series_uid}",
                        self._client.search_for_instances,
                        study_instance_uid=study_uid,
                        series_instance_uid=series_uid,
                    )
                )
                if not expected:
                    raise KidsegError(f"series {series_uid} is no longer on the server", self.url)
            with self._faults(f"fetching series {series_uid}"):
                for ds in self._client.iter_series(study_uid, series_uid):
                    if cancel is not None and cancel():
                        raise Cancelled()
                    if not isinstance(ds, pydicom.Dataset) or str(ds.get("SeriesInstanceUID", "")) != series_uid:
                        raise ValueError("an instance of another series")
                    name = tmp / f"{done:05d}.dcm"
                    pydicom.dcmwrite(name, ds, enforce_file_format=True)
                    done += 1
                    nbytes += name.stat().st_size
                    if progress:
                        progress(done, max(expected, done), nbytes)
            if done < expected:
                raise KidsegError(f"series {series_uid}: only {done} of {expected} instances came", self.url)
            try:
                os.replace(tmp, dest)
            except OSError:
                if not dest.is_dir():  # another fetch of the same series finished first: keep it
                    raise
        except KidsegError as exc:
            if "HTTP 404" in str(exc):
                raise KidsegError(f"series {series_uid} is no longer on the server (HTTP 404)", self.url) from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        seconds = time.perf_counter() - t0
        self.last_fetch = {"instances": done, "bytes": nbytes, "seconds": seconds}
        return dest

    # ------------------------------------------------------------ STOW-RS / C-STORE
    def store(self, paths) -> list[str]:
        """Store DICOM files on the server (C-STORE when the settings name a DICOM node, else
        STOW-RS); returns their SOP instance UIDs. Refused or partly stored: one line."""
        import pydicom

        datasets = []
        for p in paths:
            try:
                datasets.append(pydicom.dcmread(p))
            except (OSError, pydicom.errors.InvalidDicomError):
                raise KidsegError("is not a DICOM file; nothing was sent", p) from None
        if self.settings.dimse:
            self._c_store(datasets)
        else:
            with self._faults("storing (STOW-RS)"):
                answer = self._client.store_instances(datasets)
            failed = getattr(answer, "FailedSOPSequence", None) if answer is not None else None
            if failed:
                reason = getattr(failed[0], "FailureReason", "?")
                raise KidsegError(
                    f"storing (STOW-RS): the server refused {len(failed)} object(s) (reason {reason})", self.url
                )
        self._check_stored(datasets)
        return [str(ds.SOPInstanceUID) for ds in datasets]

    def _check_stored(self, datasets):
        """Ask the server for what it was given: a server whose filter drops an object can still
        answer the store with success (Orthanc does), and a result must not be called sent then."""
        series = {}
        for ds in datasets:
            series.setdefault((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)), set()).add(str(ds.SOPInstanceUID))
        for (study, uid), sops in series.items():
            held = self._search(
                "checking what was stored",
                self._client.search_for_instances,
                study_instance_uid=study,
                series_instance_uid=uid,
            )
            missing = sops - {_value(i, "00080018") for i in held}
            if missing:
                raise KidsegError(
                    f"the server answered the store but does not hold {len(missing)} of the {len(sops)} object(s) "
                    f"of series {uid} (refused by its rules?)",
                    self.url,
                )

    def _association(self, sop_classes=()):
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        d = self.settings.dimse
        ae = AE(ae_title=d.get("calling_aet", "KIDSEG"))
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout
        ae.add_requested_context(Verification)
        for uid in sorted(set(sop_classes)):  # what is sent, not all storage classes (at most 128)
            ae.add_requested_context(uid)
        assoc = ae.associate(d["host"], int(d["port"]), ae_title=d["called_aet"])
        if not assoc.is_established:
            raise KidsegError(
                f"DIMSE: no association with {d['called_aet']} at {d['host']}:{d['port']} (refused or unreachable)"
            )
        return assoc

    def _echo(self) -> str:
        assoc = self._association()
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        return "answers" if status and status.Status == 0 else "no answer to C-ECHO"

    def _c_store(self, datasets) -> list[str]:
        d = self.settings.dimse
        assoc = self._association(str(ds.SOPClassUID) for ds in datasets)
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                if not status or int(status.Status) != 0:
                    code = f"0x{int(status.Status):04X}" if status else "no answer"
                    raise KidsegError(f"C-STORE to {d['called_aet']} at {d['host']}:{d['port']} refused ({code})")
        finally:
            assoc.release()
        return [str(ds.SOPInstanceUID) for ds in datasets]


class _Session(requests.Session):
    """Every request verifies against the session's CA: requests lets REQUESTS_CA_BUNDLE or
    CURL_CA_BUNDLE in the environment override a session's ``verify`` (a named hospital CA would
    be silently ignored where those are set)."""

    def request(self, method, url, **kwargs):
        if kwargs.get("verify") is None:
            kwargs["verify"] = self.verify
        return super().request(method, url, **kwargs)


def _check_date(date: str):
    parts = date.split("-")
    if len(parts) > 2 or not all(len(p) in (0, 8) and (not p or p.isdigit()) for p in parts) or not any(parts):
        raise KidsegError(f"--date {date!r} is not YYYYMMDD or YYYYMMDD-YYYYMMDD")


# ----------------------------------------------------------------------------------------------
# The report as an Encapsulated PDF
# ----------------------------------------------------------------------------------------------


def encapsulated_pdf(pdf, reference_dicom, out, *, title="Kidney segmentation report (napari-kidseg)") -> Path:
    """The report PDF as a DICOM Encapsulated PDF in the study of ``reference_dicom`` (one
    instance of the CT series it describes): a new series, patient and study copied from it."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from . import __version__

    data = Path(pdf).read_bytes()
    if not data.startswith(b"%PDF"):
        raise KidsegError("is not a PDF", pdf)
    ref = pydicom.dcmread(reference_dicom, stop_before_pixels=True)
    ds = pydicom.Dataset()
    for kw in (
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
        "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "SpecificCharacterSet",
    ):  # fmt: skip
        if kw in ref:
            ds[kw] = ref[kw]
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID"):
        if kw not in ds:
            setattr(ds, kw, "")
    if "AccessionNumber" not in ds:
        ds.AccessionNumber = ""
    now = datetime.datetime.now()
    ds.SOPClassUID = ENCAPSULATED_PDF_SOP_CLASS_UID
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DOC"
    ds.SeriesNumber = int(getattr(ref, "SeriesNumber", 0) or 0) + 901
    ds.SeriesDescription = title
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD"
    ds.Manufacturer = "napari-kidseg"
    ds.SoftwareVersions = __version__
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"  # the page carries the patient's CT with labels
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = data + (b"\0" if len(data) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(data)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = Path(out)
    with files.atomic_path(out, overwrite=True) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return out


# ----------------------------------------------------------------------------------------------
# The outbox: results waiting to be sent (a failed send keeps them)
# ----------------------------------------------------------------------------------------------


class Outbox:
    """``outbox/<entry>/`` holds copies of the files to send and ``entry.json`` (case, files,
    attempts, last error); a sent entry moves to ``sent/`` with the UIDs the server stored."""

    def __init__(self, state_dir):
        self.root = Path(state_dir) / OUTBOX
        self.sent_root = Path(state_dir) / SENT
        self.root.mkdir(parents=True, exist_ok=True)
        self.sent_root.mkdir(parents=True, exist_ok=True)
        for junk in self.root.glob(".*.partial"):  # an add that died: its results are still in the export
            shutil.rmtree(junk, ignore_errors=True)

    def add(self, case: str, paths) -> Path:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        key = hashlib.sha1(case.encode()).hexdigest()[:10]
        entry = self.root / f"{stamp}-{key}"
        tmp = self.root / f".{entry.name}.partial"
        tmp.mkdir()
        names = []
        for p in paths:
            shutil.copy2(p, tmp / Path(p).name)
            names.append(Path(p).name)
        (tmp / "entry.json").write_text(json.dumps({"case": case, "files": names, "attempts": 0, "error": None}))
        os.replace(tmp, entry)
        return entry

    @staticmethod
    def read(entry: Path) -> dict:
        return json.loads((entry / "entry.json").read_text())

    def pending(self, case: str | None = None) -> list[Path]:
        out = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        return [p for p in out if case is None or self.read(p)["case"] == case]

    def sent(self, case: str) -> list[dict]:
        out = []
        for p in sorted(self.sent_root.iterdir()):
            with contextlib.suppress(OSError, ValueError, KeyError):
                info = self.read(p)
                if info["case"] == case:
                    out.append(info)
        return out

    def send(self, entry: Path, pacs: Pacs) -> dict:
        """Send one entry; on success it moves to ``sent/``. Raises KidsegError (the entry stays,
        its error noted) when the server does not take it."""
        info = self.read(entry)
        info["attempts"] += 1
        try:
            info["stored"] = pacs.store([entry / n for n in info["files"]])
        except KidsegError as exc:
            info["error"] = str(exc)
            with files.atomic_path(entry / "entry.json", overwrite=True) as tmp:
                tmp.write_text(json.dumps(info))
            raise
        info["error"] = None
        info["sent"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        info["series"] = _series_of(entry, info["files"])
        (entry / "entry.json").write_text(json.dumps(info))
        os.replace(entry, self.sent_root / entry.name)
        return info


def _series_of(entry: Path, names) -> dict:
    import pydicom

    out = {}
    for n in names:
        ds = pydicom.dcmread(entry / n, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "Modality"])
        out[n] = str(ds.SeriesInstanceUID)
    return out


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
        from .report import describe_case, write_report
        from .review import DICOM_SEG_NAME, MANIFEST

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
