"""CT and label volumes with exact geometry: NIfTI, NRRD, MHA/MHD, DICOM series, KiTS layout.

The geometry rule (DESIGN.md): every volume is read into one canonical in-memory orientation and
written back in the geometry of the file it came from.

* SimpleITK is the authority for reading every format, so world coordinates follow ITK (LPS).
* Canonical orientation: the numpy array is indexed ``[z, y, x]`` with x growing towards the
  patient's Left, y towards Posterior, z towards Superior ("LPS", identity direction). An axial
  slice ``array[k]`` is then displayed the radiological way (patient's right on the screen's left,
  anterior up) and napari gets ``scale = spacing`` and ``translate = origin`` in ``(z, y, x)`` order,
  i.e. napari's world axes are (S, P, L) in millimetres.
* Reorienting is only axis permutations and flips of the on-disk array, so it is exact and its
  inverse is exact: a label volume written back lands on the very voxels it was drawn on. Oblique
  acquisitions keep their residual rotation in :attr:`Geometry.direction`.
* NIfTI labels are written with nibabel from a copy of the source header, so the qform/sform,
  their codes and units stay as the source had them; every other format is written by SimpleITK
  with the source's spacing, origin and direction. Tests re-read every written file with the
  *other* library and check the world coordinates of an asymmetric marker.
* Writes are atomic (temporary file in the same folder, then rename) and never overwrite an
  existing file unless asked to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io as _stdio
import os
import re
import warnings
import zlib
from pathlib import Path

import numpy as np

from ..errors import KidsegError, KidsegWarning
from . import files
from .files import atomic_path
from .geometry import Geometry, SourceInfo, canonical_geometry, orientation_ops, reorient, triple

# Below -1024 HU nothing is physical: such values are scanner padding outside the field of view
# (GE writes -3024, some vendors -2048). They are read as air so that a window or a percentile
# is not thrown off by them.
AIR_HU = -1024

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".ima")
KITS_IMAGE = "imaging.nii.gz"
KITS_LABELS = "segmentation.nii.gz"
KITS_ORGANS = "organs.nii.gz"  # optional: the organ map of a training case (labels.ORGANS codes)
CASE_RE = re.compile(r"^case_\d{5}$")


LABEL_FILE_HINTS = ("segmentation", "_labels", "label", "mask", "_seg")  # in a file name: not a CT


def is_label_file(path: str | os.PathLike) -> bool:
    """Whether a volume file is named like labels (a reference, a mask) rather than a CT: the
    worklist and ``kidseg predict FOLDER`` skip such files."""
    name = Path(path).name.lower()
    return any(h in name for h in LABEL_FILE_HINTS)


@dataclasses.dataclass
class Volume:
    """A CT or a label volume in canonical orientation, with its geometry and its source."""

    array: np.ndarray
    geometry: Geometry
    source: SourceInfo | None = None

    @property
    def path(self) -> str | None:
        return None if self.source is None else self.source.path

    def napari_kwargs(self) -> dict:
        """``scale`` and ``translate`` for a napari layer (world axes S, P, L in mm)."""
        return {"scale": tuple(self.geometry.spacing), "translate": tuple(self.geometry.origin_zyx)}


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def volume_format(path: str | os.PathLike) -> str | None:
    """The format a path holds, from its name (a folder is a DICOM series), or None."""
    p = Path(path)
    if p.is_dir():
        return "dicom"
    name = p.name.lower()
    for suffix, fmt in (
        (".nii.gz", "nifti"),
        (".nii", "nifti"),
        (".nrrd", "nrrd"),
        (".nhdr", "nrrd"),
        (".mha", "mha"),
        (".mhd", "mhd"),
        (".dcm", "dicom"),
        (".ima", "dicom"),
    ):
        if name.endswith(suffix):
            return fmt
    return None


@contextlib.contextmanager
def itk_warnings_off():
    """ITK's own warnings silenced for a block (GDCM prints "No Series were found" for every folder
    it scans without DICOM files), restored after."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _check_gzip_complete(path: Path) -> None:
    """ITK zero-fills a truncated .gz without complaint, so check the stream's end ourselves.

    Reads the file once in 1 MiB blocks (no full copy in memory).
    """
    decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                decomp.decompress(block, 0)
                while decomp.unconsumed_tail:
                    decomp.decompress(decomp.unconsumed_tail, 0)
                if decomp.eof:
                    break
    except zlib.error as exc:
        raise KidsegError(f"corrupt gzip stream ({exc})", path) from None
    if not decomp.eof:
        raise KidsegError("truncated file (the gzip stream ends early)", path)


