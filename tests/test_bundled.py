"""The bundled weights load and segment the sample case (a real Dice, computed here)."""

from __future__ import annotations

import pytest

from napari_kidseg import metrics, models
from napari_kidseg._napari_io import sample_case_dir
from napari_kidseg.cascade import Cascade
from napari_kidseg.io import readers


def test_bundled_weights_segment_the_sample_case():
    if models.bundled_checkpoint("coarse") is None or models.bundled_checkpoint("refine") is None:
        pytest.skip("no bundled weights in this checkout")
    for stage in ("coarse", "refine"):
        cfg = models.read_config(models.bundled_checkpoint(stage))
        assert cfg.stage == stage and cfg.provenance.get("data"), cfg.provenance
    case = sample_case_dir()
    ct, ref = readers.read_kits_case(case)
    result = Cascade(device="cpu").run(ct.array, ct.geometry.spacing)
    assert len(result.rois) == 2
    labels = result.fuse(alpha=0.4)
    # the sample's kidneys are found (version 5: 0.87 measured, version 4: 0.79)...
    assert metrics.dice(labels > 0, ref.array == 1) > 0.80
    # ...but its 98 mm exophytic tumor, drawn as bright as the kidney by the phantom revision the
    # sample comes from, is missed (version 5: kidney+tumor 0.46, tumor 0.002; version 4: 0.61,
    # 0.29; see the model card's limits), so the floor on the whole case is lower
    fused = metrics.kits_scores(labels, ref.array)
    assert fused["kidney_tumor_dice"] > 0.40, fused
