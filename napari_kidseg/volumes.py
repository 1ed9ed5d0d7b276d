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

from .errors import KidsegError, KidsegWarning
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


def dicom_series_files(folder: Path, series_uid: str | None) -> tuple[list[str], str]:
    import SimpleITK as sitk

    ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not ids:
        raise KidsegError("no DICOM series found in this folder", folder)
    files_of = {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in ids}
    if series_uid is not None:
        if series_uid not in files_of:
            raise KidsegError(f"no DICOM series {series_uid} here (found: {', '.join(ids)})", folder)
        return files_of[series_uid], series_uid
    if len(ids) > 1:
        chosen = max(ids, key=lambda uid: len(files_of[uid]))
        others = ", ".join(f"{uid} ({len(files_of[uid])} slices)" for uid in ids if uid != chosen)
        warnings.warn(
            f"{folder}: {len(ids)} DICOM series; using {chosen} ({len(files_of[chosen])} slices), "
            f"the largest; others: {others}. Pick one with --series UID.",
            KidsegWarning,
            stacklevel=3,
        )
        return files_of[chosen], chosen
    return files_of[ids[0]], ids[0]


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
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            if path.name.lower().endswith(".gz"):
                _check_gzip_complete(path)
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
    return volume_from_image(image, path, fmt, uid)


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


def read_ct(path: str | os.PathLike, *, series_uid: str | None = None, check_hu: bool = True) -> Volume:
    """Read a CT in HU (DICOM rescale applied by ITK); padding below -1024 HU becomes air."""
    vol = read_volume(path, series_uid=series_uid)
    arr = vol.array
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise KidsegError(f"voxel type {arr.dtype} is not a CT intensity", path)
    if arr.dtype.itemsize > 2 or not np.issubdtype(arr.dtype, np.signedinteger):
        # int32/float HU -> int16 when exact, halves memory; float CTs with fractions stay float32
        if np.issubdtype(arr.dtype, np.integer) or np.array_equal(
            arr[:: max(1, arr.shape[0] // 8)], np.round(arr[:: max(1, arr.shape[0] // 8)])
        ):
            if arr.min() >= -32768 and arr.max() <= 32767:
                arr = arr.astype(np.int16)
        elif arr.dtype != np.float32:
            arr = arr.astype(np.float32)
    if arr.dtype.kind in "if":
        np.maximum(arr, AIR_HU, out=arr)
    vol.array = arr
    if check_hu:
        check_ct_intensities(arr, path)
    return vol


def read_labels(path: str | os.PathLike, like: Volume | None = None) -> Volume:
    """Read a label volume (0 background, 1 kidney, 2 tumor, ...) as uint8.

    With ``like``, the labels must lie on the same grid as that CT (same shape and geometry). A
    DICOM Segmentation file is read by :mod:`dicom_seg` (onto ``like``'s grid when given).
    """
    from .dicom_seg import is_dicom_seg, read_dicom_seg

    if is_dicom_seg(path):
        vol = read_dicom_seg(path, like=like)
        if like is not None:
            check_same_grid(like, vol, path)
        return vol
    vol = read_volume(path)
    arr = vol.array
    if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
        raise KidsegError("label volume holds fractional values", path)
    if arr.min() < 0 or arr.max() > 255:
        raise KidsegError(f"label values {arr.min()}..{arr.max()} are outside 0..255", path)
    vol.array = arr.astype(np.uint8, copy=False)
    if like is not None:
        check_same_grid(like, vol, path)
    return vol


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
    with atomic_path(path, overwrite=overwrite) as tmp:
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


def read_kits_case(case_dir: str | os.PathLike, *, with_labels: bool = True) -> tuple[Volume, Volume | None]:
    case_dir = Path(case_dir)
    ct = read_ct(case_dir / KITS_IMAGE)
    labels = None
    if with_labels and (case_dir / KITS_LABELS).exists():
        labels = read_labels(case_dir / KITS_LABELS, like=ct)
    return ct, labels


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
