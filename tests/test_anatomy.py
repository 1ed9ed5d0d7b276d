"""The anatomy check: synthetic layouts with a known answer, and real label maps that must survive."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_path

from napari_kidseg import anatomy

SPACING = (3.0, 3.0, 3.0)
SHAPE = (60, 128, 128)
MID_X, FRONT_Y = 64, 80  # spine centre column and front edge row, in voxels


def _ellipsoid(shape, centre, radii):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return sum(((g - c) / r) ** 2 for g, c, r in zip((z, y, x), centre, radii)) < 1.0


def synthetic_ct(spine=True):
    """A body of soft tissue with (optionally) a column of vertebral bodies behind (y > FRONT_Y)."""
    ct = np.full(SHAPE, -1000, np.int16)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    ct[np.broadcast_to(((y - 64) / 50.0) ** 2 + ((x - 64) / 60.0) ** 2 < 1, SHAPE)] = 30
    if spine:
        body = ((y - (FRONT_Y + 6)) / 6.0) ** 2 + ((x - MID_X) / 8.0) ** 2 < 1
        ct[np.broadcast_to(body, SHAPE)] = 400
    return ct


def kidney(labels, side, z=30, dy_mm=18.0, dx_mm=66.0, radii=(18, 10, 8), value=1):
    """A kidney-sized ellipsoid (about 160 mL at 3 mm voxels) ``dx_mm`` to one side of the spine."""
    cx = MID_X + (dx_mm / 3.0) * (1 if side == "left" else -1)  # LPS: +x is the patient's left
    m = _ellipsoid(labels.shape, (z, FRONT_Y + dy_mm / 3.0, cx), radii)
    labels[m] = value
    return m


def test_find_spine_on_a_synthetic_ct():
    spine = anatomy.find_spine(synthetic_ct(), SPACING)
    assert spine is not None and spine.found_share == 1.0
    assert np.allclose(spine.x_mm, MID_X * 3.0, atol=3.0)
    assert np.allclose(spine.front_y_mm, FRONT_Y * 3.0, atol=4.0)
    assert anatomy.find_spine(synthetic_ct(spine=False), SPACING) is None


def test_kidneys_kept_false_regions_removed_and_listed():
    labels = np.zeros(SHAPE, np.uint8)
    right, left = kidney(labels, "right"), kidney(labels, "left")
    liver = _ellipsoid(SHAPE, (30, FRONT_Y - 22, MID_X - 25), (10, 8, 10))  # 66 mm in front of the spine
    labels[liver] = 2
    vertebra = _ellipsoid(SHAPE, (45, FRONT_Y + 4, MID_X), (4, 3, 3))
    labels[vertebra] = 1
    v = anatomy.check_anatomy(labels, SPACING, anatomy.find_spine(synthetic_ct(), SPACING))
    out = v.apply(labels)
    assert (out[right | left] == 1).all(), "a real kidney lost voxels"
    assert not out[liver].any() and not out[vertebra].any()
    text = "\n".join(v.summary())
    assert "not where a kidney lies" in text
    assert v.removed_ml()["kidney"] == pytest.approx(3**3 / 1000 * (liver | vertebra).sum(), rel=0.15)
    # the slice path gives what the volume path gives
    for z in (30, 45):
        assert np.array_equal(v.apply(labels[z], z=z), out[z])
    # restore by a voxel of the removed region
    region = v.region_at((30, FRONT_Y - 22, MID_X - 25))
    assert region is not None and region.label == "kidney"
    v.restored.add(region.id)
    assert v.apply(labels)[liver].all()


def test_tumor_that_touches_no_kidney_is_removed():
    labels = np.zeros(SHAPE, np.uint8)
    k = kidney(labels, "right")
    attached = _ellipsoid(SHAPE, (30, FRONT_Y + 6, MID_X - 22 - 9), (4, 4, 4)) & k
    labels[attached] = 2
    lonely = _ellipsoid(SHAPE, (8, FRONT_Y + 6, MID_X + 22), (3, 3, 3))  # on the left, no kidney there
    labels[lonely] = 2
    v = anatomy.check_anatomy(labels, SPACING, None)  # no spine: size and attachment still apply
    out = v.apply(labels)
    assert (out[attached] == 2).all() and not out[lonely].any()
    assert any("no spine in view" in n for n in v.notes)


def test_too_small_and_second_regions():
    labels = np.zeros(SHAPE, np.uint8)
    k = kidney(labels, "right")
    far = _ellipsoid(SHAPE, (5, FRONT_Y + 6, MID_X - 22), (2, 4, 4))  # 50 mm below the kidney, same side
    labels[far] = 1
    near = _ellipsoid(SHAPE, (30, FRONT_Y + 6, MID_X - 22 - 12), (3, 2, 2))  # a piece 3-6 mm off it
    labels[near & ~_ellipsoid(SHAPE, (30, FRONT_Y + 6, MID_X - 22), (18, 10, 9.5))] = 1
    tiny_left = _ellipsoid(SHAPE, (30, FRONT_Y + 6, MID_X + 22), (2, 2, 2))
    labels[tiny_left] = 1
    v = anatomy.check_anatomy(labels, SPACING, anatomy.find_spine(synthetic_ct(), SPACING))
    out = v.apply(labels)
    assert (out[k] == 1).all()
    assert not out[far].any() and not out[tiny_left].any()
    reasons = {r.reason.split(",")[0] for r in v.regions}
    assert {"a second region on the right side", "too small to be a kidney"} <= reasons
    assert out[near & (labels == 1)].all(), "a piece within fragment_mm of its kidney must stay"


def test_one_kidney_horseshoe_and_transplant():
    spine = anatomy.find_spine(synthetic_ct(), SPACING)
    one = np.zeros(SHAPE, np.uint8)
    kidney(one, "left")
    assert not anatomy.check_anatomy(one, SPACING, spine).regions  # nephrectomy: nothing to remove

    horseshoe = np.zeros(SHAPE, np.uint8)
    kidney(horseshoe, "right", radii=(14, 8, 7))
    kidney(horseshoe, "left", radii=(14, 8, 7))
    isthmus = _ellipsoid(SHAPE, (20, FRONT_Y - 4, MID_X), (4, 4, 26))  # across the spine, joining the lower poles
    horseshoe[isthmus] = 1
    v = anatomy.check_anatomy(horseshoe, SPACING, spine)
    assert v.apply(horseshoe)[horseshoe > 0].all()
    assert any("horseshoe" in n for n in v.notes)

    transplant = np.zeros(SHAPE, np.uint8)
    kidney(transplant, "left")
    graft = kidney(transplant, "right", z=10, dy_mm=-75, dx_mm=80)  # iliac fossa: low and far in front
    v = anatomy.check_anatomy(transplant, SPACING, spine)
    assert not v.apply(transplant)[graft].any()
    assert any("transplant" in n for n in v.notes), "a removed kidney-sized region must be named"


@pytest.mark.slow
def test_held_out_flare_kidneys_kept():
    """On the 10 FLARE maps the atlas never saw, in the spine frame of their aorta: every kidney
    voxel stays. Offered the whole liver as kidney too (far worse than any network's error), the
    kidneys still keep nine tenths of their voxels where the two touch; how much of the liver goes
    is printed, not asserted (a liver joined to a kidney is judged as one part)."""
    from napari_kidseg.phantoms.labelmap import _frame, find_label_maps, read_label_map, split_label_maps

    _, held = split_label_maps(find_label_maps(shared_path("flare22-labels")))
    assert len(held) == 10
    liver_left = []
    for path in held:
        organs, spacing = read_label_map(str(path))
        mid, front = _frame(organs, spacing)
        spine = anatomy.SpineFrame(mid, front, 1.0)
        kid = np.isin(organs, (2, 13))
        labels = kid.astype(np.uint8)
        assert not anatomy.check_anatomy(labels, spacing, spine).regions, path.name
        labels[organs == 1] = 1
        out = anatomy.check_anatomy(labels, spacing, spine).apply(labels)
        assert out[kid].mean() > 0.9, path.name
        liver_left.append(out[organs == 1].mean())
    print(f"liver offered as kidney: share kept per map {np.round(liver_left, 2).tolist()}")


def test_a_large_exophytic_tumor_does_not_take_its_kidney_away():
    """The sample case's defect: a 10 cm exophytic tumor pulled its kidney+tumor region off the
    kidneys' place and the whole region was removed. Only kidney voxels vote on position."""
    labels = np.zeros(SHAPE, np.uint8)
    k = kidney(labels, "right")
    tumor = _ellipsoid(SHAPE, (30, FRONT_Y - 14, MID_X - 22 - 16), (16, 16, 16))  # 10 cm, forward and out
    labels[tumor] = 2
    v = anatomy.check_anatomy(labels, SPACING, anatomy.find_spine(synthetic_ct(), SPACING))
    out = v.apply(labels)
    assert (out[k & ~tumor] == 1).all() and (out[tumor] == 2).all(), v.summary()


def test_a_kidney_called_tumor_almost_whole_is_named():
    """Every tumor-bearing side in KiTS19 keeps some kidney (``kits_least_kidney_left_ml``): a
    region that is tumor with less kidney left gets a note, its side named; a kidney with a
    tumor and plenty of kidney left, and a region cut by the volume's first slice, get none."""
    least = anatomy.priors()["kits_least_kidney_left_ml"]
    assert 20.0 < least < 100.0  # derived from the KiTS19 label volumes (48 mL when written)
    spine = anatomy.find_spine(synthetic_ct(), SPACING)
    labels = np.zeros(SHAPE, np.uint8)
    right = kidney(labels, "right", value=2)
    zz = np.nonzero(right)[0]
    labels[right & (np.arange(SHAPE[0])[:, None, None] < zz.min() + 3)] = 1  # a cap of kidney at its upper pole
    left = kidney(labels, "left")
    labels[left & _ellipsoid(SHAPE, (30, FRONT_Y + 6, MID_X + 22), (5, 5, 5))] = 2  # a 14 mL tumor in a whole kidney
    ml = 27.0 / 1000.0
    found = anatomy.tumor_without_kidney(labels, SPACING, spine)
    assert len(found) == 1 and found[0].side == "right", found
    assert found[0].kidney_ml == pytest.approx(np.count_nonzero(labels[right] == 1) * ml, abs=0.1)
    assert 0 < found[0].kidney_ml < least
    assert found[0].tumor_ml == pytest.approx(np.count_nonzero(labels[right] == 2) * ml, abs=0.1)
    text = found[0].describe()
    assert text.startswith("right kidney: ") and f"({least:.0f} mL)" in text
    assert anatomy.tumor_without_kidney(labels[zz.min() + 1 :], SPACING, None) == []  # cut by the first slice
    labels[right] = 1
    labels[right & (np.arange(SHAPE[0])[:, None, None] > 30)] = 2  # half the kidney is tumor: plausible
    assert anatomy.tumor_without_kidney(labels, SPACING, spine) == []
