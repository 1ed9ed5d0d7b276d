"""The phantoms' tissues: HU per contrast phase, the case a generator returns, a tumor's look.

Shared by both generators (:mod:`procedural`, :mod:`labelmap`) and the tumor library
(:mod:`tumor_shapes`); nothing here draws anatomy.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from ..errors import KidsegError
from ..io import volumes
from ..labels import CYST, KIDNEY, LABEL_SETS

TISSUE_HU = {
    # (non-contrast, arterial, venous) typical HU; jittered per case
    "fat": (-100, -100, -100),
    "muscle": (45, 55, 60),
    "liver": (55, 70, 110),
    "spleen": (45, 120, 115),
    "aorta": (40, 320, 170),
    "ivc": (40, 70, 150),
    # revision 6: real kidneys are darker than revision 5 drew them (KiTS19 slices: median 125 HU,
    # IQR 105-138; the phantom's were 165-211)
    "cortex": (35, 170, 150),
    "medulla": (30, 80, 140),
    "pelvis": (10, 10, 15),
    "bone_cortex": (700, 700, 700),
    "bone_cancellous": (220, 220, 220),
    "tumor": (30, 150, 110),
    "cyst": (5, 8, 10),
    "bowel_wall": (40, 90, 100),
    "fluid": (15, 15, 15),
    "contrast": (300, 300, 300),
    "air": (-1000, -1000, -1000),
    "skin": (30, 30, 30),
    "pancreas": (40, 110, 100),
    "adrenal": (35, 70, 80),
    "node": (40, 60, 80),
    "feces": (20, 20, 20),
}
SOFT_TISSUES = (
    "muscle",
    "liver",
    "spleen",
    "aorta",
    "ivc",
    "cortex",
    "medulla",
    "tumor",
    "bowel_wall",
    "skin",
    "pancreas",
    "adrenal",
    "node",
    "feces",
)
PHASES = ("noncontrast", "arterial", "venous")
DISK_LAYOUTS = ("IPL", "LPS", "RAS", "LPI", "RAI", "LAS")


@dataclasses.dataclass
class PhantomCase:
    ct: volumes.Volume  # int16 HU, canonical orientation, with a source layout for writing
    labels: np.ndarray  # uint8, 0/1/2
    info: dict  # what was drawn: phase, spacing, tumors, cysts...
    organs: np.ndarray | None = None  # uint8 organ map (labels.ORGANS codes) on the same grid


def phase_hu(rng, table: dict, phase_idx: int) -> dict:
    """Each tissue's HU in one contrast phase, jittered for this case (fat and air drawn anew)."""
    hu = {k: v[phase_idx] + rng.normal(0, 12 if abs(v[phase_idx]) < 500 else 60) for k, v in table.items()}
    hu["fat"] = rng.uniform(-125, -80)
    hu["air"] = rng.uniform(-1010, -960)
    return hu


def randomise_contrast(rng, hu: dict, probability: float, soft_tissues, fluids) -> bool:
    """With ``probability``, give every soft tissue, fluid and fat an independent random HU
    (SynthSeg-style), in place; returns whether it did."""
    shuffled = bool(probability and rng.random() < probability)
    if shuffled:
        for k in soft_tissues:
            hu[k] = rng.uniform(-30, 230)
        for k in fluids:
            hu[k] = rng.uniform(-20, 60)
        hu["fat"] = rng.uniform(-160, -40)
    return shuffled


# Renal tumor subtypes (share of resected renal masses: clear-cell about 65-75%, papillary 10-15%,
# chromophobe about 5%, plus oncocytoma, which images like chromophobe). Enhancement is drawn as
# the tumor's darkness against its own kidney, from the 39 real KiTS19 slices with kidney and tumor
# (DESIGN.md): the tumor is darker by a median 60 HU in 85% of slices, with a within-tumor spread of
# about 35 HU; clear-cell tumors enhance most and most unevenly (necrosis, cystic parts), papillary
# tumors least and evenly, chromophobe in between. Unenhanced, all are a little darker than the kidney.
TUMOR_SUBTYPES = {
    # name: (share, darker than kidney in HU (contrast phases) as (low, high), texture sd in HU)
    "clear_cell": (0.65, (15, 90), (22, 40)),
    "papillary": (0.2, (70, 120), (8, 15)),
    "chromophobe": (0.15, (35, 80), (10, 20)),
}