def _read_gzip_checked(path: Path):
    """ITK's image of a .gz file whose stream was checked complete; the check decompresses the file
    a second time, so it runs in a thread beside ITK's read (both release the GIL: 512 x 512 x 300
    int16 took 0.9 s instead of 1.7 s on 2 cores). A truncated or corrupt stream is the error
    reported, also when ITK failed on it."""
    from concurrent.futures import ThreadPoolExecutor

    import SimpleITK as sitk

    with ThreadPoolExecutor(1) as pool:
        complete = pool.submit(_check_gzip_complete, path)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError:
            complete.result()
            raise
        complete.result()
    return image


def _check_nifti_size(path: Path) -> None:
    """ITK zero-fills a truncated uncompressed .nii without complaint: compare the file's size
    with the one its header promises."""
    import nibabel as nib

    try:
        with open(path, "rb") as fh:
            hdr = nib.Nifti1Header.from_fileobj(fh)
    except Exception:  # noqa: BLE001 - not a NIfTI header: ITK says why below
        return
    shape = hdr.get_data_shape()
    need = int(hdr.get_data_offset()) + int(np.prod(shape, dtype=np.int64)) * hdr.get_data_dtype().itemsize
    have = path.stat().st_size
    if have < need:
        raise KidsegError(f"truncated file ({have} bytes; its header needs {need})", path)


def _check_mhd_data_file(path: Path) -> None:
    """An .mhd header names its data file; say so when that file is missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return
    m = re.search(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", text, re.MULTILINE)
    if m and m.group(1) != "LOCAL" and "%" not in m.group(1) and m.group(1) != "LIST":
        data = path.parent / m.group(1)
        if not data.exists():
            raise KidsegError(f"its data file {m.group(1)} is missing (it should lie beside the header)", path)


def dicom_series_files(folder: Path, series_uid: str | None) -> tuple[list[str], str]:
    """The slice files of one series of a folder (the one named, else the largest), and its uid.

    A DICOM file that belongs to no series (truncated, or not DICOM) is refused: GDCM leaves it
    out without a word, so the series would silently miss that slice. DICOM SEG objects are not
    CT series and are not picked.
    """
    import SimpleITK as sitk

    with itk_warnings_off():
        ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
        files_of = {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in ids}
    listed = {Path(f).name for names in files_of.values() for f in names}
    unreadable = sorted(
        f.name
        for f in folder.iterdir()
        if f.is_file() and f.name.lower().endswith(DICOM_SUFFIXES) and f.name not in listed
    )
    if unreadable and ids:
        more = f" and {len(unreadable) - 1} more" if len(unreadable) > 1 else ""
        raise KidsegError(
            f"slice file {unreadable[0]}{more} is unreadable (truncated or not DICOM): the series would miss it",
            folder,
        )
    segs = {uid for uid, names in files_of.items() if len(names) == 1 and is_dicom_seg(names[0])}
    if not ids:
        raise KidsegError("no DICOM series found in this folder", folder)
    if series_uid is not None:
        if series_uid not in files_of:
            found = ", ".join(uid_text(u) for u in ids)
            raise KidsegError(f"no DICOM series {uid_text(series_uid)} here (found: {found})", folder)
        return files_of[series_uid], series_uid
    cts = [uid for uid in ids if uid not in segs]
    if not cts:
        raise KidsegError("holds only a DICOM Segmentation (labels), no CT series; give it as the labels", folder)
    if len(cts) > 1:
        chosen = max(cts, key=lambda uid: len(files_of[uid]))
        others = ", ".join(f"{uid_text(uid)} ({len(files_of[uid])} slices)" for uid in cts if uid != chosen)
        warnings.warn(
            f"{folder}: {len(cts)} DICOM series; using {uid_text(chosen)} ({len(files_of[chosen])} slices), "
            f"the largest; others: {others}. Pick one with --series UID.",
            KidsegWarning,
            stacklevel=3,
        )
        return files_of[chosen], chosen
    return files_of[cts[0]], cts[0]


SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"


def is_dicom_seg(path) -> bool:
    """Whether a file is a DICOM Segmentation object (not a CT slice)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        import pydicom

        ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # noqa: BLE001 - pydicom raises many types on a non-DICOM file: not a SEG either
        return False
    return str(getattr(ds, "SOPClassUID", "")) == SEG_SOP_CLASS_UID


# --------------------------------------------------------------------------------------------
# DICOM series: what is checked before the slices are stacked
# --------------------------------------------------------------------------------------------

