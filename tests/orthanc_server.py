"""A real Orthanc server for the PACS tests and the fetch benchmark: started on a free loopback
port with a temporary configuration and storage (authentication on), stopped at the end; and
CT volumes written as DICOM series to upload to it."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

ORTHANC = shutil.which("Orthanc") or shutil.which("orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "radiologist", "Pa55-word-not-to-leak"


def missing() -> str | None:
    """Why no Orthanc can be started here, or None."""
    if not Path(ORTHANC).exists():
        return "the Orthanc binary is absent (Debian packages orthanc and orthanc-dicomweb; `make setup` installs them)"
    if not DICOMWEB_PLUGIN.exists():
        return f"the Orthanc DICOMweb plugin is absent ({DICOMWEB_PLUGIN}; Debian package orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """``with Orthanc(folder) as server: server.url ...``; ``stop()`` / ``start()`` to fault it."""

    def __init__(self, folder, user=USER, password=PASSWORD, ssl_pem=None, refuse_modality=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.user, self.password = user, password
        self.aet = "KIDSEGTEST"
        scheme = "https" if ssl_pem else "http"
        self.url = f"{scheme}://127.0.0.1:{self.http_port}/dicom-web"
        self.rest = f"{scheme}://127.0.0.1:{self.http_port}"
        config = {
            "Name": "kidseg-test",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {user: password},
            "OrthancExplorerEnabled": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "SslEnabled": bool(ssl_pem),
            "SslCertificate": str(ssl_pem or ""),
            "HttpCompressionEnabled": False,
        }
        if refuse_modality:  # a rule of the server's that drops such objects (STOW still answers success)
            lua = self.folder / "refuse.lua"
            lua.write_text(
                "function ReceivedInstanceFilter(dicom, origin, info)\n"
                f'  return dicom.Modality ~= "{refuse_modality}"\nend\n'
            )
            config["LuaScripts"] = [str(lua)]
        self.config_path = self.folder / "orthanc.json"
        self.config_path.write_text(json.dumps(config))
        self.proc = None

    def start(self, timeout=30.0):
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 (the process keeps it open)
        self.proc = subprocess.Popen([ORTHANC, str(self.config_path)], stdout=log, stderr=log)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.http_port), 0.2):
                return self
            time.sleep(0.1)
        raise RuntimeError("Orthanc did not start")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------ the REST API (test set-up only)
    def _session(self):
        import requests

        s = requests.Session()
        s.auth = (self.user, self.password)
        s.verify = False
        return s

    def upload(self, paths) -> int:
        """POST DICOM files to /instances (Orthanc's own upload); returns how many it took."""
        s = self._session()
        n = 0
        for p in paths:
            r = s.post(f"{self.rest}/instances", data=Path(p).read_bytes(), timeout=30)
            r.raise_for_status()
            n += 1
        return n

    def series_of_study(self, study_uid: str) -> list[dict]:
        s = self._session()
        ids = s.post(f"{self.rest}/tools/lookup", data=study_uid, timeout=10).json()
        study = next(i["ID"] for i in ids if i["Type"] == "Study")
        return s.get(f"{self.rest}/studies/{study}/series", timeout=10).json()


def write_dicom_series(ct, folder, *, patient_id="PHANTOM-1", description="phantom CT", study_date="20261130",
                       study_uid=None) -> Path:  # fmt: skip
    """A canonical CT volume (z, y, x in LPS, z towards the head; HU rounded) as a CT Image
    Storage series, in its place in the world."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    stored = np.clip(np.round(np.asarray(ct.array, float)) + 1024, 0, 4095).astype(np.uint16)
    sz, sy, sx = (float(v) for v in ct.geometry.spacing)
    oz, oy, ox = (float(v) for v in ct.geometry.origin_zyx)
    for k in range(stored.shape[0]):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Kidney", patient_id, "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyDate = ds.SeriesDate = study_date
        ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "120000", "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 2, k + 1
        ds.SeriesDescription, ds.Manufacturer = description, "napari-kidseg phantom"
        ds.FrameOfReferenceUID = frame_uid
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [ox, oy, oz + k * sz]
        ds.PixelSpacing, ds.SliceThickness = [sy, sx], sz
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)
    return folder


def repeated_series(slice_file, out, n: int) -> tuple[Path, str, str]:
    """A series of ``n`` copies of one real slice, 1 mm apart (new series and instance UIDs, same
    study): a long series without a long CT to hand. Returns (folder, series UID, study UID)."""
    import copy

    import pydicom
    from pydicom.uid import generate_uid

    first = pydicom.dcmread(slice_file)
    series = generate_uid()
    out = Path(out)
    out.mkdir(parents=True)
    for k in range(n):
        ds = copy.deepcopy(first)  # a shallow copy would share (and shift) the first's elements
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [*first.ImagePositionPatient[:2], float(first.ImagePositionPatient[2]) + k]
        ds.InstanceNumber = k + 1
        ds.save_as(out / f"{k:04d}.dcm")
    return out, series, str(first.StudyInstanceUID)
