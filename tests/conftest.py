"""Shared fixtures: small phantom cases, the real data in ../shared/data (skipped when absent)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub
# triton's LLVM next to Mesa's in one process segfaults (see napari_kidseg/_widgets/__init__.py);
# the suite mixes napari viewers and training in one process in any order, and never needs triton
sys.modules.setdefault("triton", None)
# the dock freezes the objects alive after torch's import out of garbage collection (_widgets/_workers.py):
# here every test closes its viewer and napari checks that it was collected
os.environ.setdefault("KIDSEG_GC_FREEZE", "0")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def case_digest(case) -> str:
    """The golden checksum of a phantom case: CT, labels, organ map, info and geometry (16 hex digits)."""
    import hashlib
    import json

    h = hashlib.sha256()
    h.update(case.ct.array.tobytes())
    h.update(case.labels.tobytes())
    h.update(case.organs.tobytes())
    h.update(json.dumps(case.info, sort_keys=True).encode())
    h.update(repr(case.ct.geometry).encode())
    return h.hexdigest()[:16]


def read_labels_ahead(paths, workers: int = 2):
    """``(path, Volume)`` for each label file in order, read by ``workers`` spawned processes a
    few files ahead (decompressing and reorienting is most of a real-volume sweep's time; at most
    ``workers + 1`` volumes wait in memory)."""
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    from napari_kidseg.io.readers import read_labels

    paths = list(paths)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        waiting = deque()
        for path in paths:
            waiting.append((path, pool.submit(read_labels, path)))
            if len(waiting) > workers:
                done, future = waiting.popleft()
                yield done, future.result()
        while waiting:
            done, future = waiting.popleft()
            yield done, future.result()


def shared_path(*parts) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the real data at {path} (../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def small_case():
    """A small phantom (128 x 128 in-plane, <= 40 slices) with a tumor, in KiTS's I-P-L layout."""
    from napari_kidseg.phantoms.procedural import make_phantom

    return make_phantom(11, matrix=128, max_slices=40, n_tumors=1, disk_layout="IPL")


@pytest.fixture(scope="session")
def small_case_dir(tmp_path_factory, small_case):
    from napari_kidseg.io import volumes

    root = tmp_path_factory.mktemp("kits")
    volumes.write_kits_case(root, "case_00000", small_case.ct, small_case.labels)
    return root / "case_00000"


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """Three 64 x 64 phantoms with a tumor each (training and fine-tuning tests), and a cache of
    their own so cached volumes never leak between test modules."""
    from napari_kidseg.phantoms.writer import write_phantom_cases

    root = tmp_path_factory.mktemp("data")
    write_phantom_cases(root, 3, seed=500, matrix=64, max_slices=24, n_tumors=1)
    os.environ["KIDSEG_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return root


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Randomly initialised tiny networks (2.5D, 3 channels), saved as real checkpoints."""
    import torch

    from napari_kidseg import models

    folder = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for i, stage in enumerate(("coarse", "refine")):
        torch.manual_seed(i)
        cfg = models.model_config(stage, "tiny", context_slices=1, input_size=64 if stage == "coarse" else 96)
        cfg.version = "test"
        paths[stage] = models.save_checkpoint(folder / f"{stage}.safetensors", models.build_model(cfg), cfg)
    return paths
