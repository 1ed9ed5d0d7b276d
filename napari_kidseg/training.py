"""Datasets, augmentation, losses, and the train / fine-tune loops.

Data comes in KiTS layout (``case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz``), from the
real KiTS19/21/23 download or from ``kidseg phantom``. KiTS21/23 label 3 (cyst) is mapped to 1
(kidney), KiTS19's convention here: a cyst is part of the kidney, not tumor. Other values are
refused.

Each case is decoded once into memory-mapped ``.npy`` files in a cache folder, so epochs do not
gunzip volumes again and worker processes share pages. Coarse samples are whole slices, drawn
with kidney and tumor slices over-represented; refine samples are the patches that
:func:`roi.refine_patches` cuts around the reference kidneys, the very function inference uses.

Multi-GPU: ``torchrun --nproc_per_node N -m napari_kidseg.cli train ...`` runs one process per
GPU with DistributedDataParallel (NCCL on CUDA, gloo on the CPU); rank 0 validates and writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import roi
from .errors import KidsegError
from .io import files, readers, volumes
from .labels import (
    BACKGROUND,
    CYST,
    KIDNEY,
    TUMOR,
    UNLABELLED,
    kits_foreground,
    map_kits_labels,
    network_target,
    training_target,
)
from .models import ModelConfig, add_organ_channels, build_model, load_checkpoint, save_checkpoint
from .preprocessing import context_indices, hu_to_input

_log = logging.getLogger(__name__)  # the default for ``log``: quiet unless the caller configures logging


# ------------------------------------------------------------------------------ data
def cache_root() -> Path:
    return Path(os.environ.get("KIDSEG_CACHE", Path.home() / ".cache" / "napari-kidseg")) / "volumes"


def find_cases(roots) -> list[Path]:
    """All KiTS-layout cases with labels under the given roots; a clear error when there are none."""
    cases = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise KidsegError("no such dataset folder", root)
        found = [c for c in volumes.kits_cases(root) if (c / volumes.KITS_LABELS).exists()]
        if not found:
            raise KidsegError(
                f"no cases in KiTS layout here (expected case_XXXXX/{volumes.KITS_IMAGE} and {volumes.KITS_LABELS})",
                root,
            )
        cases.extend(found)
    return cases


def target_for(y, cfg: ModelConfig):
    """A label tensor as a network of ``cfg`` learns it: the cached cases keep KiTS23's cysts (3),
    which a 3-class (KiTS19) network learns as kidney, and organ codes, which only a network with
    organ channels learns (``labels.network_target``)."""
    return network_target(y, cfg.classes, len(cfg.organs))


@dataclasses.dataclass
class CachedCase:
    name: str
    ct_path: Path  # .npy, int16 HU, canonical (z, y, x)
    labels_path: Path
    spacing: tuple
    shape: tuple
    slices: tuple | None = None  # train on these slices only (a partly reviewed correction); None: all
    # fine-tuning: a uint8 .npy volume, 1 where the correction changed the parent's answer (and
    # around it): :class:`SegmentationSamples` draws those slices more and returns the mask
    lesson_path: Path | None = None

    def arrays(self):
        """(CT, labels) memory-mapped; the labels as the case has them (KiTS23 cysts included)."""
        return np.load(self.ct_path, mmap_mode="r"), np.load(self.labels_path, mmap_mode="r")


def cache_case(case_dir: Path) -> CachedCase:
    """Decode a case once into memory-mappable .npy files (re-done only when the files change)."""
    case_dir = Path(case_dir)
    img, seg = case_dir / volumes.KITS_IMAGE, case_dir / volumes.KITS_LABELS
    organ_file = case_dir / volumes.KITS_ORGANS
    organ_stamp = organ_file.stat().st_mtime_ns if organ_file.exists() else "-"
    stamp = (
        f"v3|{case_dir.resolve()}|{img.stat().st_mtime_ns}|{img.stat().st_size}|{seg.stat().st_mtime_ns}|{organ_stamp}"
    )
    folder = cache_root() / hashlib.sha1(stamp.encode()).hexdigest()[:16]
    meta_file = folder / "meta.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
    else:
        ct, labels = readers.read_kits_case(case_dir)
        lab = map_kits_labels(labels.array, case_dir / volumes.KITS_LABELS, classes=4)  # checked, cysts kept
        if organ_file.exists():  # the neighbours as classes of their own (labels.training_target)
            organs = readers.read_labels(organ_file, like=ct).array
            lab = training_target(lab, organs)
        folder.mkdir(parents=True, exist_ok=True)
        for name, arr in (("ct.npy", ct.array.astype(np.int16)), ("labels.npy", lab)):
            with files.atomic_path(folder / name, overwrite=True) as tmp:
                np.save(tmp, arr)
        meta = {"name": case_dir.name, "spacing": list(ct.geometry.spacing), "shape": list(ct.array.shape)}
        with files.atomic_path(meta_file, overwrite=True) as tmp:
            tmp.write_text(json.dumps(meta))
    return CachedCase(
        meta["name"], folder / "ct.npy", folder / "labels.npy", tuple(meta["spacing"]), tuple(meta["shape"])
    )


def cache_cases(case_dirs, jobs: int = 1) -> list[CachedCase]:
    """:func:`cache_case` for many cases, decoding up to ``jobs`` of them at once (in processes)."""
    case_dirs = list(case_dirs)
    if jobs <= 1 or len(case_dirs) <= 1:
        return [cache_case(c) for c in case_dirs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(jobs, len(case_dirs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(cache_case, case_dirs))


def reference_patches(case: CachedCase, patch_px: int) -> np.ndarray:
    """The refine patches inference would cut if the coarse stage were perfect."""
    _, labels = case.arrays()
    _, roi_map = roi.kidney_rois(kits_foreground(np.asarray(labels)), case.spacing)
    return roi.refine_patches(roi_map, case.spacing, patch_px=patch_px)


@dataclasses.dataclass
class Augment:
    flip: bool = True
    scale: float = 0.15  # +- relative
    rotate_deg: float = 12.0
    hu_shift: float = 40.0
    hu_scale: float = 0.12
    noise: float = 0.04  # std of added noise on the [-1, 1] input scale
    clahe: float = 0.0  # probability of contrast-limited adaptive histogram equalisation (off by default)
    # Another scanner's look, drawn on the CT's own grid before any resizing (off by default): image
    # noise of up to ``ct_noise_hu`` SD (real thin-slice CT reads 25-40 HU where the phantoms draw
    # 6-22) and, as often, a partial-volume blur of up to ``ct_blur_px`` pixels
    ct_noise_hu: float = 0.0
    ct_blur_px: float = 0.0


class SegmentationSamples:
    """Coarse slices or refine patches of cached cases, as (input, target) torch tensors."""

    def __init__(
        self, cases: list[CachedCase], cfg: ModelConfig, augment: Augment | None, seed: int = 0, lessons: bool = False
    ):
        """``lessons``: items are (input, target, lesson mask) and slices or patches with lesson
        voxels are drawn as often as tumor ones (a case without ``lesson_path`` has none)."""
        self.cases, self.cfg, self.augment, self.lessons = cases, cfg, augment, lessons
        self.items = []  # (case index, z, y0, x0)
        self.weights = []
        for ci, case in enumerate(cases):
            _, labels = case.arrays()
            allowed = None if case.slices is None else set(case.slices)
            lesson = self._lesson(case)
            if cfg.stage == "coarse":
                kits = np.where(kits_foreground(np.asarray(labels)), labels, 0)  # organ codes are not KiTS
                has = kits.reshape(labels.shape[0], -1).max(axis=1)
                taught = np.zeros(case.shape[0], bool) if lesson is None else lesson.reshape(len(lesson), -1).any(1)
                for z in range(case.shape[0]):
                    if allowed is not None and z not in allowed:
                        continue
                    self.items.append((ci, z, 0, 0))
                    self.weights.append(6.0 if taught[z] else {0: 1.0, 1: 4.0, 2: 6.0, 3: 6.0}[int(has[z])])
            else:
                for p in reference_patches(case, cfg.input_size):
                    z, y0, x0 = int(p["z"]), int(p["y0"]), int(p["x0"])
                    if allowed is not None and z not in allowed:
                        continue
                    self.items.append((ci, z, y0, x0))
                    # tumor patches are few and the class is the hard one: draw them 3x as often
                    has_tumor = (roi.cut_patch(np.asarray(labels[z]), y0, x0, cfg.input_size, 0) == TUMOR).any()
                    taught = (
                        lesson is not None and roi.cut_patch(np.asarray(lesson[z]), y0, x0, cfg.input_size, 0).any()
                    )
                    self.weights.append(3.0 if has_tumor or taught else 1.0)
        if not self.items:
            raise KidsegError("the dataset yields no training samples (no kidneys in any label volume?)")
        self.weights = np.asarray(self.weights) / np.sum(self.weights)
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.items)

    def _lesson(self, case: CachedCase):
        return np.load(case.lesson_path, mmap_mode="r") if self.lessons and case.lesson_path else None

    @staticmethod
    def reseed_worker(worker_id: int):
        """DataLoader ``worker_init_fn``: each worker process gets its own augmentation stream.

        Workers start as copies of the dataset, so without this they would all draw the same
        flips, rotations and HU shifts. torch gives each worker a distinct, seeded initial seed.
        """
        import torch

        info = torch.utils.data.get_worker_info()
        info.dataset.rng = np.random.default_rng([torch.initial_seed() % 2**63, worker_id])

    def __getitem__(self, i):
        import torch
        import torch.nn.functional as F

        ci, z, y0, x0 = self.items[i]
        case, cfg, aug = self.cases[ci], self.cfg, self.augment
        ct, labels = case.arrays()
        lesson = self._lesson(case)
        if self.lessons:  # the mask rides in the labels' bit 3, so every flip, scale and crop moves both alike
            labels = np.asarray(labels[z]) + 8 * (np.asarray(lesson[z]) > 0 if lesson is not None else 0)
            labels = labels.astype(np.uint8)[None]
            z_lab = 0
        else:
            z_lab = z
        zs = context_indices(z, case.shape[0], cfg.context_slices)[0]
        size = cfg.input_size
        if cfg.stage == "coarse":
            x = torch.from_numpy(np.asarray(ct[zs], np.float32))
            y = torch.from_numpy(np.asarray(labels[z_lab], np.int64))
            side = max(x.shape[-2:])
            pad = (0, side - x.shape[-1], 0, side - x.shape[-2])
            x = F.pad(x, pad, value=float(volumes.AIR_HU))
            y = F.pad(y, pad, value=0)
            x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)[
                0
            ]
            y = F.interpolate(y[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
            # drawn after the resize, scaled to it (a 4x downsample averages noise to a quarter and
            # shrinks a blur four times): the same look at a sixteenth of the cost of 512 x 512
            x = torch.from_numpy(self._scanner_look(x.numpy(), aug, pixels_per_input=side / size))
        else:
            if aug is not None:  # the coarse stage never centres a kidney exactly
                y0 += int(self.rng.integers(-24, 25))
                x0 += int(self.rng.integers(-24, 25))
            x = np.stack([roi.cut_patch(np.asarray(ct[zc]), y0, x0, size, volumes.AIR_HU) for zc in zs])
            x = torch.from_numpy(self._scanner_look(x.astype(np.float32), aug))
            y = torch.from_numpy(roi.cut_patch(np.asarray(labels[z_lab]), y0, x0, size, 0).astype(np.int64))
        taught, y = (y >= 8, y % 8) if self.lessons else (None, y)
        y = target_for(y, cfg)
        if taught is not None:
            y = y + 8 * taught
        if aug is not None:
            x, y = self._augment(x, y, aug)
        x = hu_to_input(x, cfg.hu_window)
        if aug is not None and aug.noise:
            x = x + torch.randn_like(x) * float(self.rng.uniform(0, aug.noise))
        return (x, y % 8, (y >= 8).float()) if self.lessons else (x, y)

    def _scanner_look(self, x: np.ndarray, aug: Augment | None, pixels_per_input: float = 1.0) -> np.ndarray:
        """(channels, y, x) HU with another scanner's noise or blur (or both) as :class:`Augment`
        allows, given in the CT's own pixels; ``pixels_per_input``: CT pixels per pixel of ``x``
        (a resized slice). Air stays air (the noise is drawn on the body only)."""
        if aug is None or not (aug.ct_noise_hu or aug.ct_blur_px):
            return x
        rng, f = self.rng, max(float(pixels_per_input), 1.0)
        if aug.ct_blur_px and rng.random() < 0.5:
            sigma = float(rng.uniform(min(0.3, aug.ct_blur_px), aug.ct_blur_px)) / f
            x = ndimage.gaussian_filter(x, (0, sigma, sigma), truncate=2.5)
        if aug.ct_noise_hu and rng.random() < 0.5:
            body = x > -500
            noise = rng.standard_normal(x.shape, dtype=np.float32) * float(
                rng.uniform(min(5.0, aug.ct_noise_hu), aug.ct_noise_hu) / f
            )
            if rng.random() < 0.5 and f < 2:  # correlated, as filtered back-projection makes it
                noise = ndimage.gaussian_filter(noise, (0, 0.6, 0.6), truncate=2.0) * 1.9
            x = np.where(body, x + noise, x).astype(np.float32)
        return x

    def _augment(self, x, y, aug: Augment):
        import torch
        import torch.nn.functional as F

        rng = self.rng
        if aug.flip and rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        if aug.scale or aug.rotate_deg:
            s = 1.0 + rng.uniform(-aug.scale, aug.scale)
            a = math.radians(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
            theta = torch.tensor(
                [[math.cos(a) / s, -math.sin(a) / s, 0.0], [math.sin(a) / s, math.cos(a) / s, 0.0]], dtype=torch.float32
            )[None]
            grid = F.affine_grid(theta, (1, 1, *x.shape[-2:]), align_corners=False)
            x = (
                F.grid_sample(
                    x[None] - volumes.AIR_HU, grid, mode="bilinear", padding_mode="zeros", align_corners=False
                )[0]
                + volumes.AIR_HU
            )
            y = F.grid_sample(y[None, None].float(), grid, mode="nearest", align_corners=False)[0, 0].long()
        x = x * (1.0 + rng.uniform(-aug.hu_scale, aug.hu_scale)) + rng.uniform(-aug.hu_shift, aug.hu_shift)
        if aug.clahe and rng.random() < aug.clahe:
            x = self._clahe(x, float(rng.uniform(0.005, 0.03)))
        return x, y

    def _clahe(self, x, clip_limit):
        """CLAHE inside the network's HU window, per channel: local contrast as another scanner
        or reconstruction kernel might render it. Values outside the window are left alone."""
        import torch
        from skimage.exposure import equalize_adapthist

        lo, hi = self.cfg.hu_window
        w = ((x.clamp(lo, hi) - lo) / (hi - lo)).numpy()
        eq = np.stack([equalize_adapthist(c, clip_limit=clip_limit) for c in w]).astype(np.float32)
        inside = (x > lo) & (x < hi)
        return torch.where(inside, torch.from_numpy(eq) * (hi - lo) + lo, x)


# ------------------------------------------------------------------------------ loss and scores
class VolumeSamples3D:
    """Crops of whole cases resampled to the 3D coarse stage's voxel (``cfg.voxel_mm``), as
    (input, target) tensors: half of them centred on a random kidney voxel, half anywhere. The
    resampled volumes are made once per case and kept in memory (a few MB each at 3 mm)."""

    def __init__(self, cases: list[CachedCase], cfg: ModelConfig, augment: Augment | None, seed: int = 0):
        if not cases:
            raise KidsegError("the dataset yields no training samples (no cases)")
        self.cases, self.cfg, self.augment = cases, cfg, augment
        self.items = list(range(len(cases)))
        self.weights = np.full(len(cases), 1.0 / len(cases))
        self.rng = np.random.default_rng(seed)
        self._volumes: dict[int, tuple] = {}

    def __len__(self):
        return len(self.items)

    reseed_worker = SegmentationSamples.reseed_worker

    def volume(self, ci: int):
        if ci not in self._volumes:
            from .preprocessing import resample, resample_factors

            case = self.cases[ci]
            ct, labels = case.arrays()
            f = resample_factors(case.spacing, self.cfg.voxel_mm)
            self._volumes[ci] = (
                resample(np.asarray(ct, np.float32), f, order=1),
                resample(np.asarray(labels), f, order=0),
            )
        return self._volumes[ci]

    def __getitem__(self, i):
        import torch

        ct, labels = self.volume(self.items[i])
        size, rng = self.cfg.input_size, self.rng
        pad = [(0, max(0, size - n)) for n in ct.shape]
        ct = np.pad(ct, pad, constant_values=volumes.AIR_HU)
        labels = np.pad(labels, pad)
        kidney = np.argwhere(kits_foreground(labels)) if rng.random() < 0.5 else np.zeros((0, 3))
        if len(kidney):
            centre = kidney[rng.integers(len(kidney))]
            start = [int(np.clip(c - size // 2, 0, n - size)) for c, n in zip(centre, ct.shape)]
        else:
            start = [int(rng.integers(0, n - size + 1)) for n in ct.shape]
        box = tuple(slice(a, a + size) for a in start)
        x = torch.from_numpy(np.ascontiguousarray(ct[box], np.float32))[None]
        y = torch.from_numpy(np.ascontiguousarray(labels[box], np.int64))
        y = target_for(y, self.cfg)
        if self.augment is not None:
            aug = self.augment
            if aug.flip and rng.random() < 0.5:
                x, y = x.flip(-1), y.flip(-1)
            x = x * (1.0 + rng.uniform(-aug.hu_scale, aug.hu_scale)) + rng.uniform(-aug.hu_shift, aug.hu_shift)
        return hu_to_input(x, self.cfg.hu_window), y


def dice_ce_loss(logits, target, kits_classes: int = 3, voxel_weight=None):
    """Cross-entropy over every channel (organs included; unlabelled voxels ignored) plus soft Dice
    of the KiTS regions (kidney and masses, tumor; cyst with 4 classes).

    ``voxel_weight``: the cross-entropy's weight per voxel (a fine-tune's lesson voxels count more),
    normalised so that the loss keeps its scale."""
    import torch
    import torch.nn.functional as F

    if voxel_weight is None:
        ce = F.cross_entropy(logits, target, ignore_index=UNLABELLED)
    else:
        voxel_weight = voxel_weight * (target != UNLABELLED)
        per_voxel = F.cross_entropy(logits, target, ignore_index=UNLABELLED, reduction="none")
        ce = (per_voxel * voxel_weight).sum() / voxel_weight.sum().clamp_min(1e-6)
    p = torch.softmax(logits.float(), dim=1)
    valid = (target != UNLABELLED).float()
    masses = (target >= KIDNEY) & (target < kits_classes)
    regions = [
        (p[:, KIDNEY:kits_classes].sum(1) * valid, masses.float()),
        (p[:, TUMOR] * valid, (target == TUMOR).float()),
    ]
    if kits_classes == 4:  # KiTS23's cyst class
        regions.append((p[:, CYST] * valid, (target == CYST).float()))
    dice_loss = 0.0
    for pr, gt in regions:
        inter = (pr * gt).sum()
        dice_loss = dice_loss + 1.0 - (2 * inter + 1.0) / (pr.sum() + gt.sum() + 1.0)
    return ce + dice_loss / len(regions)


class DiceCounter:
    """Voxel-aggregated Dice of kidney+tumor and tumor over many batches."""

    def __init__(self):
        self.n = np.zeros((2, 3))  # region x (intersection, pred, ref)

    def add(self, pred, target):
        for r, (p, t) in enumerate(((pred > BACKGROUND, target > BACKGROUND), (pred == TUMOR, target == TUMOR))):
            self.n[r] += [int((p & t).sum()), int(p.sum()), int(t.sum())]

    def scores(self) -> dict:
        d = [(2 * i / (p + t)) if (p + t) else 1.0 for i, p, t in self.n]
        return {"kidney_tumor_dice": d[0], "tumor_dice": d[1], "mean_dice": (d[0] + d[1]) / 2}


# ------------------------------------------------------------------------------ training loop
@dataclasses.dataclass
class TrainSettings:
    epochs: int = 30
    steps_per_epoch: int = 200
    batch_size: int = 16
    lr: float = 1e-4
    lr_step_epochs: int = 10  # step decay as in the paper
    lr_gamma: float = 0.5
    patience: int = 6  # early stopping on validation Dice
    val_fraction: float = 0.15
    val_samples: int = 1024  # at most this many validation slices or patches, evenly spread
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    max_minutes: float | None = None
    augment: bool = True
    clahe: float = 0.0  # see Augment.clahe
    ct_noise_hu: float = 0.0  # see Augment.ct_noise_hu
    ct_blur_px: float = 0.0  # see Augment.ct_blur_px
    # BatchNorm running-statistics momentum; None keeps PyTorch's 0.1. With random tissue contrasts
    # a batch's statistics swing, and at 0.1 the last ~10 batches decide what evaluation uses
    bn_momentum: float | None = None
    # fine-tuning: train the decoder (and head) only, the encoder's features stay the parent's
    freeze_encoder: bool = False


FINETUNE_SCHEDULES = ("heldout", "fixed")


@dataclasses.dataclass
class FinetuneSettings:
    """How a fine-tune on corrections learns (:mod:`finetuning`; the model card's "Fine-tuning
    defaults: the site study" measured them). ``kidseg finetune`` and the widget build one."""

    schedule: str = "heldout"  # heldout: the corrected case decides; fixed: epochs x steps_per_epoch at lr
    max_steps: int = 150  # per stage; the held-out rule usually stops earlier
    lr: float = 1e-4  # the held-out rule's first learning rate (the fixed rule's was 2e-5)
    epochs: int = 5  # epochs and steps_per_epoch: the fixed rule only
    steps_per_epoch: int = 20
    batch_size: int = 8
    n_replay: int = 8  # phantoms replayed against forgetting (half of each held-out-rule batch)
    max_minutes: float | None = 1.25  # per stage, training steps only (scoring and loading not counted)
    holdout_fraction: float = 0.25  # of the corrected scans, once there are three or more
    bn_momentum: float | None = 0.0  # 0 keeps the parent's BatchNorm statistics
    freeze_encoder: bool = False
    lesson_weight: float = 4.0  # extra loss weight of the voxels the correction changed
    lesson_mm: float = 6.0  # how far in-plane around a changed voxel it weighs
    reviewed_only: bool = True  # train on the slices the export marked reviewed (else every slice)
    device: str = "auto"

    def check(self) -> FinetuneSettings:
        """Itself, or one line naming the setting that is out of range."""
        if self.schedule not in FINETUNE_SCHEDULES:
            raise KidsegError(f"schedule must be one of {FINETUNE_SCHEDULES}, got {self.schedule!r}")
        for name in ("max_steps", "epochs", "steps_per_epoch", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise KidsegError(f"{name} must be a whole number of 1 or more, got {value}")
        if not isinstance(self.n_replay, int) or self.n_replay < 0:
            raise KidsegError(f"n_replay must be a whole number of 0 or more, got {self.n_replay}")
        if not 0 < self.lr < float("inf"):
            raise KidsegError(f"the learning rate must be above 0, got {self.lr}")
        if not 0 <= self.holdout_fraction < 1:
            raise KidsegError(f"the held-out fraction must be from 0 to below 1, got {self.holdout_fraction}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise KidsegError(f"the time budget must be above 0 minutes (or none), got {self.max_minutes}")
        if self.lesson_weight < 0 or self.lesson_mm < 0:
            raise KidsegError("the lesson weight and its reach in mm must be 0 or more")
        return self


def _trainable(model, settings: TrainSettings):
    """The parameters the optimiser moves: all, or all but the encoder's with ``freeze_encoder``."""
    encoder = getattr(model, "encoder", None)
    if settings.freeze_encoder and encoder is not None:
        for p in encoder.parameters():
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def _distributed():
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        import torch

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    rank = dist.get_rank() if world > 1 else 0
    return world, rank


def split_cases(cases: list, val_fraction: float, seed: int):
    """A deterministic train/validation split by case (never by slice: slices of one case are alike)."""
    if len(cases) < 2:
        return list(cases), []
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = max(1, int(round(len(cases) * val_fraction)))
    val = [cases[i] for i in sorted(order[:n_val])]
    train = [cases[i] for i in sorted(order[n_val:])]
    return train, val


def _plot_curves(log_rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in log_rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(ep, [r["train_loss"] for r in log_rows], label="train loss")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    for key in ("kidney_tumor_dice", "tumor_dice"):
        ax[1].plot(ep, [r.get(f"val_{key}", np.nan) for r in log_rows], label=f"val {key.replace('_', ' ')}")
    ax[1].set_ylim(0, 1)
    ax[1].set_xlabel("epoch")
    ax[1].legend()
    fig.tight_layout()
    with __import__("contextlib").suppress(Exception):
        with files.atomic_path(path, overwrite=True) as tmp:
            fig.savefig(tmp, dpi=80)
    plt.close(fig)


def train(
    cfg: ModelConfig,
    train_cases: list[CachedCase],
    val_cases: list[CachedCase],
    out: Path,
    settings: TrainSettings,
    *,
    init_checkpoint=None,
    resume=False,
    encoder_weights=None,
    progress=None,
    cancel=None,
    log=None,
) -> dict:
    """Train one stage; writes ``out`` (best on validation), ``out``.last/.state/.jsonl/.png.

    Returns a summary (best validation scores, epochs, seconds). The steps: set up the model and
    its optimizer (new, from ``init_checkpoint``, or resumed), place it on the device, make the
    loaders; then per epoch: train, validate, checkpoint, decide whether to stop.
    """
    log = log or _log.info
    import torch

    from .models import pick_device

    world, rank = _distributed()
    device = pick_device(settings.device)
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    torch.manual_seed(settings.seed + rank)
    out = Path(out)
    run = _setup_model(cfg, out, settings, init_checkpoint, resume, encoder_weights, log)
    cfg, model = run.cfg, run.model
    ddp_model, is_cuda = _place_model(model, cfg, device, world)
    loader, val_loader = _loaders(cfg, train_cases, val_cases, settings, rank, run.start_epoch, is_cuda)

    t_start = time.time()
    stale = 0
    total_steps = (settings.epochs - run.start_epoch) * settings.steps_per_epoch
    step_done = 0
    epoch = run.start_epoch
    for epoch in range(run.start_epoch, settings.epochs):
        note = progress if rank == 0 else None
        losses, step_done = _train_epoch(
            ddp_model, loader, run.opt, cfg, device, is_cuda, cancel, note, step_done, total_steps, epoch, settings
        )
        run.sched.step()
        row = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)),
            "lr": run.opt.param_groups[0]["lr"],
            "seconds": round(time.time() - t_start, 1),
        }
        if rank == 0:
            score = _validate(model, val_loader, device, cfg, row)
            stale = _checkpoint(run, out, epoch, row, score, stale)
            log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if _should_stop(stale, settings, world, t_start, log):
            break
    return {"best_score": run.best, "epochs": epoch + 1, "seconds": time.time() - t_start, "log": run.log_rows}


@dataclasses.dataclass
class _Run:
    """What a training run carries from epoch to epoch (and, through ``.state.pt``, across a resume)."""

    cfg: ModelConfig
    model: object
    opt: object
    sched: object
    start_epoch: int = 0
    best: float = float("-inf")
    log_rows: list = dataclasses.field(default_factory=list)


def _setup_model(cfg, out: Path, settings, init_checkpoint, resume, encoder_weights, log) -> _Run:
    """Setup: a new model, one continued from ``init_checkpoint``, or the run at ``out`` resumed
    (model, optimizer, scheduler, epoch, best score and log), with its optimizer and scheduler."""
    import torch

    last, state_file = out.with_suffix(".last.safetensors"), out.with_suffix(".state.pt")
    if init_checkpoint is not None:
        model, init_cfg = load_checkpoint(init_checkpoint, stage=cfg.stage)
        if cfg.organs and not init_cfg.organs:  # a KiTS-only parent learns the organs from here on
            init_cfg = add_organ_channels(model, init_cfg, cfg.organs)
        cfg = dataclasses.replace(init_cfg, provenance=cfg.provenance, version=cfg.version)
    else:
        model = build_model(cfg, encoder_weights=encoder_weights)
    start_epoch, best, log_rows = 0, float("-inf"), []
    opt = torch.optim.Adam(_trainable(model, settings), lr=settings.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=settings.lr_step_epochs, gamma=settings.lr_gamma)
    if resume:
        if not (last.exists() and state_file.exists()):
            raise KidsegError("nothing to resume from (no .last.safetensors and .state.pt beside it)", out)
        model, cfg = load_checkpoint(last, stage=cfg.stage)
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        opt = torch.optim.Adam(_trainable(model, settings), lr=settings.lr)
        opt.load_state_dict(state["optimizer"])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=settings.lr_step_epochs, gamma=settings.lr_gamma)
        sched.load_state_dict(state["scheduler"])
        start_epoch, best, log_rows = state["epoch"] + 1, state["best"], state["log"]
        log(f"resuming {out.name} at epoch {start_epoch} (best validation Dice so far {best:.4f})")
    if settings.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = settings.bn_momentum
    return _Run(cfg, model, opt, sched, start_epoch, best, log_rows)


