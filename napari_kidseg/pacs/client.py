"""One DICOMweb server: QIDO-RS find, WADO-RS fetch (atomic), STOW-RS store, or DIMSE C-STORE and
C-ECHO where the settings name a node; every fault one line naming the server."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests

from ..errors import Cancelled, KidsegError
from .settings import ENV_CA_BUNDLE, ENV_PASSWORD, ENV_USER, Settings, load_settings

QIDO_PAGE = 500  # series asked for at a time


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
