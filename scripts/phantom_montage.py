"""A montage of phantoms built on real label maps next to the shared real CT, same window.

    python scripts/phantom_montage.py [-o docs/labelmap-phantoms.png] [--cases 6]

Axial slices through the kidneys (top) and coronal slices through them (bottom) of ``--cases``
phantoms, each around a different held-out FLARE 2022 map (seeds 9100+, one per phase in turn),
beside the real portal-venous CT of ../shared/data/realct/totalseg-abdomen-3mm. Soft-tissue
window (W400/L40); kidney outlines in green, tumor in yellow.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from napari_kidseg.io import readers, volumes  # noqa: E402
from napari_kidseg.layers import CT_WINDOW  # noqa: E402
from napari_kidseg.phantoms.labelmap import find_label_maps, make_labelmap_phantom, split_label_maps  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def views(ct: np.ndarray, labels: np.ndarray, spacing):
    zs = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(1))
    z = int(zs[len(zs) // 2]) if len(zs) else ct.shape[0] // 2
    ys = np.flatnonzero(labels.any(axis=(0, 2)))
    y = int(ys[len(ys) // 2]) if len(ys) else ct.shape[1] // 2
    return (ct[z], labels[z], spacing[1] / spacing[2]), (ct[:, y][::-1], labels[:, y][::-1], spacing[0] / spacing[2])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="docs/labelmap-phantoms.png")
    ap.add_argument("--cases", type=int, default=6)
    args = ap.parse_args(argv)
    _, held = split_label_maps(find_label_maps(SHARED / "flare22-labels"))
    real_ct = volumes.read_ct(SHARED / "realct" / "totalseg-abdomen-3mm" / "ct.nii.gz")
    real_lab = readers.read_labels(SHARED / "realct" / "totalseg-abdomen-3mm" / "kidneys.nii.gz", like=real_ct)
    panels = [("real CT (shared, portal venous, 3 mm)", real_ct.array, real_lab.array, real_ct.geometry.spacing)]
    for i in range(args.cases):
        case = make_labelmap_phantom(
            held[i % len(held)],
            9100 + i,
            matrix=512,
            max_slices=200,
            phase=("venous", "arterial", "noncontrast")[i % 3],
        )
        name = f"{case.info['label_map'].split('.')[0]}, {case.info['phase']}, seed {9100 + i}"
        panels.append((name, case.ct.array, case.labels, case.ct.geometry.spacing))
    fig, axes = plt.subplots(2, len(panels), figsize=(3.2 * len(panels), 6.8))
    for col, (name, ct, lab, sp) in enumerate(panels):
        for row, (img, lb, aspect) in enumerate(views(ct, lab, sp)):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], aspect=aspect)
            if (lb == 1).any():
                ax.contour(lb > 0, [0.5], colors="lime", linewidths=0.6)
            if (lb == 2).any():
                ax.contour(lb == 2, [0.5], colors="yellow", linewidths=0.6)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(name, fontsize=7)
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=70)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
