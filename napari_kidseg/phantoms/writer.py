"""Phantom cases on disk in KiTS layout, from either generator, in one process or several."""

from __future__ import annotations

import numpy as np

from ..io import files, volumes
from .labelmap import make_labelmap_phantom
from .procedural import make_phantom


def _write_one_phantom(out, i: int, seed: int, overwrite: bool, kwargs: dict, label_map=None):
    import json

    if label_map is None:
        case = make_phantom(seed + i, **kwargs)
    else:
        case = make_labelmap_phantom(label_map, seed + i, **kwargs)
    case_dir = volumes.write_kits_case(out, f"case_{i:05d}", case.ct, case.labels, overwrite=overwrite)
    if case.organs is not None:  # the neighbours, for organ-aware training (labels.ORGANS codes)
        volumes.write_labels(case_dir / volumes.KITS_ORGANS, case.organs, case.ct, overwrite=True)
    with files.atomic_path(case_dir / "phantom.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps({**case.info, "generator_kwargs": kwargs}, indent=1))
    return case_dir


def write_phantom_cases(
    out_dir, n_cases: int, seed: int, *, overwrite=False, progress=None, jobs: int = 1, label_maps=None, **kwargs
) -> list:
    """Write ``n_cases`` phantoms in KiTS layout (case_00000, ...) with seeds ``seed, seed+1, ...``.

    Each case folder also gets ``phantom.json`` saying how it was made. ``jobs`` > 1 makes the
    cases in that many processes; case i is the same phantom either way (its seed is seed+i).
    ``label_maps``: build each case around one of these real organ label maps
    (:mod:`labelmap`); case i takes map ``order[i % len(maps)]`` of a permutation drawn
    from ``seed``, so every map is used before any is used twice.
    """
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    maps = [None] * n_cases
    if label_maps:
        order = np.random.default_rng([seed, 11]).permutation(len(label_maps))
        maps = [str(label_maps[order[i % len(label_maps)]]) for i in range(n_cases)]
    if jobs <= 1 or n_cases <= 1:
        written = []
        for i in range(n_cases):
            written.append(_write_one_phantom(out, i, seed, overwrite, kwargs, maps[i]))
            if progress:
                progress(i + 1, n_cases)
        return written
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: the caller may hold threads (napari, torch) that a fork would copy mid-lock
    with ProcessPoolExecutor(min(jobs, n_cases), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_write_one_phantom, out, i, seed, overwrite, kwargs, maps[i]): i for i in range(n_cases)}
        written = [None] * n_cases
        for done, fut in enumerate(as_completed(futures), 1):
            written[futures[fut]] = fut.result()
            if progress:
                progress(done, n_cases)
    return written
