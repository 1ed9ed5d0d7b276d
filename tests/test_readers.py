"""The reading dispatcher: what a path holds, decoded once (no display needed)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_kidseg import _napari_io
from napari_kidseg.io import readers, volumes


@pytest.fixture
def decodes(monkeypatch):
    """Count every decode of a volume from disk (all files and series go through _read_sitk)."""
    calls = []
    real = volumes._read_sitk

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(volumes, "_read_sitk", counting)
    return calls


def test_a_ct_opened_through_file_open_is_decoded_once(small_case_dir, decodes):
    path = small_case_dir / volumes.KITS_IMAGE
    layers = _napari_io.read_layers(str(path))
    assert [layer_type for _, _, layer_type in layers] == ["image"]
    assert decodes == [str(path)]


def test_a_label_file_opened_through_file_open_is_decoded_once(small_case_dir, decodes):
    path = small_case_dir / volumes.KITS_LABELS
    layers = _napari_io.read_layers(str(path))
    assert [layer_type for _, _, layer_type in layers] == ["labels"]
    assert decodes == [str(path)]


def test_read_any_says_what_a_path_holds(small_case_dir, small_case):
    ct, kind = readers.read_any(small_case_dir / volumes.KITS_IMAGE)
    assert kind == "ct" and np.array_equal(ct.array, volumes.read_ct(small_case_dir / volumes.KITS_IMAGE).array)
    labels, kind = readers.read_any(small_case_dir / volumes.KITS_LABELS)
    assert kind == "labels" and labels.array.dtype == np.uint8
    assert np.array_equal(labels.array, small_case.labels)
