"""The coarse -> ROI -> refine -> fusion cascade, on numpy arrays (no Qt, no napari).

1. Coarse: every axial slice (with ``context_slices`` neighbours as channels), padded to a
   square with air and resized to the coarse network's input size, is segmented; the kidney+tumor
   and tumor probabilities are resized back onto the CT grid on the device and stored as uint8.
2. ROI: the kidney ROIs and their refine patches (:mod:`roi`).
3. Refine: the patches at full in-plane resolution go through the refine network; overlapping
   tiles are blended with a Gaussian weight (high at a patch's centre, near zero at its edge, as
   sliding-window inference does), so no patch edge shows; results are kept only inside the patches.
4. Fusion: :meth:`CascadeResult.fuse` (``alpha``, thresholds), cheap enough for a slider.

Inference is batched under ``torch.inference_mode``; on CUDA with bf16 autocast and channels-last
memory, the next batch is copied from pinned memory while the current one runs; device memory is
bounded by the batch size, not by the volume. A CUDA out-of-memory error halves the batch and
retries. Long work reports ``progress(done, total, stage)`` and checks ``cancel()`` between
batches, raising :class:`Cancelled`.
"""

from __future__ import annotations

import dataclasses
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator

import numpy as np

from . import anatomy, enhancement, fusion, preprocessing, roi
from .errors import Cancelled, KidsegError
from .fusion import DEFAULT_ALPHA, DEFAULT_CONTRAST_TUMOR, DEFAULT_KIDNEY_THRESHOLD, DEFAULT_TUMOR_THRESHOLD
from .io.volumes import AIR_HU
from .preprocessing import context_indices, hu_to_input

PROBABILITIES_FORMAT = 2  # what save_probabilities writes; 1 had no ROIs, patches or spine