def _place_model(model, cfg, device: str, world: int):
    """The model on its device (channels-last on CUDA), wrapped for data-parallel training when
    there are several processes; returns (the model to train through, whether on CUDA)."""
    import torch

    model.to(device)
    is_cuda = device.startswith("cuda")
    if is_cuda:
        model.to(memory_format=torch.channels_last_3d if cfg.is_3d else torch.channels_last)
    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[device] if is_cuda else None)
    return ddp_model, is_cuda


def _loaders(cfg, train_cases, val_cases, settings, rank: int, start_epoch: int, is_cuda: bool):
    """The training loader (weighted sampling, augmented) and the validation loader (rank 0 only)."""
    import torch
    from torch.utils.data import DataLoader, WeightedRandomSampler

    aug = (
        Augment(clahe=settings.clahe, ct_noise_hu=settings.ct_noise_hu, ct_blur_px=settings.ct_blur_px)
        if settings.augment
        else None
    )
    # a resumed run draws fresh samples and augmentations, not epoch 1's again
    stream = settings.seed + 1000 * rank + 104_729 * start_epoch
    torch.manual_seed(stream)  # the workers' torch seeds (noise) derive from this
    samples = VolumeSamples3D if cfg.is_3d else SegmentationSamples
    train_set = samples(train_cases, cfg, aug, seed=stream)
    n_samples = settings.steps_per_epoch * settings.batch_size
    sampler = WeightedRandomSampler(
        train_set.weights, n_samples, replacement=True, generator=torch.Generator().manual_seed(stream + 7919)
    )
    loader = DataLoader(
        train_set,
        batch_size=settings.batch_size,
        sampler=sampler,
        num_workers=settings.workers,
        pin_memory=is_cuda,
        drop_last=True,
        persistent_workers=settings.workers > 0,
        worker_init_fn=SegmentationSamples.reseed_worker,
    )
    val_loader = None
    if val_cases and rank == 0:
        val_set = samples(val_cases, cfg, None, seed=settings.seed)
        val_loader = DataLoader(
            torch.utils.data.Subset(val_set, validation_indices(len(val_set), settings.val_samples)),
            batch_size=settings.batch_size,
            num_workers=0,
        )
    return loader, val_loader


