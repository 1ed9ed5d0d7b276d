"""Model factory and checkpoint format.

Configuration is plain data (:class:`ModelConfig`), the factory builds a segmentation-models-
pytorch network from it, and a checkpoint is one ``.safetensors`` file holding the weights and,
in its metadata, the whole configuration and the training provenance. Loading needs no other
file and never the network: encoders are built with ``encoder_weights=None`` and then filled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .errors import KidsegError
from .labels import CLASSES

FORMAT_VERSION = 1
STAGES = ("coarse", "refine")


def import_network_libraries():
    """torch and the model zoo imported now: seconds, much of it with the interpreter lock held
    (0.4-0.5 s at a stretch, measured in benchmarks/bench_widget.py), so the GUI does it before its
    window opens or in a thread of its own, never in napari's event loop."""
    import segmentation_models_pytorch  # noqa: F401
    import torch  # noqa: F401


@dataclasses.dataclass
class ModelConfig:
    """Everything needed to rebuild a network and feed it the right input."""

    stage: str  # "coarse" or "refine"
    arch: str = "Unet"
    encoder: str = "se_resnext50_32x4d"  # the paper's encoder
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    context_slices: int = 0  # 2.5D: this many neighbouring slices on each side become channels
    classes: int = 3  # KiTS classes: 3 (KiTS19) or 4 (KiTS23's cyst)
    # organ channels after the KiTS ones (labels.ORGANS names): they compete with kidney and tumor
    # in the softmax and give the anatomy check and the context layer the neighbours
    organs: tuple[str, ...] = ()
    input_size: int = 256  # coarse: slices resized to this; refine: patch size in pixels
    hu_window: tuple[float, float] = (-100.0, 300.0)  # clipped, then scaled to [-1, 1]
    voxel_mm: float = 0.0  # a 3D network (arch UNet3D) sees the volume resampled to this isotropic voxel
    provenance: dict = dataclasses.field(default_factory=dict)
    version: str = "0"

    @property
    def in_channels(self) -> int:
        return 2 * self.context_slices + 1

    @property
    def out_channels(self) -> int:
        return self.classes + len(self.organs)

    @property
    def is_3d(self) -> bool:
        return self.arch == "UNet3D"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        cfg.decoder_channels = tuple(cfg.decoder_channels)
        cfg.hu_window = tuple(cfg.hu_window)
        cfg.organs = tuple(cfg.organs)
        return cfg


# The paper's networks (for GPU training on real data) and the small ones the bundled weights use:
# a MobileNetV3-small U-Net runs at about 17 slices/s on 2 CPU cores, the SE-ResNeXt50 one at 0.7.
PAPER = {"encoder": "se_resnext50_32x4d", "encoder_depth": 5, "decoder_channels": (256, 128, 64, 32, 16)}
SMALL = {"encoder": "tu-mobilenetv3_small_100", "encoder_depth": 5, "decoder_channels": (64, 32, 16, 16, 8)}
TINY = {"encoder": "tu-resnet10t", "encoder_depth": 3, "decoder_channels": (16, 8, 8)}  # tests only
# the ResNet34 U-Net of 2D KiTS21 systems (kidney 0.961, tumor 0.811 there)
RESNET34 = {"encoder": "resnet34", "encoder_depth": 5, "decoder_channels": (256, 128, 64, 32, 16)}
# a feature-pyramid refine stage after the paper's SE-ResNeXt coarse stage (KiTS19 Dice 0.739 there);
# for an FPN, decoder_channels are (pyramid channels, segmentation channels)
FPN_REFINE = {"arch": "FPN", "encoder": "resnet50", "encoder_depth": 5, "decoder_channels": (256, 128)}
# a 3D U-Net coarse stage on the whole volume at 3 mm voxels (decoder_channels: widths per level;
# input_size: the training crop in voxels), then the 2D refine stage at full resolution
COARSE_3D = {"arch": "UNet3D", "encoder": "none", "encoder_depth": 4, "decoder_channels": (16, 32, 64, 128),
             "voxel_mm": 3.0, "input_size": 96}  # fmt: skip
