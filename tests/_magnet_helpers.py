"""A small MagNet checkpoint for the CLI and dock tests: the real fast-preset network (EfficientNet-Lite0 FPN and
the paper's refinement module) with seeded random weights, windows of 128 px, crops read at full resolution."""
from __future__ import annotations

import torch

from napari_uhrseg.methods import magnet as mg
from napari_uhrseg.methods.base import save_checkpoint

CLASS_NAMES = ["unknown", "field", "forest"]


def write_magnet_checkpoint(path, window: int = 128, seed: int = 0):
    torch.manual_seed(seed)
    net = mg.build_net(len(CLASS_NAMES), "fast", pretrained=False).eval()
    meta = {"method": "magnet", "preset": "fast", "schedule": "deepglobe", "class_names": CLASS_NAMES,
            "normalisation": mg.normalisation_of(net), "input_ratio": 1.0, "window": window}
    return save_checkpoint(path, net.state_dict(), meta)
