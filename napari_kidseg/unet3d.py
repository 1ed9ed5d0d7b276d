"""A plain 3D U-Net for the coarse3d preset: the coarse stage on a whole downsampled volume.

segmentation-models-pytorch builds 2D networks only; this is the small 3D U-Net of the 3D-coarse
KiTS19 cascades (coarse 3D, then the 2D refine stage at full resolution): at each level two
3x3x3 convolutions with instance normalisation and leaky ReLU, strided convolutions down,
transposed convolutions up, skip connections. ``widths`` gives the channels per level; the input
size must be a multiple of 2 ** (levels - 1) in every axis (the cascade pads to it).
"""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.InstanceNorm3d(c_out, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
        nn.Conv3d(c_out, c_out, 3, padding=1, bias=False),
        nn.InstanceNorm3d(c_out, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class UNet3D(nn.Module):
    def __init__(self, in_channels: int = 1, classes: int = 3, widths=(16, 32, 64, 128)):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        self.down = nn.ModuleList(
            [_block(in_channels, widths[0])] + [_block(a, b, stride=2) for a, b in zip(widths, widths[1:])]
        )
        self.up = nn.ModuleList([nn.ConvTranspose3d(b, a, 2, stride=2) for a, b in zip(widths[:-1], widths[1:])][::-1])
        self.merge = nn.ModuleList([_block(2 * a, a) for a in widths[:-1]][::-1])
        self.head = nn.Conv3d(widths[0], classes, 1)

    @property
    def multiple(self) -> int:
        """Every input size must be a multiple of this."""
        return 2 ** (len(self.down) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, skips[-2::-1]):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)