def _train_epoch(
    ddp_model, loader, opt, cfg, device, is_cuda, cancel, progress, step_done, total_steps, epoch, settings
):
    """One epoch of optimiser steps; returns the losses and the steps done so far in the run."""
    import torch

    ddp_model.train()
    losses = []
    for x, y in loader:
        if cancel is not None and cancel():
            from .errors import Cancelled

            raise Cancelled("training cancelled; the last saved checkpoint is kept")
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if is_cuda:
            x = x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = ddp_model(x)
        else:
            logits = ddp_model(x)
        loss = dice_ce_loss(logits.float(), y, cfg.classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step_done += 1
        if progress:
            progress(step_done, total_steps, f"epoch {epoch + 1}/{settings.epochs} loss {np.mean(losses[-20:]):.3f}")
    return losses, step_done


def _validate(model, val_loader, device, cfg, row: dict) -> float:
    """The epoch's score: mean validation Dice (its scores go into ``row``), or minus the
    training loss without validation cases."""
    if val_loader is not None:
        scores = evaluate_samples(model, val_loader, device, cfg.classes)
        row.update({f"val_{k}": v for k, v in scores.items()})
        return row["val_mean_dice"]
    return -row["train_loss"]


def _checkpoint(run: _Run, out: Path, epoch: int, row: dict, score: float, stale: int) -> int:
    """Checkpoint: the last model, the best one when ``score`` beats it, the state a resume needs,
    the log and its plot; returns the epochs without improvement."""
    import torch

    model, cfg = run.model, run.cfg
    run.log_rows.append(row)
    save_checkpoint(out.with_suffix(".last.safetensors"), model, cfg, overwrite=True)
    if score > run.best:
        run.best, stale = score, 0
        save_checkpoint(out, model, cfg, overwrite=True)
    else:
        stale += 1
    with files.atomic_path(out.with_suffix(".state.pt"), overwrite=True) as tmp:
        torch.save(
            {
                "optimizer": run.opt.state_dict(),
                "scheduler": run.sched.state_dict(),
                "epoch": epoch,
                "best": run.best,
                "log": run.log_rows,
            },
            tmp,
        )
    with files.atomic_path(out.with_suffix(".log.jsonl"), overwrite=True) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in run.log_rows))
    _plot_curves(run.log_rows, out.with_suffix(".png"))
    return stale


