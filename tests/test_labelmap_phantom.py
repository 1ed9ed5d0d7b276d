"""Phantoms on real organ label maps: geometry, labels that follow the map's kidneys, tissue HU,
and one-line refusals for maps the generator cannot use."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import case_digest, shared_path

from napari_kidseg.errors import KidsegError
from napari_kidseg.io import volumes
from napari_kidseg.phantoms.labelmap import find_label_maps, make_labelmap_phantom, read_label_map, split_label_maps


def _ellipsoid(shape, spacing, centre_mm, radii_mm):
    z, y, x = (
        np.arange(n)[s] * d
        for n, d, s in zip(shape, spacing, (np.s_[:, None, None], np.s_[None, :, None], np.s_[None, None, :]))
    )
    return sum(((g - c) / r) ** 2 for g, c, r in zip((z, y, x), centre_mm, radii_mm)) < 1.0


def toy_map(shape=(40, 160, 160), spacing=(2.5, 2.0, 2.0)):
    """A FLARE-layout map drawn by hand: liver, spleen, aorta, IVC and two kidneys (LPS: +x left)."""
    m = np.zeros(shape, np.uint8)
    e = lambda c, r: _ellipsoid(shape, spacing, c, r)  # noqa: E731
    m[e((70, 120, 110), (40, 60, 60))] = 1  # liver, patient's right (low x)
    m[e((75, 170, 240), (30, 35, 25))] = 3  # spleen, left and posterior
    m[e((50, 170, 170), (200, 10, 10))] = 5  # aorta
    m[e((50, 165, 140), (200, 10, 12))] = 6  # IVC
    m[e((45, 200, 100), (45, 22, 25))] = 2  # right kidney
    m[e((50, 200, 240), (45, 22, 25))] = 13  # left kidney
    return m, spacing


def test_toy_map_phantom_geometry_labels_and_hu():
    organs, spacing = toy_map()
    case = make_labelmap_phantom(
        (organs, spacing), seed=3, matrix=96, phase="venous", n_tumors=1, slice_thickness=2.5, disk_layout="LPS"
    )
    ct, labels = case.ct.array, case.labels
    assert ct.shape == labels.shape and ct.shape[1:] == (96, 96)
    assert case.ct.geometry.spacing == pytest.approx(tuple(case.info["spacing_zyx_mm"]), rel=1e-3)
    assert set(np.unique(labels)) <= {0, 1, 2}
    ml = float(np.prod(case.ct.geometry.spacing)) / 1000.0
    map_kidney_ml = np.isin(organs, (2, 13)).sum() * np.prod(spacing) / 1000.0
    # the labels follow the map's kidneys: their volume, through a random scale of 0.9-1.1 per axis
    # and the tumor and cysts added to them, stays within reach of the map's
    assert 0.6 * map_kidney_ml < (labels > 0).sum() * ml < 2.0 * map_kidney_ml
    # both kidneys: label on each side of the midline
    cols = np.flatnonzero((labels > 0).any(axis=(0, 1)))
    assert cols.min() < 48 < cols.max()
    # tissue HU: kidney parenchyma enhanced in the venous phase, bone in the spine, air outside
    assert 60 < np.median(ct[labels == 1]) < 260
    assert ct.max() > 400
    assert np.median(ct[:, 0, :]) < -900
    # tumors lie on a kidney
    if (labels == 2).any():
        from scipy import ndimage

        assert (ndimage.binary_dilation(labels == 2) & (labels == 1)).any()


def test_real_map_case_follows_its_kidneys():
    path = shared_path("flare22-labels", "FLARE22_Tr_0001.nii.gz")
    organs, spacing = read_label_map(str(path))
    # a cropped map: the 40 slices around the kidneys, every second voxel in-plane
    zs = np.flatnonzero(np.isin(organs, (2, 13)).any(axis=(1, 2)))
    z0 = max(0, int(zs.mean()) - 20)
    crop = np.ascontiguousarray(organs[z0 : z0 + 40, ::2, ::2])
    sp = (spacing[0], spacing[1] * 2, spacing[2] * 2)
    case = make_labelmap_phantom((crop, sp), seed=1, matrix=128, n_tumors=0, slice_thickness=2.5)
    ml = float(np.prod(case.ct.geometry.spacing)) / 1000.0
    kid_ml = np.isin(crop, (2, 13)).sum() * np.prod(sp) / 1000.0
    got = (case.labels == 1).sum() * ml
    assert 0.6 * kid_ml < got < 1.6 * kid_ml
    assert not case.info["notes"]


def test_bad_label_maps_get_one_line(tmp_path):
    with pytest.raises(KidsegError, match="no label maps"):
        find_label_maps(tmp_path)
    with pytest.raises(KidsegError, match="not a folder"):
        find_label_maps(tmp_path / "nope")
    organs, spacing = toy_map()
    bad = organs.copy()
    bad[0, 0, 0] = 42
    for name, arr, msg in (
        ("unknown.nii.gz", bad, "unknown label"),
        ("nokidney.nii.gz", np.where(np.isin(organs, (2, 13)), 0, organs).astype(np.uint8), "no kidney"),
    ):
        p = tmp_path / name
        volumes.write_volume(p, arr, volumes.volume_in_memory(arr, spacing))
        with pytest.raises(KidsegError, match=msg) as info:
            read_label_map(str(p))
        assert "\n" not in str(info.value) and name in str(info.value)
    one = np.where(organs == 13, 0, organs).astype(np.uint8)  # one kidney is allowed, and said
    case = make_labelmap_phantom((one, spacing), seed=0, matrix=64)
    assert case.info["notes"] and "one-kidney" in case.info["notes"][0]


def test_fixed_split_holds_out_the_last_ten(tmp_path):
    maps = [tmp_path / f"m{i:02d}.nii.gz" for i in range(50)]
    train, held = split_label_maps(maps)
    assert len(train) == 40 and held == maps[40:]


# Golden checksums of three label-map phantoms on the toy map (CT voxels, labels, organs, the info
# dict and the geometry), taken before make_labelmap_phantom was cut into named sections: any change
# in the order or the values of its random draws changes them. A change that means to alter these
# phantoms raises LABELMAP_GENERATOR_REVISION and records new checksums here.
LABELMAP_GOLDEN = [
    (
        "both",
        3,
        {"matrix": 96, "phase": "venous", "n_tumors": 1, "slice_thickness": 2.5, "disk_layout": "LPS"},
        "bba676c31f2e2bde",
    ),
    (
        "both",
        5,
        {"matrix": 64, "random_contrast": 1.0, "labels": "kits23", "site": 2, "n_tumors": 2},
        "35678cbc665d1b82",
    ),
    ("one", 8, {"matrix": 80}, "0cc78c223c06847f"),  # one kidney in view; phase and layout drawn
]


@pytest.mark.parametrize("kidneys, seed, kwargs, digest", LABELMAP_GOLDEN)
def test_labelmap_phantoms_match_their_golden_checksums(kidneys, seed, kwargs, digest):
    organs, spacing = toy_map()
    if kidneys == "one":
        organs[organs == 13] = 0
    case = make_labelmap_phantom((organs, spacing), seed, **kwargs)
    assert case_digest(case) == digest
