"""DICOM Segmentation objects (highdicom): what a PACS shows next to the CT series.

``write_dicom_seg`` writes the kidney and kidney-tumor labels of a CT that came from a DICOM
series as a binary SEG referencing that series: one frame per CT slice and segment (empty ones
too, so the SEG covers the CT's whole grid), segments coded in SNOMED CT, the algorithm
identification naming the models and their versions. ``read_dicom_seg`` gives the labels back on
the CT's grid, matched frame by frame through the referenced SOP instances (or, when the CT is
not at hand, on the grid the SEG itself describes).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import KidsegError
from ..labels import CYST, KIDNEY, TUMOR
from . import files, geometry, volumes


def _codes():
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    structure = codes.SCT.AnatomicalStructure
    altered = Code("49755003", "SCT", "Morphologically Altered Structure")
    return {
        KIDNEY: ("Kidney", structure, codes.SCT.Kidney),
        TUMOR: ("Kidney tumor", altered, codes.SCT.Neoplasm),
        CYST: ("Kidney cyst", altered, codes.SCT.Cyst),  # KiTS23's third class; written only when present
    }


def series_datasets(dicom_dir, series_uid: str | None = None, *, pixels: bool = True) -> tuple[list, str]:
    """The datasets of one CT series in the order the volume reader stacks them, and the series'
    id as the volume reader names it.

    A folder holding several series needs ``series_uid``; the series is checked as the CT reader
    checks it (:func:`volumes.inspect_dicom_series`), and one the reader would resample (uneven
    slice distances, a gantry tilt) is refused: a SEG on it would misplace its slices.
    """
    import pydicom
    import SimpleITK as sitk

    folder = Path(dicom_dir)
    if not folder.is_dir():
        raise KidsegError("DICOM SEG needs the CT's DICOM series (a folder of .dcm files)", folder)
    ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if len(ids) > 1 and series_uid is None:
        raise KidsegError(f"holds {len(ids)} DICOM series; pick one with --series UID ({', '.join(ids)})", folder)
    files, reader_uid = volumes.dicom_series_files(folder, series_uid)
    check = volumes.inspect_dicom_series(folder, files)  # refuses a missing slice, drops a copy
    if check.resample:
        raise KidsegError(
            f"has {check.resample}: its CT is read resampled onto a regular grid, so a DICOM SEG "
            "cannot reference its slices",
            folder,
        )
    datasets = [pydicom.dcmread(f, stop_before_pixels=not pixels) for f in check.files]
    for ds in datasets:
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet  # empty means the default repertoire; highdicom wants it absent
        # some anonymisers blank the dataset's own SOP identifiers but keep them in the file meta
        for tag, meta in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not str(getattr(ds, tag, "") or "") and getattr(ds.file_meta, meta, None):
                setattr(ds, tag, ds.file_meta[meta].value)
    missing = [
        t for t in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not str(datasets[0].get(t, "") or "")
    ]
    if missing:
        raise KidsegError(
            f"has no {' or '.join(missing)} (anonymised without them), so a DICOM SEG cannot reference it", folder
        )
    return datasets, reader_uid


def write_dicom_seg(
    dicom_dir,
    labels: np.ndarray,
    out,
    *,
    series_uid: str | None = None,
    models: dict | None = None,
    overwrite: bool = False,
    ct: volumes.Volume | None = None,
) -> Path:
    """Write ``labels`` (canonical, on the grid of the CT read from ``dicom_dir``) as a DICOM SEG.

    ``models``: {"coarse": "name (version)", "refine": ...}, written into the algorithm
    identification of each segment. ``ct``: that series already read (saves reading it again).
    """
    import highdicom as hd

    from ..labels import check_label_values

    out = Path(out)
    if out.exists() and not overwrite:
        raise KidsegError("already exists; not overwriting it (use --overwrite)", out)
    # the series first: one series (or the one named), complete, identifiable; then its volume
    datasets, series_uid = series_datasets(dicom_dir, series_uid, pixels=False)
    if ct is None or ct.source is None or ct.source.dicom_series_uid != series_uid:
        ct = volumes.read_ct(dicom_dir, series_uid=series_uid, check_hu=False)
    labels = np.asarray(labels)
    if labels.shape != ct.array.shape:
        raise KidsegError(f"labels of shape {labels.shape} do not match the CT series' {ct.array.shape}", dicom_dir)
    check_label_values(labels, cysts=True)
    disk = ct.source.to_disk(labels.astype(np.uint8))  # frame k is datasets[k]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="napari-kidseg cascade",
        family=_ai_code(),
        version=__version__,
        parameters={k: str(v) for k, v in (models or {}).items()},
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=value,
            segment_label=label,
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=f"{label} ({'KiTS label ' + str(value)})",
        )
        for value, (label, category, kind) in _codes().items()
        if value != CYST or (labels == CYST).any()
    ]
    ref = datasets[0]
    with warnings.catch_warnings():
        # the source's patient name is copied as it is; how it is written is not ours to judge
        warnings.filterwarnings("ignore", message=".*intended person name.*", category=UserWarning)
        seg = _segmentation(hd, datasets, disk, segments, ref)
    out.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(out, overwrite=overwrite) as tmp:
        seg.save_as(tmp)
    return out


def _segmentation(hd, datasets, disk, segments, ref):
    return hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=disk,  # a label map: each value is its segment's number
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(ref, "SeriesNumber", 0) or 0) + 900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="napari-kidseg",
        manufacturer_model_name="kidney and kidney tumor cascade",
        software_versions=__version__,
        device_serial_number="none",
        series_description="kidney segmentation (napari-kidseg)",
        content_label="KIDNEY",
        content_description="Kidney and kidney tumor (computed by napari-kidseg)",
        omit_empty_frames=False,  # one frame per slice: the SEG covers the CT's whole grid
    )


def _ai_code():
    from pydicom.sr.codedict import codes

    return codes.DCM.ArtificialIntelligence


def read_dicom_seg(path, like: volumes.Volume | None = None) -> volumes.Volume:
    """A SEG's segments as one KiTS label volume (kidney 1, tumor 2) on the grid of ``like`` (the
    CT of the referenced series; frames matched by SOP instance), or on the SEG's own grid."""
    import highdicom as hd

    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # noqa: BLE001 - highdicom raises many types for a broken SEG
        raise KidsegError(f"cannot read this DICOM SEG ({exc})", path) from None
    numbers = _segment_numbers(seg, path)
    if like is None:
        like = _referenced_ct(seg, path)
    if like is not None:
        return _on_ct_grid(seg, numbers, like, path)
    vol = seg.get_volume(combine_segments=True, relabel=False, segment_numbers=list(numbers))
    image = vol.to_simpleitk()
    labels = volumes.volume_from_image(image, path, "dicom-seg")
    labels.array = _kits_values(labels.array, numbers)
    return labels