MAX_GAP_RATIO = 1.5  # a gap this many times the usual slice distance is a missing slice
UNEVEN_GAP = 0.05  # slice distances off the usual one by more than 5% (and 0.05 mm) are uneven
TILT_DEGREES = 0.5  # slices stacked this far off their normal: a gantry tilt


def uid_text(uid: str | None) -> str:
    """A series uid as a message shows it (an anonymised series may have none)."""
    return uid if uid else "(no SeriesInstanceUID)"


@dataclasses.dataclass
class SeriesCheck:
    """What :func:`inspect_dicom_series` found: the slices to stack, in order (a duplicated
    slice's copy dropped), and whether they must be resampled onto a regular grid (and why)."""

    files: list[str]
    notes: list[str]
    positions: np.ndarray  # (n, 3) ImagePositionPatient of each kept slice, LPS mm
    row: np.ndarray  # direction of a row (along i), LPS
    col: np.ndarray  # direction of a column (along j)
    pixel_spacing: tuple[float, float]  # (along i, along j) mm
    resample: str = ""  # "" when the slices already form a regular grid


def inspect_dicom_series(folder, files: list[str]) -> SeriesCheck:
    """Decide, per fault, whether a DICOM series is refused (one line naming the fault) or read
    with a correction and a note that names it.

    Refused: slices of different sizes, pixel spacings or orientations; a missing slice (a gap
    over 1.5 times the usual distance); two different slices at one position. Corrected: a
    slice stored twice (same pixels) is read once; uneven slice distances and a gantry tilt are
    resampled onto a regular, orthogonal grid (linear interpolation between slices).
    """
    folder = Path(folder)
    heads = _slice_headers(folder, files)
    if len(heads) == 1 and getattr(heads[0], "ImagePositionPatient", None) is None:
        # a single image without geometry (a scout, a secondary capture): ITK's defaults stand
        return SeriesCheck(list(files), [], np.zeros((1, 3)), np.eye(3)[0], np.eye(3)[1], (1.0, 1.0))
    usual_px, spacings = _check_one_grid(folder, heads)
    iop = np.asarray(_tag(folder, heads[0], "ImageOrientationPatient", 6)).reshape(2, 3)
    row, col = iop[0] / np.linalg.norm(iop[0]), iop[1] / np.linalg.norm(iop[1])
    normal = np.cross(row, col)
    pos = np.array([_tag(folder, ds, "ImagePositionPatient", 3) for ds in heads])
    order = np.argsort(pos @ normal, kind="stable")
    names = [files[k] for k in order]
    pos = pos[order]
    notes = []
    # PixelSpacing is (between rows, between columns) = (along j, along i)
    dj, di = _tag(folder, heads[spacings.index(usual_px)], "PixelSpacing", 2)
    check = SeriesCheck(names, notes, pos, row, col, (di, dj))
    if len(names) < 2:
        return check
    s = _drop_copies(folder, check, pos @ normal)
    if len(check.files) < 2:
        return check
    _check_gaps_and_tilt(folder, check, s, normal)
    return check


def _slice_headers(folder: Path, files: list[str]) -> list:
    """The geometry tags of each slice file (no pixels); an unreadable one is refused."""
    import pydicom

    tags = ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"]
    heads = []
    for f in files:
        try:
            heads.append(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=tags))
        except Exception as exc:  # noqa: BLE001 - whatever pydicom raises, the slice is unreadable
            raise KidsegError(f"slice {Path(f).name} is unreadable ({type(exc).__name__})", folder) from None
    return heads


def _tag(folder: Path, ds, tag: str, n: int) -> tuple:
    """A slice's numeric tag of ``n`` values, or a refusal naming the slice and the tag."""
    value = getattr(ds, tag, None)
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != n:
        raise KidsegError(f"slice {Path(ds.filename).name} has no valid {tag}", folder)
    return out


