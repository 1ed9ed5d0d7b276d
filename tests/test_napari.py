"""The npe2 contributions through a real napari viewer: manifest, reader, writer, sample data, screenshot."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from napari_kidseg import _napari_io
from napari_kidseg._napari_io import sample_case_dir
from napari_kidseg.io import volumes
from napari_kidseg.layers import CT_WINDOW

pytestmark = pytest.mark.gui


def test_installed_manifest_declares_every_contribution():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    mf = pm.get_manifest("napari-kidseg")
    c = mf.contributions
    assert [w.display_name for w in c.widgets] == ["Kidney cascade", "Case worklist"]
    assert c.readers and c.writers and [s.key for s in c.sample_data] == ["phantom"]
    assert ".nii.gz" in c.writers[0].filename_extensions
    # the manifest napari reads is the one installed inside the package
    assert str(mf.package_metadata) and "napari_kidseg" in mf.name.replace("-", "_")


def test_reader_opens_ct_and_kits_case_with_physical_scale(make_napari_viewer, small_case_dir):
    viewer = make_napari_viewer()
    ct = volumes.read_ct(small_case_dir / volumes.KITS_IMAGE)
    layers = viewer.open(str(small_case_dir / volumes.KITS_IMAGE), plugin="napari-kidseg")
    assert len(layers) == 1 and layers[0]._type_string == "image"
    assert np.allclose(layers[0].scale, ct.geometry.spacing)
    assert np.allclose(layers[0].translate, ct.geometry.origin_zyx)
    assert tuple(layers[0].contrast_limits) == CT_WINDOW
    both = viewer.open(str(small_case_dir), plugin="napari-kidseg")
    assert [ly._type_string for ly in both] == ["image", "labels"]
    assert np.allclose(both[1].scale, ct.geometry.spacing)
    assert set(np.unique(both[1].data)) == {0, 1, 2}


def test_reader_returns_none_and_warns_for_unreadable_paths(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08" + b"\x00" * 50)
    reader = _napari_io.get_reader(str(bad))
    assert reader is not None  # the name looks like ours...
    with pytest.warns(UserWarning, match="broken.nii.gz"):
        assert reader(str(bad)) is None  # ...but reading it fails quietly, with the reason shown
    assert _napari_io.get_reader(str(tmp_path / "notes.txt")) is None
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5), np.int16), np.eye(4)), flat)
    with pytest.warns(UserWarning, match="2D image"):
        assert _napari_io.read_layers(str(flat)) is None


def test_writer_saves_labels_on_the_source_grid(make_napari_viewer, small_case_dir, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(str(small_case_dir), plugin="napari-kidseg")
    labels_layer = viewer.layers[-1]
    out = tmp_path / "saved.nii.gz"
    written = labels_layer.save(str(out), plugin="napari-kidseg")
    assert written == [str(out)]
    src = nib.load(str(small_case_dir / volumes.KITS_IMAGE))
    back = nib.load(str(out))
    assert back.shape == src.shape and np.array_equal(back.affine, src.affine)
    ref = nib.load(str(small_case_dir / volumes.KITS_LABELS))
    assert np.array_equal(np.asarray(back.dataobj), np.asarray(ref.dataobj))


def test_sample_data_opens_ct_and_labels_with_scale(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-kidseg", "phantom")
    assert [ly._type_string for ly in viewer.layers] == ["image", "labels"]
    image, labels = viewer.layers
    made = json.loads((sample_case_dir() / "phantom.json").read_text())  # what the generator drew
    assert list(image.data.shape) == made["shape_zyx"] == [55, 384, 384]
    assert np.allclose(image.scale, made["spacing_zyx_mm"], atol=1e-3)
    assert np.allclose(labels.scale, image.scale)
    assert (labels.data == 2).any() and (labels.data == 1).any()


def test_screenshot_of_a_real_window_shows_ct_and_labels(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-kidseg", "phantom")
    labels = viewer.layers[-1]
    z = int(np.argmax((labels.data > 0).sum(axis=(1, 2))))
    viewer.dims.current_step = (z, *viewer.dims.current_step[1:])
    labels.opacity = 1.0
    shot = viewer.screenshot(canvas_only=False, flash=False)
    from imageio.v3 import imwrite

    imwrite(tmp_path / "window.png", shot)
    rgb = shot[..., :3].astype(int)
    assert shot.shape[0] > 300 and shot.shape[1] > 300
    assert rgb.std() > 20  # not a blank canvas
    greys = (np.abs(rgb[..., 0] - rgb[..., 1]) < 4) & (np.abs(rgb[..., 1] - rgb[..., 2]) < 4) & (rgb[..., 0] > 60)
    kidney_green = (rgb[..., 1] > 120) & (rgb[..., 0] < 100) & (rgb[..., 2] < 100)
    assert greys.sum() > 10_000, "no CT grey levels on screen"
    assert kidney_green.sum() > 200, "no kidney label colour on screen"


def test_the_source_tree_does_not_shadow_the_manifest():
    """Started from the checkout (its folder first on sys.path), napari imports the source tree's
    napari_kidseg: the manifest must be found there too, and the version is single-sourced."""
    import subprocess
    import sys
    from importlib.metadata import version
    from pathlib import Path

    import napari_kidseg

    root = Path(__file__).resolve().parents[1]
    code = (
        "import napari_kidseg, npe2; pm = npe2.PluginManager.instance(); pm.discover(); "
        "print(napari_kidseg.__file__); print(pm.get_manifest('napari-kidseg').name)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert str(root / "napari_kidseg") in out and out.strip().endswith("napari-kidseg")
    assert version("napari-kidseg") == napari_kidseg.__version__