def _segment_numbers(seg, path) -> dict[int, int]:
    """SEG segment number -> KiTS label, from the segments' property types (or their labels)."""
    wanted = {code[2].value: value for value, code in _codes().items()}
    out = {}
    for desc in seg.SegmentSequence:
        kind = desc.SegmentedPropertyTypeCodeSequence[0].CodeValue
        label = str(getattr(desc, "SegmentLabel", "")).lower()
        value = wanted.get(kind) or (TUMOR if "tumor" in label else (KIDNEY if "kidney" in label else None))
        if value is not None:
            out[int(desc.SegmentNumber)] = value
    if not out:
        raise KidsegError("has no kidney or kidney tumor segment", path)
    return out


def _kits_values(array: np.ndarray, numbers: dict[int, int]) -> np.ndarray:
    lut = np.zeros(max(256, int(array.max()) + 1), np.uint8)
    for number, value in numbers.items():
        lut[number] = value
    return lut[array.astype(np.intp)]


def _referenced_ct(seg, path) -> volumes.Volume | None:
    """The CT series the SEG references, when it lies in the SEG's folder or the one above."""
    import SimpleITK as sitk

    try:
        uid = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError):
        return None
    with volumes.itk_warnings_off():  # "No Series were found" for every other folder
        for folder in (path.parent, path.parent.parent):
            candidates = [folder] + [d for d in folder.iterdir() if d.is_dir()] if folder.is_dir() else []
            for d in candidates:
                if uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(d)):
                    return volumes.read_ct(d, series_uid=uid, check_hu=False)
    return None


def _on_ct_grid(seg, numbers, like: volumes.Volume, path) -> volumes.Volume:
    import pydicom

    if like.source is None or like.source.format != "dicom":
        raise KidsegError("a DICOM SEG is placed on the DICOM series it references; this CT is not one", path)
    folder = Path(like.source.path)
    files, _ = volumes.dicom_series_files(folder, like.source.dicom_series_uid)
    check = volumes.inspect_dicom_series(folder, files)
    if check.resample:
        raise KidsegError(f"its CT series {folder} has {check.resample}; a DICOM SEG cannot be placed on it", path)
    files = check.files
    uids = [
        str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID) for f in files
    ]
    referenced = {
        str(i.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence
    }
    if not referenced & set(uids):
        raise KidsegError(f"references another series than the CT in {folder}", path)
    disk = seg.get_pixels_by_source_instance(uids, segment_numbers=list(numbers), combine_segments=True, relabel=False)
    canonical = geometry.reorient(np.ascontiguousarray(disk), like.source.axes, like.source.flips)
    return volumes.Volume(array=_kits_values(canonical, numbers), geometry=like.geometry, source=like.source)
