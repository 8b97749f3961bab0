"""Feature Pyramid Network (Lin et al. 2017b): 1x1 laterals, top-down nearest/bilinear upsample-and-add,
3x3 smoothing per level; plus ``merge_levels`` to fuse the pyramid into one map at the finest stride."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FPN(nn.Module):
    """Top-down feature pyramid.

    Parameters
    ----------
    in_channels_list : channels of the input maps, finest first (e.g. ``[256, 512, 1024, 2048]``).
    out_channels : channels of every output level.

    ``forward(features)`` takes the maps finest first and returns the smoothed maps, finest first, each at
    its input's resolution.
    """

    def __init__(self, in_channels_list, out_channels: int = 256):
        super().__init__()
        self.in_channels_list = list(in_channels_list)
        self.out_channels = out_channels
        self.laterals = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in self.in_channels_list)
        self.smooth = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1)
                                    for _ in self.in_channels_list)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.laterals):
            raise ValueError(f"FPN built for {len(self.laterals)} levels, got {len(features)}")
        top = self.laterals[-1](features[-1])
        outs = [self.smooth[-1](top)]
        for i in range(len(features) - 2, -1, -1):
            lat = self.laterals[i](features[i])
            top = lat + F.interpolate(top, size=lat.shape[-2:], mode="bilinear", align_corners=False)
            outs.insert(0, self.smooth[i](top))
        return outs


def merge_levels(levels: list[torch.Tensor]) -> torch.Tensor:
    """Sum of all pyramid levels, bilinearly upsampled to the finest one (a "semantic FPN" style merge)."""
    size = levels[0].shape[-2:]
    out = levels[0]
    for lvl in levels[1:]:
        out = out + F.interpolate(lvl, size=size, mode="bilinear", align_corners=False)
    return out