MIN_TUMOR_CONTRAST_HU = 30.0


def draw_tumor_look(rng, jitter: dict, phase: str) -> dict:
    """How one tumor looks: subtype, mean HU (relative to this case's kidney, so also under random
    contrast), texture spread and scale, necrotic/cystic core, pseudocapsule."""
    names = list(TUMOR_SUBTYPES)
    subtype = str(rng.choice(names, p=[TUMOR_SUBTYPES[n][0] for n in names]))
    _, (lo, hi), (sd_lo, sd_hi) = TUMOR_SUBTYPES[subtype]
    kidney = 0.6 * jitter["cortex"] + 0.4 * jitter["medulla"]
    if phase == "noncontrast":
        # unenhanced, a renal tumor is iso- to slightly hypodense: a truly isodense one is drawn
        # hypodense enough to be seen, since a label the image does not show teaches noise
        darker = rng.uniform(25, 45)
    elif subtype == "clear_cell" and rng.random() < (0.35 if phase == "arterial" else 0.1):
        darker = rng.uniform(-45, 0)  # a clear-cell tumor brighter than its kidney (arterial peak)
    else:
        darker = rng.uniform(lo, hi)
    # a drawn tumor must be visible: at least 30 HU from its kidney (twice the typical noise, and
    # its texture on top), however random the contrast (scripts/tumor_visibility.py measures it)
    if abs(darker) < MIN_TUMOR_CONTRAST_HU:
        darker = MIN_TUMOR_CONTRAST_HU * (1 if darker >= 0 else -1)
    core = {"clear_cell": 0.45, "papillary": 0.1, "chromophobe": 0.15}[subtype]
    return {
        "subtype": subtype,
        "hu": float(kidney - darker),
        "texture_sd": float(rng.uniform(sd_lo, sd_hi)),
        "texture_mm": float(rng.uniform(2.5, 6.0)),
        "core": str(rng.choice(["none", "necrotic", "cystic"], p=[1 - core, core * 0.7, core * 0.3])),
        "capsule_hu": float(rng.uniform(-35, -10)) if rng.random() < 0.5 else 0.0,
        "fluid_hu": float(jitter["fluid"] + rng.uniform(0, 15)),
    }


def tumor_texture(rng, rho: np.ndarray, spacing, look: dict) -> np.ndarray:
    """The HU of a tumor over its bounding box (``rho``: the blob's radius field, 1 at its edge):
    a smooth heterogeneous field, a darker rim (pseudocapsule), a fluid core."""
    sigma = [max(0.5, look["texture_mm"] / float(s)) for s in spacing]
    field = ndimage.gaussian_filter(rng.standard_normal(rho.shape).astype(np.float32), sigma, truncate=2.5)
    field *= look["texture_sd"] / max(float(field.std()), 1e-6)
    hu = look["hu"] + field
    if look["capsule_hu"]:
        hu = np.where((rho > 0.9) & (rho < 1.0), hu + look["capsule_hu"], hu)
    if look["core"] != "none":
        cut = rng.uniform(0.35, 0.65) if look["core"] == "necrotic" else rng.uniform(0.7, 0.88)
        # a necrotic core is irregular: its edge follows the texture field
        edge = rho + 0.08 * field / max(look["texture_sd"], 1e-6)
        fluid = look["fluid_hu"] + rng.normal(0, 6 if look["core"] == "necrotic" else 3, rho.shape)
        hu = np.where(edge < cut, fluid, hu)
    return hu.astype(np.float32)


def cyst_label(labels: str) -> int:
    """The label a simple cyst gets: kidney in KiTS19, its own class in KiTS21/23."""
    if labels not in LABEL_SETS:
        raise KidsegError(f"unknown label set {labels!r} (expected one of {', '.join(LABEL_SETS)})")
    return CYST if labels == "kits23" else KIDNEY
