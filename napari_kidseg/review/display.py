"""The review's display arithmetic: what the dock shows, computed without Qt or napari.

The maps laid beside the fused labels (coarse, refined, their disagreement, the refine patches),
the Review box's measurement and score text, the voxel a run's view goes to, the hand edits
carried into a run with other models, and how many voxels new models changed. The dock calls
these in its workers and only puts the answers on screen; tests call them without a display.
"""

from __future__ import annotations

import textwrap

import numpy as np

from .. import anatomy
from ..labels import BACKGROUND, TUMOR
from ..roi import patch_rois
from .session import FusionParams, ReviewSession

MEASURE_COLUMNS = 38  # the Review box's text is at most this wide (monospace): no horizontal scroll


def kidney_focus(regions: list[dict]):
    """The voxel (z, y, x) to show after a run: inside the largest kidney region the anatomy check
    did not flag (by its kidney mL, tumor left out), else the largest holding kidney, else the
    largest region; None without labels. Not the slice with the most labels: on a real scan that
    can be a false region (a liver cyst called tumor)."""
    kidneys = [r for r in regions if r["label"] != "tumor"]
    pick = [r for r in kidneys if not r["flagged"]] or kidneys or regions
    if not pick:
        return None
    return tuple(max(pick, key=lambda r: r["ml"] - r.get("tumor_ml", 0.0))["voxel"])


def comparison_maps(session, removed=None, focus=False) -> dict:
    """Coarse, refined, disagreement and ROI maps (computed in a worker thread); with ``focus``,
    also the voxel the view goes to after a run (see :func:`kidney_focus`)."""
    r, p = session.result, session.params
    coarse = r.coarse_labels(p.kidney_threshold, p.tumor_threshold)
    refined = r.refined_labels(p.kidney_threshold, p.tumor_threshold)
    return {
        "coarse": coarse,
        "refined": refined,
        "disagreement": session.disagreement_map(),
        "rois": patch_rois(r.patches, r.shape, r.patch_px),  # each ROI's refine patches, drawn as outlines
        # what the anatomy check took out: of the fusion just made, or the session's last
        "removed": session.removed_by_anatomy() if removed is None else removed,
        # what the refine stage alone makes of the volume (coarse outside the patches): scored
        # against a reference by the measurements, computed here once per fusion
        "refine_stage": np.where(r.patch_coverage(), refined, coarse),
        "focus": kidney_focus(session.region_table()) if focus else None,
    }


def review_of(result, params: tuple, labels=None):
    """The review session of a cascade result at the fusion ``params`` (the FusionParams fields),
    with the labels as corrected so far when given on the same grid, and its comparison maps with
    the voxel to show first: what the dock shows after a run or for a worklist's draft."""
    session = ReviewSession(result, FusionParams(*params))
    if labels is not None and labels.shape == session.labels.shape:
        session.load_labels(labels)
    return session, comparison_maps(session, focus=True)


def score_text(s, labels, ref, ref_name, comparison, problem=None):
    """The Review box: ``(html text, measurements, region table)`` of ``labels`` (the session's
    labels as corrected, a copy), with Dice and false mL against ``ref`` when there is one."""
    from ..metrics import bounding_box, false_ml, kits_scores, measurements

    sp = s.result.spacing
    # on the labels' box in z and y (x whole: the sides split at the middle column): the same
    # volumes and diameters from a fraction of the volume
    box = bounding_box(labels > BACKGROUND)
    m = measurements(labels if box is None else labels[box[0], box[1]], sp)
    lines = [f"{'':<7}{'kidney mL':>10}{'tumor mL':>10}{'tumor mm':>10}"]
    for side in ("right", "left", "total"):
        v = m[side]
        lines.append(f"{side:<7}{v['kidney_ml']:>10.1f}{v['tumor_ml']:>10.1f}{v['tumor_diameter_mm']:>10.0f}")
    if problem:
        lines.append(problem)
    if ref is not None:
        # two narrow blocks (Dice, then false mL), not one wide table: the dock must not need a
        # horizontal scroll bar once a reference is scored
        coarse, refined = comparison["coarse"], comparison["refine_stage"]
        # scored on the box around every label of the five maps, not the whole volume: the same
        # figures (nothing outside it), a fraction of the passes (the box caught up 5-7 s after a click)
        crop = bounding_box((ref > 0) | (labels > 0) | (coarse > 0) | (refined > 0) | (s.fused > 0))
        crop = crop or np.s_[:, :, :]
        ref = ref[crop]
        lines.append(f"Dice vs {ref_name[: MEASURE_COLUMNS - 8]}")
        lines.append(f"{'':<10}{'kid+tum':>8}{'tumor':>8}{'KiTS':>8}")
        false_lines = [f"{'false mL':<10}{'kidney':>8}{'tumor':>8}"]

        def score(value, present):  # both empty: nothing to score, not a perfect 1.000
            return f"{value:>8.3f}" if present else f"{'n/a':>8}"

        for name, lab in (("coarse", coarse), ("refined", refined), ("fused", s.fused), ("corrected", labels)):
            lab = lab[crop]
            k = kits_scores(lab, ref)
            f = false_ml(lab, ref, sp)
            has_kid, has_tum = (
                (lab > BACKGROUND).any() or (ref > BACKGROUND).any(),
                (lab == TUMOR).any() or (ref == TUMOR).any(),
            )
            composite = k["kits_composite"] if has_tum else k["kidney_tumor_dice"]
            lines.append(
                f"{name:<10}{score(k['kidney_tumor_dice'], has_kid)}{score(k['tumor_dice'], has_tum)}"
                f"{score(composite, has_kid)}"
            )
            false_lines.append(f"{name:<10}{f['false_kidney_ml']:>8.1f}{f['false_tumor_ml']:>8.1f}")
        lines += false_lines
    verdict = s.result.verdict
    if s.params.anatomy_check and verdict is not None:
        gone = verdict.removed_ml()
        lines.append(f"anatomy check removed {gone['kidney']:.1f} mL kidney, {gone['tumor']:.1f} mL tumor")
    lines += [s.result.contrast_note] if s.result.contrast_note else []  # None with the rule off
    lines += [s.result.speck_note] if s.params.anatomy_check and s.result.speck_note else []
    # judged on the labels as corrected, so a fix clears it
    lines += [r.describe() for r in anatomy.tumor_without_kidney(labels, sp, s.result.spine)]
    lines.append(f"hand-edited voxels: {np.count_nonzero(s.edited)}")  # read only: the GUI thread records edits
    lines = [
        line if len(line) <= MEASURE_COLUMNS else textwrap.fill(line, MEASURE_COLUMNS, subsequent_indent="  ")
        for line in lines
    ]
    return "<pre>" + "\n".join(lines) + "</pre>", m, s.region_table()


def carried_edits(session):
    """The hand edits to lay over a new run's labels: ``(flat indices, values)`` of every voxel the
    user set, also where the old fusion agreed (None without edits)."""
    session.sync_edits()
    keep = session.edited
    if not keep.any():
        return None
    return np.flatnonzero(keep), session.labels.ravel()[keep.ravel()].copy()


def changed_voxels(before, fused, spacing) -> tuple[int, float] | None:
    """How many voxels (and mL) differ between the labels ``before`` new models and their
    ``fused`` labels; None when the two are on different grids."""
    if before is None or before.shape != fused.shape:
        return None
    changed = int((before != fused).sum())
    return changed, changed * float(np.prod(spacing)) / 1000.0