def _check_one_grid(folder: Path, heads: list) -> tuple[tuple, list]:
    """Refuse slices of different sizes, orientations or pixel spacings; returns the usual pixel
    spacing and each slice's."""
    sizes = {(int(getattr(ds, "Rows", 0)), int(getattr(ds, "Columns", 0))) for ds in heads}
    if len(sizes) > 1:
        raise KidsegError(f"mixes slice sizes ({', '.join(f'{r}x{c}' for r, c in sorted(sizes))})", folder)
    orient = {tuple(np.round(_tag(folder, ds, "ImageOrientationPatient", 6), 4)) for ds in heads}
    if len(orient) > 1:
        raise KidsegError("mixes slice orientations; it is not one CT series", folder)
    spacings = [tuple(np.round(_tag(folder, ds, "PixelSpacing", 2), 4)) for ds in heads]
    usual_px = max(set(spacings), key=spacings.count)
    odd = [Path(ds.filename).name for ds, sp in zip(heads, spacings) if sp != usual_px]
    if odd:
        other = spacings[[sp != usual_px for sp in spacings].index(True)]
        raise KidsegError(
            f"has uneven pixel spacing: {len(odd)} slice(s) ({odd[0]}{', ...' if len(odd) > 1 else ''}) "
            f"have {other[0]:g} x {other[1]:g} mm pixels, the others {usual_px[0]:g} x {usual_px[1]:g} mm",
            folder,
        )
    return usual_px, spacings


def _drop_copies(folder: Path, check: SeriesCheck, s: np.ndarray) -> np.ndarray:
    """Read a slice stored twice (same position, same pixels) once, with a note; refuse two
    different slices at one position. Returns the kept slices' positions along the normal."""
    names, notes = check.files, check.notes
    same = np.flatnonzero(np.diff(s) < 1e-3)
    drop = set()
    for k in same:
        a, b = names[k], names[k + 1]
        if _pixels_of(a) != _pixels_of(b):
            raise KidsegError(
                f"holds two different slices at the same position ({s[k]:.1f} mm: {Path(a).name} and "
                f"{Path(b).name}); it is not one CT series",
                folder,
            )
        drop.add(k + 1)
        notes.append(f"slice {Path(b).name} is a copy of {Path(a).name} (same position and pixels): read once")
    if drop:
        keep = [k for k in range(len(names)) if k not in drop]
        check.files = [names[k] for k in keep]
        check.positions = check.positions[keep]
        s = s[keep]
    return s


def _check_gaps_and_tilt(folder: Path, check: SeriesCheck, s: np.ndarray, normal: np.ndarray) -> None:
    """Refuse a missing slice; mark uneven slice distances and a gantry tilt for resampling."""
    pos = check.positions
    gaps = np.diff(s)
    usual = float(np.median(gaps))
    worst = int(np.argmax(gaps))
    if gaps[worst] > MAX_GAP_RATIO * usual:
        raise KidsegError(
            f"misses slices: {gaps[worst]:.1f} mm between the slices at {s[worst]:.1f} and "
            f"{s[worst + 1]:.1f} mm, the others are {usual:.1f} mm apart",
            folder,
        )
    stack = pos[-1] - pos[0]
    tilt = float(np.degrees(np.arccos(np.clip(abs(stack @ normal) / np.linalg.norm(stack), -1, 1))))
    off = float(np.max(np.abs(gaps - usual)))
    why = []
    if tilt > TILT_DEGREES:
        why.append(f"a gantry tilt of {tilt:.1f} degrees")
    if off > max(UNEVEN_GAP * usual, 0.05):
        why.append(f"uneven slice distances ({gaps.min():.2f}..{gaps.max():.2f} mm)")
    if why:
        check.resample = " and ".join(why)
        step = (s[-1] - s[0]) / (len(s) - 1)
        check.notes.append(f"has {check.resample}: resampled onto a regular grid of {step:.2f} mm slices")


def _pixels_of(file) -> bytes:
    import pydicom

    return bytes(pydicom.dcmread(file).PixelData)