# a preset is one architecture for both stages, or one per stage
PRESETS = {
    "paper": PAPER,
    "small": SMALL,
    "tiny": TINY,
    "resnet34": RESNET34,
    "fpn": {"coarse": PAPER, "refine": FPN_REFINE},
    "tiny-fpn": {"coarse": TINY, "refine": {**FPN_REFINE, "encoder": "tu-resnet10t", "decoder_channels": (32, 32)}},
    "coarse3d": {"coarse": COARSE_3D, "refine": PAPER},
    "tiny-coarse3d": {"coarse": {**COARSE_3D, "decoder_channels": (4, 8, 16), "voxel_mm": 6.0, "input_size": 32},
                      "refine": TINY},
}  # fmt: skip
PRESET_NOTES = {  # what --preset's help says of each
    "paper": "SE-ResNeXt50 U-Net (both stages)",
    "small": "MobileNetV3 U-Net (the bundled weights)",
    "resnet34": "ResNet34 U-Net (both stages)",
    "fpn": "SE-ResNeXt50 U-Net coarse stage, ResNet50 FPN refine stage",
    "tiny": "tests only",
    "coarse3d": "3D U-Net coarse stage at 3 mm voxels, SE-ResNeXt50 U-Net refine stage",
    "tiny-fpn": "tests only",
    "tiny-coarse3d": "tests only",
}
assert set(PRESET_NOTES) == set(PRESETS)


def model_config(stage: str, preset: str = "paper", **overrides) -> ModelConfig:
    if stage not in STAGES:
        raise KidsegError(f"unknown stage {stage!r} (expected one of {', '.join(STAGES)})")
    if preset not in PRESETS:
        raise KidsegError(f"unknown architecture preset {preset!r} (expected one of {', '.join(PRESETS)})")
    arch = PRESETS[preset].get(stage, PRESETS[preset])
    return ModelConfig(stage=stage, **{"provenance": {"preset": preset}, **arch, **overrides})


def build_model(cfg: ModelConfig, encoder_weights: str | None = None):
    """The network for ``cfg``; ``encoder_weights='imagenet'`` downloads from the hub (training only)."""
    if cfg.is_3d:
        from .unet3d import UNet3D

        if cfg.context_slices:
            raise KidsegError("a 3D coarse stage sees the whole volume: --context-slices does not apply")
        return UNet3D(cfg.in_channels, cfg.out_channels, cfg.decoder_channels)
    import segmentation_models_pytorch as smp

    try:
        return smp.create_model(
            cfg.arch,
            encoder_name=cfg.encoder,
            encoder_weights=encoder_weights,
            in_channels=cfg.in_channels,
            classes=cfg.out_channels,
            encoder_depth=cfg.encoder_depth,
            **_decoder_kwargs(cfg),
        )
    except (OSError, ConnectionError, RuntimeError) as exc:
        if encoder_weights:
            raise KidsegError(
                f"could not fetch {encoder_weights} weights for encoder {cfg.encoder} "
                f"(no network or hub unreachable: {str(exc).splitlines()[0][:120]}); "
                "train with --encoder-weights none"
            ) from None
        raise


def add_organ_channels(model, cfg: ModelConfig, organs: tuple[str, ...]) -> ModelConfig:
    """Widen a trained 2D network's head by one output channel per organ (in place) and return
    the new config. The KiTS channels keep their weights; a new channel starts with zero weights
    and a low bias (-4), so the widened network answers as before until the organs are learned."""
    import torch

    from .labels import ORGANS

    unknown = [o for o in organs if o not in ORGANS]
    if unknown or cfg.organs:
        raise KidsegError(f"cannot add organ channels {organs} to a network with organs {cfg.organs}")
    head = model.segmentation_head[0]
    wide = torch.nn.Conv2d(head.in_channels, head.out_channels + len(organs), head.kernel_size, padding=head.padding)
    with torch.no_grad():
        wide.weight.zero_()
        wide.bias.fill_(-4.0)
        wide.weight[: head.out_channels] = head.weight
        wide.bias[: head.out_channels] = head.bias
    model.segmentation_head[0] = wide
    return dataclasses.replace(cfg, organs=tuple(organs))


