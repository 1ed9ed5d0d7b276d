"""Results back to the PACS: the report as an Encapsulated PDF, and the outbox that holds what
waits to be sent (a failed send keeps it, to be retried)."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
from pathlib import Path

from ..errors import KidsegError
from ..io import files
from .client import Pacs

ENCAPSULATED_PDF_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.104.1"
OUTBOX, SENT = "outbox", "sent"


# ----------------------------------------------------------------------------------------------
# The report as an Encapsulated PDF
# ----------------------------------------------------------------------------------------------


def encapsulated_pdf(pdf, reference_dicom, out, *, title="Kidney segmentation report (napari-kidseg)") -> Path:
    """The report PDF as a DICOM Encapsulated PDF in the study of ``reference_dicom`` (one
    instance of the CT series it describes): a new series, patient and study copied from it."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from .. import __version__

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