def _resample_series(image, check: SeriesCheck):
    """The stacked slices of an uneven or tilted series on a regular orthogonal grid: rows along
    the slices' rows, slices along the table's travel, linear interpolation between slices."""
    import SimpleITK as sitk
    from scipy import ndimage

    disk = sitk.GetArrayFromImage(image)  # (slice, j, i), slices in check.files order
    pos, row, col = check.positions, check.row, check.col
    di, dj = check.pixel_spacing
    normal = np.cross(row, col)
    s = pos @ normal
    # the slices' own planes at even distances along their normal: a tilt becomes an in-plane
    # shift from slice to slice, and the residual rotation stays in the direction (oblique)
    frame = np.stack([row, col, normal])  # rows: the new axes
    ni, nj = disk.shape[2], disk.shape[1]
    corners = np.array(
        [p + a * (ni - 1) * di * row + b * (nj - 1) * dj * col for p in pos for a in (0, 1) for b in (0, 1)]
    )
    u = corners @ frame.T
    lo, hi = u.min(axis=0), u.max(axis=0)
    step = float((s[-1] - s[0]) / (len(s) - 1))
    spacing = np.array([di, dj, step])
    size = (np.floor((hi - lo) / spacing + 1e-6) + 1).astype(int)
    origin = lo @ frame
    a, b = np.meshgrid(np.arange(size[0]) * spacing[0], np.arange(size[1]) * spacing[1], indexing="xy")
    out = np.empty((size[2], size[1], size[0]), np.float32)
    src = disk.astype(np.float32, copy=False)
    for m in range(size[2]):
        w = origin + a[..., None] * row + b[..., None] * col + (m * spacing[2]) * normal  # (nj', ni', 3)
        t = w @ normal
        inside = (t >= s[0] - 1e-3) & (t <= s[-1] + 1e-3)
        kf = np.interp(t, s, np.arange(len(s)))
        k0 = np.clip(np.floor(kf).astype(int), 0, len(s) - 2)
        f = (kf - k0)[..., None]
        p = pos[k0] * (1 - f) + pos[k0 + 1] * f
        rel = w - p
        ii, jj = rel @ row / di, rel @ col / dj
        vals = ndimage.map_coordinates(src, [kf, jj, ii], order=1, mode="constant", cval=float(AIR_HU))
        vals[~inside] = AIR_HU
        out[m] = vals
    if np.issubdtype(disk.dtype, np.integer):
        out = np.round(out).astype(disk.dtype)
    new = sitk.GetImageFromArray(out)
    new.SetSpacing(tuple(float(v) for v in spacing))
    new.SetOrigin(tuple(float(v) for v in origin))
    new.SetDirection(tuple(float(v) for v in frame.T.reshape(-1)))
    return new


def _read_sitk(path: Path, series_uid: str | None = None):
    """Read any supported path with SimpleITK; returns (image, format, series uid)."""
    import SimpleITK as sitk

    if not path.exists():
        raise KidsegError("no such file or folder", path)
    fmt = volume_format(path)
    if fmt is None:
        raise KidsegError(
            "not a supported volume (expected .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, .dcm or a DICOM folder)", path
        )
    uid = None
    try:
        if path.is_dir():
            files, uid = dicom_series_files(path, series_uid)
            check = inspect_dicom_series(path, files)
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(check.files)
            with itk_warnings_off():  # its "non uniform sampling" is judged above, in one line
                image = reader.Execute()
            if check.resample:
                image = _resample_series(image, check)
            for note in check.notes:
                warnings.warn(f"{path}: {note}", KidsegWarning, stacklevel=4)
        else:
            if fmt == "dicom" and is_dicom_seg(path):
                raise KidsegError("is a DICOM Segmentation (labels), not a CT; give it as the labels", path)
            if path.name.lower().endswith(".gz"):
                image = _read_gzip_checked(path)
            else:
                if path.name.lower().endswith(".nii"):
                    _check_nifti_size(path)
                elif fmt == "mhd":
                    _check_mhd_data_file(path)
                image = sitk.ReadImage(str(path))
    except KidsegError:
        raise
    except RuntimeError as exc:
        # ITK's messages span many lines; the first meaningful one is enough for a user
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and "sitk::ERROR" in ln]
        reason = lines[0].split("sitk::ERROR:")[-1].strip() if lines else "unreadable or corrupt file"
        raise KidsegError(f"cannot read ({reason})", path) from None
    return image, fmt, uid


def _nifti_header_bytes(path: Path) -> bytes | None:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with contextlib.suppress(OSError, EOFError):
        with opener(path, "rb") as fh:
            return fh.read(348)
    return None


def read_volume(path: str | os.PathLike, *, series_uid: str | None = None) -> Volume:
    """Read a volume in canonical orientation, keeping the source layout for writing back.

    Peak memory is about two copies of the volume: ITK's buffer and the reoriented array.
    """
    path = Path(path)
    image, fmt, uid = _read_sitk(path, series_uid)
    vol = volume_from_image(image, path, fmt, uid)
    if fmt == "nifti" and vol.array.dtype.kind == "f":
        _restore_nifti_nans(vol, path)
    return vol


def _restore_nifti_nans(vol: Volume, path: Path) -> None:
    """ITK reads a NIfTI's NaN voxels as 0 (water, in a CT) without a word: put them back, so
    that the CT check (:func:`readable_ct`) sees them. Float NIfTI files only (rare for CTs)."""
    import nibabel as nib

    data = np.asanyarray(nib.load(str(path)).dataobj)
    bad = ~np.isfinite(data)
    if bad.any():
        bad = bad.reshape(data.shape[:3]).T  # nibabel's (i, j, k) is ITK's (k, j, i) transposed
        vol.array[reorient(bad, vol.source.axes, vol.source.flips)] = np.nan