def _decoder_kwargs(cfg: ModelConfig) -> dict:
    """The decoder's widths in the words of its architecture."""
    if cfg.arch == "FPN":
        pyramid, segmentation = cfg.decoder_channels
        # (smp's FPN merges its pyramid at 1/4 scale and upsamples by 4; GroupNorm wants multiples of 32)
        return {"decoder_pyramid_channels": pyramid, "decoder_segmentation_channels": segmentation}
    return {"decoder_channels": tuple(cfg.decoder_channels)}


def save_checkpoint(path, model, cfg: ModelConfig, *, overwrite: bool = False) -> Path:
    """Write weights + config as one safetensors file, atomically."""
    from safetensors.torch import save_file

    from .io.files import atomic_path

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"kidseg_config": cfg.to_json(), "kidseg_format": str(FORMAT_VERSION)}
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return Path(path)


def read_config(path) -> ModelConfig:
    """The configuration stored in a checkpoint, without loading its weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise KidsegError("no such checkpoint", path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for any corruption
        raise KidsegError(f"not a readable checkpoint ({str(exc).splitlines()[0][:100]})", path) from None
    if "kidseg_config" not in meta:
        raise KidsegError("not a napari-kidseg checkpoint (no configuration in its metadata)", path)
    try:
        return ModelConfig.from_json(meta["kidseg_config"])
    except (ValueError, TypeError) as exc:
        raise KidsegError(f"checkpoint configuration is unreadable ({exc})", path) from None


def load_checkpoint(
    path, *, stage: str | None = None, device="cpu", in_channels: int | None = None, classes: int | None = None
):
    """(model in eval mode on ``device``, config). Refuses a checkpoint of the wrong stage or shape."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    cfg = read_config(path)
    if stage is not None and cfg.stage != stage:
        raise KidsegError(f"is a {cfg.stage} checkpoint, but a {stage} checkpoint is needed here", path)
    if in_channels is not None and cfg.in_channels != in_channels:
        raise KidsegError(f"expects {cfg.in_channels} input channels, not {in_channels}", path)
    if classes is not None and cfg.classes != classes:
        raise KidsegError(f"predicts {cfg.classes} classes, not {classes}", path)
    if cfg.classes not in (len(CLASSES), len(CLASSES) + 1):
        raise KidsegError(
            f"predicts {cfg.classes} classes; the cascade needs 3 (KiTS19: background, kidney, tumor) "
            "or 4 (KiTS23: and cyst)",
            path,
        )
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - as above: corrupt weights raise safetensors' own types
        raise KidsegError(f"weights are unreadable ({str(exc).splitlines()[0][:100]})", path) from None
    model = build_model(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:160]
        raise KidsegError(f"weights do not match the stored configuration ({first})", path) from None
    model.eval()
    model.to(device=torch.device(device))
    return model, cfg


BUNDLED = {"coarse": "coarse.safetensors", "refine": "refine.safetensors"}


def bundled_checkpoint(stage: str) -> Path | None:
    """The checkpoint shipped with the package for ``stage``, or None if none is installed."""
    path = Path(__file__).parent / "weights" / BUNDLED[stage]
    return path if path.exists() else None


def resolve_checkpoint(path, stage: str) -> Path:
    """An explicit checkpoint path, or the bundled one; a clear error when there is neither."""
    if path:
        return Path(os.fspath(path))
    found = bundled_checkpoint(stage)
    if found is None:
        raise KidsegError(
            f"no {stage} checkpoint is installed (napari_kidseg/weights/{BUNDLED[stage]} is missing); "
            f"pass --{stage} CKPT or train one with `kidseg train --stage {stage}`"
        )
    return found


def pick_device(name: str = "auto") -> str:
    """'auto' picks CUDA, then Apple's MPS, then the CPU; an unavailable choice is an error."""
    import torch

    name = (name or "auto").lower()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KidsegError("CUDA was asked for, but no CUDA GPU is available here (use --device cpu or auto)")
    if name == "mps" and not has_mps:
        raise KidsegError("MPS was asked for, but this machine has no Apple GPU (use --device cpu or auto)")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise KidsegError(f"unknown device {name!r} (expected auto, cpu, cuda or mps)")
    return name