@dataclasses.dataclass
class CascadeResult:
    """Everything needed to re-fuse without running a network again."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    coarse_meta: np.ndarray  # uint8 levels of p(kidney)+p(tumor), full grid
    coarse_tumor: np.ndarray  # uint8 levels of p(tumor), full grid
    refined: dict[int, fusion.RefinedRegion]
    rois: list[roi.KidneyROI]
    patches: np.ndarray
    patch_px: int
    timings: dict = dataclasses.field(default_factory=dict)
    messages: list[str] = dataclasses.field(default_factory=list)
    spine: anatomy.SpineFrame | None = None  # from the CT, for the anatomy check
    verdict: anatomy.AnatomyVerdict | None = None  # the anatomy check of the last whole-volume fusion
    coarse_cyst: np.ndarray | None = None  # uint8 levels of p(cyst), full grid: KiTS23 networks only
    # uint8 organ map (labels.ORGANS codes) from an organ-aware coarse stage: where the network's
    # most likely neighbour organ has p > 0.5; the context layer and the anatomy check read it
    organs: np.ndarray | None = None
    # uint8 smoothed HU (0-255) where labels can appear (enhancement.tissue_levels), for the
    # tumor-by-contrast rule; kidney_hu: that rule's kidney reference from the last volume fusion
    tissue: np.ndarray | None = None
    kidney_hu: float | None = None
    # what the rule did in the last volume fusion, in one line (None: not asked for, or no kidney)
    contrast_note: str | None = None
    # the tumor voxels the last volume fusion with the anatomy check left as kidney (flat indices,
    # sorted; fusion.tumor_specks), with the fusion settings that made them: a slice fused alone with
    # the same settings reuses them (with others it keeps its specks until the volume is fused
    # again). One tuple, replaced whole, so a slice fused while a worker fuses the volume never
    # sees half of it. And a line saying what was done.
    tumor_specks: tuple | None = None
    speck_note: str | None = None

    def fuse(
        self,
        alpha=DEFAULT_ALPHA,
        kidney_threshold=DEFAULT_KIDNEY_THRESHOLD,
        tumor_threshold=DEFAULT_TUMOR_THRESHOLD,
        z: int | None = None,
        anatomy_check: bool = True,
        contrast_tumor: bool = DEFAULT_CONTRAST_TUMOR,
        keep_specks: bool = False,
    ) -> np.ndarray:
        """Fused labels of the whole volume, or of slice ``z`` only.

        ``anatomy_check``: clear the regions :mod:`anatomy` rejects. A whole-volume fusion judges
        its own labels and keeps the verdict in :attr:`verdict`; a slice reuses the last verdict
        (a slider move re-fuses the slice in view at once and the volume, with a new verdict,
        in the background).

        ``contrast_tumor``: turn the parts of a kidney region that enhance clearly less than the
        kidney into tumor (:mod:`enhancement`), after the anatomy check (which judges kidney
        voxels: a false region turned tumor first would escape it); a slice uses the kidney
        references of the last whole-volume fusion.

        With the anatomy check, tumor masses under ``fusion.MIN_TUMOR_ML`` are left as kidney
        (:func:`fusion.tumor_specks`), unless ``keep_specks`` (fine-tuning's drafts keep them: a
        speck the radiologist left as kidney is a lesson).
        """
        if z is None:
            return self._fuse_volume(
                alpha, kidney_threshold, tumor_threshold, anatomy_check, contrast_tumor, keep_specks
            )[2]
        cyst = None if self.coarse_cyst is None else self.coarse_cyst[z]
        labels = fusion.fuse_slice(
            self.coarse_meta[z],
            self.coarse_tumor[z],
            self.refined.get(z),
            alpha,
            kidney_threshold,
            tumor_threshold,
            cyst,
        )
        if anatomy_check and self.verdict is not None:
            labels = self.verdict.apply(labels, z=z)
        if contrast_tumor and self.tissue is not None:
            ref = self.kidney_hu
            if ref is None:
                ref = enhancement.kidney_reference_hu(labels, self.tissue[z])
            labels = enhancement.mark_hypodense_tumor(labels, self.tissue[z], self.spacing, ref)
        specks = self.tumor_specks  # read once: a worker's volume fusion may replace it meanwhile
        if (
            anatomy_check
            and not keep_specks
            and specks is not None
            and specks[0] == self._speck_key(alpha, kidney_threshold, tumor_threshold, contrast_tumor)
        ):
            labels = fusion.specks_to_kidney(labels, specks[1], z=z)
        return labels

    @staticmethod
    def _speck_key(alpha, kidney_threshold, tumor_threshold, contrast_tumor) -> tuple:
        return (float(alpha), float(kidney_threshold), float(tumor_threshold), bool(contrast_tumor))

    def _fuse_volume(self, alpha, kidney_threshold, tumor_threshold, anatomy_check, contrast_tumor, keep_specks=False):
        """(labels before the anatomy check, labels after it, the final labels: with tumor by
        contrast and, with the check, the tumor specks left as kidney) of the whole volume."""
        raw = fusion.fuse_volume(
            self.coarse_meta,
            self.coarse_tumor,
            self.refined,
            alpha,
            kidney_threshold,
            tumor_threshold,
            self.coarse_cyst,
        )
        checked = raw
        if anatomy_check:
            self.verdict = anatomy.check_anatomy(raw, self.spacing, self.spine, organs=self.organs)
            checked = self.verdict.apply(raw)
        self.kidney_hu, self.contrast_note, final = None, None, checked
        if contrast_tumor and self.tissue is None:
            self.contrast_note = (
                "tumor by contrast: not available for this result (saved without its CT levels); run the cascade again"
            )
        elif contrast_tumor:
            self.kidney_hu = enhancement.kidney_reference_hu(checked, self.tissue)
            final = enhancement.mark_hypodense_tumor(checked, self.tissue, self.spacing, self.kidney_hu)
            made_ml = float(np.count_nonzero(final != checked)) * float(np.prod(self.spacing)) / 1000.0
            self.contrast_note = enhancement.describe(self.kidney_hu, made_ml)
        specks, note = None, None
        if anatomy_check and not keep_specks:  # last: a mass's size counts what the contrast rule added to it
            found, n = fusion.tumor_specks(final, self.spacing)
            final = fusion.specks_to_kidney(final, found)
            specks = (self._speck_key(alpha, kidney_threshold, tumor_threshold, contrast_tumor), found)
            note = fusion.describe_specks(n, len(found) * float(np.prod(self.spacing)) / 1000.0)
        self.tumor_specks, self.speck_note = specks, note
        return raw, checked, final

    def fuse_and_removed(
        self,
        alpha=DEFAULT_ALPHA,
        kidney_threshold=DEFAULT_KIDNEY_THRESHOLD,
        tumor_threshold=DEFAULT_TUMOR_THRESHOLD,
        anatomy_check: bool = True,
        contrast_tumor: bool = DEFAULT_CONTRAST_TUMOR,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The whole-volume fusion and the labels the anatomy check took out of it (0 elsewhere;
        None without the check): one fusion serves the result and the *removed* layer."""
        raw, checked, labels = self._fuse_volume(
            alpha, kidney_threshold, tumor_threshold, anatomy_check, contrast_tumor
        )
        if not anatomy_check:
            return labels, None
        return labels, np.where(checked != raw, raw, 0).astype(np.uint8)

    def coarse_labels(self, kidney_threshold=DEFAULT_KIDNEY_THRESHOLD, tumor_threshold=DEFAULT_TUMOR_THRESHOLD):
        return fusion.labels_from_levels(
            self.coarse_meta, self.coarse_tumor, kidney_threshold, tumor_threshold, self.coarse_cyst
        )

    def refined_labels(self, kidney_threshold=DEFAULT_KIDNEY_THRESHOLD, tumor_threshold=DEFAULT_TUMOR_THRESHOLD):
        return fusion.refined_only_labels(self.shape, self.refined, kidney_threshold, tumor_threshold)

    def patch_coverage(self) -> np.ndarray:
        return roi.patch_coverage(self.patches, self.shape, self.patch_px)

    def save_probabilities(self, path, *, overwrite=False, note: dict | None = None):
        """Everything fusion needs, as one compressed .npz written atomically: the coarse channels,
        the refined regions, the ROIs and patches, the spine frame and the run's messages, so that
        :meth:`load_probabilities` gives back a result whose fusion (any alpha and thresholds, the
        anatomy check) is the same. ``note``: what to remember with it (the models, the source)."""
        import json

        from .io.files import atomic_path

        zs = np.array(sorted(self.refined), dtype=np.int32)
        rois = [
            {**dataclasses.asdict(r), "bbox": [[b.start, b.stop] for b in r.bbox]} for r in self.rois
        ]  # fmt: skip
        payload = {
            "format": np.int32(PROBABILITIES_FORMAT),
            "shape": np.asarray(self.shape, np.int64),
            "coarse_meta": self.coarse_meta,
            "coarse_tumor": self.coarse_tumor,
            "spacing": np.asarray(self.spacing),
            "refined_z": zs,
            "refined_origin": np.array([[self.refined[z].y0, self.refined[z].x0] for z in zs], np.int32).reshape(-1, 2),
            "patches": self.patches,
            "patch_px": np.int32(self.patch_px),
            "json": np.array(json.dumps({"rois": rois, "messages": self.messages, "note": note or {}})),
        }
        if self.coarse_cyst is not None:
            payload["coarse_cyst"] = self.coarse_cyst
        if self.organs is not None:
            payload["organs"] = self.organs
        if self.tissue is not None:
            payload["tissue"] = self.tissue
        if self.spine is not None:
            payload["spine"] = np.stack([self.spine.x_mm, self.spine.front_y_mm])
            payload["spine_share"] = np.float64(self.spine.found_share)
        for z in zs:
            r = self.refined[z]
            channels = [r.meta, r.tumor, r.covered.astype(np.uint8)] + ([r.cyst] if r.cyst is not None else [])
            payload[f"refined_{z}"] = np.stack(channels)
        with atomic_path(path, overwrite=overwrite) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **payload)

    @classmethod
    def load_probabilities(cls, path) -> tuple[CascadeResult, dict]:
        """A result saved by :meth:`save_probabilities`, and the note saved with it."""
        import json

        try:
            with np.load(path, allow_pickle=False) as f:
                if "format" not in f or int(f["format"]) != PROBABILITIES_FORMAT:
                    raise KidsegError("was saved by another version of napari-kidseg; run the cascade again", path)
                extra = json.loads(str(f["json"]))
                refined = {}
                for z, (y0, x0) in zip(f["refined_z"].tolist(), f["refined_origin"].tolist()):
                    meta, tumor, covered, *cyst = f[f"refined_{z}"]
                    refined[int(z)] = fusion.RefinedRegion(
                        int(y0), int(x0), meta, tumor, covered.astype(bool), cyst[0] if cyst else None
                    )
                spine = None
                if "spine" in f:
                    spine = anatomy.SpineFrame(f["spine"][0], f["spine"][1], float(f["spine_share"]))
                rois = [
                    roi.KidneyROI(**{**r, "bbox": tuple(slice(a, b) for a, b in r["bbox"]),
                                     "centroid_zyx": tuple(r["centroid_zyx"])})
                    for r in extra["rois"]
                ]  # fmt: skip
                shape = tuple(int(v) for v in f["shape"])
                result = cls(
                    (shape[0], shape[1], shape[2]),
                    tuple(float(v) for v in f["spacing"]),
                    f["coarse_meta"],
                    f["coarse_tumor"],
                    refined,
                    rois,
                    f["patches"],
                    int(f["patch_px"]),
                    {},
                    list(extra["messages"]),
                    spine,
                    coarse_cyst=f.get("coarse_cyst"),
                    organs=f.get("organs"),
                    tissue=f.get("tissue"),
                )
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            # a truncated file raises any of these, depending on where it ends
            raise KidsegError(f"is not a readable saved cascade result ({type(exc).__name__}: {exc})", path) from None
        return result, extra.get("note", {})