def volume_from_image(image, path: Path, fmt: str, series_uid: str | None = None) -> Volume:
    """A SimpleITK image as a canonical :class:`Volume` whose source says how to write it back."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise KidsegError(
            f"has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector image); "
            "a single-channel CT volume is needed",
            path,
        )
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 4 and size[3] == 1:
        import SimpleITK as sitk

        image = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, 0])
    elif dim != 3:
        shape = "x".join(str(s) for s in size)
        raise KidsegError(f"is a {dim}D image ({shape}); a 3D CT volume is needed", path)
    import SimpleITK as sitk

    spacing = image.GetSpacing()
    origin = image.GetOrigin()
    direction = image.GetDirection()
    disk = sitk.GetArrayViewFromImage(image)
    axes, flips = orientation_ops(np.reshape(direction, (3, 3)))
    array = reorient(disk, axes, flips)  # the one copy; ITK's buffer is freed below
    k, j, i = (int(s) for s in disk.shape)
    disk_shape = (k, j, i)
    del disk, image
    geometry = canonical_geometry(spacing, origin, direction, disk_shape, axes, flips)
    source = SourceInfo(
        path=str(path),
        format=fmt,
        disk_shape=disk_shape,
        disk_spacing=triple(spacing),
        disk_origin=triple(origin),
        disk_direction=tuple(float(v) for v in direction),
        axes=axes,
        flips=flips,
        nifti_header=_nifti_header_bytes(path) if fmt == "nifti" else None,
        dicom_series_uid=series_uid,
    )
    return Volume(array=array, geometry=geometry, source=source)


MIN_INPLANE = 8  # voxels a side: nothing smaller is a CT slice
MAX_NAN_SHARE = 0.5  # a CT with more voxels without a value than this is refused


def check_ct_intensities(array: np.ndarray, path: str | os.PathLike | None = None) -> None:
    """Refuse volumes whose values cannot be Hounsfield units of a body CT.

    A body CT holds air outside the patient (about -1000 HU) and fat (about -100 HU). An 8-bit
    image (0..255), raw stored values with no rescale (0..4095), or an MR volume has neither.
    Judged on a strided sample so that it costs nothing on large volumes.
    """
    sample = array[:: max(1, array.shape[0] // 16), ::4, ::4]
    lo, hi = float(np.min(sample)), float(np.max(sample))
    if hi - lo < 200:
        raise KidsegError(f"intensities span only {lo:g}..{hi:g}; this is not a CT in HU", path)
    if lo >= -200:
        hint = " (an 8-bit image?)" if hi <= 255 else " (stored values without the rescale to HU, or not a CT?)"
        raise KidsegError(f"intensities {lo:g}..{hi:g} have no air or fat; not a CT in Hounsfield units{hint}", path)


def readable_ct(vol: Volume, path: str | os.PathLike | None = None, *, check_hu: bool = True) -> Volume:
    """The one place that decides what a readable CT is; every reader of a CT comes through here
    (``read_ct``: predict, report, the worklist, DICOM SEG; the napari reader).

    Size: 3D with at least 8 x 8 voxels a slice. Voxel type: real numbers (8- and 16-bit
    integers become int16, other integers int16 when they fit, floats float32). Slice geometry:
    finite positive spacing (a DICOM series' slices are checked when read,
    :func:`inspect_dicom_series`). Values without a number (NaN) become air with a note, and more
    than half of them is refused. HU: the volume must hold air or fat (:func:`check_ct_intensities`).
    Padding below -1024 HU becomes air. Notes are :class:`KidsegWarning`.
    """
    arr = vol.array
    shape = "x".join(str(s) for s in arr.shape[::-1])
    if arr.ndim != 3 or min(arr.shape[1:]) < MIN_INPLANE or arr.shape[0] < 1:
        raise KidsegError(f"is {shape} voxels; a CT needs at least {MIN_INPLANE}x{MIN_INPLANE} voxels a slice", path)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise KidsegError(f"voxel type {arr.dtype} is not a CT intensity", path)
    spacing = np.asarray(vol.geometry.spacing, float)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        raise KidsegError(f"voxel spacing {tuple(float(s) for s in spacing)} mm is not positive", path)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.dtype != np.int16 and int(arr.min()) >= -32768 and int(arr.max()) <= 32767:
            arr = arr.astype(np.int16)  # one type for CTs: room below 0 for air (int8), half of int32
    else:
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        bad = ~np.isfinite(arr)
        n_bad = int(np.count_nonzero(bad))
        if n_bad:
            share = n_bad / arr.size
            if share > MAX_NAN_SHARE:
                raise KidsegError(f"{100 * share:.0f}% of the voxels have no value (NaN); not a CT", path)
            arr[bad] = AIR_HU
            warnings.warn(
                f"{path}: {100 * share:.1f}% of the voxels have no value (NaN or infinite); read as air ({AIR_HU} HU)",
                KidsegWarning,
                stacklevel=3,
            )
        sample = arr[:: max(1, arr.shape[0] // 8)]
        if np.array_equal(sample, np.round(sample)) and arr.min() >= -32768 and arr.max() <= 32767:
            arr = arr.astype(np.int16)  # float HU that are whole numbers: int16, half the memory
    if arr.dtype.kind != "u":  # unsigned values lie above air anyway
        np.maximum(arr, AIR_HU, out=arr)
    vol.array = arr
    if check_hu:
        check_ct_intensities(arr, path)
    return vol


def read_ct(path: str | os.PathLike, *, series_uid: str | None = None, check_hu: bool = True) -> Volume:
    """Read a CT in HU (DICOM rescale applied by ITK) and check it (:func:`readable_ct`)."""
    return readable_ct(read_volume(path, series_uid=series_uid), path, check_hu=check_hu)


def check_same_grid(ct: Volume, labels: Volume, path=None) -> None:
    if ct.array.shape != labels.array.shape:
        raise KidsegError(f"label grid {labels.array.shape} differs from the CT grid {ct.array.shape}", path)
    a, b = ct.geometry, labels.geometry
    if not (
        np.allclose(a.spacing, b.spacing, atol=1e-3)
        and np.allclose(a.origin_zyx, b.origin_zyx, atol=1e-2)
        and np.allclose(a.direction, b.direction, atol=1e-4)
    ):
        raise KidsegError(
            f"label geometry (spacing {tuple(round(s, 3) for s in b.spacing)}, origin "
            f"{tuple(round(o, 1) for o in b.origin_zyx)}) differs from the CT's "
            f"({tuple(round(s, 3) for s in a.spacing)}, {tuple(round(o, 1) for o in a.origin_zyx)})",
            path,
        )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _sitk_image_on_disk_grid(array_disk: np.ndarray, source: SourceInfo):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array_disk))
    image.SetSpacing(source.disk_spacing)
    image.SetOrigin(source.disk_origin)
    image.SetDirection(source.disk_direction)
    return image


def _nifti_image_like(array_disk_itk: np.ndarray, source: SourceInfo):
    """A nibabel image with the source's header (qform, sform, codes, units) and new voxels."""
    import nibabel as nib

    hdr = nib.Nifti1Header.from_fileobj(_stdio.BytesIO(source.nifti_header))
    hdr = hdr.copy()
    hdr.set_data_dtype(array_disk_itk.dtype)
    hdr["scl_slope"] = np.nan  # labels and HU are stored as they are, with no scaling
    hdr["scl_inter"] = np.nan
    hdr["cal_min"] = 0
    hdr["cal_max"] = 0
    # nibabel's voxel order is (i, j, k): the reverse of ITK's numpy order (k, j, i)
    # a C-ordered (k, j, i) array is exactly the Fortran-ordered (i, j, k) one nibabel streams out
    data = array_disk_itk.T
    img = nib.Nifti1Image(data, None, header=hdr)
    # keep both affines bit-for-bit as in the source header
    sform, scode = hdr.get_sform(coded=True)
    qform, qcode = hdr.get_qform(coded=True)
    if sform is not None:
        img.set_sform(sform, int(scode))
    if qform is not None:
        img.set_qform(qform, int(qcode))
    return img