def _should_stop(stale: int, settings, world: int, t_start: float, log) -> bool:
    """Early stop (rank 0 decides for all) or the time budget spent."""
    import torch

    if world > 1:
        import torch.distributed as dist

        flag = torch.tensor([stale >= settings.patience], dtype=torch.int32)
        dist.broadcast(flag, 0)
        stop = bool(flag.item())
    else:
        stop = stale >= settings.patience
    if stop:
        log(f"early stop: validation Dice has not improved for {settings.patience} epochs")
        return True
    if settings.max_minutes and (time.time() - t_start) > settings.max_minutes * 60:
        log(f"time budget of {settings.max_minutes:g} min reached")
        return True
    return False


def validation_indices(n_items: int, cap: int) -> list[int]:
    """Which validation samples score an epoch: all of them, or ``cap`` spread evenly.

    Unweighted on purpose. Training draws kidney slices 4-6x as often as the rest; a validation
    drawn the same way hardly sees the slices without kidney, where false positives (a spleen
    marked as kidney) lie, and the epoch it ranked best in version 3's phase 1 was far worse on
    held-out cases than the last one. Every slice of the validation cases (coarse) or every
    reference patch (refine), in order, makes the score the cases' Dice, false positives included.
    """
    n = min(int(cap), int(n_items))
    if n <= 0:
        return []
    return np.unique(np.linspace(0, n_items - 1, n).round().astype(int)).tolist()


def evaluate_samples(model, loader, device, kits_classes: int = 3, counter: DiceCounter | None = None) -> dict:
    """KiTS Dice of a network over a loader; organ answers (channels after the KiTS classes) and
    unlabelled targets count as background. ``counter``: where the voxel counts add up (a new one)."""
    import torch

    model.eval()
    counter = DiceCounter() if counter is None else counter
    with torch.inference_mode():
        for x, y in loader:
            pred = model(x.to(device)).argmax(1).cpu().numpy()
            y = y.numpy()
            pred[pred >= kits_classes] = BACKGROUND
            y = np.where(y >= kits_classes, BACKGROUND, y)
            counter.add(pred, y)
    model.train()
    return counter.scores()