@dataclasses.dataclass
class CoarseOutput:
    """The coarse stage's answer on one CT (:meth:`Cascade.run_coarse`): uint8 levels as in
    :class:`CascadeResult`, the organ map, the spine frame, and their seconds."""

    shape: tuple[int, int, int]
    meta: np.ndarray
    tumor: np.ndarray
    cyst: np.ndarray | None
    organs: np.ndarray | None
    spine: anatomy.SpineFrame | None
    timings: dict


def _fusion_channels(p, kits_classes: int):
    """Softmax probabilities (B, channels, ...) as the channels fusion keeps: kidney and masses,
    tumor, with a KiTS23 network cyst, then an organ-aware network's organ channels as they are
    (the softmax ran over all channels, so an organ's share is already missing from kidney)."""
    import torch

    kept = [p[:, 1:kits_classes].sum(1), p[:, 2]] + ([p[:, 3]] if kits_classes == 4 else [])
    return torch.cat([torch.stack(kept, dim=1), p[:, kits_classes:]], dim=1)


def probability_levels(p):
    """Probabilities (a torch tensor, 0-1) as the uint8 levels (0-255) results keep."""
    import torch

    return (p * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def upsampled_levels(p, side: int):
    """(B, C, h, w) probabilities -> (B, C, side, side) uint8 levels (0-255). On the CPU the levels
    are rounded at the network's size and brought up as uint8 (a third of the float work, as the
    3D coarse stage does; a level may differ by 1 from rounding after the upsample); elsewhere
    (CUDA has no uint8 bilinear kernel) brought up as floats and rounded after."""
    import torch.nn.functional as F

    if p.device.type == "cpu":
        return F.interpolate(probability_levels(p), size=(side, side), mode="bilinear", align_corners=False)
    return probability_levels(F.interpolate(p, size=(side, side), mode="bilinear", align_corners=False))


def organ_codes(p_organs):
    """(B, organs, h, w) organ probabilities -> (B, h, w) uint8 organ codes (labels.ORGANS, 1-based)
    where the most likely organ passes 0.5, else 0."""
    import torch

    best, index = p_organs.max(dim=1)
    return torch.where(best > 0.5, index + 1, 0).to(torch.uint8)


def patch_weight(size: int, sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """The blending weight of a refine patch's pixels: a Gaussian of sigma ``size / 8`` around
    its centre (nnU-Net's sliding-window weight), scaled to 1 there and never 0, so that where
    patches overlap each one's edge fades out under its neighbour's centre instead of ending in a
    visible step, and a pixel only one patch covers keeps that patch's value."""
    centre, sigma = (size - 1) / 2.0, size * sigma_scale
    g = np.exp(-0.5 * ((np.arange(size) - centre) / sigma) ** 2)
    w = np.outer(g, g).astype(np.float32)
    return np.maximum(w, 1e-4)


class Cascade:
    """Loaded coarse and refine networks on a device, ready to segment CT volumes."""

    def __init__(
        self,
        coarse_checkpoint=None,
        refine_checkpoint=None,
        *,
        device="auto",
        batch_size=None,
        min_roi_ml: float = 5.0,
        margin_mm: float = 12.0,
    ):
        import torch

        from .models import load_checkpoint, pick_device, resolve_checkpoint

        self.device = pick_device(device)
        self.coarse_path = resolve_checkpoint(coarse_checkpoint, "coarse")
        self.refine_path = resolve_checkpoint(refine_checkpoint, "refine")
        self.coarse, self.coarse_cfg = load_checkpoint(self.coarse_path, stage="coarse", device=self.device)
        self.refine, self.refine_cfg = load_checkpoint(self.refine_path, stage="refine", device=self.device)
        if self.coarse_cfg.classes != self.refine_cfg.classes:
            raise KidsegError(
                f"the coarse model predicts {self.coarse_cfg.classes} classes and the refine model "
                f"{self.refine_cfg.classes}: both must be KiTS19 (3) or KiTS23 (4) models",
                self.refine_path,
            )
        if self.coarse_cfg.organs != self.refine_cfg.organs:
            raise KidsegError(
                f"the coarse model learned organs {self.coarse_cfg.organs or 'none'} and the refine model "
                f"{self.refine_cfg.organs or 'none'}: both stages must learn the same",
                self.refine_path,
            )
        self.kits_classes = self.coarse_cfg.classes
        self.n_fusion = self.kits_classes - 1  # kidney and masses, tumor (, cyst)
        self.is_cuda = self.device.startswith("cuda")
        # channels-last (NHWC) 2D convolutions: on CUDA for the tensor cores; on the CPU too, where
        # oneDNN's NHWC kernels ran both v5 stages about 1.5x faster than NCHW (batch 8-32, 2
        # cores; the answers differ only by float rounding, ~3e-5 in the logits). The 3D coarse
        # stage stays NCDHW on the CPU: channels_last_3d was not measured there.
        if self.is_cuda or not self.coarse_cfg.is_3d:
            self.coarse.to(memory_format=torch.channels_last_3d if self.coarse_cfg.is_3d else torch.channels_last)
        self.refine.to(memory_format=torch.channels_last)
        if self.is_cuda:
            torch.backends.cudnn.benchmark = True
        # CPU: 16 slices or patches per batch ran 10-45% more images/s than 8 with channels-last
        # on 2 cores (32 was slower again); the inputs of a coarse batch are 50 MB
        self.batch_size = int(batch_size or (64 if self.is_cuda else 16))
        # cuDNN autotunes every new input shape again (seconds for a whole network), and a run's
        # last batch is usually short: on CUDA every batch is padded to the full batch size
        self.fixed_batch_shape = self.is_cuda
        self.min_roi_ml = min_roi_ml
        self.margin_mm = margin_mm

    # ------------------------------------------------------------------ batched inference
    def _forward(self, model, batch, mirror=False):
        """Softmax probabilities of kidney+tumor and tumor, (B, 2, h, w) float32 on the device.

        ``mirror``: also run the left-right mirror image of each input (one batch of 2B) and average
        the two answers, mirrored back. Training flips left-right, so both are answers the networks
        were taught to give.
        """
        import torch

        n = batch.shape[0]
        if self.fixed_batch_shape and n < self.batch_size:
            pad = batch[-1:].expand(self.batch_size - n, *batch.shape[1:])
            return self._forward(model, torch.cat([batch, pad]), mirror)[:n]
        if mirror:
            p = self._forward(model, torch.cat([batch, batch.flip(-1)]))
            return 0.5 * (p[:n] + p[n:].flip(-1))
        batch = batch.contiguous(memory_format=torch.channels_last)
        if self.is_cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(batch)
        else:
            logits = model(batch)
        return _fusion_channels(torch.softmax(logits.float(), dim=1), self.kits_classes)

    def _run_batches(
        self,
        host_batches: Iterator[tuple[object, np.ndarray]],
        consume: Callable,
        model,
        prepare,
        total: int,
        stage: str,
        progress,
        cancel,
        mirror=False,
    ):
        """Feed host batches to the device, one copy ahead of compute; OOM halves the batch."""
        import torch

        done = 0

        def to_device(arr):
            t = torch.from_numpy(arr)
            if self.is_cuda:
                return t.pin_memory().to(self.device, non_blocking=True)
            return t.to(self.device)

        it = iter(host_batches)
        current = next(it, None)
        current_dev = to_device(current[1]) if current is not None else None
        with torch.inference_mode():
            while current is not None:
                if cancel is not None and cancel():
                    raise Cancelled(f"cancelled during the {stage} stage")
                key, arr = current
                out = self._forward_with_oom_retry(model, prepare, current_dev, mirror)  # queued on the device
                # the next batch is assembled on the host and its copy queued while the device computes
                current = next(it, None)
                current_dev = to_device(current[1]) if current is not None else None
                consume(key, out)  # waits for this batch's result
                done += arr.shape[0]
                if progress:
                    progress(done, total, stage)

    def _forward_with_oom_retry(self, model, prepare, batch, mirror=False):
        import torch

        try:
            return self._forward(model, prepare(batch), mirror)
        except torch.cuda.OutOfMemoryError:
            if batch.shape[0] == 1:
                raise KidsegError("the GPU is out of memory even for one slice; use --device cpu") from None
            torch.cuda.empty_cache()
            self.batch_size = max(1, batch.shape[0] // 2)
            half = batch.shape[0] // 2
            a = self._forward_with_oom_retry(model, prepare, batch[:half], mirror)
            b = self._forward_with_oom_retry(model, prepare, batch[half:], mirror)
            return torch.cat([a, b])

    # ------------------------------------------------------------------ stages
    def _coarse_3d(self, ct: np.ndarray, spacing, progress, cancel, mirror=False):
        """The 3D coarse stage: the whole volume at the network's voxel size in one pass, its
        probabilities brought back to the full grid as uint8 levels."""
        import torch

        from .errors import Cancelled
        from .preprocessing import resample, resample_factors

        cfg = self.coarse_cfg
        if cancel is not None and cancel():
            raise Cancelled("cancelled during the coarse stage")
        small = resample(np.asarray(ct, np.float32), resample_factors(spacing, cfg.voxel_mm), order=1)
        m = self.coarse.multiple
        pad = [(0, -n % m) for n in small.shape]
        x = hu_to_input(torch.from_numpy(np.pad(small, pad, constant_values=AIR_HU))[None, None], cfg.hu_window)
        with torch.inference_mode():
            x = x.to(self.device)
            if self.is_cuda:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.is_cuda):
                p = torch.softmax(self.coarse(x).float(), dim=1)
                if mirror:
                    p = 0.5 * (p + torch.softmax(self.coarse(x.flip(-1)).float(), dim=1).flip(-1))
            p = _fusion_channels(p, self.kits_classes)[
                0, : self.n_fusion, : small.shape[0], : small.shape[1], : small.shape[2]
            ]
            levels = probability_levels(p).cpu().numpy()
        full = [resample(level, None, order=1, shape=ct.shape) for level in levels]
        if progress:
            progress(ct.shape[0], ct.shape[0], "coarse")
        return full[0], full[1], full[2] if len(full) == 3 else None, None  # organs: 2D coarse stages only

    def _coarse(self, ct: np.ndarray, spacing, progress, cancel, mirror=False):
        import torch.nn.functional as F

        nz, ny, nx = ct.shape
        cfg = self.coarse_cfg
        side = max(ny, nx)
        pad = (0, side - nx, 0, side - ny)  # pad right/bottom to a square with air (-1 after scaling)
        meta = np.empty(ct.shape, np.uint8)
        tumor = np.empty(ct.shape, np.uint8)
        cyst = np.empty(ct.shape, np.uint8) if cfg.classes == 4 else None
        organs = np.empty(ct.shape, np.uint8) if cfg.organs else None

        # every slice scaled down once (it is a context channel of up to 2k+1 batches); a batch
        # gathers its channels from these (the same numbers: interpolation is per channel)
        small = self._coarse_inputs(ct, pad, side, cancel)

        def batches():
            for z0 in range(0, nz, self.batch_size):
                zs = np.arange(z0, min(nz, z0 + self.batch_size))
                yield zs, context_indices(zs, nz, cfg.context_slices)  # (B, C) slice indices

        def prepare(index):
            return small[index]  # (B, C, size, size)

        def consume(zs, p):
            if organs is not None:  # codes at the network's size, brought up by nearest neighbour
                codes = organ_codes(p[:, self.n_fusion :])[:, None]  # uint8: nearest only copies codes
                codes = F.interpolate(codes, size=(side, side), mode="nearest")[:, 0, :ny, :nx]
                organs[zs] = codes.cpu().numpy()
            levels = upsampled_levels(p[:, : self.n_fusion], side)[:, :, :ny, :nx].cpu().numpy()
            meta[zs] = levels[:, 0]
            tumor[zs] = levels[:, 1]
            if cyst is not None:
                cyst[zs] = levels[:, 2]

        self._run_batches(batches(), consume, self.coarse, prepare, nz, "coarse", progress, cancel, mirror)
        return meta, tumor, cyst, organs

    def _coarse_inputs(self, ct: np.ndarray, pad, side: int, cancel, chunk: int = 32):
        """(nz, size, size) float32 on the device: each slice's HU window scaled to [-1, 1], padded
        to a square with air and resized to the coarse network's input."""
        import torch
        import torch.nn.functional as F

        from .errors import Cancelled

        cfg = self.coarse_cfg
        size = cfg.input_size
        small = torch.empty((ct.shape[0], size, size), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for z0 in range(0, ct.shape[0], chunk):
                if cancel is not None and cancel():
                    raise Cancelled("cancelled during the coarse stage")
                t = torch.from_numpy(np.ascontiguousarray(ct[z0 : z0 + chunk]))[:, None]
                x = hu_to_input(t.to(self.device).float(), cfg.hu_window)
                if any(pad):  # F.pad copies even when there is nothing to pad
                    x = F.pad(x, pad, value=-1.0)
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)
                small[z0 : z0 + chunk] = x[:, 0]
        return small

    def _refine(
        self, ct: np.ndarray, patches: np.ndarray, progress, cancel, mirror=False
    ) -> dict[int, fusion.RefinedRegion]:

        cfg = self.refine_cfg
        size = cfg.input_size
        nz, ny, nx = ct.shape
        # each slice's region: the union of its patches, clipped to the image
        acc = {}
        for z in np.unique(patches["z"]):
            ps = patches[patches["z"] == z]
            y0, x0 = max(0, int(ps["y0"].min())), max(0, int(ps["x0"].min()))
            y1, x1 = min(ny, int(ps["y0"].max()) + size), min(nx, int(ps["x0"].max()) + size)
            h, w = y1 - y0, x1 - x0
            acc[int(z)] = (y0, x0, np.zeros((cfg.classes - 1, h, w), np.float32), np.zeros((h, w), np.float32))
        weight = patch_weight(size)

        def batches():
            for i0 in range(0, len(patches), self.batch_size):
                chunk = patches[i0 : i0 + self.batch_size]
                arr = np.empty((len(chunk), cfg.in_channels, size, size), ct.dtype)
                for j, p in enumerate(chunk):
                    for c, zc in enumerate(context_indices(int(p["z"]), nz, cfg.context_slices)[0]):
                        arr[j, c] = roi.cut_patch(ct[zc], int(p["y0"]), int(p["x0"]), size, AIR_HU)
                yield chunk, arr

        def prepare(t):
            return hu_to_input(t.float(), cfg.hu_window)

        def consume(chunk, p):
            levels = probability_levels(p[:, : self.n_fusion]).cpu().numpy()
            for j, pt in enumerate(chunk):
                y0, x0, sums, weights = acc[int(pt["z"])]
                # the part of the patch inside the image, in region and in patch coordinates
                py, px = int(pt["y0"]), int(pt["x0"])
                ys, xs = max(py, 0), max(px, 0)
                ye, xe = min(py + size, ny), min(px + size, nx)
                w = weight[ys - py : ye - py, xs - px : xe - px]
                sums[:, ys - y0 : ye - y0, xs - x0 : xe - x0] += levels[j, :, ys - py : ye - py, xs - px : xe - px] * w
                weights[ys - y0 : ye - y0, xs - x0 : xe - x0] += w

        self._run_batches(batches(), consume, self.refine, prepare, len(patches), "refine", progress, cancel, mirror)
        refined = {}
        for z, (y0, x0, sums, weights) in acc.items():
            covered = weights > 0
            avg = np.zeros(sums.shape, np.uint8)
            avg[:, covered] = np.clip(np.round(sums[:, covered] / weights[covered]), 0, 255).astype(np.uint8)
            refined[z] = fusion.RefinedRegion(y0, x0, avg[0], avg[1], covered, avg[2] if len(avg) == 3 else None)
        return refined

    # ------------------------------------------------------------------ the whole cascade
    def run_coarse(self, ct: np.ndarray, spacing, *, progress=None, cancel=None, mirror=False) -> CoarseOutput:
        """The coarse stage of :meth:`run` (and the spine it needs) alone: what :meth:`run` takes
        as ``coarse`` to refine again without it (a fine-tune of the refine stage re-runs only that)."""
        if ct.ndim != 3:
            raise KidsegError(f"the cascade needs a 3D CT volume, not an array of shape {ct.shape}")
        t0 = time.perf_counter()
        coarse = self._coarse_3d if self.coarse_cfg.is_3d else self._coarse
        meta, tumor, cyst, organs = coarse(ct, spacing, progress, cancel, mirror)
        self._sync()
        timings = {"coarse": time.perf_counter() - t0}
        t0 = time.perf_counter()
        spine = anatomy.find_spine(ct, spacing)
        timings["spine"] = time.perf_counter() - t0
        return CoarseOutput(tuple(ct.shape), meta, tumor, cyst, organs, spine, timings)

    def run(
        self,
        ct: np.ndarray,
        spacing,
        *,
        progress=None,
        cancel=None,
        mirror=False,
        coarse: CoarseOutput | None = None,
        smooth_noise: bool = False,
    ) -> CascadeResult:
        """Segment a CT (canonical ``(z, y, x)`` HU array with its spacing in mm).

        ``mirror``: average every slice's and patch's answer with that of its left-right mirror
        image (twice the network time). Off by default: on 30 selection phantoms it left
        kidney+tumor Dice unchanged and its tumor gain was within the noise (weights/README.md).
        ``coarse``: this CT's :meth:`run_coarse`, already made by these coarse weights (only the
        refine stage runs then). ``smooth_noise``: a CT noisier than the networks were trained on
        is smoothed in-plane first (:func:`preprocessing.smooth_noise`; a message says so). Off by
        default: on the 27 real KiTS19 tumor slices it took tumor Dice 0.069 -> 0.149, on the
        shared real CT kidney Dice 0.850 -> 0.837 (weights/README.md).
        """
        import torch

        messages = []
        if smooth_noise and coarse is not None:  # the coarse answer would be of the other CT
            raise KidsegError("a coarse stage made beforehand cannot be combined with smooth_noise")
        if smooth_noise:
            ct, note = preprocessing.smooth_noise(ct)
            messages += [note] if note else []
        if coarse is None:
            coarse = self.run_coarse(ct, spacing, progress=progress, cancel=cancel, mirror=mirror)
        elif coarse.shape != tuple(ct.shape):
            raise KidsegError(f"a coarse stage of a {coarse.shape} CT cannot be refined on one of {ct.shape}")
        coarse_meta, coarse_tumor, coarse_cyst, organs = coarse.meta, coarse.tumor, coarse.cyst, coarse.organs
        spine, timings = coarse.spine, dict(coarse.timings)

        t0 = time.perf_counter()
        # ROIs from the coarse kidney+tumor probability at 0.5, whatever the live thresholds
        rois, roi_map = roi.kidney_rois(
            coarse_meta, spacing, min_volume_ml=self.min_roi_ml, level=int(DEFAULT_KIDNEY_THRESHOLD * 255)
        )
        patches = roi.refine_patches(roi_map, spacing, patch_px=self.refine_cfg.input_size, margin_mm=self.margin_mm)
        timings["roi"] = time.perf_counter() - t0
        if not rois:
            messages.append(
                f"no kidney found: the coarse stage found no kidney or tumor region of "
                f"{self.min_roi_ml:g} mL or more, so nothing was refined"
            )

        t0 = time.perf_counter()
        refined = self._refine(ct, patches, progress, cancel, mirror) if len(patches) else {}
        self._sync()
        timings["refine"] = time.perf_counter() - t0
        timings["coarse_slices"] = ct.shape[0]
        timings["refine_patches"] = len(patches)
        t0 = time.perf_counter()
        windows = [(z, r.y0, r.x0, *r.meta.shape) for z, r in refined.items()]
        tissue = enhancement.tissue_levels(ct, coarse_meta, windows)
        timings["tissue"] = time.perf_counter() - t0
        if self.is_cuda:
            timings["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return CascadeResult(
            tuple(ct.shape),
            tuple(float(s) for s in spacing),
            coarse_meta,
            coarse_tumor,
            refined,
            rois,
            patches,
            self.refine_cfg.input_size,
            timings,
            messages,
            spine,
            coarse_cyst=coarse_cyst,
            organs=organs,
            tissue=tissue,
        )

    def _sync(self):
        if self.is_cuda:
            import torch

            torch.cuda.synchronize()


_PROCESS_CASCADES: dict = {}  # a drafting process or a cluster worker keeps its loaded models between cases


def cached_cascade(coarse=None, refine=None, device="auto", batch_size=None) -> Cascade:
    """The Cascade of these models in this process, loaded on the first call only: a drafting
    process and every Dask worker load their models once, not once per case."""
    key = (None if coarse is None else str(coarse), None if refine is None else str(refine), device, batch_size)
    if key not in _PROCESS_CASCADES:
        _PROCESS_CASCADES[key] = Cascade(coarse, refine, device=device, batch_size=batch_size)
    return _PROCESS_CASCADES[key]