def write_volume(
    path: str | os.PathLike,
    array: np.ndarray,
    like: Volume,
    *,
    overwrite: bool = False,
    dtype=None,
) -> Path:
    """Write a canonical array in the geometry of ``like``'s source file (format from ``path``).

    A NIfTI written from a NIfTI source keeps the source header; otherwise SimpleITK writes
    the source's spacing, origin and direction. Without a source (an array made in memory), the
    canonical geometry is written as it is.
    """
    import SimpleITK as sitk

    path = Path(path)
    fmt = volume_format(path) if not path.is_dir() else None
    if fmt in (None, "dicom"):
        raise KidsegError("cannot write this format (use .nii.gz, .nii, .nrrd, .mha or .mhd)", path)
    if array.shape != like.array.shape:
        raise KidsegError(f"array {array.shape} does not match the grid {like.array.shape} it is written on", path)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    source = like.source or _source_for_canonical(like)
    disk = source.to_disk(array)
    # an .mhd header names its data file: both are written under their own names, then moved
    writing = files.atomic_files if fmt == "mhd" else atomic_path
    with writing(path, overwrite=overwrite) as tmp:
        if fmt == "nifti" and source.nifti_header is not None:
            import nibabel as nib

            nib.save(_nifti_image_like(disk, source), str(tmp))
        else:
            sitk.WriteImage(_sitk_image_on_disk_grid(disk, source), str(tmp), useCompression=True)
    return path


def write_labels(path, labels: np.ndarray, like: Volume, *, overwrite: bool = False) -> Path:
    """Write a label volume (uint8) onto the grid of the CT ``like`` came from."""
    return write_volume(path, labels, like, overwrite=overwrite, dtype=np.uint8)


def _source_for_canonical(vol: Volume, disk_direction=None) -> SourceInfo:
    """A synthetic source: the canonical grid, or the same voxels laid out along ``disk_direction``.

    ``disk_direction`` is a signed permutation matrix (columns: world direction of index axes i,
    j, k), e.g. KiTS's I-P-L layout. Used for phantoms written with a varied orientation on disk.
    """
    g = vol.geometry
    canon_dir = np.asarray(g.direction, dtype=float)
    d_disk = canon_dir if disk_direction is None else canon_dir @ np.asarray(disk_direction, dtype=float)
    axes, flips = orientation_ops(d_disk)
    canon_shape = vol.array.shape
    k, j, i = (int(canon_shape[a]) for a in np.argsort(axes))  # shape of transpose(canon, argsort(axes))
    disk_shape = (k, j, i)
    # spacing of disk index axis a (ITK order) = spacing of the canonical axis it maps to
    canon_sp_itk = np.asarray(g.spacing, dtype=float)[::-1]
    sp_disk = np.zeros(3)
    first_disk_voxel = np.zeros(3)  # canonical index (x, y, z) of disk voxel [0,0,0]
    for n in range(3):  # canonical numpy axis n is disk numpy axis axes[n]
        a_itk = 2 - axes[n]
        c_itk = 2 - n
        sp_disk[a_itk] = canon_sp_itk[c_itk]
        if flips[n]:
            first_disk_voxel[c_itk] = canon_shape[n] - 1
    origin_lps = np.asarray(g.origin_zyx, dtype=float)[::-1] + canon_dir @ (first_disk_voxel * canon_sp_itk)
    return SourceInfo(
        path="<memory>",
        format="memory",
        disk_shape=disk_shape,
        disk_spacing=triple(sp_disk),
        disk_origin=triple(origin_lps),
        disk_direction=tuple(float(v) for v in d_disk.reshape(-1)),
        axes=axes,
        flips=flips,
    )


def volume_in_memory(array: np.ndarray, spacing_zyx, origin_zyx=(0.0, 0.0, 0.0), disk_direction=None) -> Volume:
    """A volume made in memory (phantoms, tests), optionally to be written with another on-disk layout."""
    vol = Volume(array=array, geometry=Geometry(tuple(map(float, spacing_zyx)), tuple(map(float, origin_zyx))))
    vol.source = _source_for_canonical(vol, disk_direction)
    return vol


# --------------------------------------------------------------------------------------------
# KiTS layout
# --------------------------------------------------------------------------------------------


def kits_cases(root: str | os.PathLike) -> list[Path]:
    """Case folders (``case_XXXXX`` holding ``imaging.nii.gz``) under a KiTS-layout root, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise KidsegError("not a folder", root)
    cases = sorted(p for p in root.iterdir() if p.is_dir() and CASE_RE.match(p.name) and (p / KITS_IMAGE).exists())
    return cases


def write_kits_case(root, case_id: str, ct: Volume, labels: np.ndarray | None, *, overwrite: bool = False) -> Path:
    """Write ``root/case_id/imaging.nii.gz`` (int16 HU) and ``segmentation.nii.gz`` (uint8)."""
    case_dir = Path(root) / case_id
    if case_dir.exists() and not overwrite and any(case_dir.iterdir()):
        raise KidsegError("case folder already exists; not overwriting it (use --overwrite)", case_dir)
    case_dir.mkdir(parents=True, exist_ok=True)
    write_volume(case_dir / KITS_IMAGE, ct.array, ct, overwrite=overwrite, dtype=np.int16)
    if labels is not None:
        write_labels(case_dir / KITS_LABELS, labels, ct, overwrite=overwrite)
    return case_dir
